// Package helper is banger-helper: the only privileged process of banger. It
// serves a narrow allow-list of network methods (hostnet.Method*) over
// banger's wire protocol (package rpc) on a unix socket, authorises every
// connection by SO_PEERCRED, validates every argument before anything
// reaches netlink or nftables, and keeps no state of its own beyond the
// devices and tables it makes (and what it records on them).
//
// Security rules enforced here:
//   - callers: root, the --allow-user uids, members of the --allow-group gids;
//   - devices: only the configured bridge and taps named <tap prefix>…,
//     1-15 bytes of [a-z0-9-];
//   - addresses: the range comes from the helper's root-owned configuration
//     (FileConfig.Pool), never from a caller: a /24 of it that overlaps no
//     route or address of the host outside banger's devices; a caller's
//     cidr that differs is refused;
//   - ownership: a non-root caller creates taps for itself only (at most
//     MaxTapsPerUser) and deletes and lists only its own taps; the bridge
//     and the NAT tables record who made them (BridgeMark) and only that
//     uid (or root) may remove them, and only while no other user's tap
//     exists; ensure_bridge removes no address the helper did not add;
//   - resources: 64 KiB request lines, a deadline per request line, a cap
//     on connections per uid and overall, refused connections answered
//     once then closed, refusal records rate-limited;
//   - guests: each tap carries its guest's MAC and IP (create_tap checks
//     the IP is a guest address of the pool's subnet that no other tap
//     holds) and may send only from them; guests reach public addresses
//     through NAT and nothing else unless the configuration's allow_cidrs
//     open a range; only a guest's owner (and root) may connect to it; the
//     DNS forwarder on the gateway is bounded (package dnsfwd);
//   - params: unknown fields are refused (invalid_argument).
//
// Mutating methods are serialised; every call produces exactly one log line
// ("helper rpc completed" / "helper rpc failed") with method, duration_ms,
// op_id and the caller's uid.
package helper

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/hostnet/dnsfwd"
	"github.com/bangerdev/banger/internal/hostnet/netcfg"
	"github.com/bangerdev/banger/internal/rpc"
)

// Log messages of the per-call records.
const (
	CompletedMsg = "helper rpc completed"
	FailedMsg    = "helper rpc failed"
)

// Config is what a helper manages and whom it serves.
type Config struct {
	// Bridge is the only bridge the helper touches (default hostnet.DefaultBridge).
	Bridge string
	// TapPrefix starts every tap name the helper accepts (default hostnet.DefaultTapPrefix).
	TapPrefix string
	// Table names banger's nftables tables (default hostnet.NATTable).
	Table string
	// Pool is the private range banger's /24 is carved out of (default
	// hostnet.DefaultPool).
	Pool netip.Prefix
	// MaxTapsPerUser caps the taps one uid owns (0: DefaultMaxTapsPerUser;
	// -1: no cap). Root's taps are not capped.
	MaxTapsPerUser int
	// MaxConnsPerUser and MaxConns cap simultaneous connections per non-root
	// uid and overall (0: the defaults).
	MaxConnsPerUser, MaxConns int
	// RequestTimeout bounds the wait for each request line (0: default).
	RequestTimeout time.Duration
	// Policy says who may call.
	Policy Policy
	// Logger receives the per-call records (default slog.Default()).
	Logger *slog.Logger
	// AllowCIDRs are IPv4 ranges guests may reach although they are
	// private or otherwise blocked (netcfg.BlockedEgress); root-owned
	// configuration only.
	AllowCIDRs []netip.Prefix
	// ResolvConf is where the DNS forwarder finds the host's name servers
	// (default /etc/resolv.conf).
	ResolvConf string
	// DNSPort is the DNS forwarder's port (default 53; tests only).
	DNSPort int
}

func (c *Config) fill() error {
	if c.Bridge == "" {
		c.Bridge = hostnet.DefaultBridge
	}
	if c.TapPrefix == "" {
		c.TapPrefix = hostnet.DefaultTapPrefix
	}
	if c.Table == "" {
		c.Table = hostnet.NATTable
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if !c.Pool.IsValid() {
		c.Pool = netip.MustParsePrefix(hostnet.DefaultPool)
	}
	if c.MaxTapsPerUser == 0 {
		c.MaxTapsPerUser = DefaultMaxTapsPerUser
	}
	if c.MaxConnsPerUser == 0 {
		c.MaxConnsPerUser = DefaultMaxConnsPerUser
	}
	if c.MaxConns == 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	c.Pool = c.Pool.Masked()
	if !c.Pool.Addr().Is4() || !hostnet.IsPrivate(c.Pool) || c.Pool.Bits() > hostnet.MaxSubnetBits {
		return fmt.Errorf("pool %s must be a private IPv4 range (inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16) of at most /%d", c.Pool, hostnet.MaxSubnetBits)
	}
	for i, p := range c.AllowCIDRs {
		if !p.IsValid() || !p.Addr().Is4() {
			return fmt.Errorf("allowed range %s is not an IPv4 CIDR", p)
		}
		c.AllowCIDRs[i] = p.Masked()
	}
	if err := hostnet.ValidDeviceName(c.Bridge); err != nil {
		return fmt.Errorf("bridge: %w", err)
	}
	if err := hostnet.ValidDeviceName(c.TapPrefix); err != nil || len(c.TapPrefix) < 2 || len(c.TapPrefix) > 10 {
		return fmt.Errorf("tap prefix %q must be 2-10 bytes of [a-z0-9-]", c.TapPrefix)
	}
	if len(c.Bridge) >= len(c.TapPrefix) && c.Bridge[:len(c.TapPrefix)] == c.TapPrefix {
		return fmt.Errorf("bridge name %q must not start with the tap prefix %q", c.Bridge, c.TapPrefix)
	}
	return nil
}

type server struct {
	bridge, prefix, table string
	pool                  netip.Prefix
	maxTaps               int
	refusals              *refusalLog
	policy                Policy
	log                   *slog.Logger
	mu                    sync.Mutex // serialises mutating methods
	l2Warn                sync.Once
	allow                 []netip.Prefix
	resolvConf            string
	dnsPort               int
	dns                   *dnsfwd.Forwarder // under mu
}

// NewServer returns an rpc.Server serving the helper's methods with
// per-connection SO_PEERCRED authorisation and one log line per call.
func NewServer(cfg Config) (*rpc.Server, error) {
	srv, _, err := newServer(&cfg)
	return srv, err
}

// newServer fills cfg's defaults and returns the rpc server and the
// helper's state.
func newServer(cfg *Config) (*rpc.Server, *server, error) {
	if err := cfg.fill(); err != nil {
		return nil, nil, err
	}
	s := &server{bridge: cfg.Bridge, prefix: cfg.TapPrefix, table: cfg.Table, policy: cfg.Policy, log: cfg.Logger,
		allow: cfg.AllowCIDRs, resolvConf: cfg.ResolvConf, dnsPort: cfg.DNSPort,
		pool: cfg.Pool, maxTaps: cfg.MaxTapsPerUser, refusals: newRefusalLog(cfg.Logger)}
	mux := rpc.NewMux()
	handle(s, mux, hostnet.MethodPing, false, s.ping)
	handle(s, mux, hostnet.MethodEnsureBridge, true, s.ensureBridge)
	handle(s, mux, hostnet.MethodDeleteBridge, true, s.deleteBridge)
	handle(s, mux, hostnet.MethodCreateTap, true, s.createTap)
	handle(s, mux, hostnet.MethodDeleteTap, true, s.deleteTap)
	handle(s, mux, hostnet.MethodEnsureNAT, true, s.ensureNAT)
	handle(s, mux, hostnet.MethodRemoveNAT, true, s.removeNAT)
	handle(s, mux, hostnet.MethodList, false, s.list)
	handle(s, mux, hostnet.MethodInfo, false, s.info)
	return &rpc.Server{
		Mux:            mux,
		Logger:         cfg.Logger,
		Authorize:      s.authorize,
		LogEachCall:    true,
		CompletedMsg:   CompletedMsg,
		FailedMsg:      FailedMsg,
		MaxLineBytes:   MaxRequestLine,
		ReadTimeout:    cfg.RequestTimeout,
		WriteTimeout:   cfg.RequestTimeout,
		CloseOnRefusal: true,
		OnRefused:      s.refused,
	}, s, nil
}

// resume restarts the DNS forwarder after a restart of the helper when
// banger's bridge and NAT are in place and the NAT was made with allow_dns
// (the bridge's mark says so), so guests keep their resolver; a NAT made
// without allow_dns gets no forwarder from a restart either.
func (s *server) resume(ctx context.Context) {
	exists, _, addrs, err := netcfg.BridgeInfo(s.bridge)
	if err != nil || !exists || len(addrs) != 1 {
		return
	}
	if m, ok, err := netcfg.ReadBridgeMark(s.bridge); err != nil || !ok || !m.DNS {
		return
	}
	if ok, err := netcfg.NATExists(s.table); err != nil || !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.startDNS(ctx, addrs[0]); err != nil {
		s.log.WarnContext(ctx, "dns forwarder not restarted", "error", err.Error())
	}
}

// decodeStrict decodes a params object into v, refusing unknown fields,
// non-objects and trailing data. Absent or null params leave v zero.
func decodeStrict(method string, raw json.RawMessage, v any) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil
	}
	if raw[0] != '{' {
		return rpc.Errorf(rpc.CodeInvalidArgument, "invalid params for %s: want a JSON object", method)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return rpc.Errorf(rpc.CodeInvalidArgument, "invalid params for %s: %v", method, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return rpc.Errorf(rpc.CodeInvalidArgument, "invalid params for %s: trailing data after the object", method)
	}
	return nil
}

func handle[P, R any](s *server, m *rpc.Mux, method string, mutating bool, fn func(ctx context.Context, c Caller, p P) (R, error)) {
	m.HandleFunc(method, func(ctx context.Context, raw json.RawMessage) (any, error) {
		caller, ok := CallerFrom(ctx)
		if !ok {
			return nil, rpc.Errorf(rpc.CodePermissionDenied, "caller unknown")
		}
		var p P
		if err := decodeStrict(method, raw, &p); err != nil {
			return nil, err
		}
		if mutating {
			s.mu.Lock()
			defer s.mu.Unlock()
		}
		r, err := fn(ctx, caller, p)
		if err != nil {
			return nil, classify(err)
		}
		return r, nil
	})
}

// classify gives netcfg's errors their protocol codes.
func classify(err error) error {
	var er *rpc.ErrorResponse
	if errors.As(err, &er) {
		return err
	}
	code := rpc.CodeInternal
	switch {
	case errors.Is(err, netcfg.ErrConflict):
		code = rpc.CodeConflict
	case errors.Is(err, netcfg.ErrPrecondition):
		code = rpc.CodeFailedPrecondition
	case errors.Is(err, netcfg.ErrNotFound):
		code = rpc.CodeNotFound
	}
	return rpc.Errorf(code, "%s", err.Error())
}

func invalid(format string, args ...any) error {
	return rpc.Errorf(rpc.CodeInvalidArgument, format, args...)
}

func (s *server) checkBridge(name string) error {
	if name == "" {
		return invalid("bridge is required (this helper manages %q)", s.bridge)
	}
	if err := hostnet.ValidDeviceName(name); err != nil {
		return invalid("bridge: %v", err)
	}
	if name != s.bridge {
		return invalid("bridge %q is not banger's bridge (this helper manages only %q)", name, s.bridge)
	}
	return nil
}

func (s *server) checkTap(name string) error {
	if name == "" {
		return invalid("tap is required")
	}
	if err := hostnet.ValidTapName(s.prefix, name); err != nil {
		return invalid("tap: %v", err)
	}
	return nil
}

func (s *server) own(name string) bool { return hostnet.OwnDevice(s.bridge, s.prefix)(name) }

func (s *server) inPool(p netip.Prefix) bool {
	return p.Bits() >= s.pool.Bits() && s.pool.Contains(p.Addr())
}

// plan returns banger's gateway address (with its prefix length) from the
// configured pool: the address the helper put on the existing bridge (or
// any gateway-shaped one of the pool there), else the gateway of the pool's
// first /24 (or the whole pool, when smaller) that collides with nothing
// of the host's.
func (s *server) plan() (netip.Prefix, error) {
	exists, _, addrs, err := netcfg.BridgeInfo(s.bridge)
	if err != nil {
		return netip.Prefix{}, err
	}
	if exists {
		mark, ok, err := netcfg.ReadBridgeMark(s.bridge)
		if err != nil {
			return netip.Prefix{}, err
		}
		if ok && slices.Contains(addrs, mark.Gateway) && s.inPool(mark.Gateway) {
			return mark.Gateway, nil
		}
		for _, a := range addrs {
			if _, err := hostnet.ParseGatewayCIDR(a.String()); err == nil && s.inPool(a) {
				return a, nil
			}
		}
	}
	used, err := netcfg.HostPrefixes(s.own)
	if err != nil {
		return netip.Prefix{}, err
	}
	var taken []netip.Prefix
	for _, u := range used {
		taken = append(taken, u.Prefix)
	}
	subnet, err := hostnet.ChooseSubnet(s.pool, max(24, s.pool.Bits()), taken)
	if err != nil {
		return netip.Prefix{}, rpc.Errorf(rpc.CodeConflict, "%v (the range is the helper's pool in %s)", err, hostnet.DefaultHelperConfig)
	}
	return hostnet.GatewayCIDR(subnet), nil
}

// checkSubnet returns the planned gateway after checking that the caller's
// cidr, if any, is that one (callers never choose the range) and that it
// overlaps nothing of the host's outside banger's own devices.
func (s *server) checkSubnet(cidr string) (netip.Prefix, error) {
	if cidr != "" {
		if _, err := hostnet.ParseGatewayCIDR(cidr); err != nil {
			return netip.Prefix{}, invalid("%v", err)
		}
	}
	gw, err := s.plan()
	if err != nil {
		return netip.Prefix{}, err
	}
	if cidr != "" && cidr != gw.String() {
		return netip.Prefix{}, invalid("cidr %s is not banger's network %s: the range comes from the helper's configuration (pool %s), not from callers (hint: call %s, or leave cidr out)",
			cidr, gw, s.pool, hostnet.MethodInfo)
	}
	used, err := netcfg.HostPrefixes(s.own)
	if err != nil {
		return netip.Prefix{}, err
	}
	for _, u := range used {
		if hostnet.Overlaps(gw, u.Prefix) {
			return netip.Prefix{}, rpc.Errorf(rpc.CodeConflict, "banger's network %s overlaps %s of this host (hint: set another pool in %s)", gw, u, hostnet.DefaultHelperConfig)
		}
	}
	return gw, nil
}

func (s *server) info(ctx context.Context, c Caller, _ struct{}) (hostnet.InfoResult, error) {
	gw, err := s.plan()
	if err != nil {
		return hostnet.InfoResult{}, err
	}
	maxTaps := s.maxTaps
	if maxTaps < 0 {
		maxTaps = 0
	}
	return hostnet.InfoResult{Bridge: s.bridge, TapPrefix: s.prefix, Pool: s.pool.String(), Subnet: gw.Masked().String(),
		Gateway: gw.String(), MaxTapsPerUser: maxTaps}, nil
}

// mark returns the bridge's ownership record; a bridge without one
// belongs to root.
func (s *server) mark() (netcfg.BridgeMark, error) {
	m, _, err := netcfg.ReadBridgeMark(s.bridge)
	return m, err
}

// othersTaps lists the uids other than uid that own banger taps.
func (s *server) othersTaps(uid uint32) ([]uint32, error) {
	taps, err := netcfg.ListTaps(s.prefix)
	if err != nil {
		return nil, err
	}
	var out []uint32
	for _, t := range taps {
		if t.Owner != uid && !slices.Contains(out, t.Owner) {
			out = append(out, t.Owner)
		}
	}
	return out, nil
}

// mayRemove checks that a non-root caller owns what it removes (owner) and
// that no other user's VM depends on it.
func (s *server) mayRemove(c Caller, what string, owner *uint32) error {
	if c.IsRoot() {
		return nil
	}
	if owner == nil || *owner != c.UID {
		who := "root"
		if owner != nil {
			who = fmt.Sprintf("uid %d", *owner)
		}
		return rpc.Errorf(rpc.CodePermissionDenied, "%s belongs to %s, not to uid %d; only its owner or root may remove it", what, who, c.UID)
	}
	others, err := s.othersTaps(c.UID)
	if err != nil {
		return err
	}
	if len(others) > 0 {
		return rpc.Errorf(rpc.CodeFailedPrecondition, "%s is in use by taps of other users (uids %v); it stays until they are gone", what, others)
	}
	return nil
}

func (s *server) ping(ctx context.Context, c Caller, _ struct{}) (hostnet.PingResult, error) {
	return hostnet.PingResult{Helper: "banger-helper", Bridge: s.bridge, TapPrefix: s.prefix, CallerUID: c.UID}, nil
}

func (s *server) ensureBridge(ctx context.Context, c Caller, p hostnet.EnsureBridgeParams) (hostnet.BridgeResult, error) {
	if err := s.checkBridge(p.Bridge); err != nil {
		return hostnet.BridgeResult{}, err
	}
	gw, err := s.checkSubnet(p.CIDR)
	if err != nil {
		return hostnet.BridgeResult{}, err
	}
	_, _, had, err := netcfg.BridgeInfo(p.Bridge)
	if err != nil {
		return hostnet.BridgeResult{}, err
	}
	mark, err := s.mark()
	if err != nil {
		return hostnet.BridgeResult{}, err
	}
	created, err := netcfg.EnsureBridge(p.Bridge, gw)
	if err != nil {
		return hostnet.BridgeResult{}, err
	}
	if created {
		mark = netcfg.BridgeMark{Owner: c.UID}
	}
	// The helper removes only an old address it added itself, and records
	// the one it adds now.
	if mark.Gateway.IsValid() && mark.Gateway != gw {
		if err := netcfg.RemoveBridgeAddr(p.Bridge, mark.Gateway); err != nil {
			return hostnet.BridgeResult{}, err
		}
		mark.Gateway = netip.Prefix{}
	}
	if !slices.Contains(had, gw) {
		mark.Gateway = gw
	}
	if err := netcfg.WriteBridgeMark(p.Bridge, mark); err != nil {
		return hostnet.BridgeResult{}, err
	}
	s.log.DebugContext(ctx, "bridge ensured", "bridge", p.Bridge, "cidr", gw.String(), "created", created)
	return hostnet.BridgeResult{Bridge: p.Bridge, CIDR: gw.String(), Created: created}, nil
}

func (s *server) deleteBridge(ctx context.Context, c Caller, p hostnet.BridgeParams) (hostnet.DeletedResult, error) {
	if err := s.checkBridge(p.Bridge); err != nil {
		return hostnet.DeletedResult{}, err
	}
	exists, _, _, err := netcfg.BridgeInfo(p.Bridge)
	if err != nil {
		return hostnet.DeletedResult{}, err
	}
	if !exists {
		// Removed out of band: the forwarder on its gateway goes too.
		s.stopDNS()
		return hostnet.DeletedResult{}, nil
	}
	mark, err := s.mark()
	if err != nil {
		return hostnet.DeletedResult{}, err
	}
	if err := s.mayRemove(c, "bridge "+p.Bridge, &mark.Owner); err != nil {
		return hostnet.DeletedResult{}, err
	}
	s.stopDNS()
	deleted, err := netcfg.DeleteBridge(p.Bridge)
	return hostnet.DeletedResult{Deleted: deleted}, err
}

// MinMTU and MaxMTU bound a tap's MTU.
const (
	MinMTU = 576
	MaxMTU = 65535
)

func (s *server) createTap(ctx context.Context, c Caller, p hostnet.CreateTapParams) (hostnet.TapInfo, error) {
	if err := s.checkTap(p.Tap); err != nil {
		return hostnet.TapInfo{}, err
	}
	if err := s.checkBridge(p.Bridge); err != nil {
		return hostnet.TapInfo{}, err
	}
	owner := c.UID
	if p.OwnerUID != nil {
		if *p.OwnerUID != c.UID && !c.IsRoot() {
			return hostnet.TapInfo{}, rpc.Errorf(rpc.CodePermissionDenied, "uid %d may not create a tap owned by uid %d (only root may)", c.UID, *p.OwnerUID)
		}
		owner = *p.OwnerUID
	}
	if owner == ^uint32(0) {
		return hostnet.TapInfo{}, invalid("owner_uid %d is not a valid uid", owner)
	}
	if p.MTU != 0 && (p.MTU < MinMTU || p.MTU > MaxMTU) {
		return hostnet.TapInfo{}, invalid("mtu %d is outside %d-%d", p.MTU, MinMTU, MaxMTU)
	}
	if err := s.checkTapCap(p.Tap, owner); err != nil {
		return hostnet.TapInfo{}, err
	}
	mac, ip, err := s.checkGuest(p)
	if err != nil {
		return hostnet.TapInfo{}, err
	}
	t, created, err := netcfg.CreateTap(p.Tap, p.Bridge, owner, p.MTU, mac, ip)
	if err != nil {
		return hostnet.TapInfo{}, err
	}
	if err := s.syncGuests(ctx); err != nil {
		return hostnet.TapInfo{}, err
	}
	s.log.DebugContext(ctx, "tap ensured", "tap", t.Name, "owner_uid", t.Owner, "created", created, "mac", p.MAC, "ip", p.IP)
	ti := tapInfo(t)
	ti.Created = created
	return ti, nil
}

func tapInfo(t netcfg.Tap) hostnet.TapInfo {
	ti := hostnet.TapInfo{Name: t.Name, OwnerUID: t.Owner, Bridge: t.Bridge, MTU: t.MTU, Up: t.Up, VnetHdr: t.VnetHdr}
	if t.Guest.IP.IsValid() {
		ti.MAC, ti.IP = t.Guest.MAC.String(), t.Guest.IP.String()
	}
	return ti
}

// checkGuest validates a tap's guest addresses: both or neither; a
// unicast, non-zero MAC; an IPv4 address inside the bridge's subnet (of
// the configured pool) that
// is neither its network, broadcast nor gateway address; and neither
// address recorded on another tap (so no one can claim a running guest's
// address for a tap of their own).
func (s *server) checkGuest(p hostnet.CreateTapParams) (net.HardwareAddr, netip.Addr, error) {
	if p.MAC == "" && p.IP == "" {
		return nil, netip.Addr{}, nil
	}
	if p.MAC == "" || p.IP == "" {
		return nil, netip.Addr{}, invalid("mac and ip go together (a tap without them passes no traffic)")
	}
	mac, err := net.ParseMAC(p.MAC)
	if err != nil || len(mac) != 6 {
		return nil, netip.Addr{}, invalid("mac %q is not an Ethernet address like 02:00:ac:1e:00:02", p.MAC)
	}
	if mac[0]&1 != 0 || bytes.Equal(mac, make([]byte, 6)) {
		return nil, netip.Addr{}, invalid("mac %s must be a unicast, non-zero address", mac)
	}
	ip, err := netip.ParseAddr(p.IP)
	if err != nil || !ip.Is4() {
		return nil, netip.Addr{}, invalid("ip %q is not an IPv4 address", p.IP)
	}
	_, _, addrs, err := netcfg.BridgeInfo(s.bridge)
	if err != nil {
		return nil, netip.Addr{}, err
	}
	inside := false
	for _, gw := range addrs {
		if !s.inPool(gw) {
			continue // an address banger's configuration did not give the bridge
		}
		sub := gw.Masked()
		last := broadcast(sub)
		if sub.Contains(ip) && ip != sub.Addr() && ip != last && ip != gw.Addr() {
			inside = true
		}
	}
	if !inside {
		return nil, netip.Addr{}, invalid("ip %s is not a guest address of bridge %s (%v)", ip, s.bridge, addrs)
	}
	taps, err := netcfg.ListTaps(s.prefix)
	if err != nil {
		return nil, netip.Addr{}, err
	}
	for _, t := range taps {
		if t.Name == p.Tap || !t.Guest.IP.IsValid() {
			continue
		}
		if t.Guest.IP == ip || bytes.Equal(t.Guest.MAC, mac) {
			return nil, netip.Addr{}, rpc.Errorf(rpc.CodeConflict, "ip %s or mac %s is already taken by tap %s", ip, mac, t.Name)
		}
	}
	return mac, ip, nil
}

func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// syncGuests rewrites the per-guest rules from the taps' records.
func (s *server) syncGuests(ctx context.Context) error {
	guests, err := netcfg.ListGuests(s.prefix)
	if err != nil {
		return err
	}
	l2, err := netcfg.SyncGuests(s.table, s.bridge, s.prefix, guests)
	if err != nil {
		return err
	}
	if !l2 {
		s.warnL2(ctx)
	}
	return nil
}

func (s *server) warnL2(ctx context.Context) {
	s.l2Warn.Do(func() {
		s.log.WarnContext(ctx, "nftables bridge family unavailable; VM-to-VM isolation relies on bridge port isolation alone and guests are not kept from spoofing addresses")
	})
}

// checkTapCap refuses a new tap for owner when it already owns maxTaps.
func (s *server) checkTapCap(name string, owner uint32) error {
	if s.maxTaps <= 0 || owner == 0 {
		return nil
	}
	if t, err := netcfg.LookupTap(name); err != nil || t != nil {
		return err // an existing tap converges (or is refused) without counting
	}
	taps, err := netcfg.ListTaps(s.prefix)
	if err != nil {
		return err
	}
	n := 0
	for _, t := range taps {
		if t.Owner == owner {
			n++
		}
	}
	if n >= s.maxTaps {
		return rpc.Errorf(rpc.CodeFailedPrecondition, "uid %d already owns %d taps, the helper's max_taps_per_user (hint: remove VMs, or raise it in %s)", owner, n, hostnet.DefaultHelperConfig)
	}
	return nil
}

func (s *server) deleteTap(ctx context.Context, c Caller, p hostnet.DeleteTapParams) (hostnet.DeletedResult, error) {
	if err := s.checkTap(p.Tap); err != nil {
		return hostnet.DeletedResult{}, err
	}
	t, err := netcfg.LookupTap(p.Tap)
	if err != nil {
		return hostnet.DeletedResult{}, err
	}
	if t == nil {
		return hostnet.DeletedResult{}, nil
	}
	if !c.IsRoot() && t.Owner != c.UID {
		return hostnet.DeletedResult{}, rpc.Errorf(rpc.CodePermissionDenied, "tap %s belongs to uid %d, not to uid %d", p.Tap, t.Owner, c.UID)
	}
	deleted, err := netcfg.DeleteTap(p.Tap)
	if err != nil {
		return hostnet.DeletedResult{}, err
	}
	return hostnet.DeletedResult{Deleted: deleted}, s.syncGuests(ctx)
}

func (s *server) ensureNAT(ctx context.Context, c Caller, p hostnet.EnsureNATParams) (hostnet.NATResult, error) {
	if err := s.checkBridge(p.Bridge); err != nil {
		return hostnet.NATResult{}, err
	}
	if p.OutIface != "" {
		if err := hostnet.ValidHostIfaceName(p.OutIface); err != nil {
			return hostnet.NATResult{}, invalid("out_iface: %v", err)
		}
		if s.own(p.OutIface) || p.OutIface == "lo" {
			return hostnet.NATResult{}, invalid("out_iface %q cannot be the uplink", p.OutIface)
		}
	}
	gw, err := s.checkSubnet(p.CIDR)
	if err != nil {
		return hostnet.NATResult{}, err
	}
	exists, _, addrs, err := netcfg.BridgeInfo(p.Bridge)
	if err != nil {
		return hostnet.NATResult{}, err
	}
	if !exists {
		return hostnet.NATResult{}, rpc.Errorf(rpc.CodeFailedPrecondition, "bridge %s does not exist (call net.ensure_bridge first)", p.Bridge)
	}
	found := false
	for _, a := range addrs {
		found = found || a == gw
	}
	if !found {
		return hostnet.NATResult{}, rpc.Errorf(rpc.CodeFailedPrecondition, "bridge %s does not carry %s (call net.ensure_bridge with it first)", p.Bridge, gw)
	}
	out := p.OutIface
	if out == "" {
		if out, err = netcfg.DefaultRouteIface(); err != nil {
			return hostnet.NATResult{}, err
		}
		if s.own(out) {
			return hostnet.NATResult{}, rpc.Errorf(rpc.CodeFailedPrecondition, "the default route goes through banger's own %s; pass out_iface", out)
		}
	} else if ok, err := netcfg.IfaceExists(out); err != nil {
		return hostnet.NATResult{}, err
	} else if !ok {
		return hostnet.NATResult{}, rpc.Errorf(rpc.CodeNotFound, "interface %q does not exist", out)
	}
	natExisted, err := netcfg.NATExists(s.table)
	if err != nil {
		return hostnet.NATResult{}, err
	}
	guests, err := netcfg.ListGuests(s.prefix)
	if err != nil {
		return hostnet.NATResult{}, err
	}
	l2, err := netcfg.EnsureNAT(netcfg.NAT{Table: s.table, Bridge: p.Bridge, TapPrefix: s.prefix, OutIface: out, Gateway: gw, AllowDNS: p.AllowDNS, AllowCIDRs: s.allow}, guests)
	if err != nil {
		return hostnet.NATResult{}, err
	}
	if mark, err := s.mark(); err != nil {
		return hostnet.NATResult{}, err
	} else if !natExisted || mark.DNS != p.AllowDNS {
		if !natExisted {
			owner := c.UID
			mark.NATOwner = &owner
		}
		mark.DNS = p.AllowDNS
		if err := netcfg.WriteBridgeMark(p.Bridge, mark); err != nil {
			return hostnet.NATResult{}, err
		}
	}
	if !l2 {
		s.warnL2(ctx)
	}
	res := hostnet.NATResult{Table: "inet " + s.table, Subnet: gw.Masked().String(), OutIface: out, L2Isolation: l2}
	if !p.AllowDNS {
		s.stopDNS() // the ruleset no longer lets guests reach it
	} else {
		// DNS never fails the call: the VM still starts, with a warning.
		a, err := s.startDNS(ctx, gw)
		switch {
		case err == nil:
			res.DNS = a.String()
		case errors.Is(err, syscall.EADDRINUSE):
			// A DNS server of the host's listens on all addresses, so on
			// the gateway too, and the input chain lets guests reach it.
			res.DNS = netip.AddrPortFrom(gw.Addr(), 53).String()
			s.log.InfoContext(ctx, "port 53 on the gateway is served by another DNS server of this host (bound to all addresses); guests use it", "error", err.Error())
		default:
			res.DNSError = err.Error()
			s.log.WarnContext(ctx, "guests get no DNS forwarder", "error", err.Error(),
				"hint", "banger-helper needs CAP_NET_BIND_SERVICE (re-run `sudo banger system install`), or set network.dns in bangerd's config")
		}
	}
	return res, nil
}

// startDNS runs the DNS forwarder on the gateway address (restarting it
// when the gateway changed). Called under s.mu.
func (s *server) startDNS(ctx context.Context, gw netip.Prefix) (netip.AddrPort, error) {
	if s.dns != nil {
		if s.dns.Addr().Addr() == gw.Addr() {
			return s.dns.Addr(), nil
		}
		s.stopDNS()
	}
	f, err := dnsfwd.Start(dnsfwd.Config{Listen: gw.Addr(), Port: s.dnsPort, Clients: gw.Masked(), ResolvConf: s.resolvConf, Logger: s.log})
	if err != nil {
		return netip.AddrPort{}, err
	}
	s.dns = f
	s.log.InfoContext(ctx, "dns forwarder listening", "addr", f.Addr().String())
	return f.Addr(), nil
}

// stopDNS stops the DNS forwarder if it runs. Called under s.mu.
func (s *server) stopDNS() {
	if s.dns != nil {
		s.dns.Close()
		s.dns = nil
	}
}

// Close stops what the server runs besides answering calls (the DNS
// forwarder).
func (s *server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopDNS()
}

func (s *server) removeNAT(ctx context.Context, c Caller, p hostnet.BridgeParams) (hostnet.DeletedResult, error) {
	if err := s.checkBridge(p.Bridge); err != nil {
		return hostnet.DeletedResult{}, err
	}
	exists, err := netcfg.NATExists(s.table)
	if err != nil {
		return hostnet.DeletedResult{}, err
	}
	if !exists {
		// Removed out of band (a firewall reload): the forwarder the
		// table let guests reach goes too.
		s.stopDNS()
		return hostnet.DeletedResult{}, nil
	}
	mark, err := s.mark()
	if err != nil {
		return hostnet.DeletedResult{}, err
	}
	if err := s.mayRemove(c, "banger's NAT (table inet "+s.table+")", mark.NATOwner); err != nil {
		return hostnet.DeletedResult{}, err
	}
	s.stopDNS()
	removed, err := netcfg.RemoveNAT(s.table, p.Bridge)
	if err == nil && mark.NATOwner != nil {
		mark.NATOwner = nil
		if ok, _, _, _ := netcfg.BridgeInfo(p.Bridge); ok {
			err = netcfg.WriteBridgeMark(p.Bridge, mark)
		}
	}
	return hostnet.DeletedResult{Deleted: removed}, err
}

func (s *server) list(ctx context.Context, c Caller, _ struct{}) (hostnet.ListResult, error) {
	var res hostnet.ListResult
	exists, up, addrs, err := netcfg.BridgeInfo(s.bridge)
	if err != nil {
		return res, err
	}
	res.Bridge = hostnet.BridgeState{Name: s.bridge, Exists: exists, Up: up}
	for _, a := range addrs {
		res.Bridge.CIDRs = append(res.Bridge.CIDRs, a.String())
	}
	if res.NAT, err = netcfg.NATExists(s.table); err != nil {
		return res, err
	}
	taps, err := netcfg.ListTaps(s.prefix)
	if err != nil {
		return res, err
	}
	if drop, acc, legacy, err := netcfg.ForwardState(s.table, s.bridge); err == nil {
		res.Forward = &hostnet.ForwardInfo{NftDrop: drop, BangerAccepts: acc, LegacyFilter: legacy}
		res.Forward.Firewalld, _ = netcfg.FirewalldActive()
	}
	res.Taps = []hostnet.TapInfo{}
	for _, t := range taps {
		if !c.IsRoot() && t.Owner != c.UID {
			continue
		}
		res.Taps = append(res.Taps, tapInfo(t))
	}
	return res, nil
}
