package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/qemu"
)

// initServices builds the services the daemon composes.
func (d *Daemon) initServices(ctx context.Context) error {
	fc, err := loadFileConfig(d.cfg.Layout.ConfigFile())
	if err != nil {
		return err
	}
	d.fileCfg = fc
	// Runs last at shutdown: a memory directory left empty is removed (one
	// with the memory of VMs that outlive bangerd stays).
	d.addCloser("memory directories", func() error {
		for _, m := range d.cfg.Layout.MemoryDirs() {
			os.Remove(m)
		}
		return nil
	})
	// Guest memory as a tmpfs file unless configured off (qemu_memory_file):
	// snapshots copy it and clones map it instead of a migration stream.
	var memDirs []string
	if fc.memoryFile() {
		memDirs = d.cfg.Layout.MemoryDirs()
	}
	drivers := map[string]vmm.Driver{
		"qemu":        qemu.New(qemu.Options{Accel: fc.QEMUAccel, MemoryDirs: memDirs, Logger: d.log}),
		"firecracker": firecracker.New(firecracker.Options{Logger: d.log, KVMDevice: fc.FirecrackerKVMDevice}),
	}
	def := fc.VMM
	if def == "" || def == "auto" {
		def = "qemu"
		if _, err := exec.LookPath("firecracker"); err == nil {
			def = "firecracker"
		}
	}
	nc, err := newNetCap(d.store, d.log, fc.Network)
	if err != nil {
		return err
	}
	dc := newDiskCap(d.cfg.Layout.CacheDir(), d.log)
	if err := dc.maker.Reclaim(ctx); err != nil { // what a previous bangerd's refills left
		d.log.WarnContext(ctx, "writable disk spares not reclaimed", "error", err.Error())
	}
	d.addCloser("writable disk spares", dc.maker.Close)
	d.vms = &vmService{
		store: d.store, locks: &d.locks, layout: d.cfg.Layout, artifacts: d, bootTimeout: fc.bootTimeout(),
		log: d.log, drivers: drivers, defDrv: def, net: nc, events: d.events,
		caps:     []capability{dc, spoolCap{}, keysCap{userKeyPath: d.cfg.Layout.UserKey()}, nc},
		newAgent: newGuestAgent(d.cfg.Layout.UserKey(), d.log),
		runtimes: map[string]*runtime{}, creates: map[string]*createOp{},
	}
	d.vms.pool = newReadyPool(d.cfg.Layout.DataDir, d.fileCfg.Pool, d.fileCfg.PoolMemoryMiB)
	d.vms.reconcile(ctx)
	d.sweepImageTemps(ctx) // leftovers of image operations a previous bangerd did not finish
	d.vms.startStatsPoller(ctx)
	d.addCloser("ready pool", runEvery(ctx, "pool refill", poolRefillEvery, d.vms.pool.kick, d.vms.poolRefill))
	d.addCloser("stats poller", d.vms.poller().stop)
	d.addCloser("ttl reaper", d.vms.startReaper(ctx))
	return nil
}

// registerServiceAPI registers the services' RPC methods.
func (d *Daemon) registerServiceAPI() {
	d.vms.register(d.mux)
	d.registerArtifactAPI()
	d.registerDoctor()
	d.registerEventsAPI()
}

func (s *vmService) driver(name string) (vmm.Driver, error) {
	if name == "" {
		name = s.defDrv
	}
	drv := s.drivers[name]
	if drv == nil {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "unknown VMM driver %q (use qemu or firecracker)", name)
	}
	return drv, nil
}

// reconcile runs at startup and converges every VM to the truth:
//   - a VMM found running for a record that says running is adopted;
//   - a record left starting or stopping ends stopped (its VMM, if any, killed);
//   - a record in the error state (a release that failed) is released again
//     from the record, keeping why it ended; that release, like every one
//     rebuilt from a record (a VM recorded running whose VMM is gone or
//     cannot be adopted), first ends the VMM the record names if it still
//     runs, and releases nothing else while it does (endRecordedVMM);
//   - a record left creating is removed with everything it made;
//   - a VMM of this home that no adopted runtime owns (found by its command
//     line in /proc, whether or not handles.json exists) is ended (SIGTERM,
//     then SIGKILL) and the files of a VM no record claims are removed;
//   - taps of this user that no running VM owns are deleted;
//   - snapshot directories that no record claims are removed;
//   - guest memory files (on a tmpfs, see paths.MemoryDirs) that no running
//     VMM uses are removed.
//
// Nothing is leaked across restarts, whatever point the previous bangerd died at.
func (s *vmService) reconcile(ctx context.Context) {
	ctx = logging.WithOpID(ctx, logging.NewOpID())
	vms, err := s.store.ListVMs(ctx)
	if err != nil {
		s.log.ErrorContext(ctx, "reconcile: list VMs", "error", err.Error())
		return
	}
	s.importLegacyFiles(ctx, vms)
	known := map[string]bool{}
	for _, vm := range vms {
		known[vm.ID] = true
		if vm.State == store.StateStopped {
			continue
		}
		rt, err := s.adopt(ctx, vm)
		switch {
		case err == nil && vm.State == store.StateRunning:
			// A VM paused by `vm pause` (or a snapshot cut short) stays paused.
			sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			if st, serr := rt.inst.State(sctx); serr == nil && st == vmm.StatePaused {
				rt.paused.Store(true)
			}
			cancel()
			s.log.InfoContext(ctx, "adopted running VM", "vm", vm.Name, "pid", rt.handles.PID, "paused", rt.paused.Load())
			go s.watch(vm.ID, rt)
		case vm.State == store.StateCreating:
			s.log.WarnContext(ctx, "removing VM whose create was interrupted by a bangerd restart", "vm", vm.Name)
			cl := s.recordedCleanup(vm)
			if rt != nil {
				cl = rt.cleanup
			}
			if err := s.release(ctx, vm, cl, ""); errors.Is(err, errVMMAlive) {
				// keep the record that names the VMM (error state)
				s.log.ErrorContext(ctx, "reconcile: VM of an interrupted create kept: its VMM could not be ended", "vm", vm.Name, "error", err.Error())
				continue
			}
			s.removeVM(ctx, vm)
		case err == nil:
			// starting or stopping when the previous bangerd died: the start
			// or stop did not finish, so the VM ends stopped.
			reason := fmt.Sprintf("bangerd restarted while the VM was %s", vm.State)
			if vm.State == store.StateError {
				reason = endReason(vm)
			}
			s.log.WarnContext(ctx, "stopping VM left half-way", "vm", vm.Name, "state", vm.State)
			if kerr := s.killVMM(ctx, vm, rt); kerr != nil {
				s.log.ErrorContext(ctx, "reconcile: kill VMM", "vm", vm.Name, "error", kerr.Error())
			}
			s.release(ctx, vm, rt.cleanup, reason)
		default:
			reason := "VMM exited while bangerd was not running"
			if vm.State == store.StateError {
				// its release failed before: try again
				reason = endReason(vm)
			} else if vm.State != store.StateRunning {
				reason = fmt.Sprintf("bangerd restarted while the VM was %s", vm.State)
			} else if !errors.Is(err, vmm.ErrGone) && !errors.Is(err, os.ErrNotExist) {
				reason = fmt.Sprintf("could not re-attach to the VMM: %v", err)
			}
			s.log.WarnContext(ctx, "VM no longer running", "vm", vm.Name, "reason", reason)
			s.releaseRecorded(ctx, vm, reason)
		}
	}
	s.reapStrays(ctx, known)
	s.reapStrayMemFiles(ctx)
	s.reapStraySnapshots(ctx)
	if s.net != nil {
		running := map[string]bool{}
		for _, vm := range vms {
			if s.runtime(vm.ID) != nil && vm.Tap != "" {
				running[vm.Tap] = true
			}
		}
		s.net.reclaim(ctx, running)
	}
}

// reapStrays kills every VMM process of this home that no adopted runtime
// owns, and removes VM directories that no record claims.
func (s *vmService) reapStrays(ctx context.Context, known map[string]bool) {
	procs, err := findVMMs(s.layout.VMsDir())
	if err != nil {
		s.log.WarnContext(ctx, "reconcile: scan /proc for VMMs", "error", err.Error())
	}
	for _, p := range procs {
		if rt := s.runtime(p.vmID); rt != nil && rt.handles.PID == p.pid {
			continue
		}
		s.log.WarnContext(ctx, "killing a VMM no running VM owns", "vm_id", p.vmID, "pid", p.pid, "recorded", known[p.vmID])
		if err := endScanned(ctx, s.layout.VMsDir(), p, s.endGrace()); err != nil {
			s.log.ErrorContext(ctx, "reconcile: kill stray VMM", "vm_id", p.vmID, "pid", p.pid, "error", err.Error())
		}
	}
	s.removeUnrecorded(ctx, "vm", s.layout.VMsDir(), known)
}

// reapStrayMemFiles removes the guest memory files (vmm.Handles.MemFile)
// that no adopted VMM uses: a VMM that exited while no bangerd watched it
// leaves its file on the tmpfs, taking memory. It runs after adoption and
// after stray VMMs are killed. A memory directory that is not this user's
// private directory is left alone (the driver does not use it either).
func (s *vmService) reapStrayMemFiles(ctx context.Context) {
	inUse := map[string]bool{}
	s.mu.Lock()
	for _, rt := range s.runtimes {
		if rt.handles.MemFile != "" {
			inUse[rt.handles.MemFile] = true
		}
	}
	s.mu.Unlock()
	for _, dir := range s.layout.MemoryDirs() {
		fi, err := os.Lstat(dir)
		if err != nil || !fi.IsDir() || fi.Mode().Perm() != paths.DirMode {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != os.Geteuid() {
			continue
		}
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			if inUse[p] || !e.Type().IsRegular() {
				continue
			}
			s.log.WarnContext(ctx, "removing a guest memory file no running VM uses", "path", p)
			if err := os.Remove(p); err != nil {
				s.log.ErrorContext(ctx, "reconcile: remove stray memory file", "path", p, "error", err.Error())
			}
		}
	}
}

// reapStraySnapshots removes snapshot directories that no record claims: a
// `snapshot create` cut short by a crash writes its directory before its
// record. It runs at startup, before any operation can be writing one.
func (s *vmService) reapStraySnapshots(ctx context.Context) {
	sns, err := s.store.ListSnapshots(ctx)
	if err != nil {
		s.log.ErrorContext(ctx, "reconcile: list snapshots", "error", err.Error())
		return
	}
	known := make(map[string]bool, len(sns))
	for _, sn := range sns {
		known[sn.ID] = true
	}
	s.removeUnrecorded(ctx, "snapshot", s.layout.SnapshotsDir(), known)
}

// removeUnrecorded removes every entry of dir whose name is not in known.
func (s *vmService) removeUnrecorded(ctx context.Context, what, dir string, known map[string]bool) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if known[e.Name()] {
			continue
		}
		s.log.WarnContext(ctx, "removing the directory of a "+what+" that has no record", what+"_id", e.Name())
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			s.log.ErrorContext(ctx, "reconcile: remove stray "+what+" directory", what+"_id", e.Name(), "error", err.Error())
		}
	}
}

// adopt re-attaches to the VMM named in the VM's handles.json and gives it
// a runtime whose cleanup releases what the record names.
func (s *vmService) adopt(ctx context.Context, vm *store.VM) (*runtime, error) {
	b, err := os.ReadFile(filepath.Join(s.vmDir(vm.ID), handlesName))
	if err != nil {
		return nil, err
	}
	var h vmm.Handles
	if err := json.Unmarshal(b, &h); err != nil {
		return nil, fmt.Errorf("handles.json: %w", err)
	}
	drv, err := s.driver(h.Driver)
	if err != nil {
		return nil, err
	}
	inst, err := drv.Adopt(ctx, h)
	if err != nil {
		return nil, err
	}
	rt := &runtime{inst: inst, handles: inst.Handles(), cleanup: s.recordedCleanup(vm)}
	rt.cleanup.addGate("vmm", s.vmmUndo(vm.ID, inst))
	rt.cleanup.add("runtime", func(context.Context) error {
		s.closeGuest(rt)
		s.forgetRuntime(vm.ID, rt)
		return nil
	})
	s.setRuntime(vm.ID, rt)
	return rt, nil
}
