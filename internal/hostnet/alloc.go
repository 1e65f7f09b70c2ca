package hostnet

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// TapName derives the tap of a VM: prefix + the first 11 hex digits of the
// VM id (15 bytes with the default prefix "bgt-"). An id that is not
// lowercase hex (or is shorter than 11 characters) is hashed first, so every
// id maps to a valid name. prefix "" means DefaultTapPrefix.
func TapName(prefix, vmID string) string {
	if prefix == "" {
		prefix = DefaultTapPrefix
	}
	n := MaxIfaceName - len(prefix)
	if n < 1 {
		n = 1
	}
	id := strings.ToLower(vmID)
	if len(id) < n || !isHex(id[:n]) {
		sum := sha256.Sum256([]byte(vmID))
		id = hex.EncodeToString(sum[:])
	}
	return prefix + id[:n]
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// MAC derives a VM's guest MAC address from its id: 06:xx:xx:xx:xx:xx
// (locally administered, unicast), stable for the id.
func MAC(vmID string) net.HardwareAddr {
	sum := sha256.Sum256([]byte(vmID))
	return net.HardwareAddr{0x06, sum[0], sum[1], sum[2], sum[3], sum[4]}
}

// GatewayCIDR returns the gateway of a subnet (its first host address) with
// the subnet's prefix length, e.g. 172.30.0.0/24 → 172.30.0.1/24.
func GatewayCIDR(subnet netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(subnet.Masked().Addr().Next(), subnet.Bits())
}

// ChooseSubnet returns the first subnet of size /bits inside pool that
// overlaps none of taken. pool must be private.
func ChooseSubnet(pool netip.Prefix, bits int, taken []netip.Prefix) (netip.Prefix, error) {
	pool = pool.Masked()
	if !pool.Addr().Is4() || !IsPrivate(pool) {
		return netip.Prefix{}, fmt.Errorf("address pool %s is not a private IPv4 range", pool)
	}
	if bits < pool.Bits() || bits < MinSubnetBits || bits > MaxSubnetBits {
		return netip.Prefix{}, fmt.Errorf("cannot carve /%d subnets out of %s", bits, pool)
	}
	step := uint64(1) << (32 - bits)
	count := uint64(1) << (bits - pool.Bits())
	base := u32(pool.Addr())
	for i := uint64(0); i < count; i++ {
		cand := netip.PrefixFrom(fromU32(base+uint32(i*step)), bits)
		free := true
		for _, t := range taken {
			if Overlaps(cand, t) {
				free = false
				break
			}
		}
		if free {
			return cand, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("every /%d of %s collides with a route or address of this host (hint: configure another private range)", bits, pool)
}

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func fromU32(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// AllocateAddr returns the lowest address of subnet that is not its network,
// broadcast or gateway address and not in inUse.
func AllocateAddr(subnet netip.Prefix, inUse []netip.Addr) (netip.Addr, error) {
	subnet = subnet.Masked()
	if !subnet.Addr().Is4() || subnet.Bits() > 30 {
		return netip.Addr{}, fmt.Errorf("subnet %s has no room for guests", subnet)
	}
	used := make(map[netip.Addr]bool, len(inUse))
	for _, a := range inUse {
		used[a.Unmap()] = true
	}
	gw := GatewayCIDR(subnet).Addr()
	bcast := Broadcast(subnet)
	for a := gw.Next(); a.IsValid() && a != bcast && subnet.Contains(a); a = a.Next() {
		if !used[a] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("no free address left in %s (%d in use)", subnet, len(inUse))
}

// OwnDevice returns a predicate for banger's own devices (the bridge and any
// interface with the tap prefix). Empty arguments mean the defaults.
func OwnDevice(bridge, tapPrefix string) func(string) bool {
	if bridge == "" {
		bridge = DefaultBridge
	}
	if tapPrefix == "" {
		tapPrefix = DefaultTapPrefix
	}
	return func(name string) bool { return name == bridge || strings.HasPrefix(name, tapPrefix) }
}
