package netcfg

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
)

// BridgeMark is what banger-helper records on its bridge, in the device's
// alias (IFLA_IFALIAS, settable only with CAP_NET_ADMIN): who made the
// bridge and the NAT tables, and which address the helper added. A bridge
// without a mark (made by hand, or by an older helper) belongs to root.
type BridgeMark struct {
	Owner    uint32       // uid that created the bridge
	NATOwner *uint32      // uid that created the NAT tables (nil: none recorded)
	Gateway  netip.Prefix // the address the helper added (invalid: none)
	// DNS records that the NAT tables let guests reach the helper's DNS
	// forwarder (ensure_nat with allow_dns), so that a restarted helper
	// starts the forwarder again only then.
	DNS bool
}

const markPrefix = "banger "

// String renders the alias ("banger owner=1000 nat_owner=1000 gw=172.30.0.1/24 dns=on").
func (m BridgeMark) String() string {
	s := markPrefix + "owner=" + strconv.FormatUint(uint64(m.Owner), 10)
	if m.NATOwner != nil {
		s += " nat_owner=" + strconv.FormatUint(uint64(*m.NATOwner), 10)
	}
	if m.Gateway.IsValid() {
		s += " gw=" + m.Gateway.String()
	}
	if m.DNS {
		s += " dns=on"
	}
	return s
}

// ParseBridgeMark parses an alias written by String; ok is false for any
// other alias (the bridge then belongs to root).
func ParseBridgeMark(alias string) (m BridgeMark, ok bool) {
	rest, found := strings.CutPrefix(alias, markPrefix)
	if !found {
		return BridgeMark{}, false
	}
	seenOwner := false
	for _, f := range strings.Fields(rest) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "owner", "nat_owner":
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				return BridgeMark{}, false
			}
			u := uint32(n)
			if k == "owner" {
				m.Owner, seenOwner = u, true
			} else {
				m.NATOwner = &u
			}
		case "gw":
			p, err := netip.ParsePrefix(v)
			if err != nil {
				return BridgeMark{}, false
			}
			m.Gateway = p
		case "dns":
			if v != "on" {
				return BridgeMark{}, false
			}
			m.DNS = true
		default:
			return BridgeMark{}, false
		}
	}
	return m, seenOwner
}

// ReadBridgeMark returns the bridge's mark; ok is false when the bridge
// does not exist or carries no mark of banger's.
func ReadBridgeMark(name string) (m BridgeMark, ok bool, err error) {
	l, err := linkByName(name)
	if err != nil || l == nil {
		return BridgeMark{}, false, err
	}
	m, ok = ParseBridgeMark(l.Attrs().Alias)
	return m, ok, nil
}

// WriteBridgeMark records m on the bridge.
func WriteBridgeMark(name string, m BridgeMark) error {
	l, err := linkByName(name)
	if err != nil {
		return err
	}
	if l == nil {
		return &classErr{ErrNotFound, fmt.Sprintf("bridge %s does not exist", name)}
	}
	if err := netlink.LinkSetAlias(l, m.String()); err != nil {
		return fmt.Errorf("record the owner of %s: %w", name, err)
	}
	return nil
}

// RemoveBridgeAddr removes one IPv4 address from the bridge if it carries
// it (the caller decides that banger added it).
func RemoveBridgeAddr(name string, p netip.Prefix) error {
	l, err := linkByName(name)
	if err != nil || l == nil {
		return err
	}
	have, err := ipv4Addrs(l)
	if err != nil {
		return err
	}
	for _, a := range have {
		if a == p {
			if err := netlink.AddrDel(l, &netlink.Addr{IPNet: ipNet(p)}); err != nil {
				return fmt.Errorf("remove address %s from %s: %w", p, name, err)
			}
		}
	}
	return nil
}
