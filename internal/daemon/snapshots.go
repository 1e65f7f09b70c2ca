package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// A snapshot lives in <data>/snapshots/<id>/: state/ (what the driver's
// SaveState wrote) and rw.ext4 (a sparse copy of the VM's writable disk taken
// while the VM was paused). Its record pins the image and kernel.
const (
	snapStateDir = "state"
	snapDiskName = rwDiskName
)

func (s *vmService) snapshotDir(id string) string {
	return filepath.Join(s.layout.SnapshotsDir(), id)
}

func (s *vmService) registerSnapshotAPI(m *rpc.Mux) {
	rpc.Handle(m, api.MethodVMPause, func(ctx context.Context, p api.VMRef) (*store.VM, error) {
		return s.withVM(ctx, p.VM, func(vm *store.VM) error { return s.pause(ctx, vm) })
	})
	rpc.Handle(m, api.MethodVMResume, func(ctx context.Context, p api.VMRef) (*store.VM, error) {
		return s.withVM(ctx, p.VM, func(vm *store.VM) error { return s.resume(ctx, vm) })
	})
	rpc.Handle(m, api.MethodSnapshotCreate, s.snapshotCreate)
	rpc.Handle(m, api.MethodSnapshotList, func(ctx context.Context, _ struct{}) ([]*store.Snapshot, error) {
		l, err := s.store.ListSnapshots(ctx)
		return l, storeErr(err)
	})
	rpc.Handle(m, api.MethodSnapshotDelete, s.snapshotDelete)
	rpc.Handle(m, api.MethodVMFork, s.fork)
	s.registerPoolAPI(m)
}

// snapshotter returns the running VM's VMM as a vmm.Snapshotter.
func (s *vmService) snapshotter(vm *store.VM) (*runtime, vmm.Snapshotter, error) {
	rt := s.runtime(vm.ID)
	if rt == nil || vm.State != store.StateRunning {
		return nil, nil, rpc.Errorf(rpc.CodeConflict, "vm %q is %s; start it first", vm.Name, vm.State)
	}
	sn, ok := rt.inst.(vmm.Snapshotter)
	if !ok {
		return nil, nil, rpc.Errorf(rpc.CodeFailedPrecondition, "the %s driver cannot pause or snapshot a VM", vm.Driver)
	}
	return rt, sn, nil
}

// pause stops the VM's vCPUs. The caller holds the VM lock.
func (s *vmService) pause(ctx context.Context, vm *store.VM) error {
	rt, sn, err := s.snapshotter(vm)
	if err != nil {
		return err
	}
	if rt.paused.Load() {
		return nil
	}
	if err := sn.Pause(ctx); err != nil {
		return err
	}
	rt.paused.Store(true)
	s.log.InfoContext(ctx, "vm paused", "vm", vm.Name)
	return nil
}

// resume runs a paused VM again. The caller holds the VM lock.
func (s *vmService) resume(ctx context.Context, vm *store.VM) error {
	rt, sn, err := s.snapshotter(vm)
	if err != nil {
		return err
	}
	if !rt.paused.Load() {
		return nil
	}
	if err := sn.Resume(ctx); err != nil {
		return err
	}
	rt.paused.Store(false)
	s.log.InfoContext(ctx, "vm resumed", "vm", vm.Name)
	return nil
}

// snapshotCreate pauses the VM, saves its state, copies its writable disk,
// and resumes it (or stops it with p.Stop). A VM paused before stays paused.
func (s *vmService) snapshotCreate(ctx context.Context, p api.SnapshotCreateParams) (*store.Snapshot, error) {
	return s.snapshotCreateAs(ctx, p, true)
}

// snapshotCreateAs is snapshotCreate; durable syncs the snapshot's files
// before its record is made (a fork's snapshot, removed once its clones
// exist, does without).
func (s *vmService) snapshotCreateAs(ctx context.Context, p api.SnapshotCreateParams, durable bool) (*store.Snapshot, error) {
	vm, unlock, err := s.lockVM(ctx, p.VM)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return s.snapshotLocked(ctx, vm, p, durable)
}

// snapshotLocked is snapshotCreateAs for a VM whose lock the caller holds.
// The files are written while the VM is paused and synced (when durable)
// after it runs again.
func (s *vmService) snapshotLocked(ctx context.Context, vm *store.VM, p api.SnapshotCreateParams, durable bool) (*store.Snapshot, error) {
	name := p.Name
	if name == "" {
		name = vm.Name + "-" + time.Now().UTC().Format("20060102-150405")
	}
	if err := validName("snapshot", name); err != nil {
		return nil, codeErr(rpc.CodeInvalidArgument, err)
	}
	if _, err := s.store.FindSnapshot(ctx, name); err == nil {
		return nil, rpc.Errorf(rpc.CodeConflict, "a snapshot named %q already exists", name)
	}
	rt, sn, err := s.snapshotter(vm)
	if err != nil {
		return nil, err
	}
	id := newID()
	dir := s.snapshotDir(id)
	if err := os.MkdirAll(filepath.Join(dir, snapStateDir), 0o700); err != nil {
		return nil, err
	}
	done := false
	defer func() {
		if !done {
			os.RemoveAll(dir)
		}
	}()
	wasPaused := rt.paused.Load()
	began := time.Now()
	if err := s.pause(ctx, vm); err != nil {
		return nil, err
	}
	saved, err := sn.SaveState(ctx, filepath.Join(dir, snapStateDir))
	var diskBytes int64
	if err == nil {
		err = s.writeSnapSource(vm, dir)
	}
	if err == nil {
		// The VMM flushed the disk when it paused; the copy is consistent
		// with the saved memory.
		if _, err = vmmproc.CopySparseUnsynced(ctx, filepath.Join(s.vmDir(vm.ID), rwDiskName), filepath.Join(dir, snapDiskName)); err == nil {
			diskBytes, _ = vmmproc.DiskUse(filepath.Join(dir, snapDiskName))
		}
	}
	saveTook := time.Since(began)
	switch {
	case err == nil && p.Stop:
		if kerr := s.kill(ctx, vm); kerr != nil {
			err = kerr
		}
	case !wasPaused:
		if rerr := s.resume(context.WithoutCancel(ctx), vm); rerr != nil {
			err = errors.Join(err, fmt.Errorf("resume after the snapshot: %w", rerr))
		}
	}
	if err == nil && durable {
		err = vmmproc.SyncTree(dir)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", vm.Name, err)
	}
	rec := &store.Snapshot{
		ID: id, Name: name, SourceVM: vm.Name, ImageID: vm.ImageID, KernelID: vm.KernelID, Driver: vm.Driver,
		VCPUs: vm.VCPUs, MemoryMiB: vm.MemoryMiB, DiskMiB: vm.DiskMiB, StateBytes: saved.Bytes, DiskBytes: diskBytes,
	}
	if err := s.store.CreateSnapshot(context.WithoutCancel(ctx), rec); err != nil {
		return nil, storeErr(err)
	}
	done = true
	s.log.InfoContext(ctx, "snapshot created", "vm", vm.Name, "snapshot", name, "state_bytes", saved.Bytes, "disk_bytes", diskBytes, "paused_ms", saveTook.Milliseconds())
	return s.store.FindSnapshot(ctx, id)
}

func (s *vmService) snapshotDelete(ctx context.Context, p api.NameRef) (*api.DeleteResult, error) {
	sn, err := s.store.FindSnapshot(ctx, p.Name)
	if err != nil {
		return nil, storeErr(err)
	}
	if err := s.store.DeleteSnapshot(ctx, sn.ID); err != nil {
		return nil, storeErr(err)
	}
	// VMs restored from it do not need its files' names: QEMU maps its
	// qemu.ram privately (or read a full stream into the clone's memory),
	// Firecracker maps the memory file privately; a mapping outlives the
	// name, and nothing ever writes to the file.
	if err := os.RemoveAll(s.snapshotDir(sn.ID)); err != nil {
		s.log.WarnContext(ctx, "remove snapshot files", "snapshot", sn.Name, "error", err.Error())
	}
	return &api.DeleteResult{Deleted: sn.Name, ID: sn.ID}, nil
}

// pausedErr is the error for guest operations on a paused VM.
func pausedErr(vm *store.VM) error {
	return rpc.Errorf(rpc.CodeConflict, "vm %q is paused; resume it first: banger vm resume %s", vm.Name, vm.Name)
}

// anyPaused says whether any running VM is paused.
func (s *vmService) anyPaused() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rt := range s.runtimes {
		if rt.paused.Load() {
			return true
		}
	}
	return false
}

// markPaused sets vm.Paused from the runtime.
func (s *vmService) markPaused(vm *store.VM) {
	if rt := s.runtime(vm.ID); rt != nil && rt.paused.Load() {
		vm.Paused = true
	}
}
