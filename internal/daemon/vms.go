package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	agentapi "github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/paths"
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

// runtime is the in-memory view of one running VM. Its cleanup owns every
// per-boot resource (tap, VMM, agent connection, handles.json, the runtime
// entry itself): whatever ends the runtime runs it.
type runtime struct {
	inst      vmm.Instance
	handles   vmm.Handles
	guestMu   sync.Mutex
	transport *guest.Transport
	agent     guestAgent
	cleanup   *cleanup
	// paused: the VMM's vCPUs are stopped (vm pause, or during a
	// snapshot). Changed under the VM's lock.
	paused atomic.Bool
	// wsLock serialises workspace operations (vm.bulk with workspace set);
	// bulk holds the open bulk streams, which closeGuest ends.
	wsLock chan struct{}
	bulkMu sync.Mutex
	bulk   map[net.Conn]struct{}
	// bulkHelloOK: the agent accepted a bulk hello of this runtime, so
	// vm.bulk sends later hellos without waiting for the answer.
	bulkHelloOK atomic.Bool
	// spoolMu is held by the file transfer using the VM's spool (one at a
	// time; others take the channel); noSpool: this VM has no usable
	// spool (no device, or an agent without spool streams);
	// noSessionSpool: its agent has no session spool form (an older one).
	spoolMu        sync.Mutex
	noSpool        atomic.Bool
	noSessionSpool atomic.Bool
}

// lockWorkspace waits (bounded by ctx) for the VM's workspace lock.
func (rt *runtime) lockWorkspace(ctx context.Context) (func(), error) {
	rt.bulkMu.Lock()
	if rt.wsLock == nil {
		rt.wsLock = make(chan struct{}, 1)
	}
	l := rt.wsLock
	rt.bulkMu.Unlock()
	select {
	case l <- struct{}{}:
		return func() { <-l }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// trackBulk records an open bulk stream; the returned func forgets it.
func (rt *runtime) trackBulk(c net.Conn) func() {
	rt.bulkMu.Lock()
	if rt.bulk == nil {
		rt.bulk = map[net.Conn]struct{}{}
	}
	rt.bulk[c] = struct{}{}
	rt.bulkMu.Unlock()
	return func() {
		rt.bulkMu.Lock()
		delete(rt.bulk, c)
		rt.bulkMu.Unlock()
	}
}

// closeBulk ends every open bulk stream (a running push fails at once).
func (rt *runtime) closeBulk() {
	rt.bulkMu.Lock()
	defer rt.bulkMu.Unlock()
	for c := range rt.bulk {
		c.Close()
	}
}

// vmStore is the part of the store the VM service uses.
type vmStore interface {
	SetWorkspaceDest(ctx context.Context, id, dest string) error
	FindVM(ctx context.Context, ref string) (*store.VM, error)
	GetVM(ctx context.Context, id string) (*store.VM, error)
	ListVMs(ctx context.Context) ([]*store.VM, error)
	CreateVM(ctx context.Context, v *store.VM) error
	CreatePoolVM(ctx context.Context, v *store.VM, key string) error
	UpdateVM(ctx context.Context, v *store.VM) error
	SetVMExpiry(ctx context.Context, id string, at time.Time) error
	SetVMForwards(ctx context.Context, id string, fws []api.Forward) error
	SetVMPool(ctx context.Context, id, key string) error
	PoolVMs(ctx context.Context) ([]*store.VM, []string, error)
	ClaimPoolVM(ctx context.Context, id, key, name, workspace string) (bool, error)
	DeleteVM(ctx context.Context, id string) error
	FindImage(ctx context.Context, ref string) (*store.Image, error)
	FindKernel(ctx context.Context, ref string) (*store.Kernel, error)
	CreateSnapshot(ctx context.Context, sn *store.Snapshot) error
	ListSnapshots(ctx context.Context) ([]*store.Snapshot, error)
	FindSnapshot(ctx context.Context, ref string) (*store.Snapshot, error)
	DeleteSnapshot(ctx context.Context, id string) error
	LegacyFilesPending(ctx context.Context) ([]string, error)
	LegacyFilesImported(ctx context.Context, id string) error
}

// artifactResolver picks the image and kernel of a new VM and gives a
// kernel's initrd carrying the current agent.
type artifactResolver interface {
	resolveImage(ctx context.Context, ref string) (*store.Image, error)
	resolveKernel(ctx context.Context, ref string) (*store.Kernel, error)
	initrdFor(ctx context.Context, k *store.Kernel) (string, error)
}

// vmService owns the VM lifecycle. It is given only the ports it uses: a
// store subset, the per-VM locks, the home's layout and an artifact resolver.
type vmService struct {
	store       vmStore
	locks       *store.LockSet
	layout      paths.Layout
	artifacts   artifactResolver
	bootTimeout time.Duration
	log         *slog.Logger
	caps        []capability
	drivers     map[string]vmm.Driver
	defDrv      string
	net         *netCap // nil in tests without a network
	events      *eventBus
	pool        *readyPool // nil: no ready pool

	// newAgent makes an agent client over a transport with the pinned host
	// key and the agent's bulk key (nil when unknown: SSH only).
	newAgent func(t *guest.Transport, hostKeyLine string, bulkKey []byte) (guestAgent, error)
	// openLegacy opens a legacy file of a VM directory (legacy.go; nil:
	// os.OpenFile), a seam for tests to count them.
	openLegacy func(name string, flag int, perm os.FileMode) (*os.File, error)

	statsOnce sync.Once
	pollerVal *statsPoller

	forwards forwardSet // host ports published with -p (forwards.go)

	// vmmGrace is how long a VMM ended from its record gets between
	// SIGTERM and SIGKILL (0: vmmEndGrace).
	vmmGrace time.Duration

	mu       sync.Mutex
	runtimes map[string]*runtime
	creates  map[string]*createOp
	// lingering holds, by VM id, an instance whose kill failed (vmmUndo).
	lingering map[string]vmm.Instance
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

// forgetRuntime removes rt (and only rt) from the runtime table.
func (s *vmService) forgetRuntime(id string, rt *runtime) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.runtimes[id] == rt {
		delete(s.runtimes, id)
	}
}

// lockVM resolves ref, takes that VM's lock and re-reads the record under it.
func (s *vmService) lockVM(ctx context.Context, ref string) (*store.VM, func(), error) {
	vm, err := s.store.FindVM(ctx, ref)
	if err != nil {
		return nil, nil, storeErr(err)
	}
	unlock := s.locks.Lock(vm.ID)
	vm, err = s.store.GetVM(ctx, vm.ID)
	if err != nil {
		unlock()
		return nil, nil, storeErr(err)
	}
	return vm, unlock, nil
}

func (s *vmService) save(ctx context.Context, vm *store.VM) error {
	// State writes must land even when the request was cancelled.
	return s.store.UpdateVM(context.WithoutCancel(ctx), vm)
}

// saveLogged is save for paths that cannot report the error to a caller.
func (s *vmService) saveLogged(ctx context.Context, vm *store.VM) {
	if err := s.save(ctx, vm); err != nil {
		s.log.ErrorContext(ctx, "record VM state", "vm", vm.Name, "state", vm.State, "error", err.Error())
	}
}

func (s *vmService) vmDir(id string) string { return s.layout.VMDir(id) }

// ---- start pipeline ----

// startRun is one pass of the start pipeline.
type startRun struct {
	env *startEnv
	cl  *cleanup // becomes the runtime's cleanup
	rt  *runtime // set by the boot stage
}

// startStage is one named step of the start pipeline. A stage registers the
// undo of everything it makes on r.cl as soon as it exists.
type startStage struct {
	name string
	run  func(ctx context.Context, r *startRun) error
}

// startStages is the start pipeline, in order. A VM's first start from a
// snapshot copies the snapshot's disk, restores instead of booting, and
// gives the clone its own identity before the usual agent wait.
func (s *vmService) startStages(restore bool) []startStage {
	if restore {
		return []startStage{
			{"check", s.stageCheck},
			{"copy disk", s.stageCopyDisk},
			{"prepare host", s.stagePrepareHost},
			{"configure", s.stageConfigure},
			{"restore", s.stageRestore},
			{"reidentify", s.stageReidentify},
			{"wait for agent", s.stageWaitAgent},
		}
	}
	return []startStage{
		{"check", s.stageCheck},
		{"prepare host", s.stagePrepareHost},
		{"configure", s.stageConfigure},
		{"boot", s.stageBoot},
		{"wait for agent", s.stageWaitAgent},
	}
}

// start boots vm (whose lock the caller holds) through the stage table.
// progress, when set, is told about stages. On failure the run's cleanup
// undoes everything the start made, the VMM included, and the record says
// stopped with the error.
func (s *vmService) start(ctx context.Context, vm *store.VM, progress func(stage string, end bool, err error)) (err error) {
	return s.startFrom(ctx, vm, progress, nil)
}

// startFrom is start; with restore set, the VM is restored from a snapshot.
func (s *vmService) startFrom(ctx context.Context, vm *store.VM, progress func(stage string, end bool, err error), restore *restoreSource) (err error) {
	if progress == nil {
		progress = func(string, bool, error) {}
	}
	img, err := s.store.FindImage(ctx, vm.ImageID)
	if err != nil {
		return storeErr(err)
	}
	k, err := s.store.FindKernel(ctx, vm.KernelID)
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
	r := &startRun{cl: newCleanup(), env: &startEnv{
		VM: vm, Image: img, Kernel: k, Dir: dir, Driver: drv,
		Boot: &bootcfg.Config{Version: 1, VMID: vm.ID, Hostname: vm.Name},
		Mach: &vmm.MachineConfig{VMID: vm.ID, Dir: dir, VCPUs: vm.VCPUs, MemoryMiB: vm.MemoryMiB, KernelPath: k.VmlinuxPath,
			Cmdline: "console=ttyS0 reboot=k panic=-1 quiet", GuestPort: agentPort},
		Restore: restore,
	}}
	if img.ConfigJSON != "" {
		var ic api.ImageConfig
		if json.Unmarshal([]byte(img.ConfigJSON), &ic) == nil {
			r.env.Boot.Env, r.env.Boot.WorkDir, r.env.Boot.User = ic.Env, ic.WorkingDir, ic.User
		}
	}
	// A create keeps its record "creating" until it runs, so that a bangerd
	// killed during it removes the VM at restart instead of keeping half of it.
	creating := vm.State == store.StateCreating
	if !creating {
		vm.State = store.StateStarting
	}
	vm.LastError = ""
	if err := s.save(ctx, vm); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			s.release(ctx, vm, r.cl, err.Error())
			if !creating {
				s.events.publish(ctx, api.Event{Type: api.EventVMStartFailed, VM: vm.Name, VMID: vm.ID, Reason: err.Error()})
			}
		} else if !creating {
			s.events.publish(ctx, api.Event{Type: api.EventVMStarted, VM: vm.Name, VMID: vm.ID})
		}
	}()
	if !creating {
		fault("start")
	}
	for _, st := range s.startStages(restore != nil) {
		progress(st.name, false, nil)
		t0 := time.Now()
		err := st.run(ctx, r)
		if ctx.Err() != nil {
			// say why (op.cancel, shutdown) rather than "context canceled"
			err = fmt.Errorf("cancelled during %s: %w", st.name, context.Cause(ctx))
		}
		progress(st.name, true, err)
		lvl := slog.LevelDebug
		if err != nil {
			lvl = slog.LevelWarn
		}
		s.log.Log(ctx, lvl, "start stage", "vm", vm.Name, "stage", st.name, "duration_ms", logging.Ms(time.Since(t0)), "ok", err == nil)
		if err != nil {
			return err
		}
	}
	vm.State = store.StateRunning
	if err := s.save(ctx, vm); err != nil {
		return err
	}
	s.refreshKnownHosts(ctx)
	s.openForwards(ctx, vm.ID, r.rt)
	go s.watch(vm.ID, r.rt)
	return nil
}

func (s *vmService) stageCheck(ctx context.Context, r *startRun) error {
	if err := r.env.Driver.Preflight(ctx); err != nil {
		return err
	}
	return eachCap(s.caps, func(p startPrereq) error { return p.StartPrereq(ctx, r.env) })
}

func (s *vmService) stagePrepareHost(ctx context.Context, r *startRun) error {
	if err := eachCap(s.caps, func(p hostPreparer) error {
		undo, err := p.PrepareHost(ctx, r.env)
		r.cl.add(p.(capability).Name(), undo)
		return err
	}); err != nil {
		return err
	}
	if err := s.save(ctx, r.env.VM); err != nil { // capabilities may have set ip, tap, mac
		return err
	}
	initrd, err := s.artifacts.initrdFor(ctx, r.env.Kernel)
	if err != nil {
		return err
	}
	r.env.Mach.InitrdPath = initrd
	return nil
}

func (s *vmService) stageConfigure(ctx context.Context, r *startRun) error {
	env := r.env
	env.Boot.Channel = channelFor(env.Driver)
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
	if err := writeFileAtomic(filepath.Join(env.Dir, bootcfgName), b, 0o600); err != nil {
		return err
	}
	return eachCap(s.caps, func(p machineConfigContributor) error { return p.ContributeMachineConfig(ctx, env) })
}

// stageBoot launches the VMM. Its identity (pid and start time) reaches
// handles.json the moment it is spawned, before the driver waits for the
// machine, so a bangerd killed at any later point finds it again.
func (s *vmService) stageBoot(ctx context.Context, r *startRun) error {
	return s.launch(ctx, r, func(ctx context.Context) (vmm.Instance, error) { return r.env.Driver.Start(ctx, *r.env.Mach) })
}

// launch runs the VMM through start (a boot or a restore), recording its
// identity and registering its undo.
func (s *vmService) launch(ctx context.Context, r *startRun, start func(context.Context) (vmm.Instance, error)) error {
	env := r.env
	hp := filepath.Join(env.Dir, handlesName)
	r.cl.add("handles.json", func(context.Context) error {
		if err := os.Remove(hp); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	})
	env.Mach.Spawned = func(h vmm.Handles) {
		if err := writeJSONAtomic(hp, h); err != nil {
			s.log.WarnContext(ctx, "record VMM identity", "vm", env.VM.Name, "error", err.Error())
		}
		fault("after-spawn")
	}
	inst, err := start(ctx)
	if err != nil {
		return err
	}
	h := inst.Handles()
	env.Handles = &h
	rt := &runtime{inst: inst, handles: h, cleanup: r.cl}
	r.rt = rt
	s.setRuntime(env.VM.ID, rt)
	// Newest first: the runtime is forgotten, then the VMM ended; if that
	// fails, nothing older (handles.json, the tap) is released (vmmUndo).
	r.cl.addGate("vmm", s.vmmUndo(env.VM.ID, inst))
	r.cl.add("runtime", func(context.Context) error {
		s.closeGuest(rt)
		s.forgetRuntime(env.VM.ID, rt)
		return nil
	})
	fault("before-handles")
	return writeJSONAtomic(hp, h)
}

func (s *vmService) stageWaitAgent(ctx context.Context, r *startRun) error {
	fault("agent-wait")
	return s.waitAgent(ctx, r.env.VM, r.rt)
}

// handlesName is the file in a VM directory recording its VMM's identity.
const handlesName = "handles.json"

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
	timeout := s.bootTimeout
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
	b, err := readTail(p, consoleHintBytes)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	for i, l := range lines {
		if len(l) > consoleHintLine {
			lines[i] = strings.ToValidUTF8(l[:consoleHintLine], "") + "…"
		}
	}
	return "; console (" + p + ") ends with:\n  " + strings.Join(lines, "\n  ")
}

// The console is the guest's: the hint quoting it in an error (which is
// stored as the VM's last error and sent in events) is bounded.
const (
	consoleHintBytes = 16 << 10
	consoleHintLine  = 240
)

// readTail reads at most the last n bytes of the file at p, without
// following a link there.
func readTail(p string, n int64) ([]byte, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", p)
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, min(fi.Size(), n))
	k, err := f.ReadAt(b, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:k], nil
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
	// No bulk key recorded (a VM started by an older bangerd): SSH only.
	bk, _ := bulkKey(s.vmDir(id))
	a, err := s.newAgent(t, pub, bk)
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

// watch waits for the VMM to exit and, unless a stop, kill or delete has
// already ended this runtime, marks the VM stopped with the reason and
// releases the runtime through its cleanup.
func (s *vmService) watch(id string, rt *runtime) {
	<-rt.inst.Exited()
	ctx := logging.WithOpID(context.Background(), logging.NewOpID())
	st, _ := rt.inst.Wait(ctx)
	unlock := s.locks.Lock(id)
	defer unlock()
	if s.runtime(id) != rt {
		return // a stop, kill or delete already handled it
	}
	vm, err := s.store.GetVM(ctx, id)
	if err != nil {
		rt.cleanup.run(ctx, s.log, "vm", id)
		return
	}
	reason := exitReason(st) // empty: the guest powered off by itself
	if vm.State == store.StateError {
		// A stop or kill whose SIGKILL this VMM outlived (vmmStuckError;
		// nothing else leaves a held runtime in the error state): it has
		// ended now, as that stop or kill asked.
		s.log.WarnContext(ctx, "VMM exited after outliving SIGKILL", "vm", vm.Name, "status", reason)
		reason = endReason(vm)
	} else {
		s.log.WarnContext(ctx, "VMM exited", "vm", vm.Name, "reason", reason)
	}
	s.releaseRuntime(ctx, vm, rt, reason)
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

// closeGuest closes the runtime's agent connection and transport.
func (s *vmService) closeGuest(rt *runtime) {
	rt.closeBulk()
	rt.guestMu.Lock()
	defer rt.guestMu.Unlock()
	if rt.agent != nil {
		rt.agent.Close()
		rt.agent = nil
	}
	if rt.transport != nil {
		rt.transport.Close()
		rt.transport = nil
	}
}

// release runs a runtime's cleanup and records the VM stopped with reason
// (empty for an intentional stop). The caller holds the VM lock. It is the
// one way a runtime ends: failed start, stop, kill, VMM crash and delete.
//
// When a step of the cleanup fails (a tap the helper could not delete, say)
// the VM is recorded in the error state, its last error the reason followed
// by what failed: the host may still hold some of its resources, and the
// next stop, kill, start, delete or bangerd start releases them again from
// the record (recordedCleanup).
func (s *vmService) release(ctx context.Context, vm *store.VM, cl *cleanup, reason string) error {
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	err := cl.run(uctx, s.log, "vm", vm.Name)
	prior := vm.State
	vm.State = store.StateStopped
	vm.LastError = reason
	if err != nil {
		vm.State = store.StateError
		vm.LastError = releaseFailedReason(reason, vm.Name, err)
	}
	s.saveLogged(uctx, vm)
	if prior == store.StateRunning || prior == store.StateStopping {
		s.events.publish(ctx, api.Event{Type: api.EventVMStopped, VM: vm.Name, VMID: vm.ID, Reason: reason})
	}
	return err
}

// releaseFailed starts, in the last error of a VM in the error state, what
// failed when its runtime was released (after why the runtime ended, if
// anything did: "<reason>; then releasing ...").
const releaseFailed = "releasing its resources failed: "

// releaseFailedReason is the last error of a VM whose release failed with err
// after its runtime ended for reason.
func releaseFailedReason(reason, name string, err error) string {
	msg := releaseFailed + err.Error() +
		fmt.Sprintf(" (banger vm stop %s retries; banger vm delete %s removes what is left)", name, name)
	if reason == "" {
		return msg
	}
	return reason + "; then " + msg
}

// endReason is why a VM without a runtime ended, for releasing it again:
// its last error, without what a failed release added.
func endReason(vm *store.VM) string {
	if vm.State != store.StateError {
		return vm.LastError
	}
	r, _, _ := strings.Cut(vm.LastError, releaseFailed)
	r, _, _ = strings.Cut(r, vmmStuck)
	return strings.TrimSuffix(r, "; then ")
}

// recordedCleanup rebuilds the cleanup of a VM whose runtime this bangerd
// does not hold (its VMM is gone, or was started by a bangerd that died):
// ending the VMM the record names if it still runs (a gate: endRecordedVMM),
// then the capabilities' per-boot resources named in the record and
// handles.json.
func (s *vmService) recordedCleanup(vm *store.VM) *cleanup {
	cl := newCleanup()
	hp := filepath.Join(s.vmDir(vm.ID), handlesName)
	cl.add("handles.json", func(context.Context) error {
		if err := os.Remove(hp); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	})
	sp := filepath.Join(s.vmDir(vm.ID), spoolName)
	cl.add("spool", func(context.Context) error { return removeRegular(sp) })
	for _, c := range s.caps {
		if sc, ok := c.(stateCleaner); ok {
			v := *vm
			cl.add(c.Name(), func(ctx context.Context) error { return sc.CleanupState(ctx, &v) })
		}
	}
	// First of all: end the VMM the record names if it still runs (a kill
	// that failed, a bangerd that died half-way), or release nothing.
	id := vm.ID
	cl.addGate("vmm", func(ctx context.Context) error { return s.endRecordedVMM(ctx, id) })
	return cl
}

// releaseRecorded converges a VM without a runtime to stopped, releasing
// what its record says it holds.
func (s *vmService) releaseRecorded(ctx context.Context, vm *store.VM, reason string) error {
	return s.release(ctx, vm, s.recordedCleanup(vm), reason)
}

// ---- stop, kill ----

// stop shuts the VM down gracefully (agent, then the VMM's own request), and
// kills it after timeout. The caller holds the VM lock.
func (s *vmService) stop(ctx context.Context, vm *store.VM, timeout time.Duration) error {
	rt := s.runtime(vm.ID)
	if rt == nil {
		if vm.State != store.StateStopped {
			return s.releaseRecorded(ctx, vm, endReason(vm))
		}
		return nil
	}
	if vm.State == store.StateError {
		// An earlier stop or kill could not end this VMM (vmmStuckError):
		// a guest that was asked to power off and a VMM that outlived
		// SIGKILL will not listen now; retry the kill.
		return s.endVMM(ctx, vm, rt, endReason(vm), "stopped")
	}
	if rt.paused.Load() {
		// A paused guest cannot act on a power-off request.
		if sn, ok := rt.inst.(vmm.Snapshotter); ok && sn.Resume(ctx) == nil {
			rt.paused.Store(false)
		}
	}
	vm.State = store.StateStopping
	s.saveLogged(ctx, vm)
	// A running workspace push or copy ends now, cleanly, with an error.
	rt.closeBulk()
	fault("stop")
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
	if werr != nil {
		s.log.WarnContext(ctx, "guest did not power off in time; killing the VMM", "vm", vm.Name, "timeout", timeout.String())
		return s.endVMM(ctx, vm, rt, fmt.Sprintf("killed after the %s stop timeout", timeout), "stopped")
	}
	s.releaseRuntime(ctx, vm, rt, "")
	return nil
}

// killVMM ends the VMM now. On failure the runtime is kept (the VMM may
// still run) and the error says so.
func (s *vmService) killVMM(ctx context.Context, vm *store.VM, rt *runtime) error {
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	if err := rt.inst.Kill(kctx); err != nil {
		return fmt.Errorf("kill VMM of %s: %w", vm.Name, err)
	}
	return nil
}

func (s *vmService) kill(ctx context.Context, vm *store.VM) error {
	rt := s.runtime(vm.ID)
	if rt == nil {
		if vm.State != store.StateStopped {
			return s.releaseRecorded(ctx, vm, endReason(vm))
		}
		return nil
	}
	reason := ""
	if vm.State == store.StateError {
		reason = endReason(vm) // a stop's kill retried: what that stop said
	}
	return s.endVMM(ctx, vm, rt, reason, "killed")
}

// endVMM kills rt's VMM and releases the runtime, recording the VM stopped
// with reason (or error, if the release fails: see release). When the kill
// fails the VMM may still run — a process that outlives SIGKILL is stuck in
// the kernel — so nothing it uses is released: the runtime is kept (its
// watcher releases it when the VMM does exit), the VM is recorded in the
// error state saying so (vmmStuckReason) and no vm.stopped is published;
// the error, a *vmmStuckError wrapping errVMMAlive, says the same. verb
// ("stopped", "killed") is what the caller asked for, for that error.
func (s *vmService) endVMM(ctx context.Context, vm *store.VM, rt *runtime, reason, verb string) error {
	if err := s.killVMM(ctx, vm, rt); err != nil {
		se := &vmmStuckError{name: vm.Name, pid: rt.handles.PID, err: err}
		vm.State = store.StateError
		vm.LastError = vmmStuckReason(reason, se)
		s.saveLogged(ctx, vm)
		s.log.ErrorContext(ctx, "VMM did not end after SIGKILL; VM recorded in the error state", "vm", vm.Name, "pid", rt.handles.PID, "error", err.Error())
		return codeErr(rpc.CodeFailedPrecondition, fmt.Errorf("vm %q was not %s (it is now in the error state): %w", vm.Name, verb, se))
	}
	s.releaseRuntime(ctx, vm, rt, reason)
	return nil
}

// releaseRuntime releases rt, whose VMM has ended, recording the VM stopped
// with reason (release). A VM in the error state here is one whose VMM
// outlived an earlier kill (endVMM): no vm.stopped was published for it
// then, and it stops now.
func (s *vmService) releaseRuntime(ctx context.Context, vm *store.VM, rt *runtime, reason string) error {
	if vm.State == store.StateError {
		vm.State = store.StateStopping
	}
	return s.release(ctx, vm, rt.cleanup, reason)
}

// vmmStuck starts, in the last error of a VM in the error state, why it is
// there: a stop or kill could not end its VMM (after why the VM was being
// ended, if anything: "<reason>; then its VMM ...").
const vmmStuck = "its VMM did not end after SIGKILL"

// vmmStuckError is the error of a stop or kill whose VMM did not end after
// SIGKILL (endVMM). It wraps errVMMAlive and the kill's error.
type vmmStuckError struct {
	name string
	pid  int // 0: unknown
	err  error
}

// what says what happened, without the hint.
func (e *vmmStuckError) what() string {
	pid := ""
	if e.pid > 0 {
		pid = fmt.Sprintf(" (pid %d)", e.pid)
	}
	return vmmStuck + pid + ": " + e.err.Error()
}

// hint says what the user can do about it.
func (e *vmmStuckError) hint() string {
	pid := "PID"
	if e.pid > 0 {
		pid = strconv.Itoa(e.pid)
	}
	return fmt.Sprintf("hint: a process that outlives SIGKILL is stuck in the kernel (ps -o pid,stat,wchan,cmd -p %s); "+
		"banger vm kill %s retries; once it is gone, banger vm delete --force %s deletes the VM", pid, e.name, e.name)
}

func (e *vmmStuckError) Error() string   { return e.what() + "; " + e.hint() }
func (e *vmmStuckError) Unwrap() []error { return []error{errVMMAlive, e.err} }

// vmmStuckReason is the last error of a VM whose VMM outlived the kill of a
// stop or kill that was ending it for reason.
func vmmStuckReason(reason string, e *vmmStuckError) string {
	if reason == "" {
		return e.Error()
	}
	return reason + "; then " + e.Error()
}

// writeFileAtomic writes p through a unique temporary file in its directory,
// so concurrent writers never share a temporary name.
func writeFileAtomic(p string, b []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
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
