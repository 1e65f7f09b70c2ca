package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	agentapi "github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"

	"github.com/bangerdev/banger/api"
)

// guestAgent is what the VM service needs of a connection to a guest's agent.
type guestAgent interface {
	Ping(ctx context.Context) error
	Shutdown(ctx context.Context) error
	Ports(ctx context.Context) ([]agentapi.Port, error)
	Stats(ctx context.Context) (agentapi.Stats, error)
	Close() error
}

// runtime is the in-memory view of one running VM.
type runtime struct {
	inst      vmm.Instance
	handles   vmm.Handles
	guestMu   sync.Mutex
	transport *guest.Transport
	agent     guestAgent
	stopping  bool // an intentional stop/kill is in progress
}

// vmService owns the VM lifecycle.
type vmService struct {
	d       *Daemon
	log     *slog.Logger
	caps    []capability
	drivers map[string]vmm.Driver
	defDrv  string
	net     *netCap

	// newAgent makes an agent client over a transport with the pinned host key.
	newAgent func(t *guest.Transport, hostKeyLine string) (guestAgent, error)

	statsOnce sync.Once
	pollerVal *statsPoller

	mu       sync.Mutex
	runtimes map[string]*runtime
	creates  map[string]*createOp
}

func (s *vmService) runtime(id string) *runtime {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.runtimes[id]
}

func (s *vmService) setRuntime(id string, rt *runtime) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rt == nil {
		delete(s.runtimes, id)
	} else {
		s.runtimes[id] = rt
	}
}

// lockVM resolves ref, takes that VM's lock and re-reads the record under it.
func (s *vmService) lockVM(ctx context.Context, ref string) (*store.VM, func(), error) {
	vm, err := s.d.store.FindVM(ctx, ref)
	if err != nil {
		return nil, nil, storeErr(err)
	}
	unlock := s.d.locks.Lock(vm.ID)
	vm, err = s.d.store.GetVM(ctx, vm.ID)
	if err != nil {
		unlock()
		return nil, nil, storeErr(err)
	}
	return vm, unlock, nil
}

func (s *vmService) save(ctx context.Context, vm *store.VM) error {
	// State writes must land even when the request was cancelled.
	return s.d.store.UpdateVM(context.WithoutCancel(ctx), vm)
}

func (s *vmService) vmDir(id string) string { return s.d.cfg.Layout.VMDir(id) }

// ---- start pipeline ----

// start boots vm (whose lock the caller holds), running the capabilities'
// hooks. progress, when set, is told about stages. On failure everything the
// start made is undone and the VMM is not left running.
func (s *vmService) start(ctx context.Context, vm *store.VM, progress func(stage string, end bool, err error)) (err error) {
	if progress == nil {
		progress = func(string, bool, error) {}
	}
	stage := func(name string, fn func() error) error {
		progress(name, false, nil)
		t0 := time.Now()
		err := fn()
		progress(name, true, err)
		lvl := slog.LevelDebug
		if err != nil {
			lvl = slog.LevelWarn
		}
		s.log.Log(ctx, lvl, "start stage", "vm", vm.Name, "stage", name, "duration_ms", logging.Ms(time.Since(t0)), "ok", err == nil)
		return err
	}
	img, err := s.d.store.FindImage(ctx, vm.ImageID)
	if err != nil {
		return storeErr(err)
	}
	k, err := s.d.store.FindKernel(ctx, vm.KernelID)
	if err != nil {
		return storeErr(err)
	}
	drv, err := s.driver(vm.Driver)
	if err != nil {
		return err
	}
	dir := s.vmDir(vm.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	env := &startEnv{
		VM: vm, Image: img, Kernel: k, Dir: dir, Driver: drv,
		Boot: &bootcfg.Config{Version: 1, VMID: vm.ID, Hostname: vm.Name},
		Mach: &vmm.MachineConfig{VMID: vm.ID, Dir: dir, VCPUs: vm.VCPUs, MemoryMiB: vm.MemoryMiB, KernelPath: k.VmlinuxPath,
			Cmdline: "console=ttyS0 reboot=k panic=-1 quiet", GuestPort: agentPort},
	}
	if img.ConfigJSON != "" {
		var ic api.ImageConfig
		if json.Unmarshal([]byte(img.ConfigJSON), &ic) == nil {
			env.Boot.Env, env.Boot.WorkDir, env.Boot.User = ic.Env, ic.WorkingDir, ic.User
		}
	}
	vm.State = store.StateStarting
	vm.LastError = ""
	if err := s.save(ctx, vm); err != nil {
		return err
	}
	var undos []func(context.Context) error
	defer func() {
		if err == nil {
			return
		}
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		for i := len(undos) - 1; i >= 0; i-- {
			if uerr := undos[i](uctx); uerr != nil {
				s.log.WarnContext(ctx, "undo after failed start", "vm", vm.Name, "error", uerr.Error())
			}
		}
		s.cleanupState(uctx, vm)
		vm.State = store.StateStopped
		vm.LastError = err.Error()
		s.save(uctx, vm)
	}()

	if err := stage("check", func() error {
		if err := drv.Preflight(ctx); err != nil {
			return err
		}
		return eachCap(s.caps, func(p startPrereq) error { return p.StartPrereq(ctx, env) })
	}); err != nil {
		return err
	}
	if err := stage("prepare host", func() error {
		if err := eachCap(s.caps, func(p hostPreparer) error {
			undo, err := p.PrepareHost(ctx, env)
			if undo != nil {
				undos = append(undos, undo)
			}
			return err
		}); err != nil {
			return err
		}
		if err := s.save(ctx, vm); err != nil { // capabilities may have set ip, tap, mac
			return err
		}
		initrd, err := s.d.initrdFor(ctx, k)
		if err != nil {
			return err
		}
		env.Mach.InitrdPath = initrd
		return nil
	}); err != nil {
		return err
	}
	if err := stage("configure", func() error {
		env.Boot.Channel = channelFor(drv)
		seed, err := bootcfg.NewSeed()
		if err != nil {
			return err
		}
		env.Boot.RNGSeed = seed
		if err := eachCap(s.caps, func(p guestConfigContributor) error { return p.ContributeGuestConfig(ctx, env) }); err != nil {
			return err
		}
		b, err := bootcfg.Encode(env.Boot)
		if err != nil {
			return err
		}
		if err := writeFileAtomic(filepath.Join(dir, bootcfgName), b, 0o600); err != nil {
			return err
		}
		return eachCap(s.caps, func(p machineConfigContributor) error { return p.ContributeMachineConfig(ctx, env) })
	}); err != nil {
		return err
	}
	var rt *runtime
	if err := stage("boot", func() error {
		inst, err := drv.Start(ctx, *env.Mach)
		if err != nil {
			return err
		}
		h := inst.Handles()
		env.Handles = &h
		rt = &runtime{inst: inst, handles: h}
		undos = append(undos, func(ctx context.Context) error {
			rt.stopping = true
			return inst.Kill(ctx)
		})
		if err := writeJSONAtomic(filepath.Join(dir, "handles.json"), h); err != nil {
			return err
		}
		s.setRuntime(vm.ID, rt)
		return nil
	}); err != nil {
		return err
	}
	if err := stage("wait for agent", func() error {
		return s.waitAgent(ctx, vm, rt)
	}); err != nil {
		return err
	}
	if err := stage("post-start", func() error {
		return eachCap(s.caps, func(p postStarter) error { return p.PostStart(ctx, env) })
	}); err != nil {
		return err
	}
	vm.State = store.StateRunning
	if err := s.save(ctx, vm); err != nil {
		return err
	}
	s.refreshKnownHosts(ctx)
	go s.watch(vm.ID, rt)
	return nil
}

// eachCap runs fn for every capability implementing hook T, in order, and
// names the capability in the error of the first that fails.
func eachCap[T any](caps []capability, fn func(T) error) error {
	for _, c := range caps {
		if h, ok := c.(T); ok {
			if err := fn(h); err != nil {
				return fmt.Errorf("%s: %w", c.Name(), err)
			}
		}
	}
	return nil
}

// agentPort is the vsock port the agent serves on.
const agentPort = agentapi.DefaultVsockPort

func channelFor(drv vmm.Driver) bootcfg.Channel {
	if drv.Capabilities().Vsock {
		return bootcfg.Channel{Kind: "vsock", Port: agentPort}
	}
	return bootcfg.Channel{Kind: "serial", Name: agentapi.DefaultSerialName}
}

// waitAgent waits until the guest agent answers, the VMM exits, or the boot
// deadline passes. The agent client retries on its own (with a short
// backoff), so one Ping spans the whole wait.
func (s *vmService) waitAgent(ctx context.Context, vm *store.VM, rt *runtime) error {
	timeout := s.d.fileCfg.bootTimeout()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	exited := make(chan struct{})
	go func() {
		select {
		case <-rt.inst.Exited():
			close(exited)
			cancel()
		case <-ctx.Done():
		}
	}()
	a, err := s.agent(ctx, vm.ID, rt)
	if err == nil {
		if err = a.Ping(ctx); err == nil {
			return nil
		}
	}
	select {
	case <-exited:
		return fmt.Errorf("the VM exited during boot%s", s.consoleHint(vm.ID))
	default:
	}
	if ctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("the guest agent did not answer within %s (%v)%s", timeout, err, s.consoleHint(vm.ID))
	}
	return err
}

// consoleHint returns the last lines of the console log, for error messages.
func (s *vmService) consoleHint(id string) string {
	p := filepath.Join(s.vmDir(id), "console.log")
	b, err := os.ReadFile(p)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	return "; console (" + p + ") ends with:\n  " + strings.Join(lines, "\n  ")
}

// agent returns (connecting if needed) the agent connection of a running VM.
func (s *vmService) agent(ctx context.Context, id string, rt *runtime) (guestAgent, error) {
	rt.guestMu.Lock()
	defer rt.guestMu.Unlock()
	if rt.agent != nil {
		return rt.agent, nil
	}
	pub, err := hostKeyPub(s.vmDir(id))
	if err != nil {
		return nil, err
	}
	t, err := s.transportLocked(rt)
	if err != nil {
		return nil, err
	}
	a, err := s.newAgent(t, pub)
	if err != nil {
		return nil, err
	}
	rt.agent = a
	return a, nil
}

// transportLocked returns the VM's guest transport; rt.guestMu is held.
func (s *vmService) transportLocked(rt *runtime) (*guest.Transport, error) {
	if rt.transport == nil {
		t, err := guest.NewTransport(rt.handles.Channel, s.log)
		if err != nil {
			return nil, err
		}
		rt.transport = t
	}
	return rt.transport, nil
}

// dialGuest opens a raw connection to the agent's SSH server.
func (s *vmService) dialGuest(ctx context.Context, rt *runtime) (net.Conn, error) {
	rt.guestMu.Lock()
	t, err := s.transportLocked(rt)
	rt.guestMu.Unlock()
	if err != nil {
		return nil, err
	}
	return t.Dial(ctx)
}

// watch waits for the VMM to exit and, unless an intentional stop is
// handling it, marks the VM stopped with the reason and releases resources.
func (s *vmService) watch(id string, rt *runtime) {
	<-rt.inst.Exited()
	ctx := logging.WithOpID(context.Background(), logging.NewOpID())
	st, _ := rt.inst.Wait(ctx)
	unlock := s.d.locks.Lock(id)
	defer unlock()
	if s.runtime(id) != rt {
		return // a stop, kill or delete already handled it
	}
	vm, err := s.d.store.GetVM(ctx, id)
	if err != nil {
		s.setRuntime(id, nil)
		return
	}
	reason := exitReason(st)
	s.log.WarnContext(ctx, "VMM exited", "vm", vm.Name, "reason", reason)
	s.finishStopped(ctx, vm, rt, reason)
}

func exitReason(st vmm.ExitStatus) string {
	switch {
	case st.Reason != "":
		return "VMM exited: " + st.Reason
	case st.Signal != "":
		return "VMM was killed (" + st.Signal + ")"
	case st.Code == 0:
		return ""
	case st.Code > 0:
		return fmt.Sprintf("VMM exited with status %d", st.Code)
	}
	return "VMM exited"
}

// finishStopped records a stopped VM and releases its per-boot resources.
// The caller holds the VM lock.
func (s *vmService) finishStopped(ctx context.Context, vm *store.VM, rt *runtime, lastErr string) {
	if rt != nil {
		rt.guestMu.Lock()
		if rt.agent != nil {
			rt.agent.Close()
			rt.agent = nil
		}
		if rt.transport != nil {
			rt.transport.Close()
			rt.transport = nil
		}
		rt.guestMu.Unlock()
	}
	s.setRuntime(vm.ID, nil)
	s.cleanupState(ctx, vm)
	vm.State = store.StateStopped
	vm.LastError = lastErr
	if err := s.save(ctx, vm); err != nil {
		s.log.ErrorContext(ctx, "record stopped VM", "vm", vm.Name, "error", err.Error())
	}
}

// cleanupState runs the capabilities' state cleanup and removes handles.json.
func (s *vmService) cleanupState(ctx context.Context, vm *store.VM) {
	for i := len(s.caps) - 1; i >= 0; i-- {
		if c, ok := s.caps[i].(stateCleaner); ok {
			if err := c.CleanupState(ctx, vm); err != nil {
				s.log.WarnContext(ctx, "state cleanup failed", "vm", vm.Name, "capability", s.caps[i].Name(), "error", err.Error())
			}
		}
	}
	os.Remove(filepath.Join(s.vmDir(vm.ID), "handles.json"))
}

// ---- stop, kill ----

// stop shuts the VM down gracefully (agent, then the VMM's own request), and
// kills it after timeout. The caller holds the VM lock.
func (s *vmService) stop(ctx context.Context, vm *store.VM, timeout time.Duration) error {
	rt := s.runtime(vm.ID)
	if rt == nil {
		if vm.State != store.StateStopped {
			s.finishStopped(ctx, vm, nil, vm.LastError)
		}
		return nil
	}
	rt.stopping = true
	vm.State = store.StateStopping
	s.save(ctx, vm)
	deadline := time.Now().Add(timeout)
	actx, cancel := context.WithTimeout(ctx, min(timeout, 5*time.Second))
	asked := false
	if a, err := s.agent(actx, vm.ID, rt); err == nil {
		asked = a.Shutdown(actx) == nil
	}
	cancel()
	if !asked {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := rt.inst.Shutdown(sctx); err != nil {
			s.log.WarnContext(ctx, "VMM shutdown request failed", "vm", vm.Name, "error", err.Error())
		}
		cancel()
	}
	wctx, wcancel := context.WithDeadline(ctx, deadline)
	_, werr := rt.inst.Wait(wctx)
	wcancel()
	reason := ""
	if werr != nil {
		s.log.WarnContext(ctx, "guest did not power off in time; killing the VMM", "vm", vm.Name, "timeout", timeout.String())
		kctx, kcancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
		err := rt.inst.Kill(kctx)
		kcancel()
		if err != nil {
			return fmt.Errorf("kill VMM of %s: %w", vm.Name, err)
		}
		reason = fmt.Sprintf("killed after the %s stop timeout", timeout)
	}
	s.finishStopped(ctx, vm, rt, reason)
	return nil
}

func (s *vmService) kill(ctx context.Context, vm *store.VM) error {
	rt := s.runtime(vm.ID)
	if rt == nil {
		if vm.State != store.StateStopped {
			s.finishStopped(ctx, vm, nil, vm.LastError)
		}
		return nil
	}
	rt.stopping = true
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	if err := rt.inst.Kill(kctx); err != nil {
		return fmt.Errorf("kill VMM of %s: %w", vm.Name, err)
	}
	s.finishStopped(ctx, vm, rt, "")
	return nil
}

func writeFileAtomic(p string, b []byte, mode os.FileMode) error {
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

func writeJSONAtomic(p string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(p, b, 0o600)
}

func notRunning(vm *store.VM) error {
	return rpc.Errorf(rpc.CodeFailedPrecondition, "vm %q is %s; start it with: banger vm start %s", vm.Name, vm.State, vm.Name)
}
