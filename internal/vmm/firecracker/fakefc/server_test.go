package fakefc

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/vmm/firecracker/fcspec"
)

var (
	specOnce sync.Once
	spec     *fcspec.Spec
	specSkip string
	specErr  error
)

func loadSpec(t testing.TB) *fcspec.Spec {
	t.Helper()
	specOnce.Do(func() {
		var p string
		p, specSkip, specErr = fcspec.Locate(context.Background())
		if specErr == nil && specSkip == "" {
			spec, specErr = fcspec.Load(p)
		}
	})
	if specErr != nil {
		t.Fatalf("firecracker API spec: %v", specErr)
	}
	if specSkip != "" {
		t.Skip(specSkip)
	}
	return spec
}

type fixture struct {
	t      *testing.T
	srv    *Server
	dir    string
	record string
	files  map[string]string
}

func newFixture(t *testing.T, fails string) *fixture {
	t.Helper()
	dir := t.TempDir()
	f := &fixture{t: t, dir: dir, record: filepath.Join(dir, "record.jsonl"), files: map[string]string{}}
	for _, n := range []string{"vmlinux", "initrd", "rootfs", "rw", "fc.log", "metrics"} {
		p := filepath.Join(dir, n)
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		f.files[n] = p
	}
	srv, err := NewServer(Options{Spec: loadSpec(t), ID: "test-vm", RecordPath: f.record, Failures: ParseFailures(fails)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	f.srv = srv
	return f
}

// do sends a request and returns the status and fault_message.
func (f *fixture) do(method, path string, body any) (int, string) {
	f.t.Helper()
	var b []byte
	switch v := body.(type) {
	case nil:
	case string:
		b = []byte(v)
	default:
		b, _ = json.Marshal(v)
	}
	req := httptest.NewRequest(method, path, bytes.NewReader(b))
	w := httptest.NewRecorder()
	f.srv.Handler().ServeHTTP(w, req)
	var fe struct {
		FaultMessage string `json:"fault_message"`
	}
	if w.Code == http.StatusBadRequest {
		if err := json.Unmarshal(w.Body.Bytes(), &fe); err != nil || fe.FaultMessage == "" {
			f.t.Errorf("400 without a fault_message: %q", w.Body.String())
		}
	}
	return w.Code, fe.FaultMessage
}

func (f *fixture) ok(method, path string, body any) {
	f.t.Helper()
	if code, fault := f.do(method, path, body); code/100 != 2 {
		f.t.Fatalf("%s %s: %d %s", method, path, code, fault)
	}
}

func (f *fixture) refused(method, path string, body any, want string) {
	f.t.Helper()
	code, fault := f.do(method, path, body)
	if code != http.StatusBadRequest || !strings.Contains(fault, want) {
		f.t.Fatalf("%s %s: %d %q, want 400 mentioning %q", method, path, code, fault, want)
	}
}

func (f *fixture) configure() {
	f.ok("PUT", "/logger", map[string]any{"log_path": f.files["fc.log"], "level": "Info"})
	f.ok("PUT", "/metrics", map[string]any{"metrics_path": f.files["metrics"]})
	f.ok("PUT", "/machine-config", map[string]any{"vcpu_count": 2, "mem_size_mib": 256})
	f.ok("PUT", "/boot-source", map[string]any{"kernel_image_path": f.files["vmlinux"], "initrd_path": f.files["initrd"], "boot_args": "console=ttyS0"})
	f.ok("PUT", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "path_on_host": f.files["rootfs"], "is_root_device": false, "is_read_only": true})
}

func (f *fixture) verdicts() []string {
	recs, err := ReadRecords(f.record)
	if err != nil {
		f.t.Fatal(err)
	}
	var out []string
	for _, r := range recs {
		if r.Kind == KindAPI {
			out = append(out, r.Verdict)
		}
	}
	return out
}

func TestHappyPathAndPostBootRules(t *testing.T) {
	f := newFixture(t, "")
	var info map[string]any
	f.configure()
	f.ok("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": filepath.Join(f.dir, "v.sock")})
	f.ok("PUT", "/actions", map[string]any{"action_type": "InstanceStart"})

	req := httptest.NewRequest("GET", "/", nil)
	w := httptest.NewRecorder()
	f.srv.Handler().ServeHTTP(w, req)
	if err := json.Unmarshal(w.Body.Bytes(), &info); err != nil || info["state"] != "Running" || info["id"] != "test-vm" {
		t.Fatalf("GET / = %s (%v)", w.Body.String(), err)
	}
	if p := loadSpec(t).CheckDefinition("InstanceInfo", w.Body.Bytes()); len(p) > 0 {
		t.Errorf("GET / answer breaks the spec: %v", p)
	}
	f.ok("GET", "/vm/config", nil)
	f.ok("GET", "/version", nil)
	f.ok("PATCH", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "path_on_host": f.files["rootfs"]})
	f.ok("PATCH", "/vm", map[string]any{"state": "Paused"})
	f.ok("PUT", "/actions", map[string]any{"action_type": "FlushMetrics"})

	f.refused("PUT", "/boot-source", map[string]any{"kernel_image_path": f.files["vmlinux"]}, "after starting")
	f.refused("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 128}, "after starting")
	f.refused("PUT", "/drives/rw", map[string]any{"drive_id": "rw", "path_on_host": f.files["rw"], "is_root_device": false, "is_read_only": false}, "after starting")
	f.refused("PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": "tap0"}, "after starting")
	f.refused("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": "/x"}, "after starting")
	f.refused("PUT", "/actions", map[string]any{"action_type": "InstanceStart"}, "after starting")

	f.ok("PUT", "/actions", map[string]any{"action_type": "SendCtrlAltDel"})
	if code := <-f.srv.Exit(); code != 0 {
		t.Errorf("exit code after Ctrl-Alt-Del = %d", code)
	}
	want := []string{"ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok",
		"violation", "violation", "violation", "violation", "violation", "violation", "ok"}
	if got := f.verdicts(); !reflect.DeepEqual(got, want) {
		t.Errorf("verdicts\n got %q\nwant %q", got, want)
	}
}

func TestPreBootRules(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(f *fixture)
		req   [3]any // method, path, body
		want  string
	}{
		{"start without boot source", func(f *fixture) {
			f.ok("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 128})
		}, [3]any{"PUT", "/actions", map[string]any{"action_type": "InstanceStart"}}, "without kernel configuration"},
		{"start without machine config", func(f *fixture) {
			f.ok("PUT", "/boot-source", map[string]any{"kernel_image_path": f.files["vmlinux"]})
		}, [3]any{"PUT", "/actions", map[string]any{"action_type": "InstanceStart"}}, "machine-config"},
		{"ctrl-alt-del before start", nil, [3]any{"PUT", "/actions", map[string]any{"action_type": "SendCtrlAltDel"}}, "before starting"},
		{"flush without metrics", nil, [3]any{"PUT", "/actions", map[string]any{"action_type": "FlushMetrics"}}, "not initialized"},
		{"post-boot only before start", nil, [3]any{"PATCH", "/drives/rootfs", map[string]any{"drive_id": "rootfs"}}, "before starting"},
		{"pause before start", nil, [3]any{"PATCH", "/vm", map[string]any{"state": "Paused"}}, "before starting"},
		{"logger twice", func(f *fixture) {
			f.ok("PUT", "/logger", map[string]any{"log_path": f.files["fc.log"]})
		}, [3]any{"PUT", "/logger", map[string]any{"level": "Debug"}}, "only be configured once"},
		{"metrics twice", func(f *fixture) {
			f.ok("PUT", "/metrics", map[string]any{"metrics_path": f.files["metrics"]})
		}, [3]any{"PUT", "/metrics", map[string]any{"metrics_path": "/m"}}, "Reinitialization"},
		{"log file must exist", nil, [3]any{"PUT", "/logger", map[string]any{"log_path": "/nonexistent/fc.log"}}, "Cannot open log_path"},
		{"kernel must exist", nil, [3]any{"PUT", "/boot-source", map[string]any{"kernel_image_path": "/nonexistent"}}, "Cannot open kernel_image_path"},
		{"drive must exist", nil, [3]any{"PUT", "/drives/d", map[string]any{"drive_id": "d", "path_on_host": "/nonexistent", "is_root_device": false, "is_read_only": true}}, "Cannot open path_on_host"},
		{"virtio-block needs is_read_only", nil, [3]any{"PUT", "/drives/d", map[string]any{"drive_id": "d", "path_on_host": "/x", "is_root_device": false}}, "is_read_only is required"},
		{"path and body ids differ", nil, [3]any{"PUT", "/drives/a", map[string]any{"drive_id": "b", "path_on_host": "/x", "is_root_device": false, "is_read_only": true}}, "does not match"},
		{"two root devices", func(f *fixture) {
			f.ok("PUT", "/drives/a", map[string]any{"drive_id": "a", "path_on_host": f.files["rootfs"], "is_root_device": true, "is_read_only": true})
		}, [3]any{"PUT", "/drives/b", map[string]any{"drive_id": "b", "path_on_host": "@rw", "is_root_device": true, "is_read_only": true}}, "root block device already exists"},
		{"root device with initrd", func(f *fixture) {
			f.ok("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 128})
			f.ok("PUT", "/boot-source", map[string]any{"kernel_image_path": f.files["vmlinux"], "initrd_path": f.files["initrd"]})
			f.ok("PUT", "/drives/a", map[string]any{"drive_id": "a", "path_on_host": f.files["rootfs"], "is_root_device": true, "is_read_only": true})
		}, [3]any{"PUT", "/actions", map[string]any{"action_type": "InstanceStart"}}, "initrd"},
		{"vsock socket exists", func(f *fixture) {}, [3]any{"PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": "@rw"}}, "Address in use"},
		{"vsock path too long", nil, [3]any{"PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": "/" + strings.Repeat("v", 120)}}, "longer than"},
		{"bad mac", nil, [3]any{"PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac"}}, "Invalid MAC"},
		{"bad tap", nil, [3]any{"PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": "tap-name-much-too-long"}}, "invalid interface name"},
		{"smt with odd vcpus", nil, [3]any{"PUT", "/machine-config", map[string]any{"vcpu_count": 3, "mem_size_mib": 128, "smt": true}}, "vCPU number is invalid"},
		{"snapshot load after config", func(f *fixture) {
			f.ok("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 128})
		}, [3]any{"PUT", "/snapshot/load", map[string]any{"snapshot_path": "/s"}}, "not allowed after configuring"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, "")
			if tc.setup != nil {
				tc.setup(f)
			}
			// "@name" stands for the fixture file name.
			body := map[string]any{}
			for k, v := range tc.req[2].(map[string]any) {
				if s, ok := v.(string); ok && strings.HasPrefix(s, "@") {
					v = f.files[s[1:]]
				}
				body[k] = v
			}
			f.refused(tc.req[0].(string), tc.req[1].(string), body, tc.want)
			v := f.verdicts()
			if len(v) == 0 || v[len(v)-1] != VerdictViolation {
				t.Errorf("last verdict %q, want violation", v)
			}
		})
	}
}

func TestInjectedFailuresAndUnsimulated(t *testing.T) {
	f := newFixture(t, "boot-source:Invalid kernel;drives:disk trouble;SendCtrlAltDel:no keyboard")
	f.refused("PUT", "/boot-source", map[string]any{"kernel_image_path": f.files["vmlinux"]}, "Invalid kernel")
	f.refused("PUT", "/drives/x", map[string]any{"drive_id": "x", "path_on_host": f.files["rw"], "is_root_device": false, "is_read_only": true}, "disk trouble")
	f.refused("PUT", "/actions", map[string]any{"action_type": "SendCtrlAltDel"}, "no keyboard")
	f.refused("GET", "/balloon", nil, "not simulated")
	// A spec violation is a violation even where a failure is injected.
	f.refused("PUT", "/boot-source", map[string]any{"kernel": "x"}, "unknown field")
	want := []string{VerdictInjected, VerdictInjected, VerdictInjected, VerdictUnsimulated, VerdictViolation}
	if got := f.verdicts(); !reflect.DeepEqual(got, want) {
		t.Errorf("verdicts %q, want %q", got, want)
	}
}

func TestParseFailures(t *testing.T) {
	got := ParseFailures(" boot-source:Invalid: kernel ; crash-after-start;;InstanceStart:KVM error")
	want := []Failure{{"boot-source", "Invalid: kernel"}, {"crash-after-start", ""}, {"InstanceStart", "KVM error"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseFailures = %#v, want %#v", got, want)
	}
}

func TestMainCommandLine(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	var out, errb bytes.Buffer
	if code := Main([]string{"firecracker", "--version"}, env(nil), &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "Firecracker v"+Version) {
		t.Errorf("--version: %d %q", code, out.String())
	}
	for _, args := range [][]string{
		{"firecracker", "--config-file", "/x.json"},
		{"firecracker", "--bogus"},
		{"firecracker", "--id", "bad/id", "--api-sock", "/tmp/x"},
		{"firecracker", "extra-arg"},
	} {
		errb.Reset()
		if code := Main(args, env(nil), &out, &errb); code == 0 {
			t.Errorf("%q accepted", args)
		}
	}
	// An existing API socket path stops Firecracker at launch.
	dir := t.TempDir()
	existing := filepath.Join(dir, "fc.sock")
	if err := os.WriteFile(existing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	errb.Reset()
	loadSpec(t) // skips when the spec is absent
	specPath, _, _ := fcspec.Locate(context.Background())
	if code := Main([]string{"firecracker", "--api-sock", existing, "--id", "x"}, env(map[string]string{EnvSpec: specPath}), &out, &errb); code != 1 || !strings.Contains(errb.String(), "Address in use") {
		t.Errorf("existing socket: %d %q", code, errb.String())
	}
	if code := Main([]string{"firecracker", "--api-sock", filepath.Join(dir, "a.sock")}, env(nil), &out, &errb); code != 2 {
		t.Errorf("no spec: exit %d, want 2", code)
	}
	// The jailer validates its arguments.
	for _, args := range [][]string{
		{"/usr/bin/jailer", "--id", "x", "--uid", "0", "--gid", "0"},                      // no exec file
		{"jailer", "--id", "a/b", "--exec-file", "/bin/true", "--uid", "0", "--gid", "0"}, // bad id
		{"jailer", "--id", "x", "--exec-file", "/bin/true"},                               // no uid/gid
		{"jailer", "--id", "x", "--exec-file", "/bin/true", "--uid", "0", "--gid", "0", "--daemonize"},
		{"jailer", "--id", "x", "--exec-file", "/bin/true", "--uid", "0", "--gid", "0", "--chroot-base-dir", "rel"},
	} {
		errb.Reset()
		if code := Main(args, env(nil), &out, &errb); code == 0 {
			t.Errorf("jailer %q accepted", args)
		}
	}
}

func FuzzServer(f *testing.F) {
	for _, s := range []struct{ m, p, b string }{
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`},
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":1,"huge_pages":"2M"}`},
		{"PUT", "/drives/a", `{"drive_id":"a","is_root_device":true,"socket":"/s"}`},
		{"PATCH", "/machine-config", `{"smt":true}`},
		{"PUT", "/network-interfaces/e", `{"iface_id":"e","host_dev_name":"t","guest_mac":"zz"}`},
		{"GET", "/vm/config", ``},
	} {
		f.Add(s.m, s.p, s.b)
	}
	sp := loadSpec(f)
	// Every path in a request resolves inside this directory (the simulated
	// chroot), so fuzzed bodies cannot make the fake write host files.
	root, err := os.MkdirTemp("", "fakefc-fuzz-")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { os.RemoveAll(root) })
	f.Fuzz(func(t *testing.T, method, path, body string) {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \r\n\t#%") || !validMethod(method) {
			return
		}
		srv, err := NewServer(Options{Spec: sp, ID: "fuzz", Root: root})
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		req, err := http.NewRequest(method, "http://localhost"+path, strings.NewReader(body))
		if err != nil {
			return
		}
		w := httptest.NewRecorder()
		srv.Handler().ServeHTTP(w, req)
		if w.Code != 200 && w.Code != 204 && w.Code != 400 {
			t.Fatalf("%s %s: status %d", method, path, w.Code)
		}
	})
}

func validMethod(m string) bool {
	switch m {
	case "GET", "PUT", "PATCH", "POST", "DELETE":
		return true
	}
	return false
}
