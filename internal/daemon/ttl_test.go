package daemon

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

func TestTTLOf(t *testing.T) {
	for _, tc := range []struct {
		sec  float64
		want time.Duration
		ok   bool
	}{
		{0, 0, true}, {5, 5 * time.Second, true}, {1, time.Second, true}, {86400 * 30, maxTTL, true},
		{0.5, 0, false}, {-1, 0, false}, {86400*30 + 1, 0, false},
	} {
		got, err := ttlOf(tc.sec)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("ttlOf(%v) = %v, %v", tc.sec, got, err)
		}
	}
}

// TestReaperDeletesExpiredVMs: expired VMs go, running ones killed and
// released; VMs without a TTL, not yet expired, or still being created stay.
func TestReaperDeletesExpiredVMs(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	running := ts.newVM(t, "running", store.StateStopped)
	if err := ts.start(ctx, running, nil); err != nil {
		t.Fatal(err)
	}
	stopped := ts.newVM(t, "stopped", store.StateStopped)
	keep := ts.newVM(t, "keep", store.StateStopped)
	later := ts.newVM(t, "later", store.StateStopped)
	creating := ts.newVM(t, "creating", store.StateCreating)
	for _, v := range []*store.VM{running, stopped, creating} {
		if err := ts.setExpiry(ctx, v, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if err := ts.setExpiry(ctx, later, time.Hour); err != nil {
		t.Fatal(err)
	}
	got, err := ts.st.GetVM(ctx, running.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.ExpiresAt == nil || time.Until(*got.ExpiresAt) > time.Second {
		t.Fatalf("ExpiresAt %v", got.ExpiresAt)
	}
	ts.reapExpired(ctx, time.Now().Add(2*time.Second))
	for _, v := range []*store.VM{running, stopped} {
		if _, err := ts.st.GetVM(ctx, v.ID); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("%s not reaped: %v", v.Name, err)
		}
	}
	ts.assertClean(t, running)
	for _, v := range []*store.VM{keep, later, creating} {
		if _, err := ts.st.GetVM(ctx, v.ID); err != nil {
			t.Errorf("%s reaped: %v", v.Name, err)
		}
	}
	// the reaper loop stops when asked
	stop := ts.startReaper(ctx)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

func TestCreateWithTTLRecordsExpiry(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	if _, err := ts.createBegin(ctx, api.CreateParams{Name: "bad", TTLSeconds: 0.2}); rpc.CodeOf(err) != rpc.CodeInvalidArgument {
		t.Fatalf("ttl 0.2s: %v", err)
	}
	st, err := ts.createBegin(rpc.WithOpID(ctx, "op-ttl1"), api.CreateParams{Name: "brief", TTLSeconds: 60})
	if err != nil {
		t.Fatal(err)
	}
	ts.waitCreate(t, st.OpID, 30*time.Second)
	vm, err := ts.st.GetVM(ctx, st.VMID)
	if err != nil {
		t.Fatal(err)
	}
	if at := vm.ExpiresAt; at == nil || time.Until(*at) < 50*time.Second || time.Until(*at) > 61*time.Second {
		t.Fatalf("expiry %v", at)
	}
	ts.reapExpired(ctx, time.Now())
	if _, err := ts.st.GetVM(ctx, vm.ID); err != nil {
		t.Fatalf("reaped before its time: %v", err)
	}
	ts.reapExpired(ctx, vm.ExpiresAt.Add(time.Second))
	if _, err := ts.st.GetVM(ctx, vm.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("not reaped after its time: %v", err)
	}
	ts.assertClean(t, vm)
}
