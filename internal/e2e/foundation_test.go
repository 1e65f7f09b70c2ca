package e2e

import (
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

var opIDRe = regexp.MustCompile(`^op-[0-9a-f]{6,}$`)

func dialUnix(sock string) (net.Conn, error) { return net.Dial("unix", sock) }

func errorOf(t *testing.T, m map[string]any) (code, op string) {
	t.Helper()
	e, ok := m["error"].(map[string]any)
	if !ok {
		t.Fatalf("expected an error response, got %v", m)
	}
	code, _ = e["code"].(string)
	op, _ = e["op_id"].(string)
	return
}

func TestDaemonWireProtocol(t *testing.T) {
	h := home(t)
	d := startDaemon(t, h)
	sock := filepath.Join(h, "run", "bangerd.sock")

	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want 0600", st.Mode().Perm())
	}

	resps := rawCall(t, sock,
		`{"version":99,"method":"system.ping"}`,
		`{"version":1,"method":"nope"}`,
		`}}garbage{{`,
		`{"version":1,"method":"system.ping","op_id":"op-c0ffee42"}`,
		`{"version":1,"method":"vm.get","params":{"vm":"ghost"},"op_id":"op-deadbeef77"}`,
	)
	for i, want := range []string{"bad_version", "unknown_method", "bad_request"} {
		code, op := errorOf(t, resps[i])
		if code != want || !opIDRe.MatchString(op) {
			t.Fatalf("response %d: code %q op %q, want %q with an op id", i, code, op, want)
		}
	}
	if resps[3]["result"] != "pong" || resps[3]["op_id"] != "op-c0ffee42" {
		t.Fatalf("ping: %v", resps[3])
	}
	if code, op := errorOf(t, resps[4]); code != "not_found" || op != "op-deadbeef77" {
		t.Fatalf("vm.get ghost: %v", resps[4])
	}
	// the supplied op ids appear in bangerd's log records for those requests
	testenv.WaitFor(t, 10*time.Second, "op ids in the daemon log", func() bool {
		var ping, get bool
		for _, line := range strings.Split(d.logs.String(), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) != nil {
				continue
			}
			ping = ping || (rec["op_id"] == "op-c0ffee42" && rec["method"] == "system.ping")
			get = get || (rec["op_id"] == "op-deadbeef77" && rec["method"] == "vm.get")
		}
		return ping && get
	})

	// info
	resps = rawCall(t, sock, `{"version":1,"method":"system.info"}`)
	info, _ := resps[0]["result"].(map[string]any)
	if info == nil || int(info["pid"].(float64)) != d.cmd.Process.Pid || info["home"] != h {
		t.Fatalf("system.info: %v", resps[0])
	}
}

func TestSecondDaemonRefused(t *testing.T) {
	h := home(t)
	d := startDaemon(t, h)
	cmd := exec.Command(filepath.Join(bins(t), "bangerd"))
	cmd.Env = append(os.Environ(), "BANGER_HOME="+h)
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("second bangerd exited 0: %s", out)
	}
	if !strings.Contains(string(out), "already running") || !strings.Contains(string(out), "pid ") {
		t.Fatalf("second bangerd message unclear: %s", out)
	}
	// the first one still serves
	resps := rawCall(t, filepath.Join(h, "run", "bangerd.sock"), `{"version":1,"method":"system.ping"}`)
	if resps[0]["result"] != "pong" {
		t.Fatalf("first daemon broken after second start: %v", resps[0])
	}
	_ = d
}

func TestCLIStartsDaemonAndListsEmpty(t *testing.T) {
	h := home(t)
	out, errOut, code := banger(t, h, "vm", "ls", "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var v any
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("stdout is not JSON: %q", out)
	}
	if arr, ok := v.([]any); !ok || len(arr) != 0 {
		t.Fatalf("want [], got %s", out)
	}
	if strings.TrimSpace(out) != "[]" {
		t.Fatalf("stdout has more than the JSON document: %q", out)
	}
	// stop the daemon the CLI started (by the PID it recorded in its lock file)
	t.Cleanup(func() { stopDaemonByLock(t, h) })

	// errors: exit 1 with op id; usage: exit 2
	_, errOut, code = banger(t, h, "vm", "show", "ghost")
	if code != 1 || !regexp.MustCompile(`^error: vm "ghost" not found \(op-[0-9a-f]{6,}\)\n$`).MatchString(errOut) {
		t.Fatalf("show ghost: exit %d, stderr %q", code, errOut)
	}
	_, errOut, code = banger(t, h, "vm", "show")
	if code != 2 || !strings.HasPrefix(errOut, "error: ") {
		t.Fatalf("usage error: exit %d, stderr %q", code, errOut)
	}
	_, _, code = banger(t, h, "vm", "ls", "--bogus")
	if code != 2 {
		t.Fatalf("unknown flag: exit %d", code)
	}
	out, _, code = banger(t, h, "completion", "bash")
	if code != 0 || !strings.Contains(out, "banger") {
		t.Fatalf("completion: exit %d", code)
	}
}

func stopDaemonByLock(t *testing.T, h string) {
	b, err := os.ReadFile(filepath.Join(h, "run", "bangerd.lock"))
	if err != nil {
		return
	}
	var pid int
	for _, c := range strings.TrimSpace(string(b)) {
		pid = pid*10 + int(c-'0')
	}
	if pid <= 0 {
		return
	}
	syscall.Kill(pid, syscall.SIGTERM)
	testenv.WaitFor(t, 20*time.Second, "bangerd to exit", func() bool { return syscall.Kill(pid, 0) != nil })
}
