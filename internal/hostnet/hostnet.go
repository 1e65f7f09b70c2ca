// Package hostnet is banger's host networking as bangerd sees it: the wire
// types of banger-helper's methods, a Client for the helper, the validation
// rules both sides share, and the pure helpers bangerd needs to plan a VM's
// network (subnet choice, per-VM addresses, tap names and MAC addresses).
//
// Layout on the host: one Linux bridge (DefaultBridge, "banger0") holding the
// gateway address of a private /24; one persistent tap per VM, named
// TapPrefix + 11 hex digits of the VM id ("bgt-0123456789a"), owned by the
// user whose bangerd runs the VM, attached to the bridge as an isolated port;
// and banger's own nftables tables ("inet banger" for NAT, the egress policy
// (public addresses only), the guest→host block and owner-only connections
// to guests; "bridge banger" for per-tap MAC/IP anti-spoofing, no IPv6, and
// VM-to-VM isolation at layer 2). The helper serves guests' DNS on the
// gateway (hostnet/dnsfwd).
//
// Privileged work happens in banger-helper (package hostnet/helper); the
// netlink and nftables code is in hostnet/netcfg; systemd units for
// `banger system install` are in hostnet/install; network-namespace fixtures
// for tests are in hostnet/nettest.
package hostnet

import (
	"os"
)

// Defaults shared by the helper and its clients.
const (
	// DefaultBridge is the name of banger's bridge.
	DefaultBridge = "banger0"
	// DefaultTapPrefix starts the name of every tap banger creates.
	DefaultTapPrefix = "bgt-"
	// DefaultSocket is where banger-helper listens.
	DefaultSocket = "/run/banger/helper.sock"
	// SocketEnv overrides DefaultSocket for the helper and its clients alike.
	SocketEnv = "BANGER_HELPER_SOCKET"
	// NATTable is the name of banger's nftables tables (families inet and bridge).
	NATTable = "banger"
	// DefaultPool is the private range the helper carves banger's /24 out
	// of, unless its configuration (DefaultHelperConfig) names another.
	DefaultPool = "172.30.0.0/16"
	// DefaultHelperConfig is the helper's root-owned configuration file,
	// written by `banger system install`.
	DefaultHelperConfig = "/etc/banger/helper.json"
)

// Method names of banger-helper.
const (
	MethodPing         = "system.ping"
	MethodEnsureBridge = "net.ensure_bridge"
	MethodDeleteBridge = "net.delete_bridge"
	MethodCreateTap    = "net.create_tap"
	MethodDeleteTap    = "net.delete_tap"
	MethodEnsureNAT    = "net.ensure_nat"
	MethodRemoveNAT    = "net.remove_nat"
	MethodList         = "net.list"
	MethodInfo         = "net.info"
)

// SocketPath returns the helper socket path: $BANGER_HELPER_SOCKET when set,
// else DefaultSocket.
func SocketPath() string {
	if p := os.Getenv(SocketEnv); p != "" {
		return p
	}
	return DefaultSocket
}

// PingResult is the result of system.ping: the helper's configuration, so
// that bangerd need not be told the bridge name or tap prefix separately.
type PingResult struct {
	Helper    string `json:"helper"`
	Bridge    string `json:"bridge"`
	TapPrefix string `json:"tap_prefix"`
	// CallerUID is the caller's uid as the helper saw it (SO_PEERCRED).
	CallerUID uint32 `json:"caller_uid"`
}

// InfoResult is the result of net.info: the network the helper's
// root-owned configuration gives banger. bangerd allocates guest addresses
// inside Subnet; a caller never chooses the range.
type InfoResult struct {
	Bridge    string `json:"bridge"`
	TapPrefix string `json:"tap_prefix"`
	// Pool is the configured range; Subnet the /24 of it in use (the
	// bridge's, or the first free one), Gateway its address on the bridge.
	Pool    string `json:"pool"`
	Subnet  string `json:"subnet"`
	Gateway string `json:"gateway"`
	// MaxTapsPerUser is how many taps one uid may own (0: no limit).
	MaxTapsPerUser int `json:"max_taps_per_user"`
}

// EnsureBridgeParams are the params of net.ensure_bridge.
type EnsureBridgeParams struct {
	Bridge string `json:"bridge"`
	// CIDR, when given, must be the gateway net.info reports (e.g.
	// "172.30.0.1/24"); the helper refuses any other. Empty means that one.
	CIDR string `json:"cidr,omitempty"`
}

// BridgeResult is the result of net.ensure_bridge.
type BridgeResult struct {
	Bridge  string `json:"bridge"`
	CIDR    string `json:"cidr"`
	Created bool   `json:"created"`
}

// CreateTapParams are the params of net.create_tap.
type CreateTapParams struct {
	Tap    string `json:"tap"`
	Bridge string `json:"bridge"`
	// OwnerUID owns the tap (may open it without privileges). When absent it
	// is the caller's uid; a caller other than root may only name itself.
	OwnerUID *uint32 `json:"owner_uid,omitempty"`
	// MTU of the tap; 0 keeps the kernel default (1500).
	MTU int `json:"mtu,omitempty"`
	// MAC and IP are the only link-layer and IPv4 source addresses the
	// tap's guest may send from (ARP included); IP must lie inside the
	// bridge's subnet and belong to no other tap. Both or neither: a tap
	// without them passes no traffic at all.
	MAC string `json:"mac,omitempty"`
	IP  string `json:"ip,omitempty"`
}

// TapInfo describes one of banger's taps (net.create_tap, net.list).
type TapInfo struct {
	Name     string `json:"name"`
	OwnerUID uint32 `json:"owner_uid"`
	// Bridge is the bridge the tap is attached to ("" when detached).
	Bridge  string `json:"bridge"`
	MTU     int    `json:"mtu"`
	Up      bool   `json:"up"`
	VnetHdr bool   `json:"vnet_hdr"`
	// MAC and IP are the guest's addresses recorded on the tap ("" when none).
	MAC string `json:"mac,omitempty"`
	IP  string `json:"ip,omitempty"`
	// Created is set by net.create_tap when this call made the tap.
	Created bool `json:"created,omitempty"`
}

// DeleteTapParams are the params of net.delete_tap.
type DeleteTapParams struct {
	Tap string `json:"tap"`
}

// DeletedResult is the result of the delete/remove methods.
type DeletedResult struct {
	// Deleted is false when there was nothing to delete.
	Deleted bool `json:"deleted"`
}

// EnsureNATParams are the params of net.ensure_nat.
type EnsureNATParams struct {
	Bridge string `json:"bridge"`
	// CIDR, when given, must be the gateway net.info reports; empty means
	// that one.
	CIDR string `json:"cidr,omitempty"`
	// OutIface is the interface NATed traffic leaves by; default: the
	// interface of the host's IPv4 default route.
	OutIface string `json:"out_iface,omitempty"`
	// AllowDNS lets guests reach UDP/TCP port 53 on the gateway address,
	// where the helper runs a DNS forwarder to the host's resolvers.
	AllowDNS bool `json:"allow_dns,omitempty"`
}

// NATResult is the result of net.ensure_nat.
type NATResult struct {
	Table    string `json:"table"`
	Subnet   string `json:"subnet"`
	OutIface string `json:"out_iface"`
	// L2Isolation reports whether the "bridge banger" table (VM-to-VM drop at
	// layer 2) is in place; bridge port isolation is set either way.
	L2Isolation bool `json:"l2_isolation"`
	// DNS is the address of the helper's DNS forwarder ("" when allow_dns
	// was not asked for).
	DNS string `json:"dns,omitempty"`
	// DNSError says why allow_dns got no forwarder (the call still
	// succeeds: guests then lack DNS unless network.dns is set).
	DNSError string `json:"dns_error,omitempty"`
}

// BridgeParams are the params of net.remove_nat and net.delete_bridge.
type BridgeParams struct {
	Bridge string `json:"bridge"`
}

// ListResult is the result of net.list.
type ListResult struct {
	Bridge BridgeState `json:"bridge"`
	// NAT reports whether banger's "inet banger" table exists.
	NAT bool `json:"nat"`
	// Taps are banger's taps (prefix match). A caller other than root sees
	// only the taps it owns.
	Taps []TapInfo `json:"taps"`
	// Forward describes other firewalls on the forward path (nil when the
	// helper could not tell).
	Forward *ForwardInfo `json:"forward,omitempty"`
}

// ForwardInfo is what the helper sees of other tables that can drop
// guests' forwarded traffic (for `banger doctor`).
type ForwardInfo struct {
	// NftDrop: an iptables-nft "ip filter" FORWARD chain drops by policy
	// (Docker, ufw); BangerAccepts: banger's accept rules for its bridge
	// are in it (or in DOCKER-USER).
	NftDrop       bool `json:"nft_forward_drop"`
	BangerAccepts bool `json:"banger_accepts"`
	// LegacyFilter: iptables-legacy's filter table is active; nftables
	// cannot see or change its FORWARD chain.
	LegacyFilter bool `json:"legacy_iptables_filter"`
	// Firewalld: firewalld's nftables table exists; its forward chain
	// rejects traffic of interfaces in no zone that allows forwarding.
	Firewalld bool `json:"firewalld"`
}

// BridgeState is the state of banger's bridge.
type BridgeState struct {
	Name   string `json:"name"`
	Exists bool   `json:"exists"`
	Up     bool   `json:"up"`
	// CIDRs are the bridge's IPv4 addresses ("172.30.0.1/24").
	CIDRs []string `json:"cidrs,omitempty"`
}
