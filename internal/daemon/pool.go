package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// The ready pool keeps VMs of configured specs booted (restored from the
// spec's base snapshot when it has one), so that `banger run` takes one
// instead of creating it. A pool VM is an ordinary VM whose record carries
// its spec's key (store column pool): vm ls hides it unless --all.
// Claiming clears the key and renames the VM to the run's name in one
// conditional update (so two runs cannot take the same VM), then tells the
// guest its hostname; its address, MAC, host key and machine-id were its
// own from the start.

const (
	poolsFile         = "pools.json"
	defaultPoolBudget = 2048 // MiB of guest memory all pool VMs may hold
	poolRefillEvery   = 10 * time.Second
	// poolRefillDelay: a claim triggers the refill this much later, so that
	// restoring the replacement (a QEMU loading its state, then a guest
	// running cold code under emulation) does not take the CPU from the run
	// that claimed a VM while its command starts.
	poolRefillDelay = time.Second
	// poolWarmTimeout bounds the warm-up exec of a new pool VM.
	poolWarmTimeout = 30 * time.Second
)

type readyPool struct {
	mu        sync.Mutex
	specs     []api.PoolSpec
	path      string
	budgetMiB int
	notes     map[string]string // by spec key
	making    map[string]int
	// warming holds the pool VMs made but not yet warmed up (by id): not
	// ready, so `pool ls` counts them as starting and a claim passes them
	// by instead of waiting on their lock for the warm-up.
	warming map[string]bool
	kick    chan struct{}
}

func newReadyPool(dataDir string, fromConfig []api.PoolSpec, budgetMiB int) *readyPool {
	p := &readyPool{path: filepath.Join(dataDir, poolsFile), budgetMiB: budgetMiB, notes: map[string]string{},
		making: map[string]int{}, warming: map[string]bool{}, kick: make(chan struct{}, 1)}
	if p.budgetMiB <= 0 {
		p.budgetMiB = defaultPoolBudget
	}
	if b, err := os.ReadFile(p.path); err == nil && json.Unmarshal(b, &p.specs) == nil {
		return p
	}
	for _, sp := range fromConfig {
		p.specs = append(p.specs, poolDefaults(sp))
	}
	return p
}

// poolDefaults fills run's defaults into a spec.
func poolDefaults(sp api.PoolSpec) api.PoolSpec {
	if sp.VCPUs == 0 {
		sp.VCPUs = 1
	}
	if sp.MemoryMiB == 0 {
		sp.MemoryMiB = 512
	}
	if sp.DiskMiB == 0 {
		sp.DiskMiB = 4096
	}
	return sp
}

func (p *readyPool) trigger() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// poolKey identifies a spec once image and kernel are resolved.
func poolKey(img *store.Image, k *store.Kernel, vcpus, mem, disk int, drv string) string {
	return fmt.Sprintf("%s/%s/%d/%d/%d/%s", img.ID, k.ID, vcpus, mem, disk, drv)
}

func (s *vmService) registerPoolAPI(m *rpc.Mux) {
	rpc.Handle(m, api.MethodPoolList, s.poolList)
	rpc.Handle(m, api.MethodPoolSet, s.poolSet)
}

// poolMembers lists the pool VMs of key (all keys when key is "").
func (s *vmService) poolMembers(ctx context.Context, key string) ([]*store.VM, error) {
	all, keys, err := s.allPoolMembers(ctx)
	if err != nil || key == "" {
		return all, err
	}
	var out []*store.VM
	for i, vm := range all {
		if keys[i] == key {
			out = append(out, vm)
		}
	}
	return out, nil
}

// allPoolMembers lists every pool VM with its spec key (keys[i] is vms[i]'s).
func (s *vmService) allPoolMembers(ctx context.Context) (vms []*store.VM, keys []string, err error) {
	return s.store.PoolVMs(ctx)
}

func (s *vmService) specKey(ctx context.Context, sp api.PoolSpec) (string, *store.Image, *store.Kernel, error) {
	img, err := s.artifacts.resolveImage(ctx, sp.Image)
	if err != nil {
		return "", nil, nil, err
	}
	k, err := s.artifacts.resolveKernel(ctx, sp.Kernel)
	if err != nil {
		return "", nil, nil, err
	}
	return poolKey(img, k, sp.VCPUs, sp.MemoryMiB, sp.DiskMiB, s.defDrv), img, k, nil
}

func (s *vmService) poolList(ctx context.Context, _ struct{}) ([]*api.Pool, error) {
	if s.pool == nil {
		return []*api.Pool{}, nil
	}
	s.pool.mu.Lock()
	specs := append([]api.PoolSpec(nil), s.pool.specs...)
	s.pool.mu.Unlock()
	out := []*api.Pool{}
	for _, sp := range specs {
		pl := &api.Pool{PoolSpec: sp}
		key, _, _, err := s.specKey(ctx, sp)
		if err != nil {
			pl.Note = err.Error()
			out = append(out, pl)
			continue
		}
		members, err := s.poolMembers(ctx, key)
		if err != nil {
			return nil, storeErr(err)
		}
		for _, vm := range members {
			if vm.State == store.StateRunning && s.runtime(vm.ID) != nil && !s.pool.isWarming(vm.ID) {
				pl.Ready++
				pl.VMs = append(pl.VMs, vm.Name)
			} else {
				pl.Starting++
			}
		}
		s.pool.mu.Lock()
		pl.Note = s.pool.notes[key]
		s.pool.mu.Unlock()
		out = append(out, pl)
	}
	return out, nil
}

// poolSet sets a spec's size (0 removes the pool and its unclaimed VMs).
func (s *vmService) poolSet(ctx context.Context, sp api.PoolSpec) (*api.Pool, error) {
	if s.pool == nil {
		return nil, rpc.Errorf(rpc.CodeFailedPrecondition, "the ready pool is not available")
	}
	sp = poolDefaults(sp)
	if sp.Size < 0 || sp.Size > 32 {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "pool size must be between 0 and 32")
	}
	key, _, _, err := s.specKey(ctx, sp)
	if err != nil {
		return nil, err
	}
	s.pool.mu.Lock()
	var specs []api.PoolSpec
	found := false
	for _, o := range s.pool.specs {
		if o.Image == sp.Image && o.Kernel == sp.Kernel && o.VCPUs == sp.VCPUs && o.MemoryMiB == sp.MemoryMiB && o.DiskMiB == sp.DiskMiB {
			found = true
			if sp.Size == 0 {
				continue
			}
			o.Size = sp.Size
		}
		specs = append(specs, o)
	}
	if !found && sp.Size > 0 {
		specs = append(specs, sp)
	}
	s.pool.specs = specs
	b, _ := json.MarshalIndent(specs, "", "  ")
	s.pool.mu.Unlock()
	if err := writeFileAtomic(s.pool.path, b, 0o600); err != nil {
		return nil, err
	}
	// Shrink now; grow in the background.
	members, err := s.poolMembers(ctx, key)
	if err != nil {
		return nil, storeErr(err)
	}
	for i := sp.Size; i < len(members); i++ {
		if _, err := s.withVM(ctx, members[i].ID, func(vm *store.VM) error { return s.delete(ctx, vm, true) }); err != nil {
			s.log.WarnContext(ctx, "shrink the pool", "vm", members[i].Name, "error", err.Error())
		}
	}
	s.pool.trigger()
	return &api.Pool{PoolSpec: sp}, nil
}

// poolRefill makes missing pool VMs, one at a time, within the budget.
func (s *vmService) poolRefill(ctx context.Context) {
	s.pool.mu.Lock()
	specs := append([]api.PoolSpec(nil), s.pool.specs...)
	budget := s.pool.budgetMiB
	s.pool.mu.Unlock()
	for _, sp := range specs {
		if sp.Size <= 0 || ctx.Err() != nil {
			continue
		}
		key, img, k, err := s.specKey(ctx, sp)
		if err != nil {
			s.poolNote(key, err.Error())
			continue
		}
		for {
			all, keys, err := s.allPoolMembers(ctx)
			if err != nil {
				return
			}
			used, have := 0, 0
			for i, vm := range all {
				used += vm.MemoryMiB
				if keys[i] == key {
					have++
				}
			}
			if have >= sp.Size {
				s.poolNote(key, "")
				break
			}
			if used+sp.MemoryMiB > budget {
				s.poolNote(key, fmt.Sprintf("%d of %d ready: the pool memory budget (%d MiB) is used up", have, sp.Size, budget))
				break
			}
			if err := s.makePoolVM(ctx, key, img, k, sp); err != nil {
				s.poolNote(key, "refill failed: "+err.Error())
				s.log.WarnContext(ctx, "refill the ready pool", "error", err.Error())
				break
			}
		}
	}
}

func (s *vmService) poolNote(key, note string) {
	s.pool.mu.Lock()
	s.pool.notes[key] = note
	s.pool.mu.Unlock()
}

// makePoolVM makes one pool VM, restored from the spec's base snapshot when
// there is one (else booted cold, and the base saved).
func (s *vmService) makePoolVM(ctx context.Context, key string, img *store.Image, k *store.Kernel, sp api.PoolSpec) error {
	vm := &store.VM{ID: newID(), ImageID: img.ID, KernelID: k.ID, VCPUs: sp.VCPUs, MemoryMiB: sp.MemoryMiB,
		DiskMiB: sp.DiskMiB, State: store.StateCreating, Driver: s.defDrv}
	vm.Name = "pool-" + vm.ID[:12]
	s.pool.setWarming(vm.ID, true)
	defer s.pool.setWarming(vm.ID, false)
	if err := s.store.CreatePoolVM(ctx, vm, key); err != nil {
		return storeErr(err)
	}
	unlock := s.locks.Lock(vm.ID)
	defer unlock()
	name, sn, err := s.baseSnapshot(ctx, img, k, sp.VCPUs, sp.MemoryMiB, sp.DiskMiB, s.defDrv)
	if err == nil {
		if sn != nil {
			var rs *restoreSource
			if rs, err = s.restoreSourceFor(sn); err == nil {
				err = s.startFrom(ctx, vm, nil, rs)
			}
		} else if err = s.start(ctx, vm, nil); err == nil {
			s.saveBase(ctx, vm, name, func(string, bool, error) {})
		}
	}
	if err != nil {
		if rerr := s.removeVM(context.WithoutCancel(ctx), vm); rerr != nil {
			s.log.ErrorContext(ctx, "remove a failed pool VM", "vm", vm.Name, "error", rerr.Error())
		}
		return err
	}
	s.warmPoolVM(ctx, vm)
	s.log.InfoContext(ctx, "pool VM ready", "vm", vm.Name, "restored", sn != nil)
	return nil
}

func (p *readyPool) setWarming(id string, on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if on {
		p.warming[id] = true
	} else {
		delete(p.warming, id)
	}
}

func (p *readyPool) isWarming(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.warming[id]
}

// execer is a guest agent client that runs commands.
type execer interface {
	Exec(ctx context.Context, cmd []string, stdin io.Reader, stdout, stderr io.Writer, opts guest.ExecOptions) (int, error)
}

// bulkExecer is a guest agent client that runs a command on a bulk session
// (guest.Client.ExecBulk), the path `banger exec` takes.
type bulkExecer interface {
	ExecBulk(ctx context.Context, line string) (int, error)
}

// execTrue runs `true` in the guest the way `banger exec` does: over a bulk
// session (and no SSH handshake) when the client has one, else over SSH.
func execTrue(ctx context.Context, a guestAgent) error {
	var err error
	if bx, ok := a.(bulkExecer); ok {
		_, err = bx.ExecBulk(ctx, "true")
	} else if ex, ok := a.(execer); ok {
		_, err = ex.Exec(ctx, []string{"true"}, nil, io.Discard, io.Discard, guest.ExecOptions{})
	}
	return err
}

// warmPoolVM runs `true` in a new pool VM (over a bulk session, as `banger
// exec` does) and renames it once (to the name
// it has): a restored QEMU under TCG translates each guest code path the
// first time it runs, so the claim's rename and the run's first exec (fork,
// exec, wait, the agent's session code, /etc writes) would otherwise pay
// for it. A failure only costs the claim that time.
func (s *vmService) warmPoolVM(ctx context.Context, vm *store.VM) {
	rt := s.runtime(vm.ID)
	if rt == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, poolWarmTimeout)
	defer cancel()
	began := time.Now()
	a, err := s.agent(ctx, vm.ID, rt)
	if err == nil {
		err = execTrue(ctx, a)
	}
	if err == nil {
		if ri, ok := a.(reidentifier); ok {
			err = ri.Reidentify(ctx, agentapiReidentifyHostname(vm.Name))
		}
	}
	if err != nil {
		s.log.WarnContext(ctx, "warm up a pool VM", "vm", vm.Name, "error", err.Error())
		return
	}
	s.log.DebugContext(ctx, "pool VM warmed up", "vm", vm.Name, "took", time.Since(began).Round(time.Millisecond))
}

// claimPool hands a ready pool VM of key to a run: renamed to name, told its
// hostname. It returns nil when the pool has none ready.
func (s *vmService) claimPool(ctx context.Context, key, name, workspace string) (*store.VM, error) {
	if s.pool == nil {
		return nil, nil
	}
	members, err := s.poolMembers(ctx, key)
	if err != nil {
		return nil, nil
	}
	for _, m := range members {
		if s.pool.isWarming(m.ID) {
			continue // not ready: a restore from the base beats waiting for it
		}
		vm, err := s.claimOne(ctx, m.ID, key, name, workspace)
		if err != nil {
			s.log.WarnContext(ctx, "claim a pool VM", "vm", m.Name, "error", err.Error())
			continue
		}
		if vm != nil {
			time.AfterFunc(poolRefillDelay, s.pool.trigger)
			return vm, nil
		}
	}
	return nil, nil
}

func (s *vmService) claimOne(ctx context.Context, id, key, name, workspace string) (*store.VM, error) {
	unlock := s.locks.Lock(id)
	defer unlock()
	vm, err := s.store.GetVM(ctx, id)
	if err != nil {
		return nil, nil
	}
	rt := s.runtime(id)
	if !vm.Pool || vm.State != store.StateRunning || rt == nil || rt.paused.Load() {
		return nil, nil
	}
	// The claim is one conditional update (key, state and pool membership
	// checked by the database); a taken name changes nothing.
	claimed, err := s.store.ClaimPoolVM(context.WithoutCancel(ctx), id, key, name, workspace)
	if err != nil || !claimed {
		return nil, storeErr(err)
	}
	vm.Name, vm.Workspace, vm.Pool = name, workspace, false
	a, err := s.agent(ctx, id, rt)
	if err == nil {
		ri, ok := a.(reidentifier)
		if !ok {
			err = errors.New("internal error: the guest agent client cannot reidentify")
		} else {
			err = ri.Reidentify(ctx, agentapiReidentifyHostname(name))
		}
	}
	if err != nil {
		// The VM is the run's now; a stale hostname is not worth failing it.
		s.log.WarnContext(ctx, "tell a claimed pool VM its hostname", "vm", name, "error", err.Error())
	}
	s.refreshKnownHosts(ctx)
	return vm, nil
}
