package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/sshd"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/testenv/conntest"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc/fakefctest"
)

// These tests drive bangerd with the fake firecracker (no guest CPU cost)
// and a pretend guest that serves the real agent SSH server for many VMs at
// once: the fake prefixes each forwarded vsock stream with the VM's boot
// config path (FAKEFC_VSOCK_PREAMBLE), so one listener knows which VM a
// connection is for.

// multiGuest is the pretend guest of every VM behind the fake firecracker.
type multiGuest struct {
	t      *testing.T
	sock   string
	passwd string
	mu     sync.Mutex
	mute   map[string]bool // VM names whose agent never answers
}

func startMultiGuest(t *testing.T) *multiGuest {
	t.Helper()
	dir, err := os.MkdirTemp("", "bg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	g := &multiGuest{t: t, sock: filepath.Join(dir, "guest.sock"), passwd: filepath.Join(dir, "passwd"), mute: map[string]bool{}}
	os.WriteFile(g.passwd, []byte("root:x:0:0:root:/tmp:/bin/sh\n"), 0o644)
	ln, err := net.Listen("unix", g.sock)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(g.sock, 0o777) // a bangerd running as nobody starts the fake VMMs
	ctx, cancel := context.WithCancel(context.Background())
	conntest.ServeEach(t, ln, func(c net.Conn) {
		defer c.Close()
		g.serveConn(ctx, c)
	})
	t.Cleanup(cancel) // runs before ServeEach's wait
	return g
}

func (g *multiGuest) setMute(name string, on bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.mute[name] = on
}

type bufConn struct {
	net.Conn
	r io.Reader
}

func (b *bufConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func (g *multiGuest) serveConn(ctx context.Context, c net.Conn) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		g.t.Logf("pretend guest: read the preamble: %v", err)
		return
	}
	c.SetReadDeadline(time.Time{})
	p, ok := strings.CutPrefix(strings.TrimSpace(line), "FAKEFC bootcfg=")
	if !ok || p == "" {
		g.t.Logf("pretend guest: bad preamble %q", line)
		return
	}
	f, err := os.Open(p)
	if err != nil {
		g.t.Logf("pretend guest: %v", err)
		return
	}
	cfg, err := bootcfg.Decode(f)
	f.Close()
	if err != nil {
		g.t.Logf("pretend guest: boot config: %v", err)
		return
	}
	g.mu.Lock()
	mute := g.mute[cfg.Hostname]
	g.mu.Unlock()
	if mute {
		<-ctx.Done() // an agent that never answers
		return
	}
	hk, err := ssh.ParsePrivateKey([]byte(cfg.HostKey))
	if err != nil {
		return
	}
	keys, err := sshd.ParseAuthorizedKeys(cfg.AuthorizedKeys)
	if err != nil {
		return
	}
	vmDir := filepath.Dir(p)
	srv, err := sshd.New(sshd.Config{HostKey: hk, AuthorizedKeys: keys, PasswdFile: g.passwd, Logger: logging.Discard(),
		OnShutdown: func() {
			var h struct{ PID int }
			if b, err := os.ReadFile(filepath.Join(vmDir, "handles.json")); err == nil && json.Unmarshal(b, &h) == nil && h.PID > 0 {
				syscall.Kill(h.PID, syscall.SIGTERM)
			}
		}})
	if err != nil {
		return
	}
	srv.ServeConn(ctx, &bufConn{c, br})
}

// fcRig is the fake firecracker, the pretend guest and a kernel and image
// to import, for bangerd processes of any number of homes.
type fcRig struct {
	fc     *fakefctest.Env
	g      *multiGuest
	env    []string
	kernel string
	rootfs string
}

func newFCRig(t *testing.T) *fcRig {
	t.Helper()
	fc := fakefctest.Setup(t)
	fc.AllowViolations() // bangerd is SIGKILLed mid-request in some tests
	t.Setenv(fakefc.EnvMaxLifetime, "30m")
	// a bangerd running as nobody must reach the fake's binary, spec and record
	for _, p := range []string{filepath.Dir(fc.Binary), filepath.Dir(filepath.Dir(fc.Binary)), filepath.Dir(fc.Record)} {
		os.Chmod(p, 0o755)
	}
	os.WriteFile(fc.Record, nil, 0o666)
	os.Chmod(fc.Record, 0o666)
	os.Chmod(fc.Spec, 0o644)
	k := testenv.GuestKernel(t)
	r := &fcRig{fc: fc, g: startMultiGuest(t), kernel: k.VmlinuxPath, rootfs: testenv.BusyboxRootfs(t, 64)}
	r.env = []string{"PATH=" + filepath.Dir(fc.Binary) + ":" + os.Getenv("PATH"),
		fakefc.EnvVsockForward + "=" + r.g.sock, fakefc.EnvVsockPreamble + "=1", "BANGER_VMM=firecracker"}
	return r
}

// home is a fresh home whose config lets the fake firecracker run where
// /dev/kvm is missing or not the user's (it needs no KVM); extra is more
// JSON members for config.json.
func (r *fcRig) home(t *testing.T, extra string) string {
	t.Helper()
	h := home(t)
	writeFakeFCConfig(t, h, extra)
	return h
}

func writeFakeFCConfig(t *testing.T, h, extra string) {
	t.Helper()
	cfg := `{"firecracker_kvm_device": "/dev/null"`
	if extra != "" {
		cfg += ", " + extra
	}
	if err := os.WriteFile(filepath.Join(h, "config.json"), []byte(cfg+"}"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// importArtifacts imports the kernel and the image into home h.
func (r *fcRig) importArtifacts(t *testing.T, h string) {
	t.Helper()
	mustBanger(t, h, "kernel", "import", r.kernel, "--name", "plain")
	mustBanger(t, h, "image", "import", r.rootfs, "--name", "busybox")
}

// faultBin builds bangerd with the faultinject tag (once), next to a copy of
// the agent, and returns its path.
var (
	faultOnce sync.Once
	faultPath string
	faultErr  error
)

func faultBangerd(t *testing.T) string {
	t.Helper()
	dir := bins(t)
	faultOnce.Do(func() {
		fdir := filepath.Join(dir, "faultinject")
		if faultErr = os.MkdirAll(fdir, 0o755); faultErr != nil {
			return
		}
		if faultErr = goBuild(t, fdir, nil, "-tags", "faultinject", "./cmd/bangerd"); faultErr != nil {
			return
		}
		b, err := os.ReadFile(filepath.Join(dir, "banger-agent"))
		if err == nil {
			err = os.WriteFile(filepath.Join(fdir, "banger-agent"), b, 0o755)
		}
		faultErr = err
		faultPath = filepath.Join(fdir, "bangerd")
	})
	if faultErr != nil {
		t.Fatalf("build bangerd with faultinject: %v", faultErr)
	}
	return faultPath
}

// startFaultDaemon runs the faultinject bangerd, killing itself at point
// (none when empty), through the same harness as startDaemon.
func startFaultDaemon(t *testing.T, h, point string, env []string) *daemonProc {
	t.Helper()
	bin := faultBangerd(t)
	return startDaemonWith(t, h, func(c *exec.Cmd) { c.Path, c.Args[0] = bin, bin },
		append([]string{"BANGER_FAULT=" + point}, env...)...)
}

// vmmProcs returns this home's VMM processes by VM id, found by their
// command line (fake firecracker or qemu naming a path under h/vms/).
func vmmProcs(h string) map[string][]int {
	re := regexp.MustCompile(regexp.QuoteMeta(h+"/vms/") + `([A-Za-z0-9_.-]+)/`)
	out := map[string][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		argv := strings.Split(string(b), "\x00")
		base := filepath.Base(argv[0])
		if base != "firecracker" && !strings.HasPrefix(base, "qemu-system") {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if i := bytes.LastIndexByte(st, ')'); i > 0 && len(st) > i+2 && st[i+2] == 'Z' {
				continue // a zombie is not running
			}
		}
		if m := re.FindSubmatch(b); m != nil {
			out[string(m[1])] = append(out[string(m[1])], pid)
		}
	}
	return out
}

type recVM struct {
	ID, Name, State string
}

// recordsFromDB reads the VM records while no bangerd runs.
func recordsFromDB(t *testing.T, h string) []recVM {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(h, "banger.db"))
	if err != nil {
		t.Fatalf("open the store: %v", err)
	}
	defer st.Close()
	vms, err := st.ListVMs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []recVM
	for _, v := range vms {
		out = append(out, recVM{v.ID, v.Name, v.State})
	}
	return out
}

func recordsFromCLI(t *testing.T, h string) []recVM {
	t.Helper()
	var vms []recVM
	if err := json.Unmarshal([]byte(mustBanger(t, h, "vm", "list", "-o", "json")), &vms); err != nil {
		t.Fatal(err)
	}
	return vms
}

// leaks counts what does not match the truth: a VMM whose record is missing
// or not running, a running record without a VMM, a record left half-way
// (creating, starting, stopping), a VM directory with no record and a
// temporary file in the writable disk cache (a spare's refill cut short).
func leaks(h string, recs []recVM) (n int, what []string) {
	tmps, _ := filepath.Glob(filepath.Join(h, "cache", "rwdisk", "*.tmp"))
	for _, p := range tmps {
		n++
		what = append(what, "cache/rwdisk/"+filepath.Base(p))
	}
	procs := vmmProcs(h)
	byID := map[string]recVM{}
	for _, r := range recs {
		byID[r.ID] = r
	}
	for id, pids := range procs {
		if r, ok := byID[id]; !ok || r.State != "running" {
			n += len(pids)
			what = append(what, fmt.Sprintf("VMM %v of %s (record %q)", pids, id, r.State))
		}
	}
	for _, r := range recs {
		switch r.State {
		case "running":
			if len(procs[r.ID]) == 0 {
				n++
				what = append(what, r.Name+" running without a VMM")
			}
		case "stopped":
		default:
			n++
			what = append(what, r.Name+" left "+r.State)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(h, "vms"))
	for _, e := range ents {
		if _, ok := byID[e.Name()]; !ok {
			n++
			what = append(what, "directory vms/"+e.Name()+" without a record")
		}
	}
	return n, what
}

// mountsUnder returns the mount points under dir.
func mountsIn(dir string) []string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			out = append(out, f[4])
		}
	}
	return out
}

// checkConverged checks the acceptance of a restarted bangerd: every
// running record answers exec, no stopped record has a VMM, and deleting
// everything leaves no process, mount or file under the home.
func checkConverged(t *testing.T, h string) {
	t.Helper()
	procs := vmmProcs(h)
	for _, v := range recordsFromCLI(t, h) {
		switch v.State {
		case "running":
			if out, errOut, code := banger(t, h, "exec", v.Name, "--", "echo", "alive"); code != 0 || strings.TrimSpace(out) != "alive" {
				t.Errorf("running %s does not answer exec: %d %q %s", v.Name, code, out, errOut)
			}
		case "stopped":
			if len(procs[v.ID]) > 0 {
				t.Errorf("stopped %s still has VMM %v", v.Name, procs[v.ID])
			}
		}
	}
	for _, v := range recordsFromCLI(t, h) {
		mustBanger(t, h, "vm", "delete", "--force", v.Name)
	}
	testenv.WaitFor(t, 10*time.Second, "no VMM of the home", func() bool { return len(vmmProcs(h)) == 0 })
	if m := mountsIn(h); len(m) > 0 {
		t.Errorf("mounts left under the home: %v", m)
	}
	if ents, _ := os.ReadDir(filepath.Join(h, "vms")); len(ents) > 0 {
		t.Errorf("files left under vms/: %v", ents)
	}
}

// faultRow is one line of the fault-injection table.
type faultRow struct {
	point                   string
	injected, before, after int
}

// TestFaultInjectionConverges kills bangerd (SIGKILL, faultinject build) at
// each named point of create, start, stop and delete, restarts it and
// checks that it converges.
func TestFaultInjectionConverges(t *testing.T) {
	rig := newFCRig(t)
	rounds := 2
	if v, err := strconv.Atoi(os.Getenv("BANGER_FAULT_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	points := []string{"after-record", "after-spawn", "before-handles", "agent-wait", "start", "stop", "delete",
		"disk-refill-temp", "disk-refill-written"}
	var rows []faultRow
	for _, point := range points {
		row := faultRow{point: point}
		for round := 0; round < rounds; round++ {
			t.Run(fmt.Sprintf("%s/%d", point, round), func(t *testing.T) {
				h := rig.home(t, "")
				d := startFaultDaemon(t, h, "", rig.env)
				rig.importArtifacts(t, h)
				mustBanger(t, h, "vm", "create", "base", "--memory", "128M", "--disk", "64M")
				if point == "start" {
					mustBanger(t, h, "vm", "stop", "base", "--timeout", "10s")
				}
				d.stop(t)
				d = startFaultDaemon(t, h, point, rig.env)
				switch point {
				case "start":
					banger(t, h, "vm", "start", "base")
				case "stop":
					banger(t, h, "vm", "stop", "base", "--timeout", "10s")
				case "delete":
					banger(t, h, "vm", "delete", "--force", "base")
				default:
					banger(t, h, "vm", "create", "v1", "--memory", "128M", "--disk", "64M")
				}
				select {
				case <-d.done:
				case <-time.After(30 * time.Second):
					t.Fatalf("bangerd did not die at %s: %s", point, d.logs.String())
				}
				if strings.Contains(d.logs.String(), "fault injected at "+point) {
					row.injected++
				}
				nb, what := leaks(h, recordsFromDB(t, h))
				row.before += nb
				t.Logf("%s: before restart %d: %v", point, nb, what)
				startFaultDaemon(t, h, "", rig.env)
				na, what := leaks(h, recordsFromCLI(t, h))
				row.after += na
				if na != 0 {
					t.Errorf("%s: after restart %d left: %v", point, na, what)
				}
				checkConverged(t, h)
			})
		}
		rows = append(rows, row)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n| point | times injected | leaks before restart | leaks after restart |\n|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %d | %d | %d |\n", r.point, r.injected, r.before, r.after)
	}
	t.Log(b.String())
	if p := os.Getenv("BANGER_FAULT_TABLE"); p != "" {
		os.WriteFile(p, []byte(b.String()), 0o644)
	}
}

// bangerCtx runs the CLI with a deadline and returns its output and status
// (-1 when it did not finish in time).
func bangerCtx(t *testing.T, h string, d time.Duration, args ...string) (string, int) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bins(t), "banger"), args...)
	cmd.Env = append(os.Environ(), "BANGER_HOME="+h)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), -1
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	}
	return string(out), 0
}

// 20 concurrent mixed operations on one VM and 8 concurrent creates all get
// an answer (no deadlock) and leave bangerd consistent.
func TestConcurrentOpsNoDeadlock(t *testing.T) {
	rig := newFCRig(t)
	h := rig.home(t, "")
	startDaemon(t, h, rig.env...)
	rig.importArtifacts(t, h)
	mustBanger(t, h, "vm", "create", "one", "--memory", "128M", "--disk", "64M")
	ops := [][]string{
		{"vm", "start", "one"}, {"vm", "stop", "one", "--timeout", "5s"}, {"vm", "set", "one", "--cpus", "2"},
		{"exec", "one", "--", "true"}, {"vm", "restart", "one", "--timeout", "5s"},
	}
	var wg sync.WaitGroup
	type res struct {
		args []string
		out  string
		code int
	}
	results := make([]res, 20)
	for i := range results {
		args := ops[i%len(ops)]
		if i == 17 {
			args = []string{"vm", "delete", "--force", "one"}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, code := bangerCtx(t, h, 3*time.Minute, args...)
			results[i] = res{args, out, code}
		}()
	}
	wg.Wait()
	for _, r := range results {
		if r.code == -1 {
			t.Errorf("%v got no answer within 3 minutes (deadlock?)", r.args)
		}
		if strings.Contains(r.out, "internal") {
			t.Errorf("%v: internal error: %s", r.args, r.out)
		}
	}
	if n, what := leaks(h, recordsFromCLI(t, h)); n != 0 {
		t.Errorf("after the mixed operations: %v", what)
	}
	// 8 creates at once
	codes := make([]int, 8)
	outs := make([]string, 8)
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], codes[i] = bangerCtx(t, h, 3*time.Minute, "vm", "create", fmt.Sprintf("c%d", i), "--memory", "128M", "--disk", "64M")
		}()
	}
	wg.Wait()
	for i, c := range codes {
		if c != 0 {
			t.Errorf("create c%d: exit %d: %s", i, c, outs[i])
		}
	}
	for i := range codes {
		if out := mustBanger(t, h, "exec", fmt.Sprintf("c%d", i), "--", "echo", "ok"); strings.TrimSpace(out) != "ok" {
			t.Errorf("exec c%d: %q", i, out)
		}
	}
	checkConverged(t, h)
}

// startDaemonDefaultLevel runs bangerd at its default log level (no --debug).
func startDaemonDefaultLevel(t *testing.T, h string, env ...string) *daemonProc {
	t.Helper()
	return startDaemonWith(t, h, func(cmd *exec.Cmd) {
		cmd.Args = []string{cmd.Args[0]}
		cmd.Env = append(cmd.Env, "BANGER_DEBUG=")
	}, env...)
}

// Ctrl-C during a create (after boot) cancels and undoes it within 5 s;
// Ctrl-C during `exec -- sleep` ends the guest process; the events stream
// and the default-level log carry the op id of a successful stop; a create
// failing at the agent wait leaves nothing, and a start failing there
// leaves a VM that deletes without --force.
func TestInterruptsEventsAndOpIDs(t *testing.T) {
	rig := newFCRig(t)
	h := rig.home(t, `"boot_timeout": "10s"`) // long enough that Ctrl-C lands during the agent wait on a loaded machine
	d := startDaemonDefaultLevel(t, h, rig.env...)
	rig.importArtifacts(t, h)

	// Ctrl-C after boot: cancelled and undone
	rig.g.setMute("slow", true)
	cmd := exec.Command(filepath.Join(bins(t), "banger"), "vm", "create", "slow", "--memory", "128M", "--disk", "64M")
	cmd.Env = append(os.Environ(), "BANGER_HOME="+h)
	stderr := &lockedBuf{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cliDone := make(chan struct{})
	go func() { cmd.Wait(); close(cliDone) }()
	testenv.WaitFor(t, 30*time.Second, "the boot stage", func() bool { return strings.Contains(stderr.String(), "boot") })
	cmd.Process.Signal(os.Interrupt)
	t0 := time.Now()
	testenv.WaitFor(t, 5*time.Second, "the cancelled create to leave no VM and no VMM", func() bool {
		return len(recordsFromCLI(t, h)) == 0 && len(vmmProcs(h)) == 0
	})
	t.Logf("Ctrl-C during create: nothing left after %v", time.Since(t0).Round(time.Millisecond))
	select {
	case <-cliDone:
	case <-time.After(10 * time.Second):
		t.Fatalf("the CLI did not exit after Ctrl-C: %s", stderr.String())
	}
	if !strings.Contains(stderr.String(), "cancel") {
		t.Errorf("the CLI did not say it cancelled: %s", stderr.String())
	}

	// an image pull begun with --no-wait, held up by its registry, is
	// cancelled with banger op cancel and leaves no work directory
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		<-r.Context().Done()
	}))
	defer reg.Close()
	out := mustBanger(t, h, "image", "pull", "--insecure", "--no-wait", strings.TrimPrefix(reg.URL, "http://")+"/stuck/x:v1")
	opID := regexp.MustCompile(`op-[0-9a-f]+`).FindString(out)
	if opID == "" || !strings.Contains(out, "banger op cancel") {
		t.Fatalf("pull --no-wait: %q", out)
	}
	if out := mustBanger(t, h, "op", "cancel", opID); !strings.Contains(out, "cancelling image operation") {
		t.Fatalf("op cancel: %q", out)
	}
	testenv.WaitFor(t, 10*time.Second, "the cancelled pull to finish", func() bool {
		out, _, _ := banger(t, h, "op", "cancel", opID)
		return strings.Contains(out, "already finished")
	})
	if m, _ := filepath.Glob(filepath.Join(h, "images", ".tmp-*")); len(m) > 0 {
		t.Errorf("the cancelled pull left %v", m)
	}

	// a create failing at the agent wait leaves nothing, keeps its console log
	_, errOut, code := banger(t, h, "vm", "create", "slow", "--memory", "128M", "--disk", "64M")
	if code == 0 || !strings.Contains(errOut, "logs/failed/") {
		t.Errorf("failed create: exit %d, %s", code, errOut)
	}
	if len(recordsFromCLI(t, h)) != 0 || len(vmmProcs(h)) != 0 {
		t.Errorf("a failed create left a VM or a VMM")
	}

	// a start failing at the agent wait: delete needs no --force
	rig.g.setMute("slow", false)
	mustBanger(t, h, "vm", "create", "slow", "--memory", "128M", "--disk", "64M")
	mustBanger(t, h, "vm", "stop", "slow", "--timeout", "5s")
	rig.g.setMute("slow", true)
	if _, _, code := banger(t, h, "vm", "start", "slow"); code == 0 {
		t.Fatal("start with a mute agent succeeded")
	}
	if v := showVM(t, h, "slow"); v.State != "stopped" || v.LastError == "" {
		t.Errorf("after the failed start: %+v", v)
	}
	mustBanger(t, h, "vm", "delete", "slow")

	// Ctrl-C during exec -- sleep ends the guest process
	mustBanger(t, h, "vm", "create", "ex", "--memory", "128M", "--disk", "64M")
	ex := exec.Command(filepath.Join(bins(t), "banger"), "exec", "ex", "--", "sleep", "100.25")
	ex.Env = append(os.Environ(), "BANGER_HOME="+h)
	if err := ex.Start(); err != nil {
		t.Fatal(err)
	}
	exDone := make(chan struct{})
	go func() { ex.Wait(); close(exDone) }()
	sleepPid := func() int {
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			if string(b) == "sleep\x00100.25\x00" {
				pid, _ := strconv.Atoi(e.Name())
				return pid
			}
		}
		return 0
	}
	testenv.WaitFor(t, 15*time.Second, "the guest's sleep", func() bool { return sleepPid() != 0 })
	ex.Process.Signal(os.Interrupt)
	testenv.WaitFor(t, 5*time.Second, "the guest's sleep to end after Ctrl-C", func() bool { return sleepPid() == 0 })
	select {
	case <-exDone:
	case <-time.After(5 * time.Second):
		t.Fatal("exec did not return after Ctrl-C")
	}

	// the op id of a successful stop: in the events and the default-level log
	mustBanger(t, h, "vm", "stop", "ex", "--timeout", "5s")
	var stopOp string
	for _, l := range strings.Split(strings.TrimSpace(mustBanger(t, h, "events", "-o", "json")), "\n") {
		var raw map[string]any
		json.Unmarshal([]byte(l), &raw)
		if raw["type"] == "vm.stopped" && raw["vm"] == "ex" {
			stopOp, _ = raw["op_id"].(string)
		}
	}
	if stopOp == "" {
		t.Fatalf("no vm.stopped event with an op id for ex")
	}
	evs := mustBanger(t, h, "events")
	for _, want := range []string{"kernel.added", "image.added", "vm.created", "vm.started", "vm.start_failed", "vm.create_failed", "vm.deleted", "vm.stopped"} {
		if !strings.Contains(evs, want) {
			t.Errorf("banger events lacks %s:\n%s", want, evs)
		}
	}
	found := false
	for _, l := range strings.Split(d.logs.String(), "\n") {
		if strings.Contains(l, stopOp) && strings.Contains(l, `"vm.stop"`) && strings.Contains(l, `"level":"INFO"`) {
			found = true
		}
	}
	if !found {
		t.Errorf("the default-level log has no Info line with the stop's op id %s", stopOp)
	}
	checkConverged(t, h)
}

// TestFiftyFreshHomesAsNobody starts 50 fresh homes at once, each with a
// bangerd running as nobody that is asked for a kernel, an image and a VM
// as soon as it answers: every create succeeds and every home's
// directories are 0700. (The fake firecracker keeps the CPU cost bounded;
// the point is 50 first starts racing.) BANGER_HOMES sets the number.
func TestFiftyFreshHomesAsNobody(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("running bangerd as nobody needs root")
	}
	n := 50
	if v, err := strconv.Atoi(os.Getenv("BANGER_HOMES")); err == nil && v > 0 {
		n = v
	}
	rig := newFCRig(t)
	// the fake VMM needs a kernel file, not a kernel: a small static x86-64 ELF
	vmlinux := "/bin/busybox"
	if _, err := os.Stat(vmlinux); err != nil {
		vmlinux = rig.kernel
	}
	rootfs := testenv.BusyboxRootfs(t, 16)
	bangerd := filepath.Join(bins(t), "bangerd")
	os.Chmod(bins(t), 0o755)
	homes := make([]*nobodyHome, n)
	for i := range homes {
		h := home(t)
		k, r := copyIntoHome(t, h, vmlinux), copyIntoHome(t, h, rootfs)
		os.Chown(k, nobodyUID, nobodyUID)
		os.Chown(r, nobodyUID, nobodyUID)
		writeFakeFCConfig(t, h, "")
		chownTree(t, h, nobodyUID)
		homes[i] = &nobodyHome{h: h, kernel: k, rootfs: r, logs: &lockedBuf{}}
	}
	t.Cleanup(func() {
		for _, hr := range homes {
			for _, v := range recordsFromCLIQuiet(hr.h) {
				bangerCtx(t, hr.h, time.Minute, "vm", "delete", "--force", v.Name)
			}
			if hr.cmd != nil && hr.cmd.Process != nil {
				hr.cmd.Process.Signal(os.Interrupt)
				hr.cmd.Wait()
			}
		}
	})
	t0 := time.Now()
	var wg sync.WaitGroup
	for _, hr := range homes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hr.err = hr.run(bangerd, rig.env)
		}()
	}
	wg.Wait()
	took := time.Since(t0)
	failed := 0
	for i, hr := range homes {
		if hr.err != nil {
			failed++
			t.Errorf("home %d (%s): %v\n%s", i, hr.h, hr.err, tail(hr.logs.String(), 2000))
		}
	}
	t.Logf("%d fresh homes as nobody, first start + kernel + image + create at once: %d succeeded in %v", n, n-failed, took.Round(time.Millisecond))
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func recordsFromCLIQuiet(h string) []recVM {
	cmd := exec.Command(filepath.Join(binDir, "banger"), "vm", "list", "-o", "json")
	cmd.Env = append(os.Environ(), "BANGER_HOME="+h)
	out, err := cmd.Output()
	if err != nil {
		return nil
	}
	var vms []recVM
	json.Unmarshal(out, &vms)
	return vms
}

// nobodyHome is one fresh home of TestFiftyFreshHomesAsNobody.
type nobodyHome struct {
	h, kernel, rootfs string
	cmd               *exec.Cmd
	logs              *lockedBuf
	err               error
}

// cli runs banger against the home with a deadline.
func (hr *nobodyHome) cli(d time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "banger"), args...)
	cmd.Env = append(os.Environ(), "BANGER_HOME="+hr.h)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("banger %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// run starts the home's first bangerd as nobody and, as soon as it answers,
// imports a kernel and an image and creates a VM, then checks it runs,
// answers exec, and that the home's directories are 0700.
func (hr *nobodyHome) run(bangerd string, env []string) error {
	hr.cmd = exec.Command(bangerd)
	hr.cmd.Env = append(append(os.Environ(), "BANGER_HOME="+hr.h, "HOME="+hr.h), env...)
	hr.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobodyUID, Gid: nobodyUID}}
	hr.cmd.Stderr = hr.logs
	if err := hr.cmd.Start(); err != nil {
		return err
	}
	sock := filepath.Join(hr.h, "run", "bangerd.sock")
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bangerd did not answer within 60s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := hr.cli(3*time.Minute, "kernel", "import", hr.kernel, "--name", "k"); err != nil {
		return err
	}
	if _, err := hr.cli(3*time.Minute, "image", "import", hr.rootfs, "--name", "busybox"); err != nil {
		return err
	}
	if _, err := hr.cli(3*time.Minute, "vm", "create", "v", "--memory", "128M", "--disk", "64M", "--no-wait"); err != nil {
		return err
	}
	deadline = time.Now().Add(4 * time.Minute)
	for {
		out, err := hr.cli(time.Minute, "vm", "show", "v", "-o", "json")
		if err != nil {
			return err
		}
		var v vmJSON
		json.Unmarshal([]byte(out), &v)
		if v.State == "running" {
			break
		}
		if v.State != "creating" && v.State != "starting" {
			return fmt.Errorf("vm is %s: %s", v.State, v.LastError)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("vm still %s after 4 minutes", v.State)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if out, err := hr.cli(time.Minute, "exec", "v", "--", "echo", "ok"); err != nil || strings.TrimSpace(out) != "ok" {
		return fmt.Errorf("exec: %q %v", out, err)
	}
	for _, d := range []string{hr.h, filepath.Join(hr.h, "run"), filepath.Join(hr.h, "ssh"), filepath.Join(hr.h, "vms"), filepath.Join(hr.h, "images"), filepath.Join(hr.h, "kernels")} {
		fi, err := os.Stat(d)
		if err != nil {
			return err
		}
		if fi.Mode().Perm() != 0o700 {
			return fmt.Errorf("%s has mode %v", d, fi.Mode().Perm())
		}
	}
	return nil
}

// A debootstrap stopped half-way leaves proc mounted in its work directory
// (images/.tmp-*): the next bangerd unmounts it, then removes the directory.
// bangerd runs in a private mount namespace made for the test (unshare -m),
// so the host's mount table is never touched.
func TestImageTempLeftoversUnmounted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting proc needs root")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skipf("unshare (util-linux) not installed: %v", err)
	}
	h := home(t)
	tmp := filepath.Join(h, "images", ".tmp-leftover")
	if err := os.MkdirAll(filepath.Join(tmp, "rootfs", "proc"), 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(tmp, "rootfs", "etc-file"), []byte("x"), 0o600)
	bangerd := filepath.Join(bins(t), "bangerd")
	script := `mount -t proc proc "$1" && grep -q " $1 " /proc/self/mountinfo && exec "$2" --debug`
	d := startDaemonWith(t, h, func(cmd *exec.Cmd) {
		cmd.Path = unshare
		cmd.Args = []string{unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh", filepath.Join(tmp, "rootfs", "proc"), bangerd}
	})
	testenv.WaitFor(t, 10*time.Second, "the leftover to be removed", func() bool {
		_, err := os.Stat(tmp)
		return os.IsNotExist(err)
	})
	if strings.Contains(d.logs.String(), "cannot unmount") {
		t.Fatalf("bangerd could not unmount the leftover: %s", d.logs.String())
	}
}
