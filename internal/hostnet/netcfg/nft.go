package netcfg

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// NAT describes banger's NAT and filtering for one bridge.
type NAT struct {
	// Table is the name of banger's tables ("banger").
	Table  string
	Bridge string
	// TapPrefix starts the names of banger's taps (the bridge's VM ports).
	TapPrefix string
	OutIface  string
	// Gateway is the bridge's address with the subnet's length.
	Gateway  netip.Prefix
	AllowDNS bool
}

// The ruleset EnsureNAT installs, for bridge B, uplink O, subnet S, gateway G:
//
//	table inet banger {
//	  chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//	    ip saddr S oifname O masquerade }
//	  chain forward { type filter hook forward priority filter; policy accept;
//	    iifname B oifname B drop                       # VM to VM, routed or br_netfilter
//	    iifname B oifname O ip saddr S accept           # VM to the outside
//	    iifname O oifname B ct state established,related accept
//	    iifname B drop                                  # VM to any other interface
//	    oifname B drop }                                # anything else to a VM
//	  chain input { type filter hook input priority filter; policy accept;
//	    iifname B ct state established,related accept
//	    [iifname B ip daddr G udp dport 53 accept]      # allow_dns
//	    [iifname B ip daddr G tcp dport 53 accept]
//	    iifname B drop }                                # guest to host services
//	}
//	table bridge banger {
//	  chain forward { type filter hook forward priority filter; policy accept;
//	    iifname "P*" oifname "P*" drop }                # VM to VM at layer 2 (P: tap prefix)
//	}
//
// Accept verdicts are final only within banger's table: another table on the
// same hook (e.g. Docker's FORWARD policy drop) can still drop the traffic.

func ifname(s string) []byte {
	b := make([]byte, 16)
	copy(b, s)
	return b
}

func metaEq(key expr.MetaKey, data []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data},
	}
}

func iif(name string) []expr.Any { return metaEq(expr.MetaKeyIIFNAME, ifname(name)) }
func oif(name string) []expr.Any { return metaEq(expr.MetaKeyOIFNAME, ifname(name)) }

func ipv4() []expr.Any { return metaEq(expr.MetaKeyNFPROTO, []byte{unix.NFPROTO_IPV4}) }

func ipSaddrIn(p netip.Prefix) []expr.Any {
	p = p.Masked()
	mask := netipMask(p.Bits())
	net4 := p.Addr().As4()
	return append(ipv4(),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: net4[:]},
	)
}

func netipMask(bits int) []byte {
	m := make([]byte, 4)
	binary.BigEndian.PutUint32(m, ^uint32(0)<<(32-bits))
	return m
}

func ipDaddr(a netip.Addr) []expr.Any {
	b := a.As4()
	return append(ipv4(),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b[:]},
	)
}

func dport(proto byte, port uint16) []expr.Any {
	p := make([]byte, 2)
	binary.BigEndian.PutUint16(p, port)
	return append(metaEq(expr.MetaKeyL4PROTO, []byte{proto}),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p},
	)
}

func ctEstablished() []expr.Any {
	mask := make([]byte, 4)
	binary.NativeEndian.PutUint32(mask, expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED)
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
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

func (n NAT) inetChains() []chainSpec {
	b, o, s, g := n.Bridge, n.OutIface, n.Gateway.Masked(), n.Gateway.Addr()
	input := [][]expr.Any{rule(iif(b), ctEstablished(), accept)}
	if n.AllowDNS {
		input = append(input,
			rule(iif(b), ipDaddr(g), dport(unix.IPPROTO_UDP, 53), accept),
			rule(iif(b), ipDaddr(g), dport(unix.IPPROTO_TCP, 53), accept))
	}
	input = append(input, rule(iif(b), drop))
	return []chainSpec{
		{name: "postrouting", typ: nftables.ChainTypeNAT, hook: nftables.ChainHookPostrouting, prio: nftables.ChainPriorityNATSource,
			rules: [][]expr.Any{rule(ipSaddrIn(s), oif(o), []expr.Any{&expr.Masq{}})}},
		{name: "forward", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookForward, prio: nftables.ChainPriorityFilter,
			rules: [][]expr.Any{
				rule(iif(b), oif(b), drop),
				rule(iif(b), oif(o), ipSaddrIn(s), accept),
				rule(iif(o), oif(b), ctEstablished(), accept),
				rule(iif(b), drop),
				rule(oif(b), drop),
			}},
		{name: "input", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookInput, prio: nftables.ChainPriorityFilter, rules: input},
	}
}

func (n NAT) bridgeChains() []chainSpec {
	return []chainSpec{{
		name: "forward", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookForward, prio: nftables.ChainPriorityFilter,
		rules: [][]expr.Any{rule(
			metaEq(expr.MetaKeyIIFNAME, []byte(n.TapPrefix)), // prefix match: "P*"
			metaEq(expr.MetaKeyOIFNAME, []byte(n.TapPrefix)),
			drop)},
	}}
}

// replaceTable atomically replaces (or creates) the table with the chains.
func replaceTable(c *nftables.Conn, fam nftables.TableFamily, name string, chains []chainSpec) error {
	t := &nftables.Table{Name: name, Family: fam}
	// add (no-op if present) + delete + add: the usual atomic replace idiom.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	policy := nftables.ChainPolicyAccept
	for _, cs := range chains {
		ch := c.AddChain(&nftables.Chain{Name: cs.name, Table: t, Type: cs.typ, Hooknum: cs.hook, Priority: cs.prio, Policy: &policy})
		for _, r := range cs.rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
		}
	}
	return c.Flush()
}

// EnsureNAT converges banger's tables to the ruleset above and enables IPv4
// forwarding. l2 reports whether the bridge-family table could be installed
// (kernels without nftables bridge support rely on bridge port isolation).
func EnsureNAT(n NAT) (l2 bool, err error) {
	if n.Table == "" || n.Bridge == "" || n.TapPrefix == "" || n.OutIface == "" || !n.Gateway.IsValid() {
		return false, fmt.Errorf("incomplete NAT description %+v", n)
	}
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables: %w", err)
	}
	if err := replaceTable(c, nftables.TableFamilyINet, n.Table, n.inetChains()); err != nil {
		return false, fmt.Errorf("install nftables table inet %s: %w", n.Table, err)
	}
	l2 = true
	if err := replaceTable(c, nftables.TableFamilyBridge, n.Table, n.bridgeChains()); err != nil {
		l2 = false
	}
	if err := EnableIPv4Forwarding(); err != nil {
		return l2, err
	}
	return l2, nil
}

// RemoveNAT deletes banger's tables; removed is false when none existed.
func RemoveNAT(table string) (removed bool, err error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables: %w", err)
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
	return removed, nil
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
				sb.WriteString("\n")
			}
		}
	}
	return sb.String(), nil
}
