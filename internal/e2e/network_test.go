package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/hostnet/nettest"
	"github.com/bangerdev/banger/internal/testenv"
)

var (
	helperBuildOnce sync.Once
	helperBin       string
	helperBuildErr  error
)

// helperBinary builds banger-helper next to the other test binaries.
func helperBinary(t *testing.T) string {
	t.Helper()
	dir := bins(t)
	helperBuildOnce.Do(func() {
		if helperBuildErr = goBuild(t, dir, nil, "./cmd/banger-helper"); helperBuildErr != nil {
			return
		}
		helperBin = filepath.Join(dir, "banger-helper")
	})
	if helperBuildErr != nil {
		t.Fatalf("build banger-helper: %v", helperBuildErr)
	}
	return helperBin
}

// netRig is a BANGER_HOME whose bangerd and banger-helper run inside a
// nettest host namespace.
type netRig struct {
	env     *nettest.Env
	home    string
	sock    string // the helper's socket
	daemon  *daemonProc
	helper  *daemonProc
	helperC *hostnet.Client
}

// startInNS starts a long-running binary inside the host namespace, with its
// stderr collected; it is stopped (SIGINT, then SIGKILL) at test end.
func startInNS(t *testing.T, e *nettest.Env, what string, env []string, name string, args ...string) *daemonProc {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	done := make(chan struct{})
	p := &daemonProc{cmd: cmd, logs: &lockedBuf{}, done: done}
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	if err := e.Start(cmd); err != nil {
		t.Fatalf("start %s in namespace %s: %v", what, e.Name, err)
	}
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { p.stop(t) })
	return p
}

func waitSocket(t *testing.T, p *daemonProc, what, sock string) {
	t.Helper()
	testenv.WaitFor(t, 15*time.Second, what+" socket", func() bool {
		select {
		case <-p.done:
			t.Fatalf("%s exited early: %s", what, p.logs.String())
		default:
		}
		_, err := os.Stat(sock)
		return err == nil
	})
}

// homeProcs returns the PIDs of processes (other than this one) whose
// command line mentions the home directory: the VMMs bangerd started.
func homeProcs(h string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(h+"/")) {
			continue
		}
		if strings.Contains(string(b), "qemu") {
			pids = append(pids, pid)
		}
	}
	return pids
}

func newNetRig(t *testing.T) *netRig {
	t.Helper()
	return newNetRigWith(t, nil)
}

// newNetRigWith is newNetRig with prep run on the namespaces before the
// helper starts; it returns extra banger-helper arguments.
func newNetRigWith(t *testing.T, prep func(e *nettest.Env) []string) *netRig {
	t.Helper()
	nettest.Require(t)
	testenv.RequireQEMU(t)
	if _, err := os.Stat(filepath.Join(repoRoot(t), "cmd", "banger-agent", "main.go")); err != nil {
		t.Fatalf("cmd/banger-agent is missing: %v", err)
	}
	deb := testenv.KernelPackage(t)
	rootfs := testenv.BusyboxRootfs(t, 64)
	helper := helperBinary(t)
	bin := bins(t)

	e := nettest.New(t)
	h := home(t)
	r := &netRig{env: e, home: h, sock: filepath.Join(h, "helper.sock")}
	r.helperC = &hostnet.Client{Socket: r.sock}
	args := []string{"--socket", r.sock, "--debug"}
	if prep != nil {
		args = append(args, prep(e)...)
	}
	r.helper = startInNS(t, e, "banger-helper", nil, helper, args...)
	waitSocket(t, r.helper, "banger-helper", r.sock)
	// The CLI (run outside the namespace) finds the helper too.
	t.Setenv(hostnet.SocketEnv, r.sock)
	r.daemon = startInNS(t, e, "bangerd", []string{"BANGER_HOME=" + h, "BANGER_VMM=qemu", hostnet.SocketEnv + "=" + r.sock},
		filepath.Join(bin, "bangerd"), "--debug")
	waitSocket(t, r.daemon, "bangerd", filepath.Join(h, "run", "bangerd.sock"))
	// Runs first at test end: no VMM of this home may outlive the test.
	t.Cleanup(func() {
		for _, pid := range homeProcs(h) {
			t.Logf("killing leftover VMM %d", pid)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	mustBanger(t, h, "kernel", "import", "--deb", deb, "--name", "debian")
	mustBanger(t, h, "image", "import", rootfs, "--name", "busybox")
	return r
}

// createStatus mirrors daemon.CreateStatus.
type createStatus struct {
	OpID   string `json:"op_id"`
	Name   string `json:"name"`
	Done   bool   `json:"done"`
	Error  string `json:"error"`
	Stages []struct {
		Name       string  `json:"name"`
		DurationMS float64 `json:"duration_ms"`
		Error      string  `json:"error"`
	} `json:"stages"`
}

func (c createStatus) stageMS(name string) float64 {
	for _, s := range c.Stages {
		if s.Name == name {
			return s.DurationMS
		}
	}
	return -1
}

// beginCreate starts a create with --no-wait and returns its op id.
func (r *netRig) beginCreate(t *testing.T, name string) string {
	t.Helper()
	out := mustBanger(t, r.home, "vm", "create", name, "--memory", "256M", "--disk", "256M", "--no-wait", "-o", "json")
	var st createStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.OpID == "" {
		t.Fatalf("vm create --no-wait -o json: no op_id (%v): %q", err, out)
	}
	return st.OpID
}

// waitCreate follows a create to its end (bounded) and fails on error.
func (r *netRig) waitCreate(t *testing.T, opID string) createStatus {
	t.Helper()
	sock := filepath.Join(r.home, "run", "bangerd.sock")
	deadline := time.Now().Add(2 * time.Minute)
	for {
		req := fmt.Sprintf(`{"version":1,"method":"vm.create.status","params":{"op_id":%q,"wait":true}}`, opID)
		resp := rawCall(t, sock, req)[0]
		if resp["error"] != nil {
			t.Fatalf("vm.create.status %s: %v", opID, resp["error"])
		}
		b, _ := json.Marshal(resp["result"])
		var st createStatus
		if err := json.Unmarshal(b, &st); err != nil {
			t.Fatalf("vm.create.status: %v: %s", err, b)
		}
		if st.Done {
			if st.Error != "" {
				t.Fatalf("create %s (%s) failed: %s\nbangerd log:\n%s\nhelper log:\n%s", st.Name, opID, st.Error, r.daemon.logs.String(), r.helper.logs.String())
			}
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("create %s (%s) not done after 2m: %+v", st.Name, opID, st)
		}
	}
}

type helperRecord struct {
	Msg        string  `json:"msg"`
	Method     string  `json:"method"`
	OpID       string  `json:"op_id"`
	DurationMS float64 `json:"duration_ms"`
}

// helperCalls returns the helper's per-call records for an operation.
func (r *netRig) helperCalls(opID string) []helperRecord {
	var recs []helperRecord
	sc := bufio.NewScanner(strings.NewReader(r.helper.logs.String()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var rec helperRecord
		if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.OpID == opID && strings.HasPrefix(rec.Msg, "helper rpc ") {
			recs = append(recs, rec)
		}
	}
	return recs
}

type guestCmd struct{ vm, script string }

type guestRes struct {
	out  string // stdout and stderr
	code int
}

// guestExecAll runs `sh -c script` in the guests concurrently (banger exec,
// each bounded by a minute) and returns the results in order.
func (r *netRig) guestExecAll(t *testing.T, cmds []guestCmd) []guestRes {
	t.Helper()
	bin := filepath.Join(bins(t), "banger")
	res := make([]guestRes, len(cmds))
	errs := make([]error, len(cmds))
	var wg sync.WaitGroup
	for i, c := range cmds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, "exec", c.vm, "--", "sh", "-c", c.script)
			cmd.Env = append(os.Environ(), "BANGER_HOME="+r.home)
			out, err := cmd.CombinedOutput()
			res[i].out = string(out)
			if ee, ok := err.(*exec.ExitError); ok && ctx.Err() == nil {
				res[i].code = ee.ExitCode()
			} else if err != nil {
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("banger exec %s -- sh -c %q: %v: %s", cmds[i].vm, cmds[i].script, err, res[i].out)
		}
	}
	return res
}

// dialIn connects from inside the host namespace and returns the first line
// the peer sends.
func dialIn(e *nettest.Env, addr string, timeout time.Duration) (string, error) {
	var line string
	err := e.Do(func() error {
		c, err := net.DialTimeout("tcp4", addr, timeout)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return strings.TrimSpace(line), err
}

// listenIn starts a TCP listener inside the host namespace that greets every
// connection and records that it was reached; closed at test end.
func listenIn(t *testing.T, e *nettest.Env, addr string) (net.Listener, func() int) {
	t.Helper()
	var ln net.Listener
	if err := e.Do(func() (err error) { ln, err = net.Listen("tcp4", addr); return err }); err != nil {
		t.Fatalf("listen in host namespace on %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	var mu sync.Mutex
	hits := 0
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			hits++
			mu.Unlock()
			io.WriteString(c, "host-service\n")
			c.Close()
		}
	}()
	return ln, func() int { mu.Lock(); defer mu.Unlock(); return hits }
}

// bgtLinks lists banger's taps in the host namespace.
func bgtLinks(t *testing.T, e *nettest.Env) []string {
	t.Helper()
	nh, err := netlink.NewHandleAt(e.Host)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", e.Name, err)
	}
	defer nh.Close()
	links, err := nh.LinkList()
	if err != nil {
		t.Fatalf("list links in %s: %v", e.Name, err)
	}
	var out []string
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, hostnet.DefaultTapPrefix) {
			out = append(out, l.Attrs().Name)
		}
	}
	return out
}

func bridgeGateway(t *testing.T, e *nettest.Env) netip.Addr {
	t.Helper()
	nh, err := netlink.NewHandleAt(e.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	br, err := nh.LinkByName(hostnet.DefaultBridge)
	if err != nil {
		t.Fatalf("bridge %s in %s: %v", hostnet.DefaultBridge, e.Name, err)
	}
	addrs, err := nh.AddrList(br, netlink.FAMILY_V4)
	if err != nil || len(addrs) == 0 {
		t.Fatalf("bridge %s has no IPv4 address: %v", hostnet.DefaultBridge, err)
	}
	a, _ := netip.AddrFromSlice(addrs[0].IP.To4())
	return a
}

// TestNetworkRealGuest is issue 4's acceptance: real guests under QEMU get
// an address on banger's bridge through banger-helper, are reachable from
// the host, reach the outside through NAT, cannot reach each other or the
// host's services, and leave nothing behind when deleted.
func TestNetworkRealGuest(t *testing.T) {
	testStart := time.Now()
	r := newNetRig(t)
	e, h := r.env, r.home
	var helperMS, prepareMS []float64
	record := func(opID string, st createStatus) {
		var sum float64
		for _, c := range r.helperCalls(opID) {
			sum += c.DurationMS
		}
		helperMS = append(helperMS, sum)
		prepareMS = append(prepareMS, st.stageMS("prepare host"))
	}

	// Two VMs, booted side by side.
	opA, opB := r.beginCreate(t, "neta"), r.beginCreate(t, "netb")
	stA, stB := r.waitCreate(t, opA), r.waitCreate(t, opB)
	record(opA, stA)
	record(opB, stB)
	t.Logf("two VMs created and running %v after the test began", time.Since(testStart).Round(time.Millisecond))

	// The op id of vm.create.begin is on bangerd's and the helper's log
	// lines for that create.
	for _, op := range []string{opA, opB} {
		if !strings.Contains(r.daemon.logs.String(), `"op_id":"`+op+`"`) {
			t.Errorf("bangerd's log has no record with op_id %s", op)
		}
		var methods []string
		for _, c := range r.helperCalls(op) {
			methods = append(methods, c.Method)
		}
		if !slices.Contains(methods, hostnet.MethodCreateTap) {
			t.Errorf("helper log for op %s has calls %v, want %s among them\nhelper log:\n%s", op, methods, hostnet.MethodCreateTap, r.helper.logs.String())
		}
	}

	// Each VM has an address, and the guest sees it on its interface.
	ips := map[string]netip.Addr{}
	for _, n := range []string{"neta", "netb"} {
		var v struct{ IP string }
		out := mustBanger(t, h, "vm", "show", n, "-o", "json")
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("vm show %s: %v", n, err)
		}
		ip, err := netip.ParseAddr(v.IP)
		if err != nil {
			t.Fatalf("vm %s has no IP in vm show: %q", n, out)
		}
		ips[n] = ip
	}
	if ips["neta"] == ips["netb"] {
		t.Fatalf("both VMs got %s", ips["neta"])
	}
	gw := bridgeGateway(t, e)
	t.Logf("addresses: neta %s, netb %s, gateway %s", ips["neta"], ips["netb"], gw)
	// control for the leftover-VMM check at the end: it finds these two
	if n := len(homeProcs(h)); n != 2 {
		t.Fatalf("found %d VMM processes of %s while two VMs run, want 2", n, h)
	}
	// In both guests at once: the address is on the interface, and a
	// listener starts.
	res := r.guestExecAll(t, []guestCmd{
		{"neta", "ip -4 addr show"}, {"netb", "ip -4 addr show"},
		{"neta", "setsid busybox nc -ll -p 8080 -e echo hi-neta </dev/null >/dev/null 2>&1 &"},
		{"netb", "setsid busybox nc -ll -p 8080 -e echo hi-netb </dev/null >/dev/null 2>&1 &"},
	})
	for i, n := range []string{"neta", "netb"} {
		if res[i].code != 0 || !strings.Contains(res[i].out, " "+ips[n].String()+"/") {
			t.Fatalf("guest %s: `ip -4 addr` (exit %d) does not show %s:\n%s", n, res[i].code, ips[n], res[i].out)
		}
		if res[2+i].code != 0 {
			t.Fatalf("start listener in %s: exit %d: %s", n, res[2+i].code, res[2+i].out)
		}
	}

	// The host namespace reaches both guests' listeners.
	for _, n := range []string{"neta", "netb"} {
		addr := netip.AddrPortFrom(ips[n], 8080).String()
		var got string
		var err error
		testenv.WaitFor(t, 15*time.Second, "host to reach the listener in "+n, func() bool {
			got, err = dialIn(e, addr, 3*time.Second)
			return err == nil && got == "hi-"+n
		})
		t.Logf("host → %s (%s): %q", n, addr, got)
	}

	// A service on the host's bridge address; the host itself reaches it.
	ln, hits := listenIn(t, e, "0.0.0.0:0")
	svc := netip.AddrPortFrom(gw, uint16(ln.Addr().(*net.TCPAddr).Port))
	if got, err := dialIn(e, svc.String(), 3*time.Second); err != nil || got != "host-service" {
		t.Fatalf("control: host cannot reach its own service on %s: %q, %v", svc, got, err)
	}
	hitsBefore := hits()

	// All at once, with the same bounded command: each guest reaches the
	// outside through NAT (the positive controls); neither reaches the
	// other's listener, nor the host's service on the gateway address.
	internet := netip.AddrPortFrom(e.InternetAddr, uint16(e.InternetPort))
	ncTo := func(ap netip.AddrPort) string {
		return fmt.Sprintf("timeout 3 busybox nc %s %d </dev/null", ap.Addr(), ap.Port())
	}
	t0 := time.Now()
	res = r.guestExecAll(t, []guestCmd{
		{"neta", ncTo(internet)}, {"netb", ncTo(internet)},
		{"neta", ncTo(netip.AddrPortFrom(ips["netb"], 8080))},
		{"netb", ncTo(netip.AddrPortFrom(ips["neta"], 8080))},
		{"neta", ncTo(svc)}, {"netb", ncTo(svc)},
	})
	t.Logf("reachability checks in the guests took %v", time.Since(t0).Round(time.Millisecond))
	for i, n := range []string{"neta", "netb"} {
		if res[i].code != 0 || strings.TrimSpace(res[i].out) != "hello "+e.HostAddr.Addr().String() {
			t.Errorf("guest %s → outside %s: exit %d, %q; want \"hello %s\" (NAT to the uplink address)", n, internet, res[i].code, res[i].out, e.HostAddr.Addr())
		}
	}
	peers := e.Peers()
	if len(peers) != 2 {
		t.Errorf("the outside saw %d connections (%v), want 2", len(peers), peers)
	}
	for _, p := range peers {
		if p != e.HostAddr.Addr() {
			t.Errorf("the outside saw a connection from %s, want only the uplink address %s", p, e.HostAddr.Addr())
		}
	}
	for i, p := range [][2]string{{"neta", "netb"}, {"netb", "neta"}} {
		g := res[2+i]
		if g.code == 0 || strings.Contains(g.out, "hi-") {
			t.Errorf("guest %s reached the listener in %s: exit %d, %q", p[0], p[1], g.code, g.out)
		}
		t.Logf("%s → %s:8080 blocked: exit %d, %q", p[0], p[1], g.code, strings.TrimSpace(g.out))
	}
	for i, n := range []string{"neta", "netb"} {
		g := res[4+i]
		if g.code == 0 || strings.Contains(g.out, "host-service") {
			t.Errorf("guest %s reached the host service on %s: exit %d, %q", n, svc, g.code, g.out)
		}
		t.Logf("%s → host service %s blocked: exit %d, %q", n, svc, g.code, strings.TrimSpace(g.out))
	}
	if hits() != hitsBefore {
		t.Errorf("the host service on %s accepted %d connection(s) from guests", svc, hits()-hitsBefore)
	}
	// The listeners blocked above are still up (so the blocks were not
	// vacuous).
	for _, n := range []string{"neta", "netb"} {
		if got, err := dialIn(e, netip.AddrPortFrom(ips[n], 8080).String(), 3*time.Second); err != nil || got != "hi-"+n {
			t.Errorf("control: host no longer reaches %s's listener: %q, %v", n, got, err)
		}
	}

	// Delete both, then create/delete cycles of one VM (5 by default;
	// BANGER_NET_CYCLES=20 for the full measurement, which takes minutes).
	for _, n := range []string{"neta", "netb"} {
		mustBanger(t, h, "vm", "delete", n, "--force")
	}
	cycles := 5
	if n, err := strconv.Atoi(os.Getenv("BANGER_NET_CYCLES")); err == nil && n > 0 {
		cycles = n
	}
	cycleStart := time.Now()
	for range cycles {
		op := r.beginCreate(t, "cyc")
		st := r.waitCreate(t, op)
		record(op, st)
		mustBanger(t, h, "vm", "delete", "cyc", "--force")
	}
	t.Logf("%d create/delete cycles in %v", cycles, time.Since(cycleStart).Round(time.Millisecond))

	// Nothing is left: no taps in the namespace, none in the helper's list,
	// no VMM of this home.
	testenv.WaitFor(t, 10*time.Second, "the VMMs of this home to be gone", func() bool { return len(homeProcs(h)) == 0 })
	if l := bgtLinks(t, e); len(l) != 0 {
		t.Errorf("taps left in %s: %v", e.Name, l)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lr, err := r.helperC.List(ctx)
	if err != nil {
		t.Fatalf("helper net.list: %v", err)
	}
	if len(lr.Taps) != 0 {
		t.Errorf("helper net.list still shows taps: %+v", lr.Taps)
	}

	t.Logf("helper time per create (sum of duration_ms of its calls with the create's op id): median %.2f ms over %d creates %v",
		testenv.Median(helperMS), len(helperMS), helperMS)
	t.Logf("\"prepare host\" stage per create: median %.1f ms %v", testenv.Median(prepareMS), prepareMS)
	t.Logf("test body took %v", time.Since(testStart).Round(time.Millisecond))
}
