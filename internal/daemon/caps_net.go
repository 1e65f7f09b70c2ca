package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"

	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
)

// netCap gives VMs a network through banger-helper: banger's bridge with NAT,
// a tap per VM owned by the user, an address from banger's subnet (kept in
// the VM record), and the guest's static configuration via the boot config.
type netCap struct {
	addrs  addrStore
	log    *slog.Logger
	client *hostnet.Client
	mode   string // auto, helper, none
	dns    []string

	allocMu sync.Mutex // serialises address allocation

	mu sync.Mutex
	// disabled records, per VM id, that this boot runs without a network
	// (mode auto and no helper).
	disabled map[string]bool
}

// addrStore is what the network capability needs of the store: the
// addresses in use, and recording a VM's new address.
type addrStore interface {
	UsedIPs(ctx context.Context) (map[string]bool, error)
	UpdateVM(ctx context.Context, v *store.VM) error
}

func newNetCap(st addrStore, log *slog.Logger, cfg NetworkConfig) (*netCap, error) {
	c := &netCap{addrs: st, log: log, client: hostnet.NewClient(), mode: cfg.Mode, dns: cfg.DNS, disabled: map[string]bool{}}
	if c.mode == "" {
		c.mode = "auto"
	}
	switch c.mode {
	case "auto", "helper", "none":
	default:
		return nil, fmt.Errorf("network.mode must be auto, helper or none, not %q", c.mode)
	}
	if cfg.Pool != "" {
		c.log.Warn("network.pool is ignored: the guest range is set by the root helper's configuration",
			"pool", cfg.Pool, "hint", "sudo banger system install --pool "+cfg.Pool)
	}
	return c, nil
}

func (*netCap) Name() string { return "network" }

func (c *netCap) off(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mode == "none" || c.disabled[id]
}

func (c *netCap) StartPrereq(ctx context.Context, env *startEnv) error {
	c.mu.Lock()
	delete(c.disabled, env.VM.ID)
	c.mu.Unlock()
	if c.mode == "none" {
		return nil
	}
	if _, err := c.client.Ping(ctx); err != nil {
		if c.mode == "helper" || !errors.Is(err, hostnet.ErrHelperUnavailable) {
			return err
		}
		c.log.InfoContext(ctx, "banger-helper not reachable: starting the VM without a network", "vm", env.VM.Name, "hint", err.Error())
		c.mu.Lock()
		c.disabled[env.VM.ID] = true
		c.mu.Unlock()
	}
	return nil
}

// ensureSubnet asks the helper for banger's subnet: the range comes from
// the helper's root-owned configuration, never from bangerd.
func (c *netCap) ensureSubnet(ctx context.Context) (netip.Prefix, error) {
	info, err := c.client.Info(ctx)
	if err != nil {
		return netip.Prefix{}, err
	}
	s, err := netip.ParsePrefix(info.Subnet)
	if err != nil || !s.Addr().Is4() || !hostnet.IsPrivate(s) {
		return netip.Prefix{}, fmt.Errorf("banger-helper reported subnet %q, not a private IPv4 range", info.Subnet)
	}
	return s.Masked(), nil
}

func (c *netCap) PrepareHost(ctx context.Context, env *startEnv) (func(context.Context) error, error) {
	if c.off(env.VM.ID) {
		return nil, nil
	}
	subnet, err := c.ensureSubnet(ctx)
	if err != nil {
		return nil, err
	}
	gw := hostnet.GatewayCIDR(subnet)
	if _, err := c.client.EnsureBridge(ctx, hostnet.DefaultBridge, gw); err != nil {
		return nil, err
	}
	if _, err := c.client.EnsureNAT(ctx, hostnet.EnsureNATParams{Bridge: hostnet.DefaultBridge, CIDR: gw.String(), AllowDNS: len(c.dns) == 0}); err != nil {
		return nil, err
	}
	vm := env.VM
	if ip, err := netip.ParseAddr(vm.IP); err != nil || !subnet.Contains(ip) {
		if err := c.allocate(ctx, vm, subnet); err != nil {
			return nil, err
		}
	}
	vm.Tap = hostnet.TapName(hostnet.DefaultTapPrefix, vm.ID)
	vm.MAC = hostnet.MAC(vm.ID).String()
	owner := uint32(os.Getuid())
	// The helper lets the tap send only from this MAC and address.
	if _, err := c.client.CreateTapWith(ctx, hostnet.CreateTapParams{
		Tap: vm.Tap, Bridge: hostnet.DefaultBridge, OwnerUID: &owner, MAC: vm.MAC, IP: vm.IP,
	}); err != nil {
		return nil, err
	}
	tap := vm.Tap
	return func(ctx context.Context) error {
		_, err := c.client.DeleteTap(ctx, tap)
		return err
	}, nil
}

// allocate gives vm the lowest free address of subnet and records it at
// once, under allocMu: VMs of one bangerd start in parallel (each under its
// own VM lock), and two must never pick the same address.
func (c *netCap) allocate(ctx context.Context, vm *store.VM, subnet netip.Prefix) error {
	c.allocMu.Lock()
	defer c.allocMu.Unlock()
	used, err := c.addrs.UsedIPs(ctx)
	if err != nil {
		return err
	}
	var inUse []netip.Addr
	for s := range used {
		if a, err := netip.ParseAddr(s); err == nil {
			inUse = append(inUse, a)
		}
	}
	a, err := hostnet.AllocateAddr(subnet, inUse)
	if err != nil {
		return err
	}
	vm.IP = a.String()
	if err := c.addrs.UpdateVM(context.WithoutCancel(ctx), vm); err != nil {
		vm.IP = ""
		return fmt.Errorf("record address %s: %w", a, err)
	}
	return nil
}

func (c *netCap) ContributeGuestConfig(ctx context.Context, env *startEnv) error {
	if c.off(env.VM.ID) || env.VM.IP == "" {
		return nil
	}
	subnet, err := c.ensureSubnet(ctx)
	if err != nil {
		return err
	}
	gw := hostnet.GatewayCIDR(subnet)
	dns := c.dns
	if len(dns) == 0 {
		// banger-helper's forwarder (net.ensure_nat allow_dns) relays to
		// the host's own name servers.
		dns = []string{gw.Addr().String()}
	}
	env.Boot.Network = &bootcfg.Network{
		MAC: env.VM.MAC, Address: fmt.Sprintf("%s/%d", env.VM.IP, subnet.Bits()), Gateway: gw.Addr().String(), DNS: dns,
	}
	return nil
}

func (c *netCap) ContributeMachineConfig(ctx context.Context, env *startEnv) error {
	if c.off(env.VM.ID) || env.VM.Tap == "" {
		return nil
	}
	env.Mach.Net = &vmm.NetInterface{Tap: env.VM.Tap, MAC: env.VM.MAC}
	return nil
}

func (c *netCap) CleanupState(ctx context.Context, vm *store.VM) error {
	if vm.Tap == "" || c.mode == "none" {
		return nil
	}
	_, err := c.client.DeleteTap(ctx, vm.Tap)
	if errors.Is(err, hostnet.ErrHelperUnavailable) {
		return nil // nothing could have been made without the helper
	}
	return err
}

// reclaim deletes banger taps of this user that no running VM owns (left by
// a crash of bangerd or of the host).
func (c *netCap) reclaim(ctx context.Context, running map[string]bool) {
	if c.mode == "none" {
		return
	}
	res, err := c.client.List(ctx)
	if err != nil {
		return
	}
	for _, t := range res.Taps {
		if t.OwnerUID != uint32(os.Getuid()) || running[t.Name] {
			continue
		}
		if _, err := c.client.DeleteTap(ctx, t.Name); err == nil {
			c.log.InfoContext(ctx, "reclaimed leaked tap", "tap", t.Name)
		}
	}
}
