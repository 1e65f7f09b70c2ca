package helper

import (
	"bufio"
	"bytes"
	"context"
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
	"github.com/bangerdev/banger/internal/hostnet/netcfg"
	"github.com/bangerdev/banger/internal/hostnet/nettest"
)

// abuseMain is the "abuse" role of the test binary: a hostile client (run
// as another uid). ABUSE_MODE:
//   - flood: one connection, ABUSE_N pipelined requests; prints replies=N;
//   - conns: ABUSE_N connections one after the other, one request each;
//     prints replies=N;
//   - hold: ABUSE_N connections at once, each sends ABUSE_BYTES without a
//     newline; prints turned_away=N (connections answered "unavailable"),
//     then holds them open until stdin closes.
func abuseMain() int {
	sock := os.Getenv(hostnet.SocketEnv)
	n, _ := strconv.Atoi(os.Getenv("ABUSE_N"))
	ping := []byte(`{"version":1,"method":"system.ping"}` + "\n")
	switch os.Getenv("ABUSE_MODE") {
	case "flood":
		c, err := net.Dial("unix", sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, "dial:", err)
			return 3
		}
		c.SetDeadline(time.Now().Add(60 * time.Second))
		go func() {
			w := bufio.NewWriter(c)
			for i := 0; i < n; i++ {
				if _, err := w.Write(ping); err != nil {
					return
				}
			}
			w.Flush()
		}()
		fmt.Printf("replies=%d\n", countLines(c))
		return 0
	case "conns":
		replies := 0
		for i := 0; i < n; i++ {
			c, err := net.Dial("unix", sock)
			if err != nil {
				fmt.Fprintln(os.Stderr, "dial:", err)
				return 3
			}
			c.SetDeadline(time.Now().Add(30 * time.Second))
			c.Write(ping)
			replies += countLines(c)
			c.Close()
		}
		fmt.Printf("replies=%d\n", replies)
		return 0
	case "parallel":
		// n VMs of one user starting at once: n concurrent create_tap calls.
		var wg sync.WaitGroup
		var mu sync.Mutex
		ok := 0
		c := &hostnet.Client{Socket: sock}
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				if _, err := c.CreateTap(ctx, fmt.Sprintf("bgt-p%02d", i), "banger0", 0); err != nil {
					fmt.Fprintln(os.Stderr, "create_tap:", err)
					return
				}
				mu.Lock()
				ok++
				mu.Unlock()
			}()
		}
		wg.Wait()
		fmt.Printf("ok=%d\n", ok)
		return 0
	case "hold":
		size, _ := strconv.Atoi(os.Getenv("ABUSE_BYTES"))
		conns := make([]net.Conn, n)
		for i := range conns {
			c, err := net.Dial("unix", sock)
			if err != nil {
				fmt.Fprintln(os.Stderr, "dial:", err)
				return 3
			}
			conns[i] = c
		}
		var wg sync.WaitGroup
		for _, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.SetWriteDeadline(time.Now().Add(60 * time.Second))
				c.Write(bytes.Repeat([]byte("a"), size)) // turned-away ones fail early
			}()
		}
		wg.Wait()
		away := 0
		for _, c := range conns {
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			line, _ := bufio.NewReader(c).ReadString('\n')
			if strings.Contains(line, `"unavailable"`) {
				away++
			}
		}
		fmt.Printf("turned_away=%d\n", away)
		io.Copy(io.Discard, os.Stdin)
		return 0
	}
	return 2
}

func countLines(c net.Conn) int {
	r := bufio.NewReader(c)
	n := 0
	for {
		line, err := r.ReadString('\n')
		if strings.HasSuffix(line, "\n") {
			n++
		}
		if err != nil {
			return n
		}
	}
}

// abuse runs the abuse role as uid and returns its first output line.
func (h *testHelper) abuse(t *testing.T, uid uint32, mode string, n int) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, worldBinary(t))
	cmd.Env = []string{roleEnv + "=abuse", hostnet.SocketEnv + "=" + h.sock, "ABUSE_MODE=" + mode, "ABUSE_N=" + strconv.Itoa(n)}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("abuse %s as uid %d: %v\n%s", mode, uid, err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

func logLineCount(h *testHelper) int { return strings.Count(h.logs.String(), "\n") }

// TestRefusedFloodIsCheap: 20,000 requests on one connection from a uid
// that is not allowed get one reply and at most a couple of log lines; 300
// refused connections in a row get one reply each and at most
// refusalBurst log lines (the rest are summarised later).
func TestRefusedFloodIsCheap(t *testing.T) {
	env := nettest.New(t)
	h := startHelper(t, env, "--allow-user", fmt.Sprint(allowedUID))
	before := logLineCount(h)
	if got := h.abuse(t, deniedUID, "flood", 20000); got != "replies=1" {
		t.Fatalf("20,000 refused requests on one connection: %s, want replies=1", got)
	}
	if n := logLineCount(h) - before; n > 2 {
		t.Fatalf("20,000 refused requests on one connection: %d log lines, want at most 2:\n%s", n, h.logs.String())
	}
	before = logLineCount(h)
	if got := h.abuse(t, deniedUID, "conns", 300); got != "replies=300" {
		t.Fatalf("300 refused connections: %s, want one reply each", got)
	}
	if n := logLineCount(h) - before; n > refusalBurst {
		t.Fatalf("300 refused connections: %d log lines, want at most %d:\n%s", n, refusalBurst, h.logs.String())
	}
	// The helper still serves its users.
	if r := h.asUID(t, allowedUID, req("system.ping", "", ""))[0]; r["error"] != nil {
		t.Fatalf("allowed user after the flood: %v", r)
	}
}

var (
	realOnce sync.Once
	realDir  string
	realBin  string
	realErr  error
)

// realHelper builds cmd/banger-helper once for the package's tests.
func realHelper(t *testing.T) string {
	t.Helper()
	realOnce.Do(func() {
		if realDir, realErr = os.MkdirTemp("", "bghelper-real"); realErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		realBin = filepath.Join(realDir, "banger-helper")
		out, err := exec.CommandContext(ctx, "go", "build", "-o", realBin, "github.com/bangerdev/banger/cmd/banger-helper").CombinedOutput()
		if err != nil {
			realErr = fmt.Errorf("go build banger-helper: %v\n%s", err, out)
		}
	})
	if realErr != nil {
		t.Fatal(realErr)
	}
	return realBin
}

func procStatusKB(pid int, field string) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			return strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// TestLineFloodMemoryBounded runs the real banger-helper and opens 24
// connections as root and 24 as an allowed user, each sending 4 MiB
// without a newline: the helper's peak RSS stays under 32 MiB, and the
// user gets DefaultMaxConnsPerUser connections, the rest turned away.
func TestLineFloodMemoryBounded(t *testing.T) {
	env := nettest.New(t)
	h := startHelperBin(t, env, realHelper(t), "--allow-user", fmt.Sprint(allowedUID))
	pid := h.cmd.Process.Pid
	base, err := procStatusKB(pid, "VmRSS")
	if err != nil {
		t.Fatal(err)
	}
	const conns, size = 24, 4 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, worldBinary(t))
	cmd.Env = []string{roleEnv + "=abuse", hostnet.SocketEnv + "=" + h.sock, "ABUSE_MODE=hold",
		"ABUSE_N=" + strconv.Itoa(conns), "ABUSE_BYTES=" + strconv.Itoa(size)}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: allowedUID, Gid: allowedUID}}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	var rootConns []net.Conn
	defer func() {
		for _, c := range rootConns {
			c.Close()
		}
	}()
	var wg sync.WaitGroup
	for i := 0; i < conns; i++ {
		c, err := net.Dial("unix", h.sock)
		if err != nil {
			t.Fatal(err)
		}
		rootConns = append(rootConns, c)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetWriteDeadline(time.Now().Add(60 * time.Second))
			if _, err := c.Write(bytes.Repeat([]byte("b"), size)); err != nil {
				t.Errorf("root connection: writing 4 MiB: %v", err)
			}
		}()
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	wg.Wait()
	if err != nil {
		t.Fatalf("abuse hold: %v\n%s", err, stderr.String())
	}
	if want := fmt.Sprintf("turned_away=%d", conns-DefaultMaxConnsPerUser); strings.TrimSpace(line) != want {
		t.Errorf("user's %d connections: %s, want %s", conns, strings.TrimSpace(line), want)
	}
	rss, err1 := procStatusKB(pid, "VmRSS")
	hwm, err2 := procStatusKB(pid, "VmHWM")
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	t.Logf("banger-helper RSS: %d kB idle, %d kB with %d×4 MiB lines pending, peak %d kB", base, rss, 2*conns, hwm)
	if hwm >= 32<<10 || rss >= 32<<10 {
		t.Fatalf("helper RSS %d kB (peak %d kB), want under 32 MiB", rss, hwm)
	}
}

// writeConfig writes a root-owned helper configuration in a fresh 0755
// directory and returns its path.
func writeConfig(t *testing.T, content string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "helper.json")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func bridgeAddrs(t *testing.T, env *nettest.Env) []string {
	t.Helper()
	var out []string
	if err := env.Do(func() error {
		_, _, addrs, err := netcfg.BridgeInfo("banger0")
		for _, a := range addrs {
			out = append(out, a.String())
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func addBridgeAddr(t *testing.T, env *nettest.Env, cidr string) {
	t.Helper()
	if err := env.Do(func() error {
		l, err := netlink.LinkByName("banger0")
		if err != nil {
			return err
		}
		a, err := netlink.ParseAddr(cidr)
		if err != nil {
			return err
		}
		return netlink.AddrAdd(l, a)
	}); err != nil {
		t.Fatal(err)
	}
}

func codeOf(m map[string]any) string { c, _, _ := errOf(m); return c }

// TestParallelStartsMeetTheConnectionCap: 24 concurrent create_tap calls
// of one user (more than its 8 connections) all succeed: the client waits
// for a slot instead of failing a VM's start.
func TestParallelStartsMeetTheConnectionCap(t *testing.T) {
	env := nettest.New(t)
	h := startHelper(t, env, "--allow-user", fmt.Sprint(allowedUID))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := (&hostnet.Client{Socket: h.sock}).EnsureBridge(ctx, "banger0", netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	if got := h.abuse(t, allowedUID, "parallel", 24); got != "ok=24" {
		t.Fatalf("24 parallel create_tap: %s", got)
	}
	t.Logf("connections turned away and retried: %d", strings.Count(h.logs.String(), "over the limits"))
}

// TestInfoAvoidsHostRoutes: the helper's subnet is the first /24 of its
// pool that no route or address of the host uses (banger's own devices
// aside), and stays the bridge's once it exists.
func TestInfoAvoidsHostRoutes(t *testing.T) {
	env := nettest.New(t)
	if err := env.Do(func() error { return addRoute("172.30.0.0/23", env.GatewayAddr.String()) }); err != nil {
		t.Fatal(err)
	}
	h := startHelper(t, env)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	for i := 0; i < 2; i++ {
		info, err := c.Info(ctx)
		if err != nil || info.Subnet != "172.30.2.0/24" || info.Gateway != "172.30.2.1/24" {
			t.Fatalf("net.info #%d with 172.30.0.0/23 routed: %+v %v", i, info, err)
		}
		if _, err := c.EnsureBridge(ctx, "banger0", netip.Prefix{}); err != nil {
			t.Fatal(err)
		}
	}
	if got := bridgeAddrs(t, env); len(got) != 1 || got[0] != "172.30.2.1/24" {
		t.Fatalf("bridge addresses: %v", got)
	}
}

// TestOwnershipAcrossUsers: two allowed users share banger's network, and
// neither can remove what the other made or depends on.
func TestOwnershipAcrossUsers(t *testing.T) {
	const a, b = allowedUID, deniedUID // both allowed here
	env := nettest.New(t)
	h := startHelper(t, env, "--allow-user", fmt.Sprint(a), "--allow-user", fmt.Sprint(b))
	tap := func(name string) string { return `{"tap":"` + name + `","bridge":"banger0"}` }
	br := `{"bridge":"banger0"}`
	res := h.asUID(t, a,
		req("net.ensure_bridge", br, ""),
		req("net.ensure_nat", br, ""),
		req("net.create_tap", tap("bgt-a1"), ""))
	for i, r := range res {
		if r["error"] != nil {
			t.Fatalf("user A setup #%d: %v", i, r)
		}
	}
	if r := h.asUID(t, b, req("net.create_tap", tap("bgt-b1"), ""))[0]; r["error"] != nil {
		t.Fatalf("user B's tap: %v", r)
	}
	for _, tc := range []struct {
		name string
		uid  uint32
		line string
		code string
	}{
		{"B deletes A's tap", b, req("net.delete_tap", `{"tap":"bgt-a1"}`, ""), "permission_denied"},
		{"B deletes A's bridge", b, req("net.delete_bridge", br, ""), "permission_denied"},
		{"B removes A's NAT", b, req("net.remove_nat", br, ""), "permission_denied"},
		{"A deletes its bridge under B's VM", a, req("net.delete_bridge", br, ""), "failed_precondition"},
		{"A removes its NAT under B's VM", a, req("net.remove_nat", br, ""), "failed_precondition"},
	} {
		if got := codeOf(h.asUID(t, tc.uid, tc.line)[0]); got != tc.code {
			t.Errorf("%s: code %q, want %q", tc.name, got, tc.code)
		}
	}
	// An address banger did not add survives ensure_bridge.
	addBridgeAddr(t, env, "192.168.99.1/24")
	if r := h.asUID(t, b, req("net.ensure_bridge", br, ""))[0]; r["error"] != nil {
		t.Fatalf("ensure_bridge by B: %v", r)
	}
	if got := bridgeAddrs(t, env); !slices.Contains(got, "192.168.99.1/24") || !slices.Contains(got, "172.30.0.1/24") {
		t.Fatalf("bridge addresses after ensure_bridge: %v", got)
	}
	// Once B's VM is gone, A removes what it made.
	if r := h.asUID(t, b, req("net.delete_tap", `{"tap":"bgt-b1"}`, ""))[0]; r["error"] != nil {
		t.Fatalf("B deletes its tap: %v", r)
	}
	res = h.asUID(t, a, req("net.remove_nat", br, ""), req("net.delete_bridge", br, ""), req("net.delete_tap", `{"tap":"bgt-a1"}`, ""))
	for i, r := range res {
		if r["error"] != nil || r["result"].(map[string]any)["deleted"] != true {
			t.Fatalf("A's teardown #%d: %v", i, r)
		}
	}
}

// TestRangeTapCapAndTimeoutFromConfig: the root-owned configuration sets
// the range (a caller's is refused, the old banger address is replaced and
// a foreign one kept), the per-user tap cap and the request deadline.
func TestRangeTapCapAndTimeoutFromConfig(t *testing.T) {
	env := nettest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h := startHelper(t, env)
	c := &hostnet.Client{Socket: h.sock}
	if r, err := c.EnsureBridge(ctx, "banger0", netip.Prefix{}); err != nil || r.CIDR != "172.30.0.1/24" {
		t.Fatalf("ensure_bridge with the default pool: %+v %v", r, err)
	}
	addBridgeAddr(t, env, "192.168.99.1/24")
	h.stop(t)

	cfg := writeConfig(t, `{"pool":"10.99.0.0/16","max_taps_per_user":2,"request_timeout":"500ms"}`)
	h = startHelper(t, env, "--config", cfg, "--allow-user", fmt.Sprint(allowedUID))
	c = &hostnet.Client{Socket: h.sock}
	info, err := c.Info(ctx)
	if err != nil || info.Subnet != "10.99.0.0/24" || info.Gateway != "10.99.0.1/24" || info.Pool != "10.99.0.0/16" || info.MaxTapsPerUser != 2 {
		t.Fatalf("net.info: %+v %v", info, err)
	}
	tap := func(name string) string { return `{"tap":"` + name + `","bridge":"banger0"}` }
	res := h.asUID(t, allowedUID,
		req("net.ensure_bridge", `{"bridge":"banger0","cidr":"172.30.0.1/24"}`, ""),
		req("net.ensure_bridge", `{"bridge":"banger0","cidr":"10.99.7.1/24"}`, ""),
		req("net.ensure_bridge", `{"bridge":"banger0"}`, ""),
		req("net.create_tap", tap("bgt-c1"), ""),
		req("net.create_tap", tap("bgt-c2"), ""),
		req("net.create_tap", tap("bgt-c3"), ""),
		req("net.create_tap", tap("bgt-c1"), ""),
	)
	for i, want := range []string{"invalid_argument", "invalid_argument", "", "", "", "failed_precondition", ""} {
		if got := codeOf(res[i]); got != want {
			t.Errorf("user request #%d: code %q, want %q (%v)", i, got, want, res[i])
		}
	}
	got := bridgeAddrs(t, env)
	slices.Sort(got)
	if want := []string{"10.99.0.1/24", "192.168.99.1/24"}; !slices.Equal(got, want) {
		t.Errorf("bridge addresses: %v, want %v (banger's old address replaced, the foreign one kept)", got, want)
	}
	// Root may not exceed the user's cap on its behalf; its own taps are not capped.
	if _, err := c.CreateTapFor(ctx, "bgt-c4", "banger0", allowedUID, 0); err == nil || !strings.Contains(err.Error(), "max_taps_per_user") {
		t.Errorf("root creating a third tap for the user: %v", err)
	}
	for _, n := range []string{"bgt-r1", "bgt-r2", "bgt-r3"} {
		if _, err := c.CreateTapFor(ctx, n, "banger0", 0, 0); err != nil {
			t.Errorf("root's own tap %s: %v", n, err)
		}
	}
	// An idle connection is closed after request_timeout.
	conn, err := net.Dial("unix", h.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	if _, err := conn.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("idle connection: read %v after %s, want EOF", err, time.Since(start))
	}
}
