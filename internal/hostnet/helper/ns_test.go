package helper

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/hostnet/netcfg"
	"github.com/bangerdev/banger/internal/hostnet/nettest"
	"github.com/bangerdev/banger/internal/rpc"
)

// The test binary doubles as the helper (role "helper": runs Main with the
// process arguments) and as an unprivileged client (role "client": sends
// stdin's lines to the socket and prints each response line).
const roleEnv = "BANGER_HELPER_TEST_ROLE"

func TestMain(m *testing.M) {
	switch os.Getenv(roleEnv) {
	case "helper":
		os.Exit(Main(os.Args[1:], os.Stderr))
	case "client":
		os.Exit(clientMain())
	case "dial":
		os.Exit(dialMain())
	case "abuse":
		os.Exit(abuseMain())
	}
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	if realDir != "" {
		os.RemoveAll(realDir)
	}
	os.Exit(code)
}

func clientMain() int {
	c, err := net.Dial("unix", os.Getenv(hostnet.SocketEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		return 3
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 8<<20)
	for in.Scan() {
		if _, err := c.Write(append(in.Bytes(), '\n')); err != nil {
			fmt.Fprintln(os.Stderr, "write:", err)
			return 3
		}
		line, err := r.ReadString('\n')
		if err != nil {
			fmt.Fprintln(os.Stderr, "read:", err)
			return 3
		}
		os.Stdout.WriteString(line)
	}
	return 0
}

var (
	binOnce sync.Once
	binDir  string
	binPath string
	binErr  error
)

// worldBinary returns a copy of the test binary that any uid may execute.
func worldBinary(t *testing.T) string {
	binOnce.Do(func() {
		self, err := os.Executable()
		if err != nil {
			binErr = err
			return
		}
		if binDir, binErr = os.MkdirTemp("", "bghelper-bin"); binErr != nil {
			return
		}
		if binErr = os.Chmod(binDir, 0o755); binErr != nil {
			return
		}
		src, err := os.Open(self)
		if err != nil {
			binErr = err
			return
		}
		defer src.Close()
		binPath = filepath.Join(binDir, "helper.test")
		dst, err := os.OpenFile(binPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
		if err != nil {
			binErr = err
			return
		}
		_, binErr = io.Copy(dst, src)
		if cerr := dst.Close(); binErr == nil {
			binErr = cerr
		}
	})
	if binErr != nil {
		t.Fatalf("copy test binary: %v", binErr)
	}
	return binPath
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

type testHelper struct {
	sock   string
	logs   *syncBuf
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // Wait's result, valid after exited is closed
}

// startHelper runs the helper as a subprocess inside env's host namespace,
// waits until its socket answers, and stops it at test end.
func startHelper(t *testing.T, env *nettest.Env, args ...string) *testHelper {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return startHelperBin(t, env, self, args...)
}

// startHelperBin is startHelper with the helper binary bin (the test binary
// in its "helper" role, or the real banger-helper). Without a --config
// argument the helper gets one that does not exist (the defaults), never
// the host's.
func startHelperBin(t *testing.T, env *nettest.Env, bin string, args ...string) *testHelper {
	t.Helper()
	if !slices.Contains(args, "--config") {
		args = append(args, "--config", filepath.Join(t.TempDir(), "no-helper.json"))
	}
	dir, err := os.MkdirTemp("", "bghelper-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	h := &testHelper{sock: filepath.Join(dir, "helper.sock"), logs: &syncBuf{}, exited: make(chan struct{})}
	h.cmd = exec.Command(bin, append([]string{"--socket", h.sock}, args...)...)
	h.cmd.Env = append(os.Environ(), roleEnv+"=helper")
	h.cmd.Stderr = h.logs
	if err := env.Start(h.cmd); err != nil {
		t.Fatalf("start helper: %v", err)
	}
	go func() { h.err = h.cmd.Wait(); close(h.exited) }()
	t.Cleanup(func() { h.stop(t) })
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.Dial("unix", h.sock)
		if err == nil {
			c.Close()
			// The socket listens before the helper has resumed what it
			// serves (a running bridge's DNS forwarder), and a call is
			// answered only after that: wait for one answer, whatever it
			// says (a policy may refuse it).
			pctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			_, _ = (&hostnet.Client{Socket: h.sock}).Ping(pctx)
			cancel()
			return h
		}
		select {
		case <-h.exited:
			t.Fatalf("helper exited during startup: %v\n%s", h.err, h.logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("helper socket not ready after 15s: %v\n%s", err, h.logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits (bounded) for a clean exit; kills on expiry.
func (h *testHelper) stop(t *testing.T) error {
	select {
	case <-h.exited:
		return h.err
	default:
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
		return h.err
	case <-time.After(15 * time.Second):
		h.cmd.Process.Kill()
		<-h.exited
		t.Errorf("helper did not stop within 15s of SIGTERM; killed\n%s", h.logs.String())
		return errors.New("killed")
	}
}

// exchange sends raw lines as root (this process) on one connection.
func (h *testHelper) exchange(t *testing.T, lines ...string) []map[string]any {
	t.Helper()
	c, err := net.Dial("unix", h.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	var out []map[string]any
	for _, l := range lines {
		if _, err := c.Write([]byte(l + "\n")); err != nil {
			t.Fatal(err)
		}
		resp, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading response to %.80q: %v", l, err)
		}
		out = append(out, decodeResp(t, resp))
	}
	return out
}

// asUID sends lines from a child process running as uid (gid = uid).
func (h *testHelper) asUID(t *testing.T, uid uint32, lines ...string) []map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, worldBinary(t))
	cmd.Env = []string{roleEnv + "=client", hostnet.SocketEnv + "=" + h.sock}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client as uid %d: %v\n%s", uid, err, stderr.String())
	}
	var res []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		res = append(res, decodeResp(t, l))
	}
	if len(res) != len(lines) {
		t.Fatalf("client as uid %d: %d responses to %d lines", uid, len(res), len(lines))
	}
	return res
}

func decodeResp(t *testing.T, line string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		t.Fatalf("response %q is not JSON: %v", line, err)
	}
	return m
}

func errOf(m map[string]any) (code, msg, op string) {
	e, _ := m["error"].(map[string]any)
	if e == nil {
		return "", "", ""
	}
	code, _ = e["code"].(string)
	msg, _ = e["message"].(string)
	op, _ = e["op_id"].(string)
	return
}

func snapshot(t *testing.T, env *nettest.Env) string {
	t.Helper()
	s, err := env.Snapshot(netcfg.DumpRuleset)
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	return s
}

func req(method, params, op string) string {
	s := `{"version":1,"method":"` + method + `"`
	if params != "" {
		s += `,"params":` + params
	}
	if op != "" {
		s += `,"op_id":"` + op + `"`
	}
	return s + "}"
}

var mintedOpID = regexp.MustCompile(`^op-[0-9a-f]{6,}$`)

const (
	allowedUID = 65534 // nobody
	deniedUID  = 65533
)

// TestBadInputRefused throws malformed, foreign, over-long, non-private,
// colliding, unauthorised and unknown input at a real helper and checks
// each is refused with the right code and an op_id, and that nothing in the
// namespace changed.
func TestBadInputRefused(t *testing.T) {
	env := nettest.New(t)
	h := startHelper(t, env, "--allow-user", fmt.Sprint(allowedUID))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	// State the refusals must leave alone: banger's bridge, a root-owned
	// tap, a foreign device carrying banger's prefix, a private route.
	if _, err := c.EnsureBridge(ctx, "banger0", mustPrefix("172.30.0.1/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateTapFor(ctx, "bgt-root1", "banger0", 0, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: "172.30.0.1/24"}); err != nil {
		t.Fatal(err)
	}
	if err := env.Do(func() error {
		return addVeth("bgt-veth", "vethpeer0")
	}); err != nil {
		t.Fatal(err)
	}
	if err := env.Do(func() error { return addRoute("10.77.0.0/16", env.GatewayAddr.String()) }); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, env)
	t.Logf("namespace before:\n%s", before)

	const (
		root = iota
		allowed
		denied
	)
	tap := func(name, extra string) string {
		return `{"tap":"` + name + `","bridge":"banger0"` + extra + `}`
	}
	br := func(name, cidr string) string { return `{"bridge":"` + name + `","cidr":"` + cidr + `"}` }
	huge := `{"version":1,"method":"system.ping","params":{"x":"` + strings.Repeat("a", 5<<20) + `"}}`
	cases := []struct {
		name   string
		caller int
		line   string
		code   string
	}{
		{"malformed json", root, `{"version":1,"method":`, "bad_request"},
		{"not an object", root, `[1,2,3]`, "bad_request"},
		{"5 MiB line", root, huge, "bad_request"},
		{"bad op id", root, req("system.ping", "", "has space"), "bad_request"},
		{"missing version", root, `{"method":"system.ping"}`, "bad_version"},
		{"unknown method", root, req("net.exec", `{"cmd":"ip link"}`, ""), "unknown_method"},
		{"method outside allow-list", root, req("net.set_sysctl", `{"key":"net.ipv4.ip_forward"}`, ""), "unknown_method"},
		{"params not an object", root, req("net.create_tap", `"bgt-a"`, ""), "invalid_argument"},
		{"null params", root, req("net.create_tap", `null`, ""), "invalid_argument"},
		{"unknown field", root, req("net.create_tap", tap("bgt-a1", `,"script":"/bin/sh"`), ""), "invalid_argument"},
		{"path with dotdot", root, req("net.create_tap", tap("bgt-a1", `,"path":"/home/u/.local/share/banger/../../../../etc/shadow"`), ""), "invalid_argument"},
		{"path outside home", root, req("net.ensure_bridge", `{"bridge":"banger0","cidr":"172.30.0.1/24","path":"/etc/passwd"}`, ""), "invalid_argument"},
		{"tap eth0", root, req("net.create_tap", tap("eth0", ""), ""), "invalid_argument"},
		{"tap lo", root, req("net.create_tap", tap("lo", ""), ""), "invalid_argument"},
		{"tap docker0", root, req("net.create_tap", tap("docker0", ""), ""), "invalid_argument"},
		{"tap existing uplink", root, req("net.delete_tap", `{"tap":"uplink0"}`, ""), "invalid_argument"},
		{"tap over-long", root, req("net.create_tap", tap("bgt-0123456789ab", ""), ""), "invalid_argument"},
		{"tap with slash", root, req("net.create_tap", tap("bgt-a/../b", ""), ""), "invalid_argument"},
		{"tap with space", root, req("net.create_tap", tap("bgt-a b", ""), ""), "invalid_argument"},
		{"tap upper case", root, req("net.create_tap", tap("bgt-ABC", ""), ""), "invalid_argument"},
		{"tap prefix only", root, req("net.create_tap", tap("bgt-", ""), ""), "invalid_argument"},
		{"tap empty", root, req("net.create_tap", tap("", ""), ""), "invalid_argument"},
		{"tap on foreign bridge", root, req("net.create_tap", `{"tap":"bgt-a1","bridge":"docker0"}`, ""), "invalid_argument"},
		{"tap mtu out of range", root, req("net.create_tap", tap("bgt-a1", `,"mtu":100000`), ""), "invalid_argument"},
		{"tap name of a foreign veth", root, req("net.create_tap", tap("bgt-veth", ""), ""), "conflict"},
		{"delete a foreign veth", root, req("net.delete_tap", `{"tap":"bgt-veth"}`, ""), "conflict"},
		{"tap of another owner", root, req("net.create_tap", tap("bgt-root1", `,"owner_uid":1000`), ""), "conflict"},
		{"bridge eth0", root, req("net.ensure_bridge", br("eth0", "172.30.0.1/24"), ""), "invalid_argument"},
		{"delete the uplink", root, req("net.delete_bridge", `{"bridge":"uplink0"}`, ""), "invalid_argument"},
		{"remove nat of docker0", root, req("net.remove_nat", `{"bridge":"docker0"}`, ""), "invalid_argument"},
		{"public range", root, req("net.ensure_bridge", br("banger0", "8.8.8.1/24"), ""), "invalid_argument"},
		{"cgnat range", root, req("net.ensure_bridge", br("banger0", "100.64.0.1/24"), ""), "invalid_argument"},
		{"cgnat /10", root, req("net.ensure_bridge", br("banger0", "100.64.0.1/10"), ""), "invalid_argument"},
		{"just outside 172.16/12", root, req("net.ensure_bridge", br("banger0", "172.32.0.1/24"), ""), "invalid_argument"},
		{"ipv6", root, req("net.ensure_bridge", br("banger0", "fd00::1/64"), ""), "invalid_argument"},
		{"no prefix length", root, req("net.ensure_bridge", br("banger0", "172.30.0.1"), ""), "invalid_argument"},
		{"network address", root, req("net.ensure_bridge", br("banger0", "172.30.0.0/24"), ""), "invalid_argument"},
		{"range outside the configured pool", root, req("net.ensure_bridge", br("banger0", "10.77.3.1/24"), ""), "invalid_argument"},
		{"another /24 of the pool", root, req("net.ensure_bridge", br("banger0", "172.30.5.1/24"), ""), "invalid_argument"},
		{"a wider range than banger's", root, req("net.ensure_bridge", br("banger0", "172.30.0.1/16"), ""), "invalid_argument"},
		{"nat range outside the pool", root, req("net.ensure_nat", br("banger0", "10.77.3.1/24"), ""), "invalid_argument"},
		{"nat cidr not the bridge's", root, req("net.ensure_nat", br("banger0", "172.30.9.1/24"), ""), "invalid_argument"},
		{"user picks a range", allowed, req("net.ensure_bridge", br("banger0", "192.168.77.1/24"), ""), "invalid_argument"},
		{"user deletes root's bridge", allowed, req("net.delete_bridge", `{"bridge":"banger0"}`, ""), "permission_denied"},
		{"user removes root's nat", allowed, req("net.remove_nat", `{"bridge":"banger0"}`, ""), "permission_denied"},
		{"nat uplink lo", root, req("net.ensure_nat", `{"bridge":"banger0","cidr":"172.30.0.1/24","out_iface":"lo"}`, ""), "invalid_argument"},
		{"nat uplink with slash", root, req("net.ensure_nat", `{"bridge":"banger0","cidr":"172.30.0.1/24","out_iface":"../eth0"}`, ""), "invalid_argument"},
		{"nat uplink missing", root, req("net.ensure_nat", `{"bridge":"banger0","cidr":"172.30.0.1/24","out_iface":"nosuch0"}`, ""), "not_found"},
		{"owner uid not the caller's", allowed, req("net.create_tap", tap("bgt-n1", `,"owner_uid":0`), "op-owner01"), "permission_denied"},
		{"delete another user's tap", allowed, req("net.delete_tap", `{"tap":"bgt-root1"}`, ""), "permission_denied"},
		{"unlisted uid ping", denied, req("system.ping", "", "op-denied01"), "permission_denied"},
		{"unlisted uid create", denied, req("net.create_tap", tap("bgt-d1", ""), ""), "permission_denied"},
		{"unlisted uid list", denied, req("net.list", "", ""), "permission_denied"},
	}
	if len(cases) < 25 {
		t.Fatalf("only %d cases", len(cases))
	}
	var lines [3][]string
	var idx [3][]int
	for i, tc := range cases {
		lines[tc.caller] = append(lines[tc.caller], tc.line)
		idx[tc.caller] = append(idx[tc.caller], i)
	}
	resps := make([]map[string]any, len(cases))
	for who, uid := range []uint32{0, allowedUID, deniedUID} {
		var got []map[string]any
		switch who {
		case root:
			got = h.exchange(t, lines[who]...)
		case allowed:
			got = h.asUID(t, uid, lines[who]...)
		default: // a refused connection answers once and closes
			for _, l := range lines[who] {
				got = append(got, h.asUID(t, uid, l)...)
			}
		}
		for j, r := range got {
			resps[idx[who][j]] = r
		}
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, msg, op := errOf(resps[i])
			if code != tc.code {
				t.Fatalf("code %q (%s), want %q; response %v", code, msg, tc.code, resps[i])
			}
			if msg == "" {
				t.Fatal("empty message")
			}
			wantOp := regexp.MustCompile(`"op_id":"(op-[a-z0-9]+)"`).FindStringSubmatch(tc.line)
			if wantOp != nil && wantOp[1] != op {
				t.Fatalf("op_id %q, want the caller's %q", op, wantOp[1])
			}
			if wantOp == nil && !mintedOpID.MatchString(op) {
				t.Fatalf("op_id %q is not a minted id", op)
			}
		})
	}
	if after := snapshot(t, env); after != before {
		t.Fatalf("refused requests changed the namespace:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	// The refusals were logged one line per call with the caller's uid.
	waitLog(t, h, func(l logLine) bool {
		return l.Msg == FailedMsg && l.OpID == "op-denied01" && l.Code == "permission_denied" && l.CallerUID != nil && *l.CallerUID == deniedUID
	})
}

func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// addVeth and addRoute run inside a namespace (nettest.Env.Do).
func addVeth(name, peer string) error {
	return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer})
}

func addRoute(dst, gw string) error {
	_, n, err := net.ParseCIDR(dst)
	if err != nil {
		return err
	}
	return netlink.RouteAdd(&netlink.Route{Dst: n, Gw: net.ParseIP(gw)})
}

type logLine struct {
	Msg        string   `json:"msg"`
	Method     string   `json:"method"`
	OpID       string   `json:"op_id"`
	Code       string   `json:"code"`
	DurationMS *float64 `json:"duration_ms"`
	CallerUID  *uint32  `json:"caller_uid"`
}

func parseLogs(t *testing.T, s string) []logLine {
	t.Helper()
	var out []logLine
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if l == "" {
			continue
		}
		var ll logLine
		if err := json.Unmarshal([]byte(l), &ll); err != nil {
			t.Fatalf("helper log line is not JSON: %q: %v", l, err)
		}
		out = append(out, ll)
	}
	return out
}

func waitLog(t *testing.T, h *testHelper, match func(logLine) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, l := range parseLogs(t, h.logs.String()) {
			if match(l) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("expected log line not found; logs:\n%s", h.logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readProcSys(env *nettest.Env, path string) (string, error) {
	var v string
	err := env.Do(func() error {
		b, err := os.ReadFile(path)
		v = strings.TrimSpace(string(b))
		return err
	})
	return v, err
}

func opCtx(ctx context.Context, id string) context.Context { return rpc.WithOpID(ctx, id) }

// TestHappyPath drives every method through the client in a namespace and
// checks the kernel's view after each, idempotence, and that teardown
// leaves the namespace exactly as it was.
func TestHappyPath(t *testing.T) {
	env := nettest.New(t)
	before := snapshot(t, env)
	h := startHelper(t, env, "--allow-user", fmt.Sprint(allowedUID))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	gw := mustPrefix("172.30.0.1/24")

	ping, err := c.Ping(opCtx(ctx, "op-happy00"))
	if err != nil || ping.Bridge != "banger0" || ping.TapPrefix != "bgt-" || ping.CallerUID != 0 {
		t.Fatalf("ping: %+v %v", ping, err)
	}
	for i, wantCreated := range []bool{true, false} {
		r, err := c.EnsureBridge(opCtx(ctx, fmt.Sprintf("op-happy1%d", i)), "banger0", gw)
		if err != nil || r.Created != wantCreated || r.CIDR != "172.30.0.1/24" {
			t.Fatalf("ensure_bridge #%d: %+v %v", i, r, err)
		}
	}

	// A user's own tap: owner defaults to the caller.
	userTap := hostnet.TapName("", "aaaaaaaaaaaaaaaa")
	res := h.asUID(t, allowedUID,
		req("net.create_tap", `{"tap":"`+userTap+`","bridge":"banger0"}`, "op-happy20"),
		req("net.create_tap", `{"tap":"`+userTap+`","bridge":"banger0","owner_uid":65534}`, "op-happy21"),
	)
	for i, r := range res {
		ti, _ := r["result"].(map[string]any)
		if ti == nil || ti["owner_uid"] != float64(allowedUID) || ti["bridge"] != "banger0" || ti["vnet_hdr"] != true || ti["up"] != true {
			t.Fatalf("create_tap as uid %d #%d: %v", allowedUID, i, r)
		}
		if created, _ := ti["created"].(bool); created != (i == 0) {
			t.Fatalf("create_tap #%d: created=%v", i, ti["created"])
		}
	}
	// Root makes one for another user, with an MTU.
	rootTap := hostnet.TapName("", "bbbbbbbbbbbbbbbb")
	ti, err := c.CreateTapFor(opCtx(ctx, "op-happy30"), rootTap, "banger0", 1000, 1400)
	if err != nil || !ti.Created || ti.OwnerUID != 1000 || ti.MTU != 1400 {
		t.Fatalf("create_tap for 1000: %+v %v", ti, err)
	}
	if ti, err = c.CreateTapFor(ctx, rootTap, "banger0", 1000, 1400); err != nil || ti.Created {
		t.Fatalf("create_tap again: %+v %v", ti, err)
	}
	for _, chk := range []struct{ iface, attr, want string }{
		{userTap, "owner", "65534"},
		{rootTap, "owner", "1000"},
		{rootTap, "mtu", "1400"},
		{userTap, "brport/isolated", "1"},
		{rootTap, "brport/isolated", "1"},
		{userTap, "tun_flags", "0x5802"}, // IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_PERSIST
	} {
		got, err := env.ReadSys(chk.iface, chk.attr)
		if err != nil || got != chk.want {
			t.Errorf("/sys/class/net/%s/%s = %q, %v; want %q", chk.iface, chk.attr, got, err, chk.want)
		}
	}

	// net.list: root sees both taps, the user only its own.
	l, err := c.List(ctx)
	if err != nil || !l.Bridge.Exists || !l.Bridge.Up || len(l.Bridge.CIDRs) != 1 || len(l.Taps) != 2 || l.NAT {
		t.Fatalf("list as root: %+v %v", l, err)
	}
	ul := h.asUID(t, allowedUID, req("net.list", "", ""))[0]
	uTaps, _ := ul["result"].(map[string]any)["taps"].([]any)
	if len(uTaps) != 1 || uTaps[0].(map[string]any)["name"] != userTap {
		t.Fatalf("list as uid %d: %v", allowedUID, ul)
	}

	// NAT twice: the same ruleset.
	var dumps []string
	for i := 0; i < 2; i++ {
		nat, err := c.EnsureNAT(opCtx(ctx, fmt.Sprintf("op-happy4%d", i)), hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String(), AllowDNS: true})
		if err != nil || nat.OutIface != nettest.Uplink || nat.Subnet != "172.30.0.0/24" || nat.Table != "inet banger" {
			t.Fatalf("ensure_nat #%d: %+v %v", i, nat, err)
		}
		if !nat.L2Isolation {
			t.Errorf("the bridge-family table was not installed")
		}
		var d string
		if err := env.Do(func() (err error) { d, err = netcfg.DumpRuleset(); return err }); err != nil {
			t.Fatal(err)
		}
		dumps = append(dumps, d)
	}
	if dumps[0] != dumps[1] {
		t.Fatalf("ensure_nat is not idempotent:\n%s\n---\n%s", dumps[0], dumps[1])
	}
	if !strings.Contains(dumps[0], "table inet banger") || !strings.Contains(dumps[0], "table bridge banger") || strings.Count(dumps[0], "rule ") < 9 {
		t.Fatalf("unexpected ruleset:\n%s", dumps[0])
	}
	t.Logf("ruleset:\n%s", dumps[0])
	if v, err := readProcSys(env, "/proc/sys/net/ipv4/ip_forward"); err != nil || v != "1" {
		t.Fatalf("ip_forward = %q %v", v, err)
	}
	if l, err = c.List(ctx); err != nil || !l.NAT {
		t.Fatalf("list after nat: %+v %v", l, err)
	}

	// Teardown, each step idempotent.
	res = h.asUID(t, allowedUID,
		req("net.delete_tap", `{"tap":"`+userTap+`"}`, "op-happy50"),
		req("net.delete_tap", `{"tap":"`+userTap+`"}`, "op-happy51"))
	if res[0]["result"].(map[string]any)["deleted"] != true || res[1]["result"].(map[string]any)["deleted"] != false {
		t.Fatalf("delete_tap as user: %v", res)
	}
	for _, step := range []struct {
		name string
		fn   func(op string) (bool, error)
	}{
		{"delete_tap", func(op string) (bool, error) { return c.DeleteTap(opCtx(ctx, op), rootTap) }},
		{"remove_nat", func(op string) (bool, error) { return c.RemoveNAT(opCtx(ctx, op), "banger0") }},
		{"delete_bridge", func(op string) (bool, error) { return c.DeleteBridge(opCtx(ctx, op), "banger0") }},
	} {
		for i, want := range []bool{true, false} {
			op := fmt.Sprintf("op-%s-%d", strings.ReplaceAll(step.name, "_", ""), i)
			if got, err := step.fn(op); err != nil || got != want {
				t.Fatalf("%s #%d: deleted=%v %v", step.name, i, got, err)
			}
		}
	}
	if after := snapshot(t, env); after != before {
		t.Fatalf("teardown left state behind:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	// One log line per call with op_id, method and duration_ms.
	if err := h.stop(t); err != nil {
		t.Fatalf("helper exit after SIGTERM: %v\n%s", err, h.logs.String())
	}
	if _, err := os.Stat(h.sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after shutdown: %v", err)
	}
	perOp := map[string][]logLine{}
	for _, l := range parseLogs(t, h.logs.String()) {
		if l.Msg == CompletedMsg || l.Msg == FailedMsg {
			if l.Method == "" || l.DurationMS == nil || !strings.HasPrefix(l.OpID, "op-") {
				t.Errorf("incomplete call record %+v", l)
			}
			perOp[l.OpID] = append(perOp[l.OpID], l)
		}
	}
	for op, method := range map[string]string{
		"op-happy00": hostnet.MethodPing, "op-happy10": hostnet.MethodEnsureBridge, "op-happy20": hostnet.MethodCreateTap,
		"op-happy30": hostnet.MethodCreateTap, "op-happy41": hostnet.MethodEnsureNAT, "op-happy50": hostnet.MethodDeleteTap,
		"op-removenat-0": hostnet.MethodRemoveNAT, "op-deletebridge-1": hostnet.MethodDeleteBridge,
	} {
		ls := perOp[op]
		if len(ls) != 1 || ls[0].Method != method || ls[0].Msg != CompletedMsg || ls[0].CallerUID == nil {
			t.Errorf("log records for %s: %+v, want exactly one %q for %s", op, ls, CompletedMsg, method)
		}
	}
	if ls := perOp["op-happy20"]; len(ls) == 1 && (ls[0].CallerUID == nil || *ls[0].CallerUID != allowedUID) {
		t.Errorf("caller_uid of the user's call: %+v", ls[0])
	}
}

// TestGuestTraffic checks the ruleset's effect with fake guests (veth pairs
// into their own namespaces) on the bridge: NAT out to the "internet",
// no guest→host services, no guest→guest, host→guest allowed.
func TestGuestTraffic(t *testing.T) {
	env := nettest.New(t)
	h := startHelper(t, env)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	gw := mustPrefix("172.30.0.1/24")
	if _, err := c.EnsureBridge(ctx, "banger0", gw); err != nil {
		t.Fatal(err)
	}
	g1 := env.AddGuest(t, "banger0", "bgt-g1", mustPrefix("172.30.0.2/24"), gw.Addr())
	g2 := env.AddGuest(t, "banger0", "bgt-g2", mustPrefix("172.30.0.3/24"), gw.Addr())
	hostSvc := nettest.Listen(t, env.Host, netip.MustParseAddrPort("0.0.0.0:0"))
	g2Svc := nettest.Listen(t, g2.NS, netip.MustParseAddrPort("172.30.0.3:0"))
	internet := netip.AddrPortFrom(env.InternetAddr, uint16(env.InternetPort))
	// Before NAT: the outside has no route back to the guests.
	if _, err := nettest.Dial(ctx, g1.NS, internet, time.Second); err == nil {
		t.Fatal("guest reached the outside without NAT")
	}
	// Control: with port isolation off and no rules, guests reach each other.
	isolate := func(on bool) {
		for _, p := range []string{g1.Port, g2.Port} {
			if err := env.SetIsolated(p, on); err != nil {
				t.Fatal(err)
			}
		}
	}
	isolate(false)
	if line, err := nettest.Dial(ctx, g1.NS, g2Svc, 5*time.Second); err != nil || line != "hello" {
		t.Fatalf("control guest → guest without isolation: %q %v", line, err)
	}
	if _, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String()}); err != nil {
		t.Fatal(err)
	}
	// The fake guests' ports are veths, not taps: record them by hand.
	registerGuests(t, env, 0, g1, g2)
	line, err := nettest.Dial(ctx, g1.NS, internet, 5*time.Second)
	if err != nil || line != "hello "+env.HostAddr.Addr().String() {
		t.Fatalf("guest → internet: %q %v (want the uplink address: masqueraded)", line, err)
	}
	// Host → guest works (bangerd reaches guests this way without vsock).
	if line, err := nettest.Dial(ctx, env.Host, g2Svc, 5*time.Second); err != nil || line != "hello" {
		t.Fatalf("host → guest: %q %v", line, err)
	}
	blocked := []struct {
		name string
		from *nettest.Guest
		to   netip.AddrPort
	}{
		{"guest → host via gateway", g1, netip.AddrPortFrom(gw.Addr(), hostSvc.Port())},
		{"guest → host via uplink address", g1, netip.AddrPortFrom(env.HostAddr.Addr(), hostSvc.Port())},
		{"guest → guest", g1, g2Svc},
	}
	// Ports still not isolated: the nftables rules alone must block these.
	for _, b := range blocked {
		if line, err := nettest.Dial(ctx, b.from.NS, b.to, time.Second); err == nil {
			t.Errorf("%s: connected (%q), want blocked", b.name, line)
		}
	}
	// And port isolation alone (as create_tap sets it) blocks guest → guest.
	isolate(true)
	if _, err := c.RemoveNAT(ctx, "banger0"); err != nil {
		t.Fatal(err)
	}
	if line, err := nettest.Dial(ctx, g1.NS, g2Svc, time.Second); err == nil {
		t.Errorf("guest → guest with isolated ports and no rules: connected (%q)", line)
	}
}

// registerGuests installs the per-guest rules (anti-spoofing, owner-only
// connections) for fake guests, owned by owner, as the helper does for the
// taps it creates.
func registerGuests(t *testing.T, env *nettest.Env, owner uint32, gs ...*nettest.Guest) {
	t.Helper()
	var guests []netcfg.Guest
	for _, g := range gs {
		guests = append(guests, netcfg.Guest{Tap: g.Port, Owner: owner, MAC: g.MAC, IP: g.Addr.Addr()})
	}
	if err := env.Do(func() error {
		l2, err := netcfg.SyncGuests(hostnet.NATTable, "banger0", hostnet.DefaultTapPrefix, guests)
		if err == nil && !l2 {
			err = errors.New("bridge family table not installed")
		}
		return err
	}); err != nil {
		t.Fatalf("register fake guests: %v", err)
	}
}
