package netcfg

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// NAT describes banger's NAT and filtering for one bridge.
type NAT struct {
	// Table is the name of banger's tables ("banger").
	Table  string
	Bridge string
	// TapPrefix starts the names of banger's taps (the bridge's VM ports).
	TapPrefix string
	// OutIface is the uplink: public destinations are reached through it.
	OutIface string
	// Gateway is the bridge's address with the subnet's length.
	Gateway netip.Prefix
	// AllowDNS lets guests reach UDP/TCP port 53 on the gateway address
	// (banger-helper's DNS forwarder).
	AllowDNS bool
	// AllowCIDRs are destinations opened on purpose although BlockedEgress
	// covers them (root-owned helper configuration). They never open the
	// host itself or another guest.
	AllowCIDRs []netip.Prefix
}

// Guest is what the rules know of one VM: its tap, the tap's owner, and the
// only MAC and IPv4 address the tap may send from.
type Guest struct {
	Tap   string
	Owner uint32
	MAC   net.HardwareAddr
	IP    netip.Addr
}

// BlockedEgress are the IPv4 destinations a guest may not reach (unless an
// AllowCIDRs entry opens them): "this network", RFC 1918, CGNAT, loopback,
// link-local (cloud metadata at 169.254.169.254), IETF protocol
// assignments, benchmarking, multicast, and the reserved 240/4 including
// the limited broadcast address. The documentation ranges (RFC 5737) are
// not routed on the internet and stay allowed, so that tests can play
// "the internet" with them inside their namespaces.
var BlockedEgress = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("240.0.0.0/4"),
}

// The ruleset, for bridge B, tap prefix P, uplink O, subnet S, gateway G,
// allowed ranges A…, blocked ranges X… (BlockedEgress) and guests
// (tap T, owner U, MAC M, address I):
//
//	table inet banger {
//	  chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//	    ip saddr S oifname != B masquerade }
//	  chain forward { type filter hook forward priority filter; policy accept;
//	    iifname B oifname B drop                        # VM to VM, routed or br_netfilter
//	    iifname B meta nfproto ipv6 drop                # no IPv6 leaves a tap
//	    oifname B meta nfproto ipv6 drop
//	    iifname B ip saddr S ip daddr A accept          # each allowed range, any uplink
//	    iifname B ip daddr X drop                       # each blocked range
//	    iifname B oifname O ip saddr S accept           # VM to the internet
//	    oifname B ct state established,related accept   # replies
//	    iifname B drop                                  # anything else from a VM
//	    oifname B drop                                  # anything else to a VM
//	    [drop] }                                        # only when banger turned forwarding on
//	  chain input { type filter hook input priority filter; policy accept;
//	    iifname B ct state established,related accept
//	    [iifname B ip daddr G udp dport 53 accept]      # allow_dns: the helper's forwarder
//	    [iifname B ip daddr G tcp dport 53 accept]
//	    iifname B drop }                                # guest to any host address
//	  chain output { type filter hook output priority filter; policy accept;
//	    oifname B meta skuid 0 accept                   # root
//	    oifname B ip daddr I meta skuid U accept        # each guest: its owner
//	    oifname B ct state new drop }                   # other local users
//	  [chain forwarding-enabled-by-banger {}]           # marker, see ForwardGuard
//	}
//	table bridge banger {
//	  chain prerouting { type filter hook prerouting priority filter; policy accept;
//	    iifname T ether saddr M ether type ip ip saddr I accept          # each guest
//	    iifname T ether saddr M ether type arp arp htype 1 arp ptype ip
//	      arp hlen 6 arp plen 4 arp saddr ether M arp saddr ip I accept
//	    iifname "P*" drop }                             # spoofing, IPv6, anything else
//	  chain forward { type filter hook forward priority filter; policy accept;
//	    iifname "P*" oifname "P*" drop }                # VM to VM at layer 2
//	}
//
// Accept verdicts are final only within banger's table: another table on the
// same hook (e.g. Docker's FORWARD policy drop) can still drop the traffic;
// see DockerForward for what banger does about that.

// guardChain is the marker chain saying banger switched IPv4 forwarding on
// (it was off), so that banger's forward chain drops all forwarding that
// does not involve its bridge.
const guardChain = "forwarding-enabled-by-banger"

func ifname(s string) []byte {
	b := make([]byte, 16)
	copy(b, s)
	return b
}

func metaCmp(key expr.MetaKey, op expr.CmpOp, data []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: data},
	}
}

func metaEq(key expr.MetaKey, data []byte) []expr.Any { return metaCmp(key, expr.CmpOpEq, data) }

func iif(name string) []expr.Any    { return metaEq(expr.MetaKeyIIFNAME, ifname(name)) }
func oif(name string) []expr.Any    { return metaEq(expr.MetaKeyOIFNAME, ifname(name)) }
func oifNot(name string) []expr.Any { return metaCmp(expr.MetaKeyOIFNAME, expr.CmpOpNeq, ifname(name)) }

func ipv4() []expr.Any { return metaEq(expr.MetaKeyNFPROTO, []byte{unix.NFPROTO_IPV4}) }
func ipv6() []expr.Any { return metaEq(expr.MetaKeyNFPROTO, []byte{unix.NFPROTO_IPV6}) }

func skuid(uid uint32) []expr.Any {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, uid)
	return metaEq(expr.MetaKeySKUID, b)
}

// ipIn matches the IPv4 source (offset 12) or destination (16) in p.
func ipIn(offset uint32, p netip.Prefix) []expr.Any {
	p = p.Masked()
	net4 := p.Addr().As4()
	if p.Bits() == 32 {
		return append(ipv4(),
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: net4[:]})
	}
	return append(ipv4(),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: netipMask(p.Bits()), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: net4[:]},
	)
}

func ipSaddrIn(p netip.Prefix) []expr.Any { return ipIn(12, p) }
func ipDaddrIn(p netip.Prefix) []expr.Any { return ipIn(16, p) }
func ipDaddr(a netip.Addr) []expr.Any     { return ipIn(16, netip.PrefixFrom(a, 32)) }

func netipMask(bits int) []byte {
	m := make([]byte, 4)
	if bits > 0 {
		binary.BigEndian.PutUint32(m, ^uint32(0)<<(32-bits))
	}
	return m
}

func dport(proto byte, port uint16) []expr.Any {
	p := make([]byte, 2)
	binary.BigEndian.PutUint16(p, port)
	return append(metaEq(expr.MetaKeyL4PROTO, []byte{proto}),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p},
	)
}

func ctState(bits uint32) []expr.Any {
	mask := make([]byte, 4)
	binary.NativeEndian.PutUint32(mask, bits)
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func ctEstablished() []expr.Any {
	return ctState(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED)
}

func ctNew() []expr.Any { return ctState(expr.CtStateBitNEW) }

// payloadEq compares len(data) bytes at offset of base.
func payloadEq(base expr.PayloadBase, offset uint32, data []byte) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: base, Offset: offset, Len: uint32(len(data))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data},
	}
}

func etherSaddr(mac net.HardwareAddr) []expr.Any {
	return payloadEq(expr.PayloadBaseLLHeader, 6, []byte(mac))
}

func etherType(t uint16) []expr.Any {
	b := make([]byte, 2)
	binary.BigEndian.PutUint16(b, t)
	return payloadEq(expr.PayloadBaseLLHeader, 12, b)
}

func verdict(k expr.VerdictKind) expr.Any { return &expr.Verdict{Kind: k} }

func rule(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

var (
	accept = []expr.Any{verdict(expr.VerdictAccept)}
	drop   = []expr.Any{verdict(expr.VerdictDrop)}
)

type chainSpec struct {
	name  string
	typ   nftables.ChainType
	hook  *nftables.ChainHook
	prio  *nftables.ChainPriority
	rules [][]expr.Any
}

// outputRules let only root and each guest's owner open connections to it.
func outputRules(bridge string, guests []Guest) [][]expr.Any {
	rules := [][]expr.Any{rule(oif(bridge), skuid(0), accept)}
	for _, g := range guests {
		if !g.IP.Is4() {
			continue
		}
		rules = append(rules, rule(oif(bridge), ipDaddr(g.IP), skuid(g.Owner), accept))
	}
	return append(rules, rule(oif(bridge), ctNew(), drop))
}

// inetChains builds table inet banger; marker records that banger turned
// forwarding on, dropOthers ends the forward chain with a drop.
func (n NAT) inetChains(guests []Guest, marker, dropOthers bool) []chainSpec {
	b, o, s, g := n.Bridge, n.OutIface, n.Gateway.Masked(), n.Gateway.Addr()
	input := [][]expr.Any{rule(iif(b), ctEstablished(), accept)}
	if n.AllowDNS {
		input = append(input,
			rule(iif(b), ipDaddr(g), dport(unix.IPPROTO_UDP, 53), accept),
			rule(iif(b), ipDaddr(g), dport(unix.IPPROTO_TCP, 53), accept))
	}
	input = append(input, rule(iif(b), drop))
	forward := [][]expr.Any{
		rule(iif(b), oif(b), drop),
		rule(iif(b), ipv6(), drop),
		rule(oif(b), ipv6(), drop),
	}
	for _, a := range n.AllowCIDRs {
		forward = append(forward, rule(iif(b), ipSaddrIn(s), ipDaddrIn(a), accept))
	}
	for _, x := range BlockedEgress {
		forward = append(forward, rule(iif(b), ipDaddrIn(x), drop))
	}
	forward = append(forward,
		rule(iif(b), oif(o), ipSaddrIn(s), accept),
		rule(oif(b), ctEstablished(), accept),
		rule(iif(b), drop),
		rule(oif(b), drop),
	)
	chains := []chainSpec{
		{name: "postrouting", typ: nftables.ChainTypeNAT, hook: nftables.ChainHookPostrouting, prio: nftables.ChainPriorityNATSource,
			rules: [][]expr.Any{rule(ipSaddrIn(s), oifNot(b), []expr.Any{&expr.Masq{}})}},
		{name: "forward", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookForward, prio: nftables.ChainPriorityFilter},
		{name: "input", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookInput, prio: nftables.ChainPriorityFilter, rules: input},
		{name: "output", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookOutput, prio: nftables.ChainPriorityFilter, rules: outputRules(b, guests)},
	}
	if dropOthers {
		forward = append(forward, drop)
	}
	if marker {
		chains = append(chains, chainSpec{name: guardChain})
	}
	chains[1].rules = forward
	return chains
}

const (
	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
)

// antiSpoof lets each tap send only its guest's MAC and IPv4 address (ARP
// included) and drops everything else from banger's taps.
func antiSpoof(prefix string, guests []Guest) [][]expr.Any {
	var rules [][]expr.Any
	for _, g := range guests {
		if len(g.MAC) != 6 || !g.IP.Is4() {
			continue
		}
		ip := g.IP.As4()
		rules = append(rules,
			rule(iif(g.Tap), etherSaddr(g.MAC), etherType(etherTypeIPv4),
				payloadEq(expr.PayloadBaseNetworkHeader, 12, ip[:]), accept),
			rule(iif(g.Tap), etherSaddr(g.MAC), etherType(etherTypeARP),
				payloadEq(expr.PayloadBaseNetworkHeader, 0, []byte{0, 1, 8, 0, 6, 4}),                     // htype ether, ptype ip, hlen 6, plen 4
				payloadEq(expr.PayloadBaseNetworkHeader, 8, append(append([]byte{}, g.MAC...), ip[:]...)), // sender MAC, sender IP
				accept),
		)
	}
	return append(rules, rule(metaEq(expr.MetaKeyIIFNAME, []byte(prefix)), drop)) // prefix match: "P*"
}

func bridgeChains(prefix string, guests []Guest) []chainSpec {
	return []chainSpec{
		{name: "prerouting", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookPrerouting, prio: nftables.ChainPriorityFilter,
			rules: antiSpoof(prefix, guests)},
		{name: "forward", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookForward, prio: nftables.ChainPriorityFilter,
			rules: [][]expr.Any{rule(
				metaEq(expr.MetaKeyIIFNAME, []byte(prefix)),
				metaEq(expr.MetaKeyOIFNAME, []byte(prefix)),
				drop)}},
	}
}

// addTable queues the atomic replacement (or creation) of a table.
func addTable(c *nftables.Conn, fam nftables.TableFamily, name string, chains []chainSpec) {
	t := &nftables.Table{Name: name, Family: fam}
	// add (no-op if present) + delete + add: the usual atomic replace idiom.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	policy := nftables.ChainPolicyAccept
	for _, cs := range chains {
		ch := &nftables.Chain{Name: cs.name, Table: t}
		if cs.hook != nil {
			ch.Type, ch.Hooknum, ch.Priority, ch.Policy = cs.typ, cs.hook, cs.prio, &policy
		}
		ch = c.AddChain(ch)
		for _, r := range cs.rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
		}
	}
}

// replaceTable atomically replaces (or creates) the table with the chains.
func replaceTable(c *nftables.Conn, fam nftables.TableFamily, name string, chains []chainSpec) error {
	addTable(c, fam, name, chains)
	return c.Flush()
}

func sortGuests(gs []Guest) []Guest {
	out := append([]Guest(nil), gs...)
	sort.Slice(out, func(i, j int) bool { return out[i].Tap < out[j].Tap })
	return out
}

// EnsureNAT converges banger's tables to the ruleset above for the given
// guests, makes Docker-style FORWARD chains let banger's bridge through
// (DockerForward) and enables IPv4 forwarding. l2 reports whether the
// bridge-family table (anti-spoofing, VM-to-VM drop at layer 2) could be
// installed; without it, bridge port isolation still separates VMs but
// nothing stops address spoofing.
//
// When forwarding was off, banger turns it on and its forward chain then
// drops every forwarded packet that does not involve the bridge, so that
// the host does not become a router for its other interfaces. A marker
// chain remembers this across later calls; RemoveNAT turns forwarding
// back off. While another firewall guards forwarding (an iptables-nft
// FORWARD chain with policy drop: Docker, ufw), banger leaves that job to
// it: a router started after banger (Docker) keeps working, and RemoveNAT
// leaves forwarding on for it.
func EnsureNAT(n NAT, guests []Guest) (l2 bool, err error) {
	if n.Table == "" || n.Bridge == "" || n.TapPrefix == "" || n.OutIface == "" || !n.Gateway.IsValid() {
		return false, fmt.Errorf("incomplete NAT description %+v", n)
	}
	guests = sortGuests(guests)
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables: %w", err)
	}
	fwdOn, err := ipv4ForwardingOn()
	if err != nil {
		return false, err
	}
	marker := !fwdOn
	if !marker {
		if marker, err = chainExists(c, nftables.TableFamilyINet, n.Table, guardChain); err != nil {
			return false, err
		}
	}
	other, _, _, err := forwardDropElsewhere(c)
	if err != nil {
		return false, err
	}
	if err := replaceTable(c, nftables.TableFamilyINet, n.Table, n.inetChains(guests, marker, marker && !other)); err != nil {
		return false, fmt.Errorf("install nftables table inet %s: %w", n.Table, err)
	}
	l2 = true
	if err := replaceTable(c, nftables.TableFamilyBridge, n.Table, bridgeChains(n.TapPrefix, guests)); err != nil {
		l2 = false
	}
	if _, err := DockerForward(n.Table, n.Bridge, true); err != nil {
		return l2, err
	}
	if !fwdOn {
		if err := EnableIPv4Forwarding(); err != nil {
			return l2, err
		}
	}
	return l2, nil
}

// SyncGuests rewrites the per-guest rules (anti-spoofing in "bridge
// <table>", owner-only connections in the output chain of "inet <table>"
// when that table exists) for exactly these guests, atomically.
func SyncGuests(table, bridge, prefix string, guests []Guest) (l2 bool, err error) {
	guests = sortGuests(guests)
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables: %w", err)
	}
	hasOutput, err := chainExists(c, nftables.TableFamilyINet, table, "output")
	if err != nil {
		return false, err
	}
	if hasOutput {
		t := &nftables.Table{Name: table, Family: nftables.TableFamilyINet}
		ch := &nftables.Chain{Name: "output", Table: t}
		c.FlushChain(ch)
		for _, r := range outputRules(bridge, guests) {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
		}
		if err := c.Flush(); err != nil {
			return false, fmt.Errorf("update nftables chain inet %s output: %w", table, err)
		}
	}
	if err := replaceTable(c, nftables.TableFamilyBridge, table, bridgeChains(prefix, guests)); err != nil {
		return false, nil
	}
	return true, nil
}

func chainExists(c *nftables.Conn, fam nftables.TableFamily, table, chain string) (bool, error) {
	ok, err := tableExists(c, fam, table)
	if err != nil || !ok {
		return false, err
	}
	chains, err := c.ListChainsOfTableFamily(fam)
	if err != nil {
		return false, fmt.Errorf("list nftables chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name == table && ch.Name == chain {
			return true, nil
		}
	}
	return false, nil
}

// RemoveNAT deletes banger's tables and its rules in Docker-style FORWARD
// chains; removed is false when there was nothing. When banger had turned
// IPv4 forwarding on, it is turned off again, unless another firewall
// (Docker, ufw) now manages forwarding.
func RemoveNAT(table, bridge string) (removed bool, err error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables: %w", err)
	}
	guard, err := chainExists(c, nftables.TableFamilyINet, table, guardChain)
	if err != nil {
		return false, err
	}
	for _, fam := range []nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyBridge} {
		ok, err := tableExists(c, fam, table)
		if err != nil {
			return removed, err
		}
		if !ok {
			continue
		}
		c.DelTable(&nftables.Table{Name: table, Family: fam})
		if err := c.Flush(); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return removed, fmt.Errorf("delete nftables table %s %s: %w", famName(fam), table, err)
		}
		removed = true
	}
	if n, err := DockerForward(table, bridge, false); err != nil {
		return removed, err
	} else if n > 0 {
		removed = true
	}
	other, _, _, err := forwardDropElsewhere(c)
	if err != nil {
		return removed, err
	}
	if guard && !other {
		if err := os.WriteFile(ipForward, []byte("0\n"), 0o644); err != nil {
			return removed, fmt.Errorf("turn IPv4 forwarding back off: %w", err)
		}
	}
	return removed, nil
}

// dockerMark tags the rules banger adds to other tools' chains.
func dockerMark(table, bridge string) []byte {
	return userdata.AppendString(nil, userdata.TypeComment, table+":"+bridge)
}

// DockerForward makes an iptables-nft "ip filter" FORWARD chain that drops
// by policy (Docker, ufw and firewalld set one) let banger's bridge through:
// with add, it (re)inserts "iifname B accept" and "oifname B accept" at the
// top of DOCKER-USER when that chain exists (Docker's documented place for
// them), else at the top of FORWARD; without add it only removes them. The
// rules carry the comment "<table>:<bridge>". They only accept what banger's
// own tables already let through: a drop in any table is final. It returns
// how many rules it removed or added. Chains of iptables-legacy (not
// nftables) are invisible here; `banger doctor` reports them.
func DockerForward(table, bridge string, add bool) (int, error) {
	c, err := nftables.New()
	if err != nil {
		return 0, fmt.Errorf("open nftables: %w", err)
	}
	ok, err := tableExists(c, nftables.TableFamilyIPv4, "filter")
	if err != nil || !ok {
		return 0, err
	}
	t := &nftables.Table{Name: "filter", Family: nftables.TableFamilyIPv4}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return 0, fmt.Errorf("list nftables chains: %w", err)
	}
	var fwd, user *nftables.Chain
	for _, ch := range chains {
		if ch.Table.Name != "filter" {
			continue
		}
		switch ch.Name {
		case "FORWARD":
			if ch.Hooknum != nil && *ch.Hooknum == *nftables.ChainHookForward {
				fwd = ch
			}
		case "DOCKER-USER":
			user = ch
		}
	}
	if fwd == nil {
		return 0, nil
	}
	mark := dockerMark(table, bridge)
	n := 0
	for _, ch := range []*nftables.Chain{fwd, user} {
		if ch == nil {
			continue
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return 0, fmt.Errorf("list rules of ip filter %s: %w", ch.Name, err)
		}
		for _, r := range rules {
			if bytes.Equal(r.UserData, mark) {
				if err := c.DelRule(r); err != nil {
					return 0, fmt.Errorf("remove banger's rule from ip filter %s: %w", ch.Name, err)
				}
				n++
			}
		}
	}
	if user != nil {
		// DOCKER-USER only counts when FORWARD jumps to it.
		rules, err := c.GetRules(t, fwd)
		if err != nil {
			return 0, fmt.Errorf("list rules of ip filter FORWARD: %w", err)
		}
		jumped := false
		for _, r := range rules {
			for _, e := range r.Exprs {
				if v, ok := e.(*expr.Verdict); ok && v.Kind == expr.VerdictJump && v.Chain == user.Name {
					jumped = true
				}
			}
		}
		if !jumped {
			user = nil
		}
	}
	dropping := fwd.Policy != nil && *fwd.Policy == nftables.ChainPolicyDrop
	if add && (dropping || user != nil) {
		into := fwd
		if user != nil {
			into = user
		}
		// InsertRule puts each at the top: oifname ends up after iifname.
		for _, r := range [][]expr.Any{rule(oif(bridge), accept), rule(iif(bridge), accept)} {
			c.InsertRule(&nftables.Rule{Table: t, Chain: into, Exprs: r, UserData: mark})
			n++
		}
	}
	if n == 0 {
		return 0, nil
	}
	if err := c.Flush(); err != nil {
		return 0, fmt.Errorf("update ip filter FORWARD for %s: %w", bridge, err)
	}
	return n, nil
}

// ForwardState reports whether an iptables-nft "ip filter" FORWARD chain
// drops by policy, whether banger's accept rules (DockerForward) are in
// it or in DOCKER-USER, and whether iptables-legacy's filter table is
// active in this namespace (/proc/net/ip_tables_names, readable by root).
func ForwardState(table, bridge string) (nftDrop, accepts, legacy bool, err error) {
	if b, rerr := os.ReadFile("/proc/net/ip_tables_names"); rerr == nil {
		for _, l := range strings.Fields(string(b)) {
			legacy = legacy || l == "filter"
		}
	}
	c, err := nftables.New()
	if err != nil {
		return false, false, legacy, fmt.Errorf("open nftables: %w", err)
	}
	ok, err := tableExists(c, nftables.TableFamilyIPv4, "filter")
	if err != nil || !ok {
		return false, false, legacy, err
	}
	return forwardState(c, table, bridge, legacy)
}

// forwardDropElsewhere reports whether an iptables-nft "ip filter" FORWARD
// chain drops by policy.
func forwardDropElsewhere(c *nftables.Conn) (bool, bool, bool, error) {
	ok, err := tableExists(c, nftables.TableFamilyIPv4, "filter")
	if err != nil || !ok {
		return false, false, false, err
	}
	return forwardState(c, "", "", false)
}

// FirewalldActive reports whether firewalld's nftables table exists.
func FirewalldActive() (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables: %w", err)
	}
	return tableExists(c, nftables.TableFamilyINet, "firewalld")
}

func forwardState(c *nftables.Conn, table, bridge string, legacy bool) (nftDrop, accepts, _ bool, err error) {
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return false, false, legacy, fmt.Errorf("list nftables chains: %w", err)
	}
	t := &nftables.Table{Name: "filter", Family: nftables.TableFamilyIPv4}
	mark := dockerMark(table, bridge)
	for _, ch := range chains {
		if ch.Table.Name != "filter" || (ch.Name != "FORWARD" && ch.Name != "DOCKER-USER") {
			continue
		}
		if ch.Name == "FORWARD" && ch.Policy != nil && *ch.Policy == nftables.ChainPolicyDrop {
			nftDrop = true
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return nftDrop, accepts, legacy, fmt.Errorf("list rules of ip filter %s: %w", ch.Name, err)
		}
		for _, r := range rules {
			accepts = accepts || bytes.Equal(r.UserData, mark)
		}
	}
	return nftDrop, accepts, legacy, nil
}

func tableExists(c *nftables.Conn, fam nftables.TableFamily, name string) (bool, error) {
	ts, err := c.ListTablesOfFamily(fam)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EAFNOSUPPORT) {
			return false, nil
		}
		return false, fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range ts {
		if t.Name == name {
			return true, nil
		}
	}
	return false, nil
}

// NATExists reports whether table inet <table> exists.
func NATExists(table string) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables: %w", err)
	}
	return tableExists(c, nftables.TableFamilyINet, table)
}

func famName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyBridge:
		return "bridge"
	case nftables.TableFamilyARP:
		return "arp"
	case nftables.TableFamilyNetdev:
		return "netdev"
	}
	return fmt.Sprintf("family-%d", f)
}

// DumpRuleset renders every nftables table of the current namespace (all
// families) with its chains and rules in a canonical text form (handles
// left out), for comparisons and diagnostics.
func DumpRuleset() (string, error) {
	c, err := nftables.New()
	if err != nil {
		return "", fmt.Errorf("open nftables: %w", err)
	}
	tables, err := c.ListTables()
	if err != nil {
		return "", fmt.Errorf("list nftables tables: %w", err)
	}
	chains, err := c.ListChains()
	if err != nil {
		return "", fmt.Errorf("list nftables chains: %w", err)
	}
	sort.Slice(tables, func(i, j int) bool {
		if tables[i].Family != tables[j].Family {
			return tables[i].Family < tables[j].Family
		}
		return tables[i].Name < tables[j].Name
	})
	var sb strings.Builder
	for _, t := range tables {
		fmt.Fprintf(&sb, "table %s %s\n", famName(t.Family), t.Name)
		var mine []*nftables.Chain
		for _, ch := range chains {
			if ch.Table.Name == t.Name && ch.Table.Family == t.Family {
				mine = append(mine, ch)
			}
		}
		sort.Slice(mine, func(i, j int) bool { return mine[i].Name < mine[j].Name })
		for _, ch := range mine {
			fmt.Fprintf(&sb, "  chain %s type=%s", ch.Name, ch.Type)
			if ch.Hooknum != nil {
				fmt.Fprintf(&sb, " hook=%d", *ch.Hooknum)
			}
			if ch.Priority != nil {
				fmt.Fprintf(&sb, " prio=%d", *ch.Priority)
			}
			if ch.Policy != nil {
				fmt.Fprintf(&sb, " policy=%d", *ch.Policy)
			}
			sb.WriteString("\n")
			rules, err := c.GetRules(t, ch)
			if err != nil {
				return "", fmt.Errorf("list rules of %s %s %s: %w", famName(t.Family), t.Name, ch.Name, err)
			}
			for _, r := range rules {
				sb.WriteString("    rule")
				for _, e := range r.Exprs {
					fmt.Fprintf(&sb, " %T%+v", e, e)
				}
				if len(r.UserData) > 0 {
					fmt.Fprintf(&sb, " userdata=%x", r.UserData)
				}
				sb.WriteString("\n")
			}
		}
	}
	return sb.String(), nil
}
