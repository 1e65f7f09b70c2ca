// Package nettest builds throwaway network namespaces for tests of banger's
// host networking, so that nothing ever touches the machine's own network.
//
// New creates two named namespaces:
//
//	Host ("bgtest-XXXXXX-h"): where banger's bridge, taps and helper live.
//	  lo up; Uplink "uplink0" 198.51.100.2/24; default route via 198.51.100.1.
//	Outside ("bgtest-XXXXXX-o"): the "internet".
//	  "ext0" 198.51.100.1/24 (the uplink's veth peer); InternetAddr
//	  203.0.113.10/32 on lo with a TCP listener (InternetPort) that answers
//	  every connection with "hello <peer address>\n" and records the peer.
//
// The addresses are documentation ranges (RFC 5737) and live only inside
// the namespaces. Code runs inside a namespace with Do / Start (a locked OS
// thread switched into the namespace); `ip netns exec <Name>` works too.
// Everything is removed at test end.
package nettest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Fixed addressing of an Env.
var (
	HostAddr     = netip.MustParsePrefix("198.51.100.2/24")
	GatewayAddr  = netip.MustParseAddr("198.51.100.1")
	InternetAddr = netip.MustParseAddr("203.0.113.10")
)

// Uplink is the name of the host namespace's uplink interface.
const Uplink = "uplink0"

// Env is a host namespace with an uplink to an outside namespace.
type Env struct {
	Name, OutsideName string
	Host, Outside     netns.NsHandle
	Uplink            string
	HostAddr          netip.Prefix
	GatewayAddr       netip.Addr
	InternetAddr      netip.Addr
	InternetPort      int

	mu    sync.Mutex
	peers []netip.Addr
	ln    net.Listener
}

// Require skips the test unless it runs as root with network namespaces.
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("needs root to create network namespaces (euid %d)", os.Geteuid())
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		t.Skipf("network namespaces unavailable: %v", err)
	}
}

// newNamed creates a named namespace on a throwaway locked thread.
func newNamed(name string) (netns.NsHandle, error) {
	type res struct {
		h   netns.NsHandle
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread has switched namespace and is
		// discarded when this goroutine returns.
		h, err := netns.NewNamed(name)
		ch <- res{h, err}
	}()
	r := <-ch
	return r.h, r.err
}

// New creates the namespaces and registers their removal with t.Cleanup.
func New(t testing.TB) *Env {
	t.Helper()
	Require(t)
	var rb [3]byte
	rand.Read(rb[:])
	id := hex.EncodeToString(rb[:])
	e := &Env{
		Name: "bgtest-" + id + "-h", OutsideName: "bgtest-" + id + "-o",
		Uplink: Uplink, HostAddr: HostAddr, GatewayAddr: GatewayAddr, InternetAddr: InternetAddr,
		Host: netns.None(), Outside: netns.None(),
	}
	t.Cleanup(e.close)
	var err error
	if e.Host, err = newNamed(e.Name); err != nil {
		t.Fatalf("create network namespace %s: %v", e.Name, err)
	}
	if e.Outside, err = newNamed(e.OutsideName); err != nil {
		t.Fatalf("create network namespace %s: %v", e.OutsideName, err)
	}
	if err := e.setup(); err != nil {
		t.Fatalf("set up network namespaces: %v", err)
	}
	return e
}

func (e *Env) setup() error {
	hh, err := netlink.NewHandleAt(e.Host)
	if err != nil {
		return err
	}
	defer hh.Close()
	oh, err := netlink.NewHandleAt(e.Outside)
	if err != nil {
		return err
	}
	defer oh.Close()
	for _, h := range []*netlink.Handle{hh, oh} {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := h.LinkSetUp(lo); err != nil {
			return err
		}
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: e.Uplink}, PeerName: "ext0", PeerNamespace: netlink.NsFd(int(e.Outside))}
	if err := hh.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth: %w", err)
	}
	up, err := hh.LinkByName(e.Uplink)
	if err != nil {
		return err
	}
	if err := hh.AddrAdd(up, &netlink.Addr{IPNet: ipNet(e.HostAddr)}); err != nil {
		return err
	}
	if err := hh.LinkSetUp(up); err != nil {
		return err
	}
	ext, err := oh.LinkByName("ext0")
	if err != nil {
		return err
	}
	if err := oh.AddrAdd(ext, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(e.GatewayAddr, e.HostAddr.Bits()))}); err != nil {
		return err
	}
	if err := oh.LinkSetUp(ext); err != nil {
		return err
	}
	lo, _ := oh.LinkByName("lo")
	if err := oh.AddrAdd(lo, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(e.InternetAddr, 32))}); err != nil {
		return err
	}
	if err := hh.RouteAdd(&netlink.Route{Gw: net.IP(e.GatewayAddr.AsSlice()), LinkIndex: up.Attrs().Index}); err != nil {
		return fmt.Errorf("add default route: %w", err)
	}
	return e.DoOutside(func() error {
		ln, err := net.Listen("tcp4", netip.AddrPortFrom(e.InternetAddr, 0).String())
		if err != nil {
			return err
		}
		e.ln = ln
		e.InternetPort = ln.Addr().(*net.TCPAddr).Port
		go e.serve(ln)
		return nil
	})
}

func (e *Env) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
		e.mu.Lock()
		e.peers = append(e.peers, ap.Addr().Unmap())
		e.mu.Unlock()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "hello %s\n", ap.Addr().Unmap())
		c.Close()
	}
}

// Peers returns the source addresses of the connections the internet
// listener has accepted (the host's uplink address when NAT worked).
func (e *Env) Peers() []netip.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]netip.Addr(nil), e.peers...)
}

func (e *Env) close() {
	if e.ln != nil {
		e.ln.Close()
	}
	for _, n := range []struct {
		name string
		h    *netns.NsHandle
	}{{e.Name, &e.Host}, {e.OutsideName, &e.Outside}} {
		if n.h.IsOpen() {
			// Delete every link but lo first so that nothing (taps, the
			// bridge) can outlive the namespace.
			if h, err := netlink.NewHandleAt(*n.h); err == nil {
				if links, err := h.LinkList(); err == nil {
					for _, l := range links {
						if l.Attrs().Name != "lo" {
							h.LinkDel(l)
						}
					}
				}
				h.Close()
			}
			n.h.Close()
		}
		netns.DeleteNamed(n.name)
	}
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// DoIn runs fn on an OS thread switched into ns.
func DoIn(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		} // else the thread stays locked and dies with this goroutine
		errc <- err
	}()
	return <-errc
}

// Do runs fn inside the host namespace.
func (e *Env) Do(fn func() error) error { return DoIn(e.Host, fn) }

// DoOutside runs fn inside the outside namespace.
func (e *Env) DoOutside(fn func() error) error { return DoIn(e.Outside, fn) }

// Start starts cmd inside the host namespace (the child inherits the
// namespace of the thread that forks it).
func (e *Env) Start(cmd *exec.Cmd) error { return DoIn(e.Host, cmd.Start) }

// ReadSys reads /sys/class/net/<iface>/<attr> (attr may be a path such as
// "brport/isolated") as the host namespace sees
// it: sysfs shows the namespace of whoever mounted it, so this mounts a
// fresh sysfs in a private mount namespace of a throwaway thread.
func (e *Env) ReadSys(iface, attr string) (string, error) {
	if iface == "" || attr == "" || strings.ContainsAny(iface, "/\x00") || strings.Contains(attr, "\x00") ||
		iface[0] == '.' || slices.Contains(strings.Split(attr, "/"), "..") {
		return "", fmt.Errorf("bad sysfs name %q/%q", iface, attr)
	}
	dir, err := os.MkdirTemp("", "bgsys")
	if err != nil {
		return "", err
	}
	defer os.Remove(dir)
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: this thread's namespaces change
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			ch <- res{err: fmt.Errorf("unshare mount namespace: %w", err)}
			return
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			ch <- res{err: fmt.Errorf("make mounts private: %w", err)}
			return
		}
		if err := netns.Set(e.Host); err != nil {
			ch <- res{err: err}
			return
		}
		if err := unix.Mount("sysfs", dir, "sysfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			ch <- res{err: fmt.Errorf("mount sysfs: %w", err)}
			return
		}
		b, err := os.ReadFile(filepath.Join(dir, "class", "net", iface, attr))
		unix.Unmount(dir, unix.MNT_DETACH)
		ch <- res{strings.TrimSpace(string(b)), err}
	}()
	r := <-ch
	return r.s, r.err
}

// Snapshot renders the host namespace's links (name, kind, flags, master,
// addresses), routes and nftables tables canonically, for before/after
// comparisons. dumpNft renders the nftables ruleset (pass
// netcfg.DumpRuleset; it runs inside the namespace), or nil to skip.
func (e *Env) Snapshot(dumpNft func() (string, error)) (string, error) {
	return SnapshotOf(e.Host, dumpNft)
}

// SnapshotOf is Snapshot for any namespace.
func SnapshotOf(ns netns.NsHandle, dumpNft func() (string, error)) (string, error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return "", err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return "", err
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	var lines []string
	for _, l := range links {
		a := l.Attrs()
		s := fmt.Sprintf("link %s %s up=%v master=%s", a.Name, l.Type(), a.Flags&net.FlagUp != 0, names[a.MasterIndex])
		if t, ok := l.(*netlink.Tuntap); ok {
			s += fmt.Sprintf(" owner=%d", t.Owner)
		}
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return "", err
		}
		for _, ad := range addrs {
			if ad.IP.IsLinkLocalUnicast() {
				continue
			}
			s += " addr=" + ad.IPNet.String()
		}
		lines = append(lines, s)
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return "", err
	}
	for _, r := range routes {
		lines = append(lines, fmt.Sprintf("route table=%d dst=%v gw=%v dev=%s", r.Table, r.Dst, r.Gw, names[r.LinkIndex]))
	}
	sort.Strings(lines)
	out := strings.Join(lines, "\n") + "\n"
	if dumpNft != nil {
		var nft string
		if err := DoIn(ns, func() (err error) { nft, err = dumpNft(); return err }); err != nil {
			return "", fmt.Errorf("dump nftables: %w", err)
		}
		out += nft
	}
	return out, nil
}

// Guest is a fake guest: a namespace joined to banger's bridge by a veth
// pair, standing in for a VM in tests that do not boot one.
type Guest struct {
	NS   netns.NsHandle
	Port string // the bridge port (host side of the veth)
	Addr netip.Prefix
	MAC  net.HardwareAddr // of the guest's eth0
}

// AddGuest creates a namespace whose "eth0" carries addr with a default
// route via gw, and attaches the host end (named port) to bridge in the
// host namespace as an isolated port, like banger's taps. Removed at test end.
func (e *Env) AddGuest(t testing.TB, bridge, port string, addr netip.Prefix, gw netip.Addr) *Guest {
	t.Helper()
	g := &Guest{Port: port, Addr: addr}
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread changes namespace
		h, err := netns.New()
		g.NS = h
		ch <- err
	}()
	if err := <-ch; err != nil {
		t.Fatalf("create guest namespace: %v", err)
	}
	t.Cleanup(func() { g.NS.Close() })
	hh, err := netlink.NewHandleAt(e.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer hh.Close()
	gh, err := netlink.NewHandleAt(g.NS)
	if err != nil {
		t.Fatal(err)
	}
	defer gh.Close()
	br, err := hh.LinkByName(bridge)
	if err != nil {
		t.Fatalf("bridge %s: %v", bridge, err)
	}
	if err := hh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: port, MasterIndex: br.Attrs().Index}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(g.NS))}); err != nil {
		t.Fatalf("create guest veth: %v", err)
	}
	t.Cleanup(func() {
		if h, err := netlink.NewHandleAt(e.Host); err == nil {
			if l, err := h.LinkByName(port); err == nil {
				h.LinkDel(l)
			}
			h.Close()
		}
	})
	pl, err := hh.LinkByName(port)
	if err != nil {
		t.Fatal(err)
	}
	if err := hh.LinkSetIsolated(pl, true); err != nil {
		t.Fatalf("isolate port: %v", err)
	}
	if err := hh.LinkSetUp(pl); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"lo", "eth0"} {
		l, err := gh.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := gh.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		if name == "eth0" {
			if err := gh.AddrAdd(l, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
				t.Fatal(err)
			}
			if err := gh.RouteAdd(&netlink.Route{Gw: net.IP(gw.AsSlice()), LinkIndex: l.Attrs().Index}); err != nil {
				t.Fatalf("guest default route: %v", err)
			}
			g.MAC = l.Attrs().HardwareAddr
		}
	}
	return g
}

// Dial connects from inside ns to addr with a timeout and returns the first
// line the peer sends (or "" if it sends none before closing).
func Dial(ctx context.Context, ns netns.NsHandle, addr netip.AddrPort, timeout time.Duration) (string, error) {
	var c net.Conn
	err := DoIn(ns, func() error {
		d := net.Dialer{Timeout: timeout}
		var err error
		c, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if line == "" && err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// Listen opens a TCP listener inside ns that greets each connection with
// "hello\n"; it is closed at test end.
func Listen(t testing.TB, ns netns.NsHandle, addr netip.AddrPort) netip.AddrPort {
	t.Helper()
	var ln net.Listener
	if err := DoIn(ns, func() (err error) { ln, err = net.Listen("tcp", addr.String()); return err }); err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "hello\n")
			c.Close()
		}
	}()
	ap, _ := netip.ParseAddrPort(ln.Addr().String())
	return ap
}

// AddOutsideAddr puts addr (a /32) on the outside namespace's lo, so that
// it is reachable from the host namespace through the uplink like any
// address "on the internet". Only for addresses that exist nowhere else:
// they never leave the namespaces.
func (e *Env) AddOutsideAddr(addr netip.Addr) error {
	h, err := netlink.NewHandleAt(e.Outside)
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	return h.AddrAdd(lo, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(addr, 32))})
}

// SetIsolated turns bridge port isolation of a port in the host namespace
// on or off.
func (e *Env) SetIsolated(port string, on bool) error {
	h, err := netlink.NewHandleAt(e.Host)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(port)
	if err != nil {
		return err
	}
	return h.LinkSetIsolated(l, on)
}
