package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/system"

	"github.com/bangerdev/banger/api"
)

type createOp struct {
	mu     sync.Mutex
	status api.CreateStatus
	done   chan struct{}
	cancel context.CancelCauseFunc // nil in tests
}

// errCancelled is the cause given to an operation cancelled with op.cancel.
var errCancelled = errors.New("cancelled by the user (op.cancel)")

// cancelOp cancels the create unless it has finished; it reports whether
// it was still running.
func (c *createOp) cancelOp() bool {
	select {
	case <-c.done:
		return false
	default:
	}
	if c.cancel != nil {
		c.cancel(errCancelled)
	}
	return true
}

// createOp returns the create operation with this op id, or nil.
func (s *vmService) createOp(opID string) *createOp {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.creates[opID]
}

func (c *createOp) snapshot() api.CreateStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.status
	st.Stages = append([]api.Stage(nil), c.status.Stages...)
	return st
}

func (c *createOp) progress(name string, end bool, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if !end {
		c.status.Stages = append(c.status.Stages, api.Stage{Name: name, StartedAt: now})
		return
	}
	for i := len(c.status.Stages) - 1; i >= 0; i-- {
		st := &c.status.Stages[i]
		if st.Name == name && st.FinishedAt == nil {
			st.FinishedAt = &now
			st.DurationMS = logging.Ms(now.Sub(st.StartedAt))
			if err != nil {
				st.Error = err.Error()
			}
			return
		}
	}
}

// maxVCPUsPerVM bounds the cpus of one VM.
const maxVCPUsPerVM = 64

func (s *vmService) register(m *rpc.Mux) {
	vmOf := func(p api.VMRef) string { return p.VM }
	stopOf := func(p api.StopParams) string { return p.VM }
	rpc.Handle(m, api.MethodVMCreateBegin, logOp(s.log, api.MethodVMCreateBegin, "vm", func(p api.CreateParams) string { return p.Name }, s.createBegin))
	rpc.Handle(m, api.MethodVMCreateStatus, func(ctx context.Context, p api.CreateStatusParams) (api.CreateStatus, error) {
		s.mu.Lock()
		op := s.creates[p.OpID]
		s.mu.Unlock()
		if op == nil {
			return api.CreateStatus{}, rpc.Errorf(rpc.CodeNotFound, "no create operation %q (finished creates are kept for an hour)", p.OpID)
		}
		if p.Wait {
			select {
			case <-op.done:
			case <-ctx.Done():
			case <-time.After(2 * time.Second):
			}
		}
		return op.snapshot(), nil
	})
	rpc.Handle(m, api.MethodVMStart, logOp(s.log, api.MethodVMStart, "vm", vmOf, func(ctx context.Context, p api.VMRef) (*store.VM, error) {
		return s.withVM(ctx, p.VM, func(vm *store.VM) error { return s.startVM(ctx, vm) })
	}))
	rpc.Handle(m, api.MethodVMStop, logOp(s.log, api.MethodVMStop, "vm", stopOf, func(ctx context.Context, p api.StopParams) (*store.VM, error) {
		return s.withVM(ctx, p.VM, func(vm *store.VM) error { return s.stop(ctx, vm, stopTimeout(p.TimeoutSeconds)) })
	}))
	rpc.Handle(m, api.MethodVMRestart, logOp(s.log, api.MethodVMRestart, "vm", stopOf, func(ctx context.Context, p api.StopParams) (*store.VM, error) {
		return s.withVM(ctx, p.VM, func(vm *store.VM) error {
			if err := s.stop(ctx, vm, stopTimeout(p.TimeoutSeconds)); err != nil {
				return err
			}
			return s.start(ctx, vm, nil)
		})
	}))
	rpc.Handle(m, api.MethodVMKill, logOp(s.log, api.MethodVMKill, "vm", vmOf, func(ctx context.Context, p api.VMRef) (*store.VM, error) {
		return s.withVM(ctx, p.VM, func(vm *store.VM) error { return s.kill(ctx, vm) })
	}))
	rpc.Handle(m, api.MethodVMDelete, logOp(s.log, api.MethodVMDelete, "vm", func(p api.DeleteParams) string { return p.VM }, func(ctx context.Context, p api.DeleteParams) (*api.DeleteResult, error) {
		vm, err := s.withVM(ctx, p.VM, func(vm *store.VM) error { return s.delete(ctx, vm, p.Force) })
		if err != nil {
			return nil, err
		}
		return &api.DeleteResult{Deleted: vm.Name, ID: vm.ID}, nil
	}))
	rpc.Handle(m, api.MethodVMSet, logOp(s.log, api.MethodVMSet, "vm", func(p api.SetParams) string { return p.VM }, s.set))
	rpc.Handle(m, api.MethodVMConnect, s.connect)
	rpc.Handle(m, api.MethodVMBulk, s.bulk)
	rpc.Handle(m, api.MethodVMLogs, func(ctx context.Context, p api.LogsParams) (api.LogsResult, error) {
		vm, err := s.store.FindVM(ctx, p.VM)
		if err != nil {
			return api.LogsResult{}, storeErr(err)
		}
		return readLog(filepath.Join(s.vmDir(vm.ID), "console.log"), p.Offset, p.Max, s.runtime(vm.ID) != nil)
	})
	s.registerGuestAPI(m)
	s.registerSnapshotAPI(m)
}

// withVM runs fn on the VM named by ref while holding its lock, with the
// record re-read under the lock, and returns the record as fn left it.
func (s *vmService) withVM(ctx context.Context, ref string, fn func(*store.VM) error) (*store.VM, error) {
	vm, unlock, err := s.lockVM(ctx, ref)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := fn(vm); err != nil {
		return nil, err
	}
	return vm, nil
}

func stopTimeout(sec float64) time.Duration {
	if sec <= 0 {
		return 30 * time.Second
	}
	return time.Duration(sec * float64(time.Second))
}

func readLog(p string, off, max int64, running bool) (api.LogsResult, error) {
	if max <= 0 || max > 1<<20 {
		max = 1 << 20
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return api.LogsResult{NextOffset: 0, Running: running}, nil
	}
	if err != nil {
		return api.LogsResult{}, err
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && off > st.Size() {
		off = 0 // log was truncated (new boot)
	}
	buf := make([]byte, max)
	n, err := f.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return api.LogsResult{}, err
	}
	return api.LogsResult{Data: string(buf[:n]), NextOffset: off + int64(n), Running: running}, nil
}

func (s *vmService) createBeginNow(ctx context.Context, p api.CreateParams) (api.CreateStatus, error) {
	if p.Name == "" {
		p.Name = randomName()
	}
	if err := validName("vm", p.Name); err != nil {
		return api.CreateStatus{}, codeErr(rpc.CodeInvalidArgument, err)
	}
	if p.Snapshot != "" {
		return s.createBeginFromSnapshot(ctx, p)
	}
	if p.VCPUs == 0 {
		p.VCPUs = 1
	}
	if p.MemoryMiB == 0 {
		p.MemoryMiB = 512
	}
	if p.DiskMiB == 0 {
		p.DiskMiB = 4096
	}
	switch {
	case p.VCPUs < 1 || p.VCPUs > maxVCPUsPerVM:
		return api.CreateStatus{}, rpc.Errorf(rpc.CodeInvalidArgument, "cpus must be between 1 and %d", maxVCPUsPerVM)
	case p.MemoryMiB < 64 || p.MemoryMiB > 1<<20:
		return api.CreateStatus{}, rpc.Errorf(rpc.CodeInvalidArgument, "memory must be between 64 MiB and 1 TiB")
	case p.DiskMiB < 64 || p.DiskMiB > 16<<20:
		return api.CreateStatus{}, rpc.Errorf(rpc.CodeInvalidArgument, "disk must be between 64 MiB and 16 TiB")
	}
	img, err := s.artifacts.resolveImage(ctx, p.Image)
	if err != nil {
		return api.CreateStatus{}, err
	}
	k, err := s.artifacts.resolveKernel(ctx, p.Kernel)
	if err != nil {
		return api.CreateStatus{}, err
	}
	drvName := p.Driver
	if drvName == "" {
		drvName = s.defDrv
	}
	if _, err := s.driver(drvName); err != nil {
		return api.CreateStatus{}, err
	}
	var base string
	if p.Base {
		if vm, err := s.claimPool(ctx, poolKey(img, k, p.VCPUs, p.MemoryMiB, p.DiskMiB, drvName), p.Name, p.Workspace); err == nil && vm != nil {
			return s.claimedStatus(ctx, vm), nil
		}
		name, sn, err := s.baseSnapshot(ctx, img, k, p.VCPUs, p.MemoryMiB, p.DiskMiB, drvName)
		if err != nil {
			return api.CreateStatus{}, err
		}
		if sn != nil {
			return s.createBeginFromSnapshot(ctx, api.CreateParams{Name: p.Name, Snapshot: sn.ID, Workspace: p.Workspace})
		}
		base = name
	}
	vm := &store.VM{ID: newID(), Name: p.Name, ImageID: img.ID, KernelID: k.ID, VCPUs: p.VCPUs, MemoryMiB: p.MemoryMiB,
		DiskMiB: p.DiskMiB, State: store.StateCreating, Driver: drvName, Workspace: p.Workspace}
	if err := s.store.CreateVM(ctx, vm); err != nil {
		return api.CreateStatus{}, storeErr(err)
	}
	fault("after-record")
	opID := rpc.OpID(ctx)
	op := &createOp{status: api.CreateStatus{OpID: opID, VMID: vm.ID, Name: vm.Name, Stages: []api.Stage{}}, done: make(chan struct{})}
	s.mu.Lock()
	s.creates[opID] = op
	s.mu.Unlock()
	// The create goes on after this call returns; it keeps the op id, and
	// op.cancel cancels it (the start then undoes what it made).
	s.goCreate(ctx, vm, op, nil, base)
	return op.snapshot(), nil
}

// claimedStatus is the finished create of a VM taken from the ready pool.
func (s *vmService) claimedStatus(ctx context.Context, vm *store.VM) api.CreateStatus {
	opID := rpc.OpID(ctx)
	op := &createOp{status: api.CreateStatus{OpID: opID, VMID: vm.ID, Name: vm.Name, Stages: []api.Stage{}}, done: make(chan struct{})}
	op.progress("claim from pool", false, nil)
	op.progress("claim from pool", true, nil)
	op.status.Done, op.status.VM = true, vm
	close(op.done)
	s.mu.Lock()
	s.creates[opID] = op
	s.mu.Unlock()
	time.AfterFunc(time.Hour, func() {
		s.mu.Lock()
		delete(s.creates, opID)
		s.mu.Unlock()
	})
	s.log.InfoContext(ctx, "create served from the ready pool", "vm", vm.Name)
	return op.snapshot()
}

// createBeginFromSnapshot is vm.create.begin with a snapshot: the VM takes
// the snapshot's image, kernel, sizes and driver, and its first start
// restores the snapshot.
func (s *vmService) createBeginFromSnapshot(ctx context.Context, p api.CreateParams) (api.CreateStatus, error) {
	if p.Image != "" || p.Kernel != "" || p.VCPUs != 0 || p.MemoryMiB != 0 || p.DiskMiB != 0 || p.Driver != "" {
		return api.CreateStatus{}, rpc.Errorf(rpc.CodeInvalidArgument, "a VM made from a snapshot has the snapshot's image, kernel, cpus, memory, disk and driver; do not set them")
	}
	sn, err := s.store.FindSnapshot(ctx, p.Snapshot)
	if err != nil {
		return api.CreateStatus{}, storeErr(err)
	}
	rs, err := s.restoreSourceFor(sn)
	if err != nil {
		return api.CreateStatus{}, err
	}
	if _, err := s.driver(sn.Driver); err != nil {
		return api.CreateStatus{}, err
	}
	vm := &store.VM{ID: newID(), Name: p.Name, ImageID: sn.ImageID, KernelID: sn.KernelID, VCPUs: sn.VCPUs, MemoryMiB: sn.MemoryMiB,
		DiskMiB: sn.DiskMiB, State: store.StateCreating, Driver: sn.Driver, Workspace: p.Workspace}
	if err := s.store.CreateVM(ctx, vm); err != nil {
		return api.CreateStatus{}, storeErr(err)
	}
	opID := rpc.OpID(ctx)
	op := &createOp{status: api.CreateStatus{OpID: opID, VMID: vm.ID, Name: vm.Name, Stages: []api.Stage{}}, done: make(chan struct{})}
	s.mu.Lock()
	s.creates[opID] = op
	s.mu.Unlock()
	s.goCreate(ctx, vm, op, rs, "")
	return op.snapshot(), nil
}

// goCreate runs the create in the background under a context that
// op.cancel cancels; it keeps the op id of ctx.
func (s *vmService) goCreate(ctx context.Context, vm *store.VM, op *createOp, restore *restoreSource, base string) {
	bctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	op.cancel = cancel
	go func() {
		defer cancel(nil)
		s.runCreate(bctx, vm, op, restore, base)
	}()
}

func (s *vmService) runCreate(ctx context.Context, vm *store.VM, op *createOp, restore *restoreSource, base string) {
	unlock := s.locks.Lock(vm.ID)
	err := s.startFrom(ctx, vm, op.progress, restore)
	if err == nil && base != "" {
		s.saveBase(ctx, vm, base, op.progress)
	}
	if err != nil {
		// The console log outlives the VM, and the error names where it is.
		if kept := s.keepFailedConsole(ctx, vm); kept != "" {
			consolePath := filepath.Join(s.vmDir(vm.ID), "console.log")
			msg := err.Error()
			if strings.Contains(msg, consolePath) {
				msg = strings.ReplaceAll(msg, consolePath, kept)
			} else {
				msg += "; console log kept at " + kept
			}
			err = fmt.Errorf("%s", msg)
		}
		// the start's cleanup released the runtime; the record and files go
		// too, unless its VMM could not be ended (the record names it)
		if vm.State == store.StateError && errors.Is(s.releaseRecorded(ctx, vm, endReason(vm)), errVMMAlive) {
			s.log.ErrorContext(ctx, "VM of a failed create kept: its VMM could not be ended", "vm", vm.Name, "error", vm.LastError)
		} else if rerr := s.removeVM(ctx, vm); rerr != nil {
			s.log.ErrorContext(ctx, "remove VM after a failed create", "vm", vm.Name, "error", rerr.Error())
		}
	}
	unlock()
	op.mu.Lock()
	op.status.Done = true
	if err != nil {
		op.status.Error = err.Error()
		s.log.WarnContext(ctx, "create failed", "vm", vm.Name, "error", err.Error())
		s.events.publish(ctx, api.Event{Type: api.EventVMCreateFailed, VM: vm.Name, VMID: vm.ID, Reason: err.Error()})
	} else {
		op.status.VM = vm
		s.log.InfoContext(ctx, "create completed", "vm", vm.Name)
		s.events.publish(ctx, api.Event{Type: api.EventVMCreated, VM: vm.Name, VMID: vm.ID})
		s.events.publish(ctx, api.Event{Type: api.EventVMStarted, VM: vm.Name, VMID: vm.ID})
	}
	op.mu.Unlock()
	close(op.done)
	time.AfterFunc(time.Hour, func() {
		s.mu.Lock()
		delete(s.creates, op.status.OpID)
		s.mu.Unlock()
	})
}

// removeVM deletes a stopped VM's files and record. Its runtime, if it had
// one, has already been released.
func (s *vmService) removeVM(ctx context.Context, vm *store.VM) error {
	ctx = context.WithoutCancel(ctx)
	if err := os.RemoveAll(s.vmDir(vm.ID)); err != nil {
		return fmt.Errorf("remove VM directory: %w", err)
	}
	if err := s.store.DeleteVM(ctx, vm.ID); err != nil {
		return err
	}
	s.refreshKnownHosts(ctx)
	return nil
}

// startVM is vm.start: a running VM is left alone, a stopped one is started,
// one in the error state (a failed release, or a stop or kill whose VMM
// outlived SIGKILL) is released again first — that VMM ended first — so
// nothing of its last boot is left for this one to collide with. The caller
// holds the VM lock.
func (s *vmService) startVM(ctx context.Context, vm *store.VM) error {
	switch vm.State {
	case store.StateRunning:
		return nil
	case store.StateError:
		if rt := s.runtime(vm.ID); rt != nil {
			// A stop or kill could not end its VMM and its runtime is kept
			// (endVMM): that kill is retried, and the start goes on only
			// once the VMM is gone.
			if err := s.endVMM(ctx, vm, rt, endReason(vm), "started"); err != nil {
				var se *vmmStuckError
				if errors.As(err, &se) {
					// A second VMM on the same writable disk would corrupt it.
					return rpc.Errorf(rpc.CodeFailedPrecondition, "vm %q was not started: %s; a second VMM on its writable disk would corrupt it; %s", vm.Name, se.what(), se.hint())
				}
				return err
			}
			if vm.State != store.StateError {
				return s.start(ctx, vm, nil)
			}
			// its release failed: released again from the record below
		}
		if err := s.releaseRecorded(ctx, vm, endReason(vm)); err != nil {
			if errors.Is(err, errVMMAlive) {
				// A second VMM on the same writable disk would corrupt it.
				return rpc.Errorf(rpc.CodeFailedPrecondition, "vm %q was not started: %v; a second VMM on its writable disk would corrupt it; hint: a process that outlives SIGKILL is stuck in the kernel (ps -o pid,stat,wchan,cmd -p PID); once it is gone, banger vm start %s", vm.Name, err, vm.Name)
			}
			return fmt.Errorf("vm %q was not started: releasing what its last boot left failed again: %w", vm.Name, err)
		}
		return s.start(ctx, vm, nil)
	case store.StateStopped:
		return s.start(ctx, vm, nil)
	}
	return rpc.Errorf(rpc.CodeConflict, "vm %q is %s", vm.Name, vm.State)
}

// delete removes a VM. A running one needs force: it is killed and its
// runtime released through its cleanup first; so does one whose stop or kill
// could not end its VMM (the runtime is kept: endVMM), and while that VMM
// outlives the kill the record stays. A record that is not stopped but has
// no runtime (a failed or interrupted start) is released from the record, so
// no --force is needed for it.
func (s *vmService) delete(ctx context.Context, vm *store.VM, force bool) error {
	if rt := s.runtime(vm.ID); rt != nil {
		if !force {
			if vm.State == store.StateError {
				// a stop or kill could not end its VMM (endVMM)
				return rpc.Errorf(rpc.CodeConflict, "vm %q was not deleted: its VMM may still run (%s); banger vm delete --force %s retries the kill", vm.Name, vm.LastError, vm.Name)
			}
			return rpc.Errorf(rpc.CodeConflict, "vm %q is running; stop it first or use --force", vm.Name)
		}
		if err := s.kill(ctx, vm); err != nil {
			var se *vmmStuckError
			if errors.As(err, &se) {
				// Removing the record and disk would leave that VMM behind.
				return rpc.Errorf(rpc.CodeFailedPrecondition, "vm %q was not deleted: %s; deleting the record would leave that VMM behind; %s", vm.Name, se.what(), se.hint())
			}
			return err
		}
	} else if vm.State != store.StateStopped {
		if err := s.releaseRecorded(ctx, vm, endReason(vm)); errors.Is(err, errVMMAlive) {
			// Removing the record and disk would leave that VMM behind.
			return rpc.Errorf(rpc.CodeFailedPrecondition, "vm %q was not deleted: %v; deleting the record would leave that VMM behind; hint: once it is gone, banger vm delete %s", vm.Name, err, vm.Name)
		}
	}
	fault("delete") // VMM gone, files and record still there
	if err := s.removeVM(ctx, vm); err != nil {
		return err
	}
	s.events.publish(ctx, api.Event{Type: api.EventVMDeleted, VM: vm.Name, VMID: vm.ID})
	return nil
}

func (s *vmService) set(ctx context.Context, p api.SetParams) (api.SetResult, error) {
	vm, unlock, err := s.lockVM(ctx, p.VM)
	if err != nil {
		return api.SetResult{}, err
	}
	defer unlock()
	old := *vm
	if p.VCPUs != 0 {
		if p.VCPUs < 1 || p.VCPUs > maxVCPUsPerVM {
			return api.SetResult{}, rpc.Errorf(rpc.CodeInvalidArgument, "cpus must be between 1 and %d", maxVCPUsPerVM)
		}
		vm.VCPUs = p.VCPUs
	}
	if p.MemoryMiB != 0 {
		if p.MemoryMiB < 64 {
			return api.SetResult{}, rpc.Errorf(rpc.CodeInvalidArgument, "memory must be at least 64 MiB")
		}
		vm.MemoryMiB = p.MemoryMiB
	}
	if p.DiskMiB != 0 {
		vm.DiskMiB = p.DiskMiB
	}
	running := s.runtime(vm.ID) != nil
	for _, c := range s.caps {
		if cc, ok := c.(configChanger); ok {
			if err := cc.ApplyConfigChange(ctx, &old, vm, running); err != nil {
				return api.SetResult{}, codeErr(rpc.CodeInvalidArgument, err)
			}
		}
	}
	if err := s.save(ctx, vm); err != nil {
		return api.SetResult{}, err
	}
	res := api.SetResult{VM: vm}
	if running && (old.VCPUs != vm.VCPUs || old.MemoryMiB != vm.MemoryMiB || old.DiskMiB != vm.DiskMiB) {
		res.Note = "the VM is running: the changes apply at its next start (banger vm restart " + vm.Name + ")"
	} else if old.DiskMiB != vm.DiskMiB {
		res.Note = "the disk grows at the next start"
	}
	return res, nil
}

// connect splices the caller's connection to the guest agent's SSH server.
func (s *vmService) connect(ctx context.Context, p api.VMRef) (*rpc.Upgrade, error) {
	vm, rt, err := s.runningVM(ctx, p.VM)
	if err != nil {
		return nil, err
	}
	pub, err := hostKeyPub(s.vmDir(vm.ID))
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	gc, err := s.dialGuest(dctx, rt)
	cancel()
	if err != nil {
		return nil, rpc.Errorf(rpc.CodeUnavailable, "cannot reach the agent of %s: %v", vm.Name, err)
	}
	return &rpc.Upgrade{
		Result: api.ConnectResult{VM: vm.Name, HostKey: pub, User: "root", KeyPath: s.layout.UserKey()},
		Then: func(ctx context.Context, c net.Conn) {
			system.Splice(c, gc)
		},
	}, nil
}

// bulk opens an authenticated bulk stream to the guest agent (the hello,
// with the VM's bulk key, done here: the client never sees the key) and
// splices the caller's connection to it.
func (s *vmService) bulk(ctx context.Context, p api.BulkParams) (*rpc.Upgrade, error) {
	vm, rt, err := s.runningVM(ctx, p.VM)
	if err != nil {
		return nil, err
	}
	key, err := bulkKey(s.vmDir(vm.ID))
	if err != nil {
		return nil, rpc.Errorf(rpc.CodeFailedPrecondition, "%v", err)
	}
	unlock := func() {}
	if p.Workspace {
		t0 := time.Now()
		if unlock, err = rt.lockWorkspace(ctx); err != nil {
			return nil, rpc.Errorf(rpc.CodeUnavailable, "wait for the workspace operation running on %s: %v", vm.Name, err)
		}
		if d := time.Since(t0); d > 10*time.Millisecond {
			s.log.InfoContext(ctx, "waited for the VM's workspace lock", "vm", vm.Name, "ms", d.Milliseconds())
		}
		if p.Dest != "" && p.Dest != vm.WorkspaceDest {
			if err := s.store.SetWorkspaceDest(ctx, vm.ID, p.Dest); err != nil {
				unlock()
				return nil, err
			}
		}
	}
	ok := false
	defer func() {
		if !ok {
			unlock()
		}
	}()
	gc, sc, forget, err := s.openAgentBulk(ctx, rt, vm.Name, key)
	if err != nil {
		return nil, err
	}
	ok = true
	return &rpc.Upgrade{
		Result: api.BulkResult{VM: vm.Name},
		Then: func(ctx context.Context, c net.Conn) {
			defer unlock()
			if p.Spool {
				gc, sc, forget = s.spoolBulk(ctx, rt, vm, key, c, gc, sc, forget)
				if sc == nil {
					return
				}
			}
			defer forget()
			system.SpliceBuffer(c, sc, bulkSpliceBuffer)
		},
		Abandon: func() { forget(); gc.Close(); unlock() },
	}, nil
}

// openAgentBulk opens a bulk stream to the agent of rt and does its hello:
// gc is the guest connection (closing it ends the stream), sc the stream to
// relay to, and forget ends its tracking (closeGuest ends the tracked ones).
func (s *vmService) openAgentBulk(ctx context.Context, rt *runtime, vmName string, key []byte) (gc, sc net.Conn, forget func(), err error) {
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	gc, err = s.dialGuest(dctx, rt)
	if err != nil {
		return nil, nil, nil, rpc.Errorf(rpc.CodeUnavailable, "cannot reach the agent of %s: %v", vmName, err)
	}
	sc, err = s.bulkHello(dctx, rt, vmName, gc, key)
	if err != nil {
		gc.Close()
		return nil, nil, nil, err
	}
	return gc, sc, rt.trackBulk(gc), nil
}

// spoolBulk serves a vm.bulk stream whose client said (BulkParams.Spool)
// it is one file's put or get, a push, or a session with a lot of stdin:
// it reads what the client sends first and, when the operation has a spool
// form and the VM's spool is free, carries the stream through the spool
// (bulk.RelaySpool), closes both ends and returns a nil sc. Otherwise (the spool busy or missing, an agent without
// spool streams, an inline put) it sends the client's frames on to the
// agent and returns the stream to splice the client to: the one given, or
// a new one when the agent's refusal spent it.
func (s *vmService) spoolBulk(ctx context.Context, rt *runtime, vm *store.VM, key []byte, c, gc, sc net.Conn, forget func()) (net.Conn, net.Conn, func()) {
	end := func() (net.Conn, net.Conn, func()) {
		forget()
		gc.Close()
		c.Close()
		return nil, nil, nil
	}
	_ = c.SetReadDeadline(time.Now().Add(bulkAnswerWait))
	frames, o, ok, err := bulk.StartSpool(c)
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		return end()
	}
	forward := func() (net.Conn, net.Conn, func()) {
		if _, err := sc.Write(frames); err != nil {
			return end()
		}
		return gc, sc, forget
	}
	session := o.Op == bulk.OpSession
	if !ok || rt.noSpool.Load() || (session && rt.noSessionSpool.Load()) || !rt.spoolMu.TryLock() {
		return forward()
	}
	defer rt.spoolMu.Unlock()
	f, err := os.OpenFile(filepath.Join(s.vmDir(vm.ID), spoolName), os.O_RDWR|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		rt.noSpool.Store(true) // started without one (by an older bangerd, or a clone of such a VM)
		return forward()
	}
	defer f.Close()
	t0 := time.Now()
	err = bulk.RelaySpool(c, sc, f, frames, o)
	// The slots' bytes are spent: give the host file's pages back.
	_ = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, bulk.SpoolHeader, bulk.SpoolSize-bulk.SpoolHeader)
	if errors.Is(err, bulk.ErrSpoolRefused) {
		switch {
		case strings.Contains(err.Error(), "busy"):
		case session:
			rt.noSessionSpool.Store(true) // an agent from before sessions' spool form: its files' still works
		default:
			rt.noSpool.Store(true)
		}
		s.log.DebugContext(ctx, "bulk stream not through the spool", "vm", vm.Name, "op", o.Op, "why", err.Error())
		forget()
		gc.Close()
		gc, sc, forget, err = s.openAgentBulk(ctx, rt, vm.Name, key)
		if err != nil {
			c.Close()
			return nil, nil, nil
		}
		return forward()
	}
	if err != nil {
		s.log.InfoContext(ctx, "bulk stream through the spool failed", "vm", vm.Name, "op", o.Op, "error", err.Error())
	} else {
		s.log.DebugContext(ctx, "bulk stream through the spool", "vm", vm.Name, "op", o.Op, "ms", time.Since(t0).Milliseconds())
	}
	return end()
}

// bulkSpliceBuffer is the buffer of a bulk stream's splice, per direction:
// a 256 KiB data frame (plus its header) goes to the guest in one yamux
// write instead of eight of 32 KiB.
const bulkSpliceBuffer = 512 << 10

// bulkHello sends the bulk hello with key on gc, a fresh stream to the
// agent of rt, and returns the connection to splice the caller to.
//
// The first hello of a runtime waits for the agent's answer, so that an
// agent without bulk streams (or one that refuses the key) is reported here
// and the caller can fall back to SSH. Once this agent has accepted, later
// hellos do not wait: the caller's frames follow the hello at once (a round
// trip through the guest saved, the larger part of a short exec under TCG)
// and the answer is checked as the agent's first bytes come back (see
// bulk.AfterHello). Should the agent refuse after all (re-keyed), that
// stream ends without a byte of the agent's, and the next hello waits again.
func (s *vmService) bulkHello(ctx context.Context, rt *runtime, vmName string, gc net.Conn, key []byte) (net.Conn, error) {
	dl, _ := ctx.Deadline()
	_ = gc.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { _ = gc.SetDeadline(time.Unix(1, 0)) })
	pipelined := rt.bulkHelloOK.Load()
	var err error
	if pipelined {
		err = bulk.WriteHello(gc, key)
	} else {
		err = bulk.Hello(gc, key)
	}
	stop()
	_ = gc.SetDeadline(time.Time{})
	switch {
	case errors.Is(err, bulk.ErrUnsupported):
		return nil, rpc.Errorf(rpc.CodeFailedPrecondition, "the agent of %s does not serve bulk streams (restart the VM to update it)", vmName)
	case err != nil:
		return nil, rpc.Errorf(rpc.CodeUnavailable, "bulk stream to %s: %v", vmName, err)
	case !pipelined:
		rt.bulkHelloOK.Store(true)
		return gc, nil
	}
	return bulk.AfterHello(gc, bulkAnswerWait, func(err error) {
		rt.bulkHelloOK.Store(false)
		s.log.WarnContext(ctx, "bulk stream ended: the agent did not accept the hello", "vm", vmName, "error", err.Error())
	}), nil
}

// bulkAnswerWait bounds the wait for the agent's answer to a hello.
const bulkAnswerWait = 15 * time.Second

var adjectives = []string{"brave", "calm", "eager", "fuzzy", "jolly", "lucky", "proud", "quick", "shiny", "witty"}
var nouns = []string{"otter", "falcon", "badger", "heron", "lynx", "marmot", "panda", "quokka", "tapir", "wombat"}

func randomName() string {
	id := newID()
	return adjectives[int(id[0])%len(adjectives)] + "-" + nouns[int(id[1])%len(nouns)] + "-" + id[2:6]
}

// resolveDefault picks an artifact by ref, else by the configured default,
// else the newest one; none at all is a failed precondition with a hint.
func resolveDefault[T any](ctx context.Context, ref, configured string, find func(context.Context, string) (T, error),
	list func(context.Context) ([]T, error), none string) (T, error) {
	var zero T
	if ref == "" {
		ref = configured
	}
	if ref != "" {
		v, err := find(ctx, ref)
		return v, storeErr(err)
	}
	all, err := list(ctx)
	if err != nil {
		return zero, err
	}
	if len(all) == 0 {
		return zero, rpc.Errorf(rpc.CodeFailedPrecondition, "%s", none)
	}
	return all[0], nil
}

func (d *Daemon) resolveImage(ctx context.Context, ref string) (*store.Image, error) {
	return resolveDefault(ctx, ref, d.fileCfg.DefaultImage, d.store.FindImage, d.store.ListImages,
		"no images yet: import one with `banger image import ROOTFS.ext4` (or pull one)")
}

func (d *Daemon) resolveKernel(ctx context.Context, ref string) (*store.Kernel, error) {
	return resolveDefault(ctx, ref, d.fileCfg.DefaultKernel, d.store.FindKernel, d.store.ListKernels,
		"no kernels yet: import one with `banger kernel import --package linux-image-cloud-amd64`")
}

// maxFailedLogs is how many console logs of failed creates are kept.
const maxFailedLogs = 20

// keepFailedConsole moves the console log of a failed create to
// logs/failed/ (keeping the newest maxFailedLogs) and returns its new path,
// or "" when there was none.
func (s *vmService) keepFailedConsole(ctx context.Context, vm *store.VM) string {
	src := filepath.Join(s.vmDir(vm.ID), "console.log")
	if fi, err := os.Stat(src); err != nil || fi.Size() == 0 {
		return ""
	}
	dir := s.layout.FailedLogsDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		s.log.WarnContext(ctx, "keep the console log of a failed create", "vm", vm.Name, "error", err.Error())
		return ""
	}
	dst := filepath.Join(dir, time.Now().UTC().Format("20060102T150405.000Z")+"-"+vm.Name+"-"+vm.ID+".log")
	if err := os.Rename(src, dst); err != nil {
		s.log.WarnContext(ctx, "keep the console log of a failed create", "vm", vm.Name, "error", err.Error())
		return ""
	}
	pruneDir(dir, ".log", maxFailedLogs)
	return dst
}

// pruneDir removes the oldest files (by name: they start with a timestamp)
// ending in suffix beyond keep.
func pruneDir(dir, suffix string, keep int) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	var names []string
	for _, e := range ents {
		if e.Type().IsRegular() && strings.HasSuffix(e.Name(), suffix) {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	for len(names) > keep {
		os.Remove(filepath.Join(dir, names[0]))
		names = names[1:]
	}
}
