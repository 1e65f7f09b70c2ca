package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/hostnet/nettest"
	"github.com/bangerdev/banger/internal/testenv"
)

// dialAsUser connects with busybox nc from the host namespace as uid and
// returns what the peer said (err when nc failed).
func dialAsUser(t *testing.T, e *nettest.Env, uid uint32, ap netip.AddrPort) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "busybox", "timeout", "3", "busybox", "nc", ap.Addr().String(), fmt.Sprint(ap.Port()))
	cmd.Dir = "/"
	cmd.Stdin = strings.NewReader("")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := e.Start(cmd); err != nil {
		t.Fatalf("start nc as uid %d: %v", uid, err)
	}
	err := cmd.Wait()
	return strings.TrimSpace(out.String()), err
}

// TestGuestNetworkEgress is issue 9 §5's acceptance with real guests
// (QEMU/TCG behind banger's taps), on a host namespace where Docker's
// iptables-nft FORWARD policy is drop and the resolver is a stub at
// 127.0.0.53: a guest reaches a public-range address through NAT but not
// 169.254.169.254 or a private address in the "outside"; it resolves a
// name through its gateway; nobody cannot connect to a guest port its
// owner reaches; a guest that takes another guest's address gets nothing
// through, and the real guest still answers.
func TestGuestNetworkEgress(t *testing.T) {
	metadata := netip.MustParseAddr("169.254.169.254")
	private := netip.MustParseAddr("10.20.30.40")
	answer := netip.MustParseAddr("203.0.113.77")
	svc := map[netip.Addr]netip.AddrPort{}
	var stubHits func() int
	r := newNetRigWith(t, func(e *nettest.Env) []string {
		// Docker (iptables-nft): FORWARD policy drop, jumping to DOCKER-USER.
		if err := e.DockerForwardDrop(true); err != nil {
			t.Fatal(err)
		}
		for _, a := range []netip.Addr{metadata, private} {
			if err := e.AddOutsideAddr(a); err != nil {
				t.Fatal(err)
			}
			svc[a] = nettest.Listen(t, e.Outside, netip.AddrPortFrom(a, 0))
		}
		stubHits = e.ServeDNS(t, netip.MustParseAddrPort("127.0.0.53:53"), answer)
		resolv := filepath.Join(t.TempDir(), "resolv.conf")
		if err := os.WriteFile(resolv, []byte("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return []string{"--resolv-conf", resolv}
	})
	e, h := r.env, r.home
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for a, ap := range svc {
		if line, err := nettest.Dial(ctx, e.Host, ap, 3*time.Second); err != nil || line != "hello" {
			t.Fatalf("control: the host namespace does not reach %s: %q %v", a, line, err)
		}
	}

	opA, opB := r.beginCreate(t, "ega"), r.beginCreate(t, "egb")
	r.waitCreate(t, opA)
	r.waitCreate(t, opB)
	ips := map[string]netip.Addr{}
	for _, n := range []string{"ega", "egb"} {
		var v struct{ IP string }
		if err := json.Unmarshal([]byte(mustBanger(t, h, "vm", "show", n, "-o", "json")), &v); err != nil {
			t.Fatal(err)
		}
		ips[n] = netip.MustParseAddr(v.IP)
	}
	gw := bridgeGateway(t, e)
	internet := netip.AddrPortFrom(e.InternetAddr, uint16(e.InternetPort))
	nc := func(ap netip.AddrPort) string {
		return fmt.Sprintf("timeout 3 busybox nc %s %d </dev/null", ap.Addr(), ap.Port())
	}
	res := r.guestExecAll(t, []guestCmd{
		{"ega", nc(internet)},
		{"ega", nc(svc[metadata])},
		{"ega", nc(svc[private])},
		{"ega", "cat /etc/resolv.conf; busybox nslookup vm.example"},
		{"ega", "setsid busybox nc -ll -p 8080 -e echo hi-ega </dev/null >/dev/null 2>&1 &"},
	})
	if res[0].code != 0 || res[0].out != "hello "+e.HostAddr.Addr().String()+"\n" {
		t.Errorf("guest → public %s (positive control, through Docker's FORWARD drop): exit %d %q", internet, res[0].code, res[0].out)
	}
	for i, name := range map[int]string{1: "cloud metadata " + metadata.String(), 2: "private " + private.String()} {
		if res[i].code == 0 || strings.Contains(res[i].out, "hello") {
			t.Errorf("guest → %s: exit %d %q, want blocked", name, res[i].code, res[i].out)
		}
	}
	t.Logf("guest nslookup:\n%s", res[3].out)
	if res[3].code != 0 || !strings.Contains(res[3].out, answer.String()) || !strings.Contains(res[3].out, gw.String()) {
		t.Errorf("guest nslookup vm.example through %s: exit %d\n%s", gw, res[3].code, res[3].out)
	}
	if stubHits() == 0 {
		t.Errorf("the host's 127.0.0.53 resolver saw no query")
	}
	if res[4].code != 0 {
		t.Fatalf("start listener in ega: %d %s", res[4].code, res[4].out)
	}

	// The owner (bangerd's user: root here) reaches the guest; nobody not.
	ega := netip.AddrPortFrom(ips["ega"], 8080)
	testenv.WaitFor(t, 15*time.Second, "owner to reach ega's listener", func() bool {
		line, err := dialAsUser(t, e, 0, ega)
		return err == nil && line == "hi-ega"
	})
	if line, err := dialAsUser(t, e, nobodyUID, internet); err != nil || !strings.HasPrefix(line, "hello") {
		t.Fatalf("control: nobody's nc does not reach %s: %q %v", internet, line, err)
	}
	if line, err := dialAsUser(t, e, nobodyUID, ega); err == nil || line == "hi-ega" {
		t.Errorf("nobody → guest %s: %q %v, want refused", ega, line, err)
	}

	// egb takes ega's address: nothing gets through, and ega still answers.
	spoof := fmt.Sprintf("dev=$(ls /sys/class/net | grep -v '^lo$' | head -1); ip addr flush dev $dev && ip addr add %s/24 dev $dev && ip route add default via %s; %s",
		ips["ega"], gw, nc(internet))
	res = r.guestExecAll(t, []guestCmd{{"egb", spoof}})
	if res[0].code == 0 || strings.Contains(res[0].out, "hello") {
		t.Errorf("guest with another guest's IP → internet: exit %d %q, want nothing through", res[0].code, res[0].out)
	}
	if line, err := dialAsUser(t, e, 0, ega); err != nil || line != "hi-ega" {
		t.Errorf("host → the real ega after egb's spoofing: %q %v", line, err)
	}
	for _, n := range []string{"ega", "egb"} {
		mustBanger(t, h, "vm", "delete", n, "--force")
	}
}
