package helper

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/hostnet/netcfg"
	"github.com/bangerdev/banger/internal/hostnet/nettest"
)

// dialMain is the test binary's "dial" role: connect to $BANGER_DIAL_ADDR
// (TCP, 3 s) and print the first line the peer sends.
func dialMain() int {
	c, err := net.DialTimeout("tcp", os.Getenv("BANGER_DIAL_ADDR"), 3*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		return 4
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	b := make([]byte, 64)
	n, _ := c.Read(b)
	os.Stdout.Write(b[:n])
	return 0
}

// dialAs connects to addr from the host namespace as uid and returns the
// greeting (err when the connection failed).
func dialAs(t *testing.T, env *nettest.Env, uid uint32, addr netip.AddrPort) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, worldBinary(t))
	cmd.Env = []string{roleEnv + "=dial", "BANGER_DIAL_ADDR=" + addr.String()}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := env.Start(cmd); err != nil {
		t.Fatalf("start dialer: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		return "", fmt.Errorf("%v: %s", err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// dockerDrop installs what Docker (iptables-nft) leaves: table ip filter
// with FORWARD policy drop and a DOCKER-USER chain it jumps to.
func dockerDrop(t *testing.T, env *nettest.Env, withUser bool) {
	t.Helper()
	if err := env.DockerForwardDrop(withUser); err != nil {
		t.Fatal(err)
	}
}

// countMarked counts banger's rules in table ip filter.
func countMarked(t *testing.T, env *nettest.Env) int {
	t.Helper()
	var d string
	if err := env.Do(func() (err error) { d, err = netcfg.DumpRuleset(); return err }); err != nil {
		t.Fatal(err)
	}
	n := 0
	inFilter := false
	for _, l := range strings.Split(d, "\n") {
		if strings.HasPrefix(l, "table ") {
			inFilter = l == "table ip filter"
		}
		if inFilter && strings.Contains(l, "userdata=") {
			n++
		}
	}
	return n
}

// query builds an A query for name.
func query(id uint16, name string) []byte {
	q := make([]byte, 12)
	binary.BigEndian.PutUint16(q, id)
	q[2] = 0x01 // RD
	binary.BigEndian.PutUint16(q[4:], 1)
	for _, l := range strings.Split(strings.TrimSuffix(name, "."), ".") {
		q = append(q, byte(len(l)))
		q = append(q, l...)
	}
	return append(q, 0, 0, 1, 0, 1)
}

// resolveIn sends an A query for name to server from ns over UDP or TCP and
// returns the last 4 bytes of the answer as an address.
func resolveIn(ns netns.NsHandle, server netip.AddrPort, name string, tcp bool) (netip.Addr, error) {
	var ans []byte
	err := nettest.DoIn(ns, func() error {
		network := "udp4"
		if tcp {
			network = "tcp4"
		}
		c, err := net.DialTimeout(network, server.String(), 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(4 * time.Second))
		q := query(0x4242, name)
		if tcp {
			q = append([]byte{byte(len(q) >> 8), byte(len(q))}, q...)
		}
		if _, err := c.Write(q); err != nil {
			return err
		}
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		ans = buf[:n]
		if tcp {
			ans = ans[2:]
		}
		return nil
	})
	if err != nil {
		return netip.Addr{}, err
	}
	if len(ans) < 16 || ans[0] != 0x42 || ans[1] != 0x42 || ans[3]&0x0f != 0 || binary.BigEndian.Uint16(ans[6:]) != 1 {
		return netip.Addr{}, fmt.Errorf("not an answer: %x", ans)
	}
	return netip.AddrFrom4([4]byte(ans[len(ans)-4:])), nil
}

// setGuestAddr replaces a fake guest's eth0 address (and MAC when given),
// keeping its default route: a guest that spoofs.
func setGuestAddr(t *testing.T, g *nettest.Guest, addr netip.Prefix, mac net.HardwareAddr, gw netip.Addr) {
	t.Helper()
	h, err := netlink.NewHandleAt(g.NS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	addrs, _ := h.AddrList(l, netlink.FAMILY_V4)
	for _, a := range addrs {
		h.AddrDel(l, &a)
	}
	if mac != nil {
		h.LinkSetDown(l)
		if err := h.LinkSetHardwareAddr(l, mac); err != nil {
			t.Fatal(err)
		}
		h.LinkSetUp(l)
	}
	if err := h.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}}); err != nil {
		t.Fatal(err)
	}
	h.RouteAdd(&netlink.Route{Gw: gw.AsSlice(), LinkIndex: l.Attrs().Index})
}

// TestGuestNetworkPolicy is issue 9 §5's acceptance with fake guests (veth
// namespaces on banger's bridge) and a Docker-style FORWARD drop already in
// place: a guest reaches a public address through NAT and nothing else (not
// 169.254.169.254, not RFC 1918 or CGNAT addresses in the "outside"),
// except a range the helper's --allow-cidr opens; no IPv6 leaves it; a
// guest that takes another's MAC and IP gets nothing through; only the
// owner (and root) may connect to a guest; guests resolve names through the
// helper's forwarder when the host's resolver is 127.0.0.53; remove_nat
// takes banger's rules out again.
func TestGuestNetworkPolicy(t *testing.T) {
	env := nettest.New(t)
	const owner = 1000
	dockerDrop(t, env, true)
	if v, err := readProcSys(env, "/proc/sys/net/ipv4/ip_forward"); err != nil || v != "0" {
		t.Fatalf("a new namespace has ip_forward %q %v, want 0", v, err)
	}

	// The "outside": the public control and addresses that must stay out
	// of reach, each with a listener; the host itself reaches all of them.
	internet := netip.AddrPortFrom(env.InternetAddr, uint16(env.InternetPort))
	blocked := map[string]netip.Addr{
		"cloud metadata":                    netip.MustParseAddr("169.254.169.254"),
		"RFC 1918 10/8":                     netip.MustParseAddr("10.20.30.40"),
		"RFC 1918 192.168/16 (not allowed)": netip.MustParseAddr("192.168.60.10"),
		"CGNAT":                             netip.MustParseAddr("100.64.1.1"),
	}
	allowed := netip.MustParseAddr("192.168.50.10") // opened by --allow-cidr
	svc := map[netip.Addr]netip.AddrPort{}
	for _, a := range append([]netip.Addr{allowed}, mapValues(blocked)...) {
		if err := env.AddOutsideAddr(a); err != nil {
			t.Fatalf("outside address %s: %v", a, err)
		}
		svc[a] = nettest.Listen(t, env.Outside, netip.AddrPortFrom(a, 0))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for a, ap := range svc {
		if line, err := nettest.Dial(ctx, env.Host, ap, 3*time.Second); err != nil || line != "hello" {
			t.Fatalf("control: the host namespace does not reach %s: %q %v", a, line, err)
		}
	}

	// The host's resolver is a stub at 127.0.0.53, as with systemd-resolved.
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(resolv, []byte("# systemd-resolved stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	answer := netip.MustParseAddr("203.0.113.77")
	stubHits := env.ServeDNS(t, netip.MustParseAddrPort("127.0.0.53:53"), answer)

	h := startHelper(t, env, "--allow-user", fmt.Sprint(allowedUID), "--allow-cidr", "192.168.50.0/24", "--resolv-conf", resolv)
	c := &hostnet.Client{Socket: h.sock}
	gw := mustPrefix("172.30.0.1/24")
	if _, err := c.EnsureBridge(ctx, "banger0", gw); err != nil {
		t.Fatal(err)
	}
	g1 := env.AddGuest(t, "banger0", "bgt-g1", mustPrefix("172.30.0.2/24"), gw.Addr())
	g2 := env.AddGuest(t, "banger0", "bgt-g2", mustPrefix("172.30.0.3/24"), gw.Addr())
	spoofer := env.AddGuest(t, "banger0", "bgt-g3", mustPrefix("172.30.0.4/24"), gw.Addr())
	nat, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String(), AllowDNS: true})
	if err != nil {
		t.Fatalf("ensure_nat: %v\n%s", err, h.logs.String())
	}
	if nat.DNS != "172.30.0.1:53" {
		t.Errorf("ensure_nat reports DNS %q, want 172.30.0.1:53", nat.DNS)
	}
	registerGuests(t, env, owner, g1, g2, spoofer)
	if v, _ := readProcSys(env, "/proc/sys/net/ipv4/ip_forward"); v != "1" {
		t.Fatalf("ip_forward %q after ensure_nat", v)
	}
	if n := countMarked(t, env); n != 2 {
		t.Errorf("%d banger rules in Docker's ip filter, want 2", n)
	}
	if l, err := c.List(ctx); err != nil || l.Forward == nil || !l.Forward.NftDrop || !l.Forward.BangerAccepts || l.Forward.LegacyFilter {
		t.Errorf("net.list forward state: %+v %v, want nft drop with banger's accepts, no legacy table", l.Forward, err)
	}

	// Egress: the public address through NAT (with Docker's drop present),
	// the allowed range, and nothing else.
	if line, err := nettest.Dial(ctx, g1.NS, internet, 5*time.Second); err != nil || line != "hello "+env.HostAddr.Addr().String() {
		t.Fatalf("guest → public %s: %q %v (want NAT through the Docker-style FORWARD drop)", internet, line, err)
	}
	if line, err := nettest.Dial(ctx, g1.NS, svc[allowed], 5*time.Second); err != nil || line != "hello" {
		t.Errorf("guest → %s (opened by --allow-cidr): %q %v", allowed, line, err)
	}
	for name, a := range blocked {
		if line, err := nettest.Dial(ctx, g1.NS, svc[a], time.Second); err == nil {
			t.Errorf("guest → %s %s: connected (%q), want blocked", name, a, line)
		}
	}

	// DNS: the gateway answers (UDP and TCP) with what the host's 127.0.0.53
	// resolver says.
	for _, tcp := range []bool{false, true} {
		got, err := resolveIn(g1.NS, netip.AddrPortFrom(gw.Addr(), 53), "vm.example", tcp)
		if err != nil || got != answer {
			t.Errorf("guest resolves vm.example via the gateway (tcp=%v): %s %v; want %s", tcp, got, err, answer)
		}
	}
	if stubHits() == 0 {
		t.Errorf("the 127.0.0.53 stub saw no query")
	}
	// The forwarder does not relay junk.
	if _, err := resolveIn(g1.NS, netip.AddrPortFrom(gw.Addr(), 53), strings.Repeat("a.", 3000)+"x", false); err == nil {
		t.Errorf("an oversized query got an answer")
	}

	// IPv6: a control first — with banger's tables gone for a moment the
	// guest reaches the host over IPv6 — then nothing.
	h6 := nettest.Listen(t, env.Host, netip.MustParseAddrPort("[::]:0"))
	addV6(t, env.Host, "banger0", "fd42::1/64")
	addV6(t, g1.NS, "eth0", "fd42::2/64")
	v6 := netip.AddrPortFrom(netip.MustParseAddr("fd42::1"), h6.Port())
	if err := env.Do(func() error { _, err := netcfg.RemoveNAT(hostnet.NATTable, "banger0"); return err }); err != nil {
		t.Fatal(err)
	}
	if line, err := nettest.Dial(ctx, g1.NS, v6, 5*time.Second); err != nil || line != "hello" {
		t.Fatalf("control: guest → host over IPv6 without banger's tables: %q %v", line, err)
	}
	if _, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String(), AllowDNS: true}); err != nil {
		t.Fatal(err)
	}
	registerGuests(t, env, owner, g1, g2, spoofer)
	if line, err := nettest.Dial(ctx, g1.NS, v6, time.Second); err == nil {
		t.Errorf("guest → host over IPv6: connected (%q), want dropped", line)
	}

	// Only the owner (and root) open connections to a guest.
	g2Svc := nettest.Listen(t, g2.NS, netip.MustParseAddrPort("172.30.0.3:0"))
	for _, tc := range []struct {
		uid  uint32
		want bool
	}{{owner, true}, {0, true}, {allowedUID, false}, {owner + 1, false}} {
		line, err := dialAs(t, env, tc.uid, g2Svc)
		if got := err == nil && line == "hello"; got != tc.want {
			t.Errorf("uid %d → guest %s: %q %v; want reached=%v", tc.uid, g2Svc, line, err, tc.want)
		}
	}

	// Spoofing: the third guest reaches the internet as itself (control),
	// then takes g2's MAC and IP and gets nothing through.
	if line, err := nettest.Dial(ctx, spoofer.NS, internet, 5*time.Second); err != nil || !strings.HasPrefix(line, "hello") {
		t.Fatalf("control: spoofer → internet as itself: %q %v", line, err)
	}
	setGuestAddr(t, spoofer, g2.Addr, g2.MAC, gw.Addr())
	if line, err := nettest.Dial(ctx, spoofer.NS, internet, 2*time.Second); err == nil {
		t.Errorf("guest with another guest's MAC and IP → internet: connected (%q)", line)
	}
	if _, err := resolveIn(spoofer.NS, netip.AddrPortFrom(gw.Addr(), 53), "vm.example", false); err == nil {
		t.Errorf("guest with another guest's MAC and IP got a DNS answer")
	}
	setGuestAddr(t, spoofer, g2.Addr, nil, gw.Addr())
	spoofer.MAC = nil
	if line, err := nettest.Dial(ctx, spoofer.NS, internet, 2*time.Second); err == nil {
		t.Errorf("guest with another guest's IP → internet: connected (%q)", line)
	}
	// The real g2 is still the one the host reaches (no ARP poisoning).
	if line, err := nettest.Dial(ctx, env.Host, g2Svc, 5*time.Second); err != nil || line != "hello" {
		t.Errorf("host → real g2 after the spoofing attempts: %q %v", line, err)
	}
	if line, err := nettest.Dial(ctx, g2.NS, internet, 5*time.Second); err != nil || !strings.HasPrefix(line, "hello") {
		t.Errorf("real g2 → internet after the spoofing attempts: %q %v", line, err)
	}

	// remove_nat: banger's tables and Docker rules gone; forwarding stays on
	// because Docker's firewall now manages it (TestForwardingGuard covers
	// the host without one).
	if _, err := c.RemoveNAT(ctx, "banger0"); err != nil {
		t.Fatal(err)
	}
	if n := countMarked(t, env); n != 0 {
		t.Errorf("%d banger rules left in ip filter after remove_nat", n)
	}
	if l, err := c.List(ctx); err != nil || l.Forward == nil || !l.Forward.NftDrop || l.Forward.BangerAccepts {
		t.Errorf("net.list forward state after remove_nat: %+v %v", l.Forward, err)
	}
	if v, _ := readProcSys(env, "/proc/sys/net/ipv4/ip_forward"); v != "1" {
		t.Errorf("ip_forward %q after remove_nat with Docker's FORWARD drop present, want 1 (left for Docker)", v)
	}
	var d string
	env.Do(func() (err error) { d, err = netcfg.DumpRuleset(); return err })
	if strings.Contains(d, "banger") {
		t.Errorf("banger's tables left after remove_nat:\n%s", d)
	}
}

func mapValues(m map[string]netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// addV6 puts an IPv6 address (no duplicate address detection) on iface in ns.
func addV6(t *testing.T, ns netns.NsHandle, iface, cidr string) {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(iface)
	if err != nil {
		t.Fatal(err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	a.Flags = unix.IFA_F_NODAD
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatalf("add %s to %s: %v", cidr, iface, err)
	}
}

// addLAN creates a namespace behind a veth "iface" of the host namespace
// (hostAddr on the host side, lanAddr inside, default route back through
// the host): another network the host is attached to. Removed at test end.
func addLAN(t *testing.T, env *nettest.Env, iface, hostAddr, lanAddr string) netns.NsHandle {
	t.Helper()
	ch := make(chan netns.NsHandle, 1)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread changes namespace
		h, err := netns.New()
		ch <- h
		errc <- err
	}()
	ns := <-ch
	if err := <-errc; err != nil {
		t.Fatalf("create LAN namespace: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	hh, err := netlink.NewHandleAt(env.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer hh.Close()
	lh, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer lh.Close()
	if err := hh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: iface}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns))}); err != nil {
		t.Fatalf("create LAN veth: %v", err)
	}
	t.Cleanup(func() {
		if l, err := hh.LinkByName(iface); err == nil {
			hh.LinkDel(l)
		}
	})
	for _, x := range []struct {
		h    *netlink.Handle
		name string
		addr string
	}{{hh, iface, hostAddr}, {lh, "eth0", lanAddr}, {lh, "lo", ""}} {
		l, err := x.h.LinkByName(x.name)
		if err != nil {
			t.Fatal(err)
		}
		if x.addr != "" {
			a, _ := netlink.ParseAddr(x.addr)
			if err := x.h.AddrAdd(l, a); err != nil {
				t.Fatal(err)
			}
		}
		if err := x.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	eth, _ := lh.LinkByName("eth0")
	gw, _ := netlink.ParseAddr(hostAddr)
	if err := lh.RouteAdd(&netlink.Route{Gw: gw.IP, LinkIndex: eth.Attrs().Index}); err != nil {
		t.Fatalf("LAN default route: %v", err)
	}
	return ns
}

// TestCreateTapGuestAddresses: create_tap records a guest's MAC and IP
// only when the IP is a guest address of the bridge's subnet and neither
// is another tap's, so no user can claim a running guest's address.
func TestCreateTapGuestAddresses(t *testing.T) {
	env := nettest.New(t)
	h := startHelper(t, env, "--allow-user", fmt.Sprint(allowedUID))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	if _, err := c.EnsureBridge(ctx, "banger0", netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sub := netip.MustParsePrefix(info.Subnet)
	gw := netip.MustParsePrefix(info.Gateway).Addr()
	guest := sub.Addr().Next().Next() // .2
	root := uint32(0)
	ti, err := c.CreateTapWith(ctx, hostnet.CreateTapParams{Tap: "bgt-a1", Bridge: "banger0", OwnerUID: &root, MAC: "02:00:00:00:00:0a", IP: guest.String()})
	if err != nil || ti.MAC != "02:00:00:00:00:0a" || ti.IP != guest.String() {
		t.Fatalf("create_tap with the guest's addresses: %+v %v", ti, err)
	}
	alias, err := env.ReadSys("bgt-a1", "ifalias")
	if err != nil || !strings.Contains(alias, guest.String()) {
		t.Fatalf("tap alias %q %v, want the guest's record", alias, err)
	}
	// An address someone else put on the bridge, outside the helper's pool,
	// does not make its subnet a guest range.
	if err := env.Do(func() error {
		l, err := netlink.LinkByName("banger0")
		if err != nil {
			return err
		}
		a, _ := netlink.ParseAddr("192.0.2.1/24")
		return netlink.AddrAdd(l, a)
	}); err != nil {
		t.Fatal(err)
	}
	bcast := netip.AddrFrom4([4]byte{sub.Addr().As4()[0], sub.Addr().As4()[1], sub.Addr().As4()[2], 255})
	tap := func(name, mac, ip string) string {
		return req("net.create_tap", fmt.Sprintf(`{"tap":%q,"bridge":"banger0","mac":%q,"ip":%q}`, name, mac, ip), "")
	}
	for _, tc := range []struct{ name, line, code string }{
		{"another tap's IP", tap("bgt-b1", "02:00:00:00:00:0b", guest.String()), "conflict"},
		{"another tap's MAC", tap("bgt-b1", "02:00:00:00:00:0a", guest.Next().String()), "conflict"},
		{"the gateway", tap("bgt-b1", "02:00:00:00:00:0b", gw.String()), "invalid_argument"},
		{"the network address", tap("bgt-b1", "02:00:00:00:00:0b", sub.Addr().String()), "invalid_argument"},
		{"the broadcast address", tap("bgt-b1", "02:00:00:00:00:0b", bcast.String()), "invalid_argument"},
		{"outside the subnet", tap("bgt-b1", "02:00:00:00:00:0b", "203.0.113.9"), "invalid_argument"},
		{"a foreign bridge address's subnet", tap("bgt-b1", "02:00:00:00:00:0b", "192.0.2.5"), "invalid_argument"},
		{"IPv6", tap("bgt-b1", "02:00:00:00:00:0b", "fd00::2"), "invalid_argument"},
		{"multicast MAC", tap("bgt-b1", "03:00:00:00:00:0b", guest.Next().String()), "invalid_argument"},
		{"zero MAC", tap("bgt-b1", "00:00:00:00:00:00", guest.Next().String()), "invalid_argument"},
		{"long MAC", tap("bgt-b1", "02:00:00:00:00:00:00:0b", guest.Next().String()), "invalid_argument"},
		{"MAC without IP", req("net.create_tap", `{"tap":"bgt-b1","bridge":"banger0","mac":"02:00:00:00:00:0b"}`, ""), "invalid_argument"},
	} {
		resp := h.asUID(t, allowedUID, tc.line)[0]
		if code, msg, _ := errOf(resp); code != tc.code {
			t.Errorf("%s: got %v (%s), want %s", tc.name, code, msg, tc.code)
		}
	}
	if _, err := env.ReadSys("bgt-b1", "ifindex"); err == nil {
		t.Errorf("a refused create_tap left tap bgt-b1 behind")
	}
}

// TestDNSPortTakenByHost: when a DNS server of the host already listens on
// all addresses, ensure_nat still succeeds and guests reach that server on
// the gateway.
func TestDNSPortTakenByHost(t *testing.T) {
	env := nettest.New(t)
	answer := netip.MustParseAddr("203.0.113.88")
	hits := env.ServeDNS(t, netip.MustParseAddrPort("0.0.0.0:53"), answer)
	h := startHelper(t, env)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	gw := mustPrefix("172.30.0.1/24")
	if _, err := c.EnsureBridge(ctx, "banger0", gw); err != nil {
		t.Fatal(err)
	}
	g := env.AddGuest(t, "banger0", "bgt-g1", mustPrefix("172.30.0.2/24"), gw.Addr())
	nat, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String(), AllowDNS: true})
	if err != nil || nat.DNS != "172.30.0.1:53" || nat.DNSError != "" {
		t.Fatalf("ensure_nat with port 53 taken: %+v %v\n%s", nat, err, h.logs.String())
	}
	registerGuests(t, env, 0, g)
	if got, err := resolveIn(g.NS, netip.AddrPortFrom(gw.Addr(), 53), "vm.example", false); err != nil || got != answer || hits() == 0 {
		t.Fatalf("guest resolves through the host's own server: %s %v (hits %d)", got, err, hits())
	}
	// net.list tells doctor about firewalld (its table appears).
	if l, err := c.List(ctx); err != nil || l.Forward == nil || l.Forward.Firewalld || l.Forward.NftDrop {
		t.Fatalf("forward state without other firewalls: %+v %v", l.Forward, err)
	}
	if err := env.Nft(func(nc *nftables.Conn) {
		nc.AddTable(&nftables.Table{Name: "firewalld", Family: nftables.TableFamilyINet})
	}); err != nil {
		t.Fatal(err)
	}
	if l, err := c.List(ctx); err != nil || l.Forward == nil || !l.Forward.Firewalld {
		t.Fatalf("forward state with firewalld's table: %+v %v", l.Forward, err)
	}
}

// TestDNSForwarderSurvivesHelperRestart: a restarted helper serves the
// running guests' DNS again before any new call.
func TestDNSForwarderSurvivesHelperRestart(t *testing.T) {
	env := nettest.New(t)
	answer := netip.MustParseAddr("203.0.113.99")
	env.ServeDNS(t, netip.MustParseAddrPort("127.0.0.53:53"), answer)
	resolv := stubResolvConf(t)
	h := startHelper(t, env, "--resolv-conf", resolv)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	gw := mustPrefix("172.30.0.1/24")
	if _, err := c.EnsureBridge(ctx, "banger0", gw); err != nil {
		t.Fatal(err)
	}
	g := env.AddGuest(t, "banger0", "bgt-g1", mustPrefix("172.30.0.2/24"), gw.Addr())
	if _, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String(), AllowDNS: true}); err != nil {
		t.Fatal(err)
	}
	registerGuests(t, env, 0, g)
	dns := netip.AddrPortFrom(gw.Addr(), 53)
	if got, err := resolveIn(g.NS, dns, "vm.example", false); err != nil || got != answer {
		t.Fatalf("before the restart: %s %v", got, err)
	}
	if err := h.stop(t); err != nil {
		t.Fatalf("stop helper: %v", err)
	}
	if _, err := resolveIn(g.NS, dns, "vm.example", false); err == nil {
		t.Fatal("control: DNS answered with the helper stopped")
	}
	startHelper(t, env, "--resolv-conf", resolv)
	if got, err := resolveIn(g.NS, dns, "vm.example", false); err != nil || got != answer {
		t.Fatalf("after the restart: %s %v", got, err)
	}
}

// TestForwardingGuard: when banger turns IPv4 forwarding on, the host does
// not become a router for its other interfaces; when a firewall such as
// Docker's (FORWARD policy drop) appears later, banger leaves forwarding to
// it, so Docker's own networks keep working; remove_nat turns forwarding
// off again only when no such firewall needs it.
func TestForwardingGuard(t *testing.T) {
	env := nettest.New(t)
	h := startHelper(t, env)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	gw := mustPrefix("172.30.0.1/24")
	if _, err := c.EnsureBridge(ctx, "banger0", gw); err != nil {
		t.Fatal(err)
	}
	// A LAN behind the host (lan0), and the outside routing to it via the host.
	lan := addLAN(t, env, "lan0", "10.99.0.1/24", "10.99.0.2/24")
	lanSvc := nettest.Listen(t, lan, netip.MustParseAddrPort("10.99.0.2:0"))
	if err := nettest.DoIn(env.Outside, func() error {
		_, dst, _ := net.ParseCIDR("10.99.0.0/24")
		return netlink.RouteAdd(&netlink.Route{Dst: dst, Gw: env.HostAddr.Addr().AsSlice()})
	}); err != nil {
		t.Fatal(err)
	}
	setForward := func(v string) {
		t.Helper()
		if err := env.Do(func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte(v), 0o644) }); err != nil {
			t.Fatal(err)
		}
	}
	routed := func() bool {
		_, err := nettest.Dial(ctx, env.Outside, lanSvc, time.Second)
		return err == nil
	}
	// routedSoon is routed for the checks that expect a route: on a loaded
	// machine the first connection can wait on neighbour discovery.
	routedSoon := func() bool {
		deadline := time.Now().Add(15 * time.Second)
		for !routed() {
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(50 * time.Millisecond)
		}
		return true
	}
	forward := func() string { v, _ := readProcSys(env, "/proc/sys/net/ipv4/ip_forward"); return v }
	// Control: with forwarding on and no rules, the host routes outside → LAN.
	setForward("1")
	if !routedSoon() {
		t.Fatal("control: outside → LAN not routed with forwarding on and no rules")
	}
	setForward("0")

	nat := hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String()}
	if _, err := c.EnsureNAT(ctx, nat); err != nil {
		t.Fatal(err)
	}
	if forward() != "1" {
		t.Fatalf("ip_forward %q after ensure_nat", forward())
	}
	if routed() {
		t.Error("outside → LAN routed through the host after banger turned forwarding on")
	}

	// Docker starts: FORWARD policy drop, accepting its own network (lan0
	// stands in for docker0). banger steps back at its next ensure_nat.
	dockerDrop(t, env, true)
	if err := env.Nft(func(nc *nftables.Conn) {
		tb := &nftables.Table{Name: "filter", Family: nftables.TableFamilyIPv4}
		ch := &nftables.Chain{Name: "FORWARD", Table: tb}
		for _, k := range []expr.MetaKey{expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME} {
			nc.AddRule(&nftables.Rule{Table: tb, Chain: ch, Exprs: []expr.Any{
				&expr.Meta{Key: k, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("lan0\x00")},
				&expr.Verdict{Kind: expr.VerdictAccept}}})
		}
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.EnsureNAT(ctx, nat); err != nil {
		t.Fatal(err)
	}
	if !routedSoon() {
		t.Error("Docker's own network (accepted in its FORWARD) not routed after banger's ensure_nat")
	}
	if _, err := c.RemoveNAT(ctx, "banger0"); err != nil {
		t.Fatal(err)
	}
	if forward() != "1" {
		t.Errorf("ip_forward %q after remove_nat while Docker manages forwarding, want 1", forward())
	}

	// Docker gone: banger's guard is back, and remove_nat turns forwarding off.
	if err := env.Nft(func(nc *nftables.Conn) {
		nc.DelTable(&nftables.Table{Name: "filter", Family: nftables.TableFamilyIPv4})
	}); err != nil {
		t.Fatal(err)
	}
	setForward("0")
	if _, err := c.EnsureNAT(ctx, nat); err != nil {
		t.Fatal(err)
	}
	if routed() {
		t.Error("outside → LAN routed through the host after banger turned forwarding on again")
	}
	if _, err := c.RemoveNAT(ctx, "banger0"); err != nil {
		t.Fatal(err)
	}
	if forward() != "0" {
		t.Errorf("ip_forward %q after remove_nat, want 0 (banger had turned it on)", forward())
	}
}

// stubResolvConf writes a resolv.conf naming a stub resolver on
// 127.0.0.53 (as systemd-resolved's) and returns its path.
func stubResolvConf(t *testing.T) string {
	t.Helper()
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(resolv, []byte("nameserver 127.0.0.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return resolv
}

// dnsPortFree binds the forwarder's address itself in env's namespace;
// IP_FREEBIND so that a gone bridge address does not fail the bind, only a
// socket left on it.
func dnsPortFree(ctx context.Context, env *nettest.Env, dns *net.UDPAddr) error {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, unix.IP_FREEBIND, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	return env.Do(func() error {
		p, err := lc.ListenPacket(ctx, "udp4", dns.String())
		if err == nil {
			p.Close()
		}
		return err
	})
}

// TestDNSForwarderResumesOnlyWithAllowDNS: a restarted helper starts the
// DNS forwarder again only when the NAT was made with allow_dns; after
// ensure_nat without it (or after allow_dns was turned off) the restart
// leaves port 53 on the gateway alone, as the ruleset does.
func TestDNSForwarderResumesOnlyWithAllowDNS(t *testing.T) {
	env := nettest.New(t)
	resolv := stubResolvConf(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	gw := mustPrefix("172.30.0.1/24")
	dns := net.UDPAddrFromAddrPort(netip.AddrPortFrom(gw.Addr(), 53))
	for _, tc := range []struct {
		name  string
		calls []bool // allow_dns of each ensure_nat, in order
		want  bool   // a forwarder after the restart
	}{
		{"allow_dns", []bool{true}, true},
		{"without allow_dns", []bool{false}, false},
		{"allow_dns turned off", []bool{true, false}, false},
		{"allow_dns turned on", []bool{false, true}, true},
	} {
		h := startHelper(t, env, "--resolv-conf", resolv)
		c := &hostnet.Client{Socket: h.sock}
		if _, err := c.EnsureBridge(ctx, "banger0", gw); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		for _, allow := range tc.calls {
			if _, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String(), AllowDNS: allow}); err != nil {
				t.Fatalf("%s: ensure_nat: %v", tc.name, err)
			}
		}
		if err := h.stop(t); err != nil {
			t.Fatalf("%s: stop helper: %v", tc.name, err)
		}
		h = startHelper(t, env, "--resolv-conf", resolv)
		c = &hostnet.Client{Socket: h.sock}
		// The helper resumes before it serves, so the forwarder's state is
		// settled once a call is answered.
		if _, err := c.List(ctx); err != nil {
			t.Fatalf("%s: list: %v", tc.name, err)
		}
		if got := dnsPortFree(ctx, env, dns) != nil; got != tc.want {
			t.Errorf("%s: forwarder after the restart = %v, want %v", tc.name, got, tc.want)
		}
		if _, err := c.DeleteBridge(ctx, "banger0"); err != nil {
			t.Fatalf("%s: delete_bridge: %v", tc.name, err)
		}
		if err := h.stop(t); err != nil {
			t.Fatalf("%s: stop helper: %v", tc.name, err)
		}
	}
}

// TestDNSForwarderStopsWithNAT: ensure_nat without allow_dns, remove_nat
// and delete_bridge leave no DNS forwarder socket behind, also when banger's table or bridge went away
// out of band first (a firewall reload, `ip link del`).
func TestDNSForwarderStopsWithNAT(t *testing.T) {
	env := nettest.New(t)
	resolv := stubResolvConf(t)
	h := startHelper(t, env, "--resolv-conf", resolv)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := &hostnet.Client{Socket: h.sock}
	gw := mustPrefix("172.30.0.1/24")
	dns := net.UDPAddrFromAddrPort(netip.AddrPortFrom(gw.Addr(), 53))
	portFree := func() error { return dnsPortFree(ctx, env, dns) }
	for _, tc := range []struct {
		name      string
		outOfBand func() error
		call      func() (bool, error)
	}{
		{"ensure_nat without allow_dns", nil, func() (bool, error) {
			_, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String()})
			return false, err
		}},
		{"remove_nat", nil, func() (bool, error) { return c.RemoveNAT(ctx, "banger0") }},
		{"remove_nat after the table went", func() error { _, err := netcfg.RemoveNAT(hostnet.NATTable, "banger0"); return err },
			func() (bool, error) { return c.RemoveNAT(ctx, "banger0") }},
		{"delete_bridge", nil, func() (bool, error) { return c.DeleteBridge(ctx, "banger0") }},
		{"delete_bridge after the bridge went", func() error { _, err := netcfg.DeleteBridge("banger0"); return err },
			func() (bool, error) { return c.DeleteBridge(ctx, "banger0") }},
	} {
		if _, err := c.EnsureBridge(ctx, "banger0", gw); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if res, err := c.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: "banger0", CIDR: gw.String(), AllowDNS: true}); err != nil || res.DNS == "" {
			t.Fatalf("%s: ensure_nat: %+v %v", tc.name, res, err)
		}
		if err := portFree(); err == nil {
			t.Fatalf("%s: control: port 53 on the gateway free with the forwarder running", tc.name)
		}
		if tc.outOfBand != nil {
			if err := env.Do(tc.outOfBand); err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
		}
		if _, err := tc.call(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if err := portFree(); err != nil {
			t.Errorf("%s: the DNS forwarder's socket is left: %v", tc.name, err)
		}
	}
}
