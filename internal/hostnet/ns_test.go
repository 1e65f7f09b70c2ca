package hostnet_test

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/hostnet/netcfg"
	"github.com/bangerdev/banger/internal/hostnet/nettest"
)

// TestPlanSubnetInNamespace: the plan avoids the namespace's routes, and
// follows banger's bridge once it exists.
func TestPlanSubnetInNamespace(t *testing.T) {
	env := nettest.New(t)
	pool := netip.MustParsePrefix(hostnet.DefaultPool)
	err := env.Do(func() error {
		_, dst, _ := net.ParseCIDR("172.30.0.0/23")
		if err := netlink.RouteAdd(&netlink.Route{Dst: dst, Gw: net.IP(env.GatewayAddr.AsSlice())}); err != nil {
			return err
		}
		got, err := hostnet.PlanSubnet(pool, "", "")
		if err != nil {
			return err
		}
		if got.String() != "172.30.2.0/24" {
			t.Errorf("PlanSubnet with 172.30.0.0/23 routed = %v", got)
		}
		if iface, err := netcfg.DefaultRouteIface(); err != nil || iface != nettest.Uplink {
			t.Errorf("DefaultRouteIface = %q %v", iface, err)
		}
		// banger's bridge with its subnet: the plan keeps it, and
		// HostPrefixes does not count it as taken.
		if _, err := netcfg.EnsureBridge(hostnet.DefaultBridge, netip.MustParsePrefix("172.30.7.1/24")); err != nil {
			return err
		}
		if got, err = hostnet.PlanSubnet(pool, "", ""); err != nil || got.String() != "172.30.7.0/24" {
			t.Errorf("PlanSubnet with the bridge present = %v %v", got, err)
		}
		taken, err := hostnet.HostPrefixes("", "")
		if err != nil {
			return err
		}
		for _, p := range taken {
			if p.Overlaps(netip.MustParsePrefix("172.30.7.0/24")) {
				t.Errorf("banger's own subnet counted as taken: %v", taken)
			}
		}
		if !containsPrefix(taken, "172.30.0.0/23") || !containsPrefix(taken, "198.51.100.0/24") {
			t.Errorf("HostPrefixes = %v", taken)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func containsPrefix(ps []netip.Prefix, s string) bool {
	for _, p := range ps {
		if p.String() == s {
			return true
		}
	}
	return false
}
