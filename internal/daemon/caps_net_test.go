package daemon

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/store"
)

// Parallel starts must never hand two VMs the same address.
func TestConcurrentAddressAllocationIsUnique(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "banger.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.CreateImage(ctx, &store.Image{ID: "i", Name: "i", RootfsPath: "/x"})
	st.CreateKernel(ctx, &store.Kernel{ID: "k", Name: "k", VmlinuxPath: "/v"})
	c, err := newNetCap(st, logging.Discard(), NetworkConfig{})
	if err != nil {
		t.Fatal(err)
	}
	subnet := netip.MustParsePrefix("172.30.0.0/24")
	const n = 20
	vms := make([]*store.VM, n)
	for i := range vms {
		vms[i] = &store.VM{ID: fmt.Sprintf("vm%02d", i), Name: fmt.Sprintf("vm%02d", i), ImageID: "i", KernelID: "k",
			VCPUs: 1, MemoryMiB: 64, DiskMiB: 64, State: store.StateStarting}
		if err := st.CreateVM(ctx, vms[i]); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range vms {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = c.allocate(ctx, vms[i], subnet) }()
	}
	wg.Wait()
	seen := map[string]bool{}
	for i, v := range vms {
		if errs[i] != nil {
			t.Fatalf("allocate %s: %v", v.Name, errs[i])
		}
		if seen[v.IP] || !subnet.Contains(netip.MustParseAddr(v.IP)) {
			t.Fatalf("address %s given twice or outside the subnet", v.IP)
		}
		seen[v.IP] = true
		got, _ := st.GetVM(ctx, v.ID)
		if got.IP != v.IP {
			t.Fatalf("%s: stored %q, allocated %q", v.Name, got.IP, v.IP)
		}
	}
}
