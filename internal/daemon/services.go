package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/bangerdev/banger/internal/logging"
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
	drivers := map[string]vmm.Driver{
		"qemu":        qemu.New(qemu.Options{Accel: fc.QEMUAccel, Logger: d.log}),
		"firecracker": firecracker.New(firecracker.Options{Logger: d.log}),
	}
	def := fc.VMM
	if def == "" || def == "auto" {
		def = "qemu"
		if _, err := exec.LookPath("firecracker"); err == nil {
			def = "firecracker"
		}
	}
	nc, err := newNetCap(d, fc.Network)
	if err != nil {
		return err
	}
	d.vms = &vmService{
		d: d, log: d.log, drivers: drivers, defDrv: def, net: nc,
		caps:     []capability{diskCap{}, keysCap{userKeyPath: d.cfg.Layout.UserKey()}, nc},
		newAgent: newGuestAgent(d.cfg.Layout.UserKey(), d.log),
		runtimes: map[string]*runtime{}, creates: map[string]*createOp{},
	}
	d.vms.reconcile(ctx)
	d.vms.startStatsPoller(ctx)
	return nil
}

// registerServiceAPI registers the services' RPC methods.
func (d *Daemon) registerServiceAPI() {
	d.vms.register(d.mux)
	d.registerArtifactAPI()
	d.registerDoctor()
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

// reconcile runs at startup: it adopts VMs whose VMM still runs, marks the
// others stopped and releases their resources, and undoes creates that a
// previous bangerd did not finish. Nothing is leaked across restarts.
func (s *vmService) reconcile(ctx context.Context) {
	ctx = logging.WithOpID(ctx, logging.NewOpID())
	vms, err := s.d.store.ListVMs(ctx)
	if err != nil {
		s.log.ErrorContext(ctx, "reconcile: list VMs", "error", err.Error())
		return
	}
	for _, vm := range vms {
		if vm.State == store.StateStopped {
			continue
		}
		rt, err := s.adopt(ctx, vm)
		switch {
		case err == nil && vm.State != store.StateCreating:
			vm.State = store.StateRunning
			s.save(ctx, vm)
			s.log.InfoContext(ctx, "adopted running VM", "vm", vm.Name, "pid", rt.handles.PID)
			go s.watch(vm.ID, rt)
		case vm.State == store.StateCreating:
			if rt != nil {
				rt.inst.Kill(ctx)
			}
			s.log.WarnContext(ctx, "removing VM whose create was interrupted by a bangerd restart", "vm", vm.Name)
			s.cleanupState(ctx, vm)
			s.removeVM(ctx, vm)
		default:
			reason := "VMM exited while bangerd was not running"
			if !errors.Is(err, vmm.ErrGone) && !errors.Is(err, os.ErrNotExist) {
				reason = fmt.Sprintf("could not re-attach to the VMM: %v", err)
			}
			s.log.WarnContext(ctx, "VM no longer running", "vm", vm.Name, "reason", reason)
			s.finishStopped(ctx, vm, nil, reason)
		}
	}
	running := map[string]bool{}
	for _, vm := range vms {
		if s.runtime(vm.ID) != nil && vm.Tap != "" {
			running[vm.Tap] = true
		}
	}
	s.net.reclaim(ctx, running)
}

func (s *vmService) adopt(ctx context.Context, vm *store.VM) (*runtime, error) {
	b, err := os.ReadFile(filepath.Join(s.vmDir(vm.ID), "handles.json"))
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
	rt := &runtime{inst: inst, handles: inst.Handles()}
	s.setRuntime(vm.ID, rt)
	return rt, nil
}
