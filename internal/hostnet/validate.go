package hostnet

import (
	"fmt"
	"net/netip"
	"strings"
)

// MaxIfaceName is the longest Linux interface name (IFNAMSIZ-1).
const MaxIfaceName = 15

// PrivateRanges are the IPv4 ranges banger may use (RFC 1918).
var PrivateRanges = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
}

// ValidDeviceName checks a name banger gives a device it creates: 1-15
// bytes of [a-z0-9-], not starting with '-'.
func ValidDeviceName(name string) error {
	if name == "" {
		return fmt.Errorf("device name is empty")
	}
	if len(name) > MaxIfaceName {
		return fmt.Errorf("device name %q is longer than %d bytes", name, MaxIfaceName)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("device name %q has a character outside [a-z0-9-]", name)
		}
	}
	if name[0] == '-' {
		return fmt.Errorf("device name %q starts with '-'", name)
	}
	return nil
}

// ValidTapName checks that name is a valid device name that starts with
// prefix and has something after it.
func ValidTapName(prefix, name string) error {
	if err := ValidDeviceName(name); err != nil {
		return err
	}
	if !strings.HasPrefix(name, prefix) || len(name) == len(prefix) {
		return fmt.Errorf("tap name %q is not one of banger's (want %s followed by the VM id)", name, prefix)
	}
	return nil
}

// ValidHostIfaceName checks the name of an existing host interface (the NAT
// uplink): 1-15 bytes of [A-Za-z0-9._-], not "." or "..".
func ValidHostIfaceName(name string) error {
	if name == "" || len(name) > MaxIfaceName {
		return fmt.Errorf("interface name %q must be 1-%d bytes", name, MaxIfaceName)
	}
	if name == "." || name == ".." {
		return fmt.Errorf("interface name %q is not valid", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("interface name %q has a character outside [A-Za-z0-9._-]", name)
		}
	}
	return nil
}

// IsPrivate reports whether all of p lies inside one of PrivateRanges.
func IsPrivate(p netip.Prefix) bool {
	p = p.Masked()
	for _, r := range PrivateRanges {
		if r.Bits() <= p.Bits() && r.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// Smallest and largest subnets banger accepts for its bridge.
const (
	MinSubnetBits = 16
	MaxSubnetBits = 29
)

// ParseGatewayCIDR parses the bridge address "a.b.c.d/n": IPv4, n between
// MinSubnetBits and MaxSubnetBits, the whole subnet private, and the address
// neither the subnet's network nor its broadcast address. It returns the
// address with its prefix length (not masked).
func ParseGatewayCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("cidr %q is not an address/prefix-length like 172.30.0.1/24", s)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("cidr %q is not IPv4", s)
	}
	if p.Bits() < MinSubnetBits || p.Bits() > MaxSubnetBits {
		return netip.Prefix{}, fmt.Errorf("cidr %q: prefix length must be between /%d and /%d", s, MinSubnetBits, MaxSubnetBits)
	}
	if !IsPrivate(p) {
		return netip.Prefix{}, fmt.Errorf("cidr %q is not inside a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)", s)
	}
	if p.Addr() == p.Masked().Addr() {
		return netip.Prefix{}, fmt.Errorf("cidr %q: the gateway address is the subnet's network address (use e.g. %s)", s, GatewayCIDR(p.Masked()))
	}
	if p.Addr() == Broadcast(p) {
		return netip.Prefix{}, fmt.Errorf("cidr %q: the gateway address is the subnet's broadcast address", s)
	}
	return p, nil
}

// Broadcast returns the last address of the subnet of p (IPv4).
func Broadcast(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Overlaps reports whether two prefixes share any address.
func Overlaps(a, b netip.Prefix) bool { return a.Masked().Overlaps(b.Masked()) }
