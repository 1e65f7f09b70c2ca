package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// A VM created with a TTL carries its expiry in its record; a reaper
// deletes expired VMs (for agents that forget theirs).

const (
	maxTTL         = 30 * 24 * time.Hour
	minTTL         = time.Second
	reaperInterval = time.Second
)

// ttlOf validates a create's ttl_seconds (0: none).
func ttlOf(sec float64) (time.Duration, error) {
	if sec == 0 {
		return 0, nil
	}
	d := time.Duration(sec * float64(time.Second))
	if sec < 0 || d < minTTL || d > maxTTL {
		return 0, rpc.Errorf(rpc.CodeInvalidArgument, "ttl must be between %s and %s", minTTL, maxTTL)
	}
	return d, nil
}

// createBegin is vm.create.begin: the create (from an image or a snapshot),
// with the VM's expiry and published ports recorded.
func (s *vmService) createBegin(ctx context.Context, p api.CreateParams) (api.CreateStatus, error) {
	ttl, err := ttlOf(p.TTLSeconds)
	if err != nil {
		return api.CreateStatus{}, err
	}
	ports, err := parsePorts(p.Ports)
	if err != nil {
		return api.CreateStatus{}, err
	}
	st, err := s.createBeginNow(ctx, p)
	if err != nil {
		return st, err
	}
	if err := s.setPorts(ctx, st.VMID, ports); err != nil {
		return st, fmt.Errorf("%s is being created, but its published ports could not be recorded: %w", st.Name, err)
	}
	if ttl == 0 {
		return st, nil
	}
	if err := s.setExpiry(ctx, &store.VM{ID: st.VMID}, ttl); err != nil {
		return st, fmt.Errorf("%s is being created, but its ttl could not be recorded (delete it yourself): %w", st.Name, err)
	}
	return st, nil
}

// setExpiry records that vm expires ttl from now.
func (s *vmService) setExpiry(ctx context.Context, vm *store.VM, ttl time.Duration) error {
	if ttl <= 0 {
		return nil
	}
	at := time.Now().Add(ttl).UTC()
	if err := s.store.SetVMExpiry(ctx, vm.ID, at); err != nil {
		return fmt.Errorf("record the VM's expiry: %w", err)
	}
	vm.ExpiresAt = &at
	return nil
}

// startReaper deletes expired VMs and keeps published ports listening (or
// not) every second until the returned stop is called (bangerd registers it
// as a closer).
func (s *vmService) startReaper(ctx context.Context) func() error {
	stop := runEvery(ctx, "ttl reaper", reaperInterval, nil, func(ctx context.Context) {
		// One listing serves both: a VM the reaper deletes has no runtime
		// left, so syncForwards skips it.
		if vms, ok := s.listForReaper(ctx); ok {
			s.reapExpiredIn(ctx, vms, time.Now())
			s.syncForwards(ctx, vms)
		}
	})
	return func() error {
		err := stop()
		s.closeForwards()
		return err
	}
}

// reapExpired stops and deletes every VM whose expiry is past; one still
// being created or started is left for the next round.
func (s *vmService) reapExpired(ctx context.Context, now time.Time) {
	if vms, ok := s.listForReaper(ctx); ok {
		s.reapExpiredIn(ctx, vms, now)
	}
}

func (s *vmService) listForReaper(ctx context.Context) ([]*store.VM, bool) {
	vms, err := s.store.ListVMs(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.WarnContext(ctx, "ttl: list VMs", "error", err.Error())
		}
		return nil, false
	}
	return vms, true
}

// reapExpiredIn is reapExpired over a listing the caller made.
func (s *vmService) reapExpiredIn(ctx context.Context, vms []*store.VM, now time.Time) {
	for _, vm := range vms {
		if vm.ExpiresAt == nil || now.Before(*vm.ExpiresAt) || vm.State == store.StateCreating || vm.State == store.StateStarting {
			continue
		}
		at := *vm.ExpiresAt
		if ctx.Err() != nil {
			return
		}
		s.reap(logging.WithOpID(ctx, logging.NewOpID()), vm.ID, at)
	}
}

func (s *vmService) reap(ctx context.Context, id string, at time.Time) {
	vm, unlock, err := s.lockVM(ctx, id)
	if err != nil {
		if !errors.Is(err, store.ErrNotFound) && rpc.CodeOf(err) != rpc.CodeNotFound {
			s.log.WarnContext(ctx, "ttl: find VM", "vm_id", id, "error", err.Error())
		}
		return
	}
	defer unlock()
	if vm.State == store.StateCreating || vm.State == store.StateStarting {
		return
	}
	s.log.InfoContext(ctx, "ttl expired: deleting VM", "vm", vm.Name, "expired_at", at.Format(time.RFC3339))
	if err := s.delete(ctx, vm, true); err != nil {
		s.log.WarnContext(ctx, "ttl: delete VM", "vm", vm.Name, "error", err.Error())
	}
}
