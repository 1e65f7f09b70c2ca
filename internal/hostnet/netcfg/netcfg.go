// Package netcfg does banger's privileged network configuration in the
// current network namespace: the bridge, taps, banger's nftables tables and
// IPv4 forwarding. It talks netlink directly (vishvananda/netlink,
// google/nftables) and never runs a command. Callers validate names and
// addresses first (package hostnet); this package trusts its arguments but
// refuses to touch a device of the wrong kind.
//
// Errors wrap ErrConflict, ErrPrecondition or ErrNotFound where the caller
// can do something about them.
package netcfg

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Error classes (use errors.Is).
var (
	ErrConflict     = errors.New("conflicting state")
	ErrPrecondition = errors.New("precondition not met")
	ErrNotFound     = errors.New("not found")
)

// classErr is an error of a class whose message is only its own text.
type classErr struct {
	class error
	msg   string
}

func (e *classErr) Error() string        { return e.msg }
func (e *classErr) Is(target error) bool { return target == e.class }

func conflictf(format string, args ...any) error {
	return &classErr{ErrConflict, fmt.Sprintf(format, args...)}
}

func preconditionf(format string, args ...any) error {
	return &classErr{ErrPrecondition, fmt.Sprintf(format, args...)}
}

func linkByName(name string) (netlink.Link, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return nil, nil
		}
		return nil, fmt.Errorf("look up interface %s: %w", name, err)
	}
	return l, nil
}

func ipv4Addrs(l netlink.Link) ([]netip.Prefix, error) {
	addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet, false); ok {
			out = append(out, p)
		}
	}
	return out, nil
}

// prefixOf converts an IPNet; masked selects the network rather than the
// address with its length.
func prefixOf(n *net.IPNet, masked bool) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, bits := n.Mask.Size()
	if bits == 0 || (a.Is4() && bits != 32) {
		return netip.Prefix{}, false
	}
	p := netip.PrefixFrom(a, ones)
	if masked {
		p = p.Masked()
	}
	return p, true
}

// EnsureBridge makes the bridge exist, carry the IPv4 address gw
// (address/prefix length) and be up. created reports whether it was made now.
func EnsureBridge(name string, gw netip.Prefix) (created bool, err error) {
	l, err := linkByName(name)
	if err != nil {
		return false, err
	}
	if l == nil {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
		if err := netlink.LinkAdd(br); err != nil {
			return false, fmt.Errorf("create bridge %s: %w", name, err)
		}
		created = true
		if l, err = netlink.LinkByName(name); err != nil {
			return true, fmt.Errorf("look up new bridge %s: %w", name, err)
		}
	} else if l.Type() != "bridge" {
		return false, conflictf("interface %s exists and is a %s, not a bridge", name, l.Type())
	}
	have, err := ipv4Addrs(l)
	if err != nil {
		return created, err
	}
	// Other addresses stay: banger did not necessarily add them (the helper
	// removes its own old address itself, see RemoveBridgeAddr).
	if !slices.Contains(have, gw) {
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipNet(gw)}); err != nil {
			return created, fmt.Errorf("add address %s to %s: %w", gw, name, err)
		}
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(l); err != nil {
			return created, fmt.Errorf("bring up %s: %w", name, err)
		}
	}
	return created, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// DeleteBridge deletes the bridge if it exists.
func DeleteBridge(name string) (deleted bool, err error) {
	l, err := linkByName(name)
	if err != nil || l == nil {
		return false, err
	}
	if l.Type() != "bridge" {
		return false, conflictf("interface %s is a %s, not a bridge; leaving it alone", name, l.Type())
	}
	if err := netlink.LinkDel(l); err != nil {
		return false, fmt.Errorf("delete bridge %s: %w", name, err)
	}
	return true, nil
}

// BridgeInfo reports the bridge's state.
func BridgeInfo(name string) (exists, up bool, addrs []netip.Prefix, err error) {
	l, err := linkByName(name)
	if err != nil || l == nil {
		return false, false, nil, err
	}
	if l.Type() != "bridge" {
		return false, false, nil, conflictf("interface %s is a %s, not a bridge", name, l.Type())
	}
	addrs, err = ipv4Addrs(l)
	return true, l.Attrs().Flags&net.FlagUp != 0, addrs, err
}

// Tap describes a tap device.
type Tap struct {
	Name    string
	Owner   uint32
	Bridge  string
	MTU     int
	Up      bool
	VnetHdr bool
	// Guest is the MAC and address the tap may send from, as recorded on
	// the tap (its alias, which only CAP_NET_ADMIN can change); zero when
	// none is recorded.
	Guest Guest
}

// aliasPrefix starts the alias banger gives its taps.
const aliasPrefix = "banger-guest "

// tapAlias renders a guest's identity for the tap's alias.
func tapAlias(mac net.HardwareAddr, ip netip.Addr) string {
	return aliasPrefix + "mac=" + mac.String() + " ip=" + ip.String()
}

// parseTapAlias reads tapAlias back; ok is false for anything else.
func parseTapAlias(s string) (mac net.HardwareAddr, ip netip.Addr, ok bool) {
	rest, found := strings.CutPrefix(s, aliasPrefix)
	if !found {
		return nil, netip.Addr{}, false
	}
	f := strings.Fields(rest)
	if len(f) != 2 {
		return nil, netip.Addr{}, false
	}
	ms, ok1 := strings.CutPrefix(f[0], "mac=")
	is, ok2 := strings.CutPrefix(f[1], "ip=")
	if !ok1 || !ok2 {
		return nil, netip.Addr{}, false
	}
	mac, err := net.ParseMAC(ms)
	if err != nil || len(mac) != 6 {
		return nil, netip.Addr{}, false
	}
	ip, err = netip.ParseAddr(is)
	if err != nil || !ip.Is4() {
		return nil, netip.Addr{}, false
	}
	return mac, ip, true
}

func tapOf(l netlink.Link) (*netlink.Tuntap, bool) {
	t, ok := l.(*netlink.Tuntap)
	if !ok || t.Mode != netlink.TUNTAP_MODE_TAP {
		return nil, false
	}
	return t, true
}

func describeTap(t *netlink.Tuntap, bridgeName func(idx int) string) Tap {
	out := Tap{
		Name:    t.Name,
		Owner:   t.Owner,
		MTU:     t.MTU,
		Up:      t.Attrs().Flags&net.FlagUp != 0,
		VnetHdr: t.Flags&netlink.TUNTAP_VNET_HDR != 0,
	}
	if t.MasterIndex != 0 {
		out.Bridge = bridgeName(t.MasterIndex)
	}
	if mac, ip, ok := parseTapAlias(t.Attrs().Alias); ok {
		out.Guest = Guest{Tap: t.Name, Owner: t.Owner, MAC: mac, IP: ip}
	}
	return out
}

func lookupName(idx int) string {
	if m, err := netlink.LinkByIndex(idx); err == nil {
		return m.Attrs().Name
	}
	return ""
}

// CreateTap makes a persistent tap (vnet_hdr, no packet info) owned by owner,
// attached to bridge as an isolated port, with mtu when nonzero, and up,
// and records on it the only MAC and IPv4 address its guest may send from
// (the anti-spoofing rules are made from that record: SyncGuests).
// An existing tap of the same owner is converged to that state; one of
// another owner is a conflict. The bridge must exist.
func CreateTap(name, bridge string, owner uint32, mtu int, mac net.HardwareAddr, ip netip.Addr) (info Tap, created bool, err error) {
	br, err := linkByName(bridge)
	if err != nil {
		return Tap{}, false, err
	}
	if br == nil || br.Type() != "bridge" {
		return Tap{}, false, preconditionf("bridge %s does not exist (call net.ensure_bridge first)", bridge)
	}
	l, err := linkByName(name)
	if err != nil {
		return Tap{}, false, err
	}
	if l != nil {
		t, ok := tapOf(l)
		if !ok {
			return Tap{}, false, conflictf("interface %s exists and is a %s, not a tap", name, l.Type())
		}
		if t.Owner != owner {
			return Tap{}, false, conflictf("tap %s exists and belongs to uid %d", name, t.Owner)
		}
	} else {
		t := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: name},
			Mode:      netlink.TUNTAP_MODE_TAP,
			Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_TUN_EXCL,
			Owner:     owner,
		}
		if err := netlink.LinkAdd(t); err != nil {
			return Tap{}, false, fmt.Errorf("create tap %s: %w", name, err)
		}
		created = true
		if l, err = netlink.LinkByName(name); err != nil {
			return Tap{}, true, fmt.Errorf("look up new tap %s: %w", name, err)
		}
	}
	undo := func(err error) (Tap, bool, error) {
		if created {
			if derr := netlink.LinkDel(l); derr != nil && !errors.Is(derr, unix.ENODEV) {
				err = fmt.Errorf("%w (and removing the half-made tap failed: %v)", err, derr)
			}
		}
		return Tap{}, false, err
	}
	if mtu > 0 && l.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(l, mtu); err != nil {
			return undo(fmt.Errorf("set mtu %d on %s: %w", mtu, name, err))
		}
	}
	if l.Attrs().MasterIndex != br.Attrs().Index {
		if err := netlink.LinkSetMaster(l, br); err != nil {
			return undo(fmt.Errorf("attach %s to %s: %w", name, bridge, err))
		}
	}
	if err := netlink.LinkSetIsolated(l, true); err != nil {
		return undo(fmt.Errorf("isolate bridge port %s: %w", name, err))
	}
	if alias := tapAlias(mac, ip); l.Attrs().Alias != alias {
		if err := netlink.LinkSetAlias(l, alias); err != nil {
			return undo(fmt.Errorf("record the guest's addresses on %s: %w", name, err))
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return undo(fmt.Errorf("bring up %s: %w", name, err))
	}
	l, err = netlink.LinkByName(name)
	if err != nil {
		return Tap{}, created, fmt.Errorf("look up tap %s: %w", name, err)
	}
	t, _ := tapOf(l)
	if t == nil {
		return Tap{}, created, fmt.Errorf("tap %s changed kind while being configured", name)
	}
	return describeTap(t, lookupName), created, nil
}

// LookupTap returns the tap called name, nil when there is none. A device of
// another kind by that name is a conflict.
func LookupTap(name string) (*Tap, error) {
	l, err := linkByName(name)
	if err != nil || l == nil {
		return nil, err
	}
	t, ok := tapOf(l)
	if !ok {
		return nil, conflictf("interface %s is a %s, not a tap", name, l.Type())
	}
	d := describeTap(t, lookupName)
	return &d, nil
}

// DeleteTap deletes the tap if present.
func DeleteTap(name string) (deleted bool, err error) {
	l, err := linkByName(name)
	if err != nil || l == nil {
		return false, err
	}
	if _, ok := tapOf(l); !ok {
		return false, conflictf("interface %s is a %s, not a tap; leaving it alone", name, l.Type())
	}
	if err := netlink.LinkDel(l); err != nil {
		if errors.Is(err, unix.ENODEV) {
			return false, nil
		}
		return false, fmt.Errorf("delete tap %s: %w", name, err)
	}
	return true, nil
}

// ListTaps returns the taps whose names start with prefix.
func ListTaps(prefix string) ([]Tap, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	var out []Tap
	for _, l := range links {
		if !strings.HasPrefix(l.Attrs().Name, prefix) {
			continue
		}
		t, ok := tapOf(l)
		if !ok {
			continue
		}
		d := describeTap(t, func(idx int) string { return names[idx] })
		out = append(out, d)
	}
	return out, nil
}

// HostPrefix is a route or address of the host, for overlap checks.
type HostPrefix struct {
	Prefix netip.Prefix
	Iface  string
	Kind   string // "route" or "address"
}

func (h HostPrefix) String() string {
	if h.Iface == "" {
		return fmt.Sprintf("%s %s", h.Kind, h.Prefix)
	}
	return fmt.Sprintf("%s %s on %s", h.Kind, h.Prefix, h.Iface)
}

// HostPrefixes lists the IPv4 networks the host already uses: routes of
// every table (except default routes) and interface addresses, skipping
// interfaces for which skip returns true (banger's own bridge and taps).
func HostPrefixes(skip func(iface string) bool) ([]HostPrefix, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	skipIdx := func(idx int) bool { return idx != 0 && skip != nil && skip(names[idx]) }
	var out []HostPrefix
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		p, ok := prefixOf(r.Dst, true)
		if !ok || p.Bits() == 0 || skipIdx(r.LinkIndex) || !p.Addr().Is4() {
			continue
		}
		if p.Addr().IsLoopback() {
			continue
		}
		out = append(out, HostPrefix{Prefix: p, Iface: names[r.LinkIndex], Kind: "route"})
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet, true)
		if !ok || skipIdx(a.LinkIndex) || p.Addr().IsLoopback() {
			continue
		}
		out = append(out, HostPrefix{Prefix: p, Iface: names[a.LinkIndex], Kind: "address"})
	}
	return out, nil
}

// DefaultRouteIface returns the interface of the IPv4 default route of the
// main table (the lowest metric when there are several).
func DefaultRouteIface() (string, error) {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return "", fmt.Errorf("list routes: %w", err)
	}
	best, bestPrio := 0, -1
	for _, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		idx := r.LinkIndex
		if idx == 0 && len(r.MultiPath) > 0 {
			idx = r.MultiPath[0].LinkIndex
		}
		if idx == 0 {
			continue
		}
		if bestPrio < 0 || r.Priority < bestPrio {
			best, bestPrio = idx, r.Priority
		}
	}
	if best == 0 {
		return "", preconditionf("the host has no IPv4 default route (pass out_iface to name the uplink)")
	}
	l, err := netlink.LinkByIndex(best)
	if err != nil {
		return "", fmt.Errorf("look up default route interface: %w", err)
	}
	return l.Attrs().Name, nil
}

// IfaceExists reports whether an interface called name exists.
func IfaceExists(name string) (bool, error) {
	l, err := linkByName(name)
	return l != nil, err
}

const ipForward = "/proc/sys/net/ipv4/ip_forward"

func ipv4ForwardingOn() (bool, error) {
	b, err := os.ReadFile(ipForward)
	if err != nil {
		return false, fmt.Errorf("read IPv4 forwarding setting: %w", err)
	}
	return strings.TrimSpace(string(b)) == "1", nil
}

// EnableIPv4Forwarding sets net.ipv4.ip_forward=1 in the current namespace.
func EnableIPv4Forwarding() error {
	if on, err := ipv4ForwardingOn(); err == nil && on {
		return nil
	}
	if err := os.WriteFile(ipForward, []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	return nil
}

// ListGuests returns the guests recorded on the taps whose names start
// with prefix (taps without a record have no guest: their traffic is
// dropped).
func ListGuests(prefix string) ([]Guest, error) {
	taps, err := ListTaps(prefix)
	if err != nil {
		return nil, err
	}
	var out []Guest
	for _, t := range taps {
		if t.Guest.IP.IsValid() {
			out = append(out, t.Guest)
		}
	}
	return out, nil
}
