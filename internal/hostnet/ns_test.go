package hostnet_test

import (
	"testing"

	"github.com/bangerdev/banger/internal/hostnet/netcfg"
	"github.com/bangerdev/banger/internal/hostnet/nettest"
)

// TestDefaultRouteIfaceInNamespace: the NAT uplink is the default route's.
func TestDefaultRouteIfaceInNamespace(t *testing.T) {
	env := nettest.New(t)
	err := env.Do(func() error {
		if iface, err := netcfg.DefaultRouteIface(); err != nil || iface != nettest.Uplink {
			t.Errorf("DefaultRouteIface = %q %v", iface, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
