package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"

	agentapi "github.com/bangerdev/banger/internal/agent/api"
)

// ---- a fake vmm.Driver ----

type fakeDriver struct {
	// wrap, when set, turns each new instance into the one Start returns.
	wrap         func(*fakeInst) vmm.Instance
	preflightErr error
	startErr     error // returned after the VMM was spawned (and killed, as drivers do)
	onStart      func(cfg vmm.MachineConfig)

	mu    sync.Mutex
	insts map[string]*fakeInst // by VM id
	pid   int
}

func (d *fakeDriver) Name() string                        { return "fake" }
func (d *fakeDriver) Preflight(ctx context.Context) error { return d.preflightErr }
func (d *fakeDriver) Capabilities() vmm.Capabilities {
	return vmm.Capabilities{Vsock: true, GracefulStop: true}
}

func (d *fakeDriver) Start(ctx context.Context, cfg vmm.MachineConfig) (vmm.Instance, error) {
	d.mu.Lock()
	d.pid++
	in := &fakeInst{h: vmm.Handles{Driver: "fake", VMID: cfg.VMID, PID: 100000 + d.pid, StartTime: 1,
		Channel: vmm.GuestChannel{Kind: vmm.ChannelVsock, CID: 3, Port: cfg.GuestPort}}, exited: make(chan struct{})}
	if d.insts == nil {
		d.insts = map[string]*fakeInst{}
	}
	d.insts[cfg.VMID] = in
	d.mu.Unlock()
	if cfg.Spawned != nil {
		cfg.Spawned(in.h)
	}
	if d.onStart != nil {
		d.onStart(cfg)
	}
	if d.startErr != nil {
		in.exit(vmm.ExitStatus{Signal: "killed"})
		return nil, d.startErr
	}
	if d.wrap != nil {
		return d.wrap(in), nil
	}
	return in, nil
}

func (d *fakeDriver) Adopt(ctx context.Context, h vmm.Handles) (vmm.Instance, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	in := d.insts[h.VMID]
	if in == nil || in.h.PID != h.PID || in.dead() {
		return nil, vmm.ErrGone
	}
	return in, nil
}

// live returns how many VMMs still run.
func (d *fakeDriver) live() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, in := range d.insts {
		if !in.dead() {
			n++
		}
	}
	return n
}

func (d *fakeDriver) inst(id string) *fakeInst {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.insts[id]
}

type fakeInst struct {
	h      vmm.Handles
	once   sync.Once
	exited chan struct{}
	st     vmm.ExitStatus
}

func (i *fakeInst) exit(st vmm.ExitStatus) {
	i.once.Do(func() { i.st = st; close(i.exited) })
}
func (i *fakeInst) dead() bool {
	select {
	case <-i.exited:
		return true
	default:
		return false
	}
}
func (i *fakeInst) Handles() vmm.Handles { return i.h }
func (i *fakeInst) Shutdown(ctx context.Context) error {
	i.exit(vmm.ExitStatus{})
	return nil
}
func (i *fakeInst) Kill(ctx context.Context) error {
	i.exit(vmm.ExitStatus{Code: -1, Signal: "killed"})
	return nil
}
func (i *fakeInst) Wait(ctx context.Context) (vmm.ExitStatus, error) {
	select {
	case <-i.exited:
		return i.st, nil
	case <-ctx.Done():
		return vmm.ExitStatus{}, ctx.Err()
	}
}
func (i *fakeInst) Exited() <-chan struct{} { return i.exited }
func (i *fakeInst) State(ctx context.Context) (vmm.State, error) {
	if i.dead() {
		return vmm.StateExited, nil
	}
	return vmm.StateRunning, nil
}

// ---- a fake agent (the newAgent seam) ----

type fakeAgent struct {
	pingErr error
	drv     *fakeDriver
	id      string
	closed  *int32c
}

type int32c struct {
	mu sync.Mutex
	n  int
}

func (c *int32c) inc() { c.mu.Lock(); c.n++; c.mu.Unlock() }
func (c *int32c) get() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func (a *fakeAgent) Ping(ctx context.Context) error {
	if errors.Is(a.pingErr, errBlock) {
		<-ctx.Done()
		return ctx.Err()
	}
	return a.pingErr
}

// errBlock makes the fake agent's Ping wait for its context.
var errBlock = errors.New("block")

func (a *fakeAgent) Shutdown(ctx context.Context) error {
	if in := a.drv.inst(a.id); in != nil {
		in.exit(vmm.ExitStatus{})
	}
	return nil
}
func (a *fakeAgent) Ports(ctx context.Context) ([]agentapi.Port, error) { return nil, nil }
func (a *fakeAgent) Stats(ctx context.Context) (agentapi.Stats, error)  { return agentapi.Stats{}, nil }
func (a *fakeAgent) Close() error                                       { a.closed.inc(); return nil }

// ---- a probe capability: makes a host resource, can fail at any hook ----

type probeCap struct {
	failAt string // prereq, prepare, prepare-after, guest, machine

	mu           sync.Mutex
	resources    map[string]bool // "tap-<vm id>"
	undos        int
	releaseFails int // the next releases that fail, keeping the resource
	// onRelease, when set, is called (without mu) before a resource is released.
	onRelease func(name string)
}

func (*probeCap) Name() string { return "probe" }

func (p *probeCap) fail(hook string) error {
	if p.failAt == hook {
		return errors.New("probe fails at " + hook)
	}
	return nil
}

func (p *probeCap) StartPrereq(ctx context.Context, env *startEnv) error { return p.fail("prereq") }

func (p *probeCap) PrepareHost(ctx context.Context, env *startEnv) (func(context.Context) error, error) {
	if err := p.fail("prepare"); err != nil {
		return nil, err
	}
	name := "tap-" + env.VM.ID
	p.mu.Lock()
	p.resources[name] = true
	p.mu.Unlock()
	env.VM.Tap = name
	undo := func(context.Context) error { return p.release(name) }
	// made, then failed: the undo still comes back and must run
	return undo, p.fail("prepare-after")
}

func (p *probeCap) release(name string) error {
	p.mu.Lock()
	hook := p.onRelease
	p.mu.Unlock()
	if hook != nil {
		hook(name)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.undos++
	if p.releaseFails > 0 {
		p.releaseFails--
		return errors.New("probe cannot release " + name)
	}
	if !p.resources[name] {
		return errors.New(name + " released twice or never made")
	}
	delete(p.resources, name)
	return nil
}

func (p *probeCap) ContributeGuestConfig(ctx context.Context, env *startEnv) error {
	return p.fail("guest")
}
func (p *probeCap) ContributeMachineConfig(ctx context.Context, env *startEnv) error {
	return p.fail("machine")
}
func (p *probeCap) CleanupState(ctx context.Context, vm *store.VM) error {
	if vm.Tap == "" {
		return nil
	}
	p.mu.Lock()
	made := p.resources[vm.Tap]
	p.mu.Unlock()
	if !made {
		return nil // like deleting a tap that is gone
	}
	return p.release(vm.Tap)
}

func (p *probeCap) held() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.resources)
}

// ---- fake artifacts ----

type fakeArtifacts struct {
	st        *store.Store
	initrdErr error
}

func (a *fakeArtifacts) resolveImage(ctx context.Context, ref string) (*store.Image, error) {
	return a.st.FindImage(ctx, "img")
}
func (a *fakeArtifacts) resolveKernel(ctx context.Context, ref string) (*store.Kernel, error) {
	return a.st.FindKernel(ctx, "k")
}
func (a *fakeArtifacts) initrdFor(ctx context.Context, k *store.Kernel) (string, error) {
	return "/nonexistent/initrd", a.initrdErr
}

type testSvc struct {
	*vmService
	drv    *fakeDriver
	probe  *probeCap
	arts   *fakeArtifacts
	st     *store.Store
	closed *int32c
	ping   error
}

func newTestSvc(t *testing.T) *testSvc {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	l := paths.Layout{ConfigDir: dir, DataDir: dir, RunDir: filepath.Join(dir, "run")}
	if err := l.Ensure(); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(ctx, l.DB())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := st.CreateImage(ctx, &store.Image{ID: "img", Name: "img", RootfsPath: "/x"}); err != nil {
		t.Fatal(err)
	}
	if err := st.CreateKernel(ctx, &store.Kernel{ID: "k", Name: "k", VmlinuxPath: "/v"}); err != nil {
		t.Fatal(err)
	}
	ts := &testSvc{drv: &fakeDriver{}, probe: &probeCap{resources: map[string]bool{}}, st: st, closed: &int32c{}}
	ts.arts = &fakeArtifacts{st: st}
	ts.vmService = &vmService{
		store: st, locks: &store.LockSet{}, layout: l, artifacts: ts.arts, bootTimeout: 5 * time.Second,
		log: logging.Discard(), drivers: map[string]vmm.Driver{"fake": ts.drv}, defDrv: "fake",
		caps:     []capability{spoolCap{}, keysCap{userKeyPath: l.UserKey()}, ts.probe},
		runtimes: map[string]*runtime{}, creates: map[string]*createOp{}, events: newEventBus(),
	}
	ts.newAgent = func(tr *guest.Transport, hostKey string, bulkKey []byte) (guestAgent, error) {
		id := ""
		ts.mu.Lock()
		for vid, rt := range ts.runtimes {
			if rt.transport == tr {
				id = vid
			}
		}
		ts.mu.Unlock()
		return &fakeAgent{pingErr: ts.ping, drv: ts.drv, id: id, closed: ts.closed}, nil
	}
	return ts
}

// waitCreate returns the create operation opID once it has finished, failing
// the test if that takes longer than d.
func (ts *testSvc) waitCreate(t *testing.T, opID string, d time.Duration) *createOp {
	t.Helper()
	op := ts.createOp(opID)
	if op == nil {
		t.Fatalf("no create operation %s", opID)
	}
	select {
	case <-op.done:
	case <-time.After(d):
		t.Fatalf("create %s did not finish in %v", opID, d)
	}
	return op
}

func (ts *testSvc) newVM(t *testing.T, name, state string) *store.VM {
	t.Helper()
	vm := &store.VM{ID: newID(), Name: name, ImageID: "img", KernelID: "k", VCPUs: 1, MemoryMiB: 64, DiskMiB: 64,
		State: state, Driver: "fake"}
	if err := ts.st.CreateVM(context.Background(), vm); err != nil {
		t.Fatal(err)
	}
	return vm
}

// assertClean checks nothing of vm's runtime is left.
func (ts *testSvc) assertClean(t *testing.T, vm *store.VM) {
	t.Helper()
	if n := ts.probe.held(); n != 0 {
		t.Errorf("%d host resources left", n)
	}
	if n := ts.drv.live(); n != 0 {
		t.Errorf("%d VMMs left running", n)
	}
	if ts.runtime(vm.ID) != nil {
		t.Error("runtime entry left")
	}
	if _, err := os.Stat(filepath.Join(ts.vmDir(vm.ID), handlesName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("handles.json left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(ts.vmDir(vm.ID), spoolName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("spool file left: %v", err)
	}
}

func TestStartFailureAtEveryStageUndoesEverything(t *testing.T) {
	tests := []struct {
		stage string
		setup func(ts *testSvc)
	}{
		{"check", func(ts *testSvc) { ts.drv.preflightErr = errors.New("no vmm here") }},
		{"check", func(ts *testSvc) { ts.probe.failAt = "prereq" }},
		{"prepare host", func(ts *testSvc) { ts.probe.failAt = "prepare" }},
		{"prepare host", func(ts *testSvc) { ts.probe.failAt = "prepare-after" }},
		{"prepare host", func(ts *testSvc) { ts.arts.initrdErr = errors.New("no initrd") }},
		{"configure", func(ts *testSvc) { ts.probe.failAt = "guest" }},
		{"configure", func(ts *testSvc) { ts.probe.failAt = "machine" }},
		{"boot", func(ts *testSvc) { ts.drv.startErr = errors.New("vmm died") }},
		{"wait for agent", func(ts *testSvc) { ts.ping = errors.New("agent says no") }},
	}
	for _, tt := range tests {
		t.Run(tt.stage, func(t *testing.T) {
			ts := newTestSvc(t)
			tt.setup(ts)
			ctx := context.Background()
			vm := ts.newVM(t, "v", store.StateStopped)
			var failed string
			err := ts.start(ctx, vm, func(stage string, end bool, err error) {
				if end && err != nil {
					failed = stage
				}
			})
			if err == nil {
				t.Fatal("start succeeded")
			}
			if failed != tt.stage {
				t.Fatalf("failed at stage %q, want %q (%v)", failed, tt.stage, err)
			}
			ts.assertClean(t, vm)
			got, _ := ts.st.GetVM(ctx, vm.ID)
			if got.State != store.StateStopped || got.LastError == "" {
				t.Fatalf("record after failed start: %s %q", got.State, got.LastError)
			}
			// the stale runtime bug: delete must not ask for --force
			if err := ts.delete(ctx, got, false); err != nil {
				t.Fatalf("delete after a failed start: %v", err)
			}
			if _, err := ts.st.GetVM(ctx, vm.ID); !errors.Is(err, store.ErrNotFound) {
				t.Fatalf("record left after delete: %v", err)
			}
			if _, err := os.Stat(ts.vmDir(vm.ID)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("VM directory left: %v", err)
			}
		})
	}
}

// A create failing at the agent wait removes the VM; the undos ran once each.
func TestFailedCreateRemovesEverythingOnce(t *testing.T) {
	ts := newTestSvc(t)
	ts.ping = errors.New("agent never answers")
	ctx := context.Background()
	vm := ts.newVM(t, "c", store.StateCreating)
	op := &createOp{status: api.CreateStatus{OpID: "op1"}, done: make(chan struct{})}
	ts.runCreate(ctx, vm, op, nil, "")
	st := op.snapshot()
	if !st.Done || !strings.Contains(st.Error, "agent never answers") {
		t.Fatalf("create status: %+v", st)
	}
	ts.assertClean(t, vm)
	if ts.probe.undos != 1 {
		t.Fatalf("tap released %d times, want 1", ts.probe.undos)
	}
	if ts.closed.get() != 1 {
		t.Fatalf("agent closed %d times, want 1", ts.closed.get())
	}
	if _, err := ts.st.GetVM(ctx, vm.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("record left: %v", err)
	}
}

func TestStartStopReleaseOnce(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	vm := ts.newVM(t, "s", store.StateStopped)
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	if vm.State != store.StateRunning || ts.runtime(vm.ID) == nil || ts.probe.held() != 1 {
		t.Fatalf("after start: %s, runtime %v, %d resources", vm.State, ts.runtime(vm.ID) != nil, ts.probe.held())
	}
	if _, err := os.Stat(filepath.Join(ts.vmDir(vm.ID), handlesName)); err != nil {
		t.Fatalf("handles.json: %v", err)
	}
	if err := ts.delete(ctx, vm, false); err == nil {
		t.Fatal("delete of a running VM without force succeeded")
	}
	if err := locked(ts, vm, func() error { return ts.stop(ctx, vm, 5*time.Second) }); err != nil {
		t.Fatal(err)
	}
	ts.assertClean(t, vm)
	if vm.State != store.StateStopped || vm.LastError != "" {
		t.Fatalf("after stop: %s %q", vm.State, vm.LastError)
	}
	if ts.probe.undos != 1 {
		t.Fatalf("tap released %d times", ts.probe.undos)
	}
	// start again, then delete --force
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	if err := ts.delete(ctx, vm, true); err != nil {
		t.Fatal(err)
	}
	ts.assertClean(t, vm)
	if ts.probe.undos != 2 {
		t.Fatalf("tap released %d times over two boots", ts.probe.undos)
	}
}

func TestVMMCrashLeavesStoppedWithReason(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	vm := ts.newVM(t, "crash", store.StateStopped)
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	ts.drv.inst(vm.ID).exit(vmm.ExitStatus{Code: -1, Signal: "segmentation fault"})
	deadline := time.Now().Add(5 * time.Second)
	var got *store.VM
	for time.Now().Before(deadline) {
		got, _ = ts.st.GetVM(ctx, vm.ID)
		if got.State == store.StateStopped && ts.runtime(vm.ID) == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got.State != store.StateStopped || !strings.Contains(got.LastError, "segmentation fault") {
		t.Fatalf("after crash: %s %q", got.State, got.LastError)
	}
	ts.assertClean(t, vm)
	if ts.probe.undos != 1 {
		t.Fatalf("tap released %d times", ts.probe.undos)
	}
}

// What a bangerd killed at any point leaves is converged by the next one.
func TestReconcileConverges(t *testing.T) {
	ctx := context.Background()
	ts := newTestSvc(t)
	// a running VM: adopted
	run := ts.newVM(t, "run", store.StateStopped)
	if err := ts.start(ctx, run, nil); err != nil {
		t.Fatal(err)
	}
	// a create interrupted after spawn: removed, VMM killed, tap released
	creating := ts.newVM(t, "creating", store.StateStopped)
	if err := ts.start(ctx, creating, nil); err != nil {
		t.Fatal(err)
	}
	creating.State = store.StateCreating
	ts.save(ctx, creating)
	// a start interrupted: ends stopped with a reason, VMM killed
	starting := ts.newVM(t, "starting", store.StateStopped)
	if err := ts.start(ctx, starting, nil); err != nil {
		t.Fatal(err)
	}
	starting.State = store.StateStarting
	ts.save(ctx, starting)
	// a running record whose VMM died with bangerd: stopped, tap released
	gone := ts.newVM(t, "gone", store.StateStopped)
	if err := ts.start(ctx, gone, nil); err != nil {
		t.Fatal(err)
	}

	// "restart": a new service over the same store, driver and host state
	old := ts.vmService
	old.mu.Lock()
	old.runtimes = map[string]*runtime{} // the old bangerd is gone: its watchers must not act
	old.mu.Unlock()
	ts2 := *ts
	ts2.vmService = &vmService{store: old.store, locks: &store.LockSet{}, layout: old.layout, artifacts: old.artifacts,
		bootTimeout: old.bootTimeout, log: old.log, drivers: old.drivers, defDrv: old.defDrv, caps: old.caps,
		newAgent: old.newAgent, runtimes: map[string]*runtime{}, creates: map[string]*createOp{}}
	ts.drv.inst(gone.ID).exit(vmm.ExitStatus{Signal: "killed"}) // died while no bangerd ran
	ts2.reconcile(ctx)

	if r, _ := ts.st.GetVM(ctx, run.ID); r.State != store.StateRunning || ts2.runtime(run.ID) == nil {
		t.Fatalf("running VM not adopted: %s", r.State)
	}
	if _, err := ts.st.GetVM(ctx, creating.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("creating VM not removed: %v", err)
	}
	if _, err := os.Stat(ts.vmDir(creating.ID)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("creating VM's directory left: %v", err)
	}
	for _, v := range []*store.VM{starting, gone} {
		r, _ := ts.st.GetVM(ctx, v.ID)
		if r.State != store.StateStopped || r.LastError == "" {
			t.Fatalf("%s: %s %q", v.Name, r.State, r.LastError)
		}
		// its spool file went with the rest of its boot's resources
		if _, err := os.Stat(filepath.Join(ts.vmDir(v.ID), spoolName)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s: spool file left: %v", v.Name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(ts.vmDir(run.ID), spoolName)); err != nil {
		t.Fatalf("the adopted VM lost its spool file: %v", err)
	}
	if n := ts.drv.live(); n != 1 {
		t.Fatalf("%d VMMs running, want only the adopted one", n)
	}
	if n := ts.probe.held(); n != 1 {
		t.Fatalf("%d taps held, want only the adopted VM's", n)
	}
	// and the adopted VM releases through its rebuilt cleanup
	if err := ts2.delete(ctx, run, true); err != nil {
		t.Fatal(err)
	}
	if ts.drv.live() != 0 || ts.probe.held() != 0 {
		t.Fatalf("after delete: %d VMMs, %d taps", ts.drv.live(), ts.probe.held())
	}
}

func TestCleanupRunsEachUndoOnceAndJoinsErrors(t *testing.T) {
	c := newCleanup()
	var order []string
	var mu sync.Mutex
	add := func(name string, err error) {
		c.add(name, func(context.Context) error {
			mu.Lock()
			order = append(order, name)
			mu.Unlock()
			return err
		})
	}
	add("a", nil)
	add("b", errors.New("b broke"))
	add("c", errors.New("c broke"))
	c.add("nil", nil)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = c.run(context.Background(), nil) }()
	}
	wg.Wait()
	if len(order) != 3 {
		t.Fatalf("ran %v, want each undo once", order)
	}
	joined := errors.Join(errs...)
	if joined == nil || !strings.Contains(joined.Error(), "b: b broke") || !strings.Contains(joined.Error(), "c: c broke") {
		t.Fatalf("errors: %v", joined)
	}
	c2 := newCleanup()
	for _, n := range []string{"1", "2", "3"} {
		c2.add(n, func(context.Context) error { order = append(order, n); return nil })
	}
	order = nil
	c2.run(context.Background(), nil)
	if strings.Join(order, "") != "321" {
		t.Fatalf("order %v, want newest first", order)
	}
}

func TestVMIDFromArgs(t *testing.T) {
	prefix := "/home/u/.local/share/banger/vms/"
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"-chardev", "socket,id=qmp,path=/home/u/.local/share/banger/vms/abc123/qmp.sock,server=on"}, "abc123"},
		{[]string{"--api-sock", "/home/u/.local/share/banger/vms/x-1/fc.sock"}, "x-1"},
		{[]string{"--api-sock", "/home/other/banger/vms/x-1/fc.sock"}, ""},
		{[]string{"/home/u/.local/share/banger/vms/../etc/x"}, ""},
		{[]string{"/home/u/.local/share/banger/vms/noslash"}, ""},
	}
	for _, tt := range tests {
		if got := vmIDFromArgs(tt.args, prefix); got != tt.want {
			t.Errorf("%v: %q, want %q", tt.args, got, tt.want)
		}
	}
}

// findVMMs finds this home's VMMs by their command line and nothing else.
func TestFindVMMsIn(t *testing.T) {
	proc := t.TempDir()
	vms := "/data/banger/vms"
	stat := func(start string) string {
		return "1 (x) S 4 5 6 7 8 9 10 11 12 13 1 1 16 17 18 19 20 21 " + start + " 23 24 25\n"
	}
	mk := func(pid string, argv ...string) {
		d := filepath.Join(proc, pid)
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, "cmdline"), []byte(strings.Join(argv, "\x00")+"\x00"), 0o644)
		os.WriteFile(filepath.Join(d, "stat"), []byte(stat("777")), 0o644)
	}
	mk("10", "/usr/bin/qemu-system-x86_64", "-chardev", "socket,id=qmp,path=/data/banger/vms/vm1/qmp.sock,server=on")
	mk("11", "/usr/bin/firecracker", "--api-sock", "/data/banger/vms/vm2/firecracker.sock")
	mk("12", "cat", "/data/banger/vms/vm3/console.log")                        // not a VMM
	mk("13", "/usr/bin/qemu-system-x86_64", "-drive", "file=/other/vms/vm4/x") // another home
	mk("self", "qemu-system-x86_64", "/data/banger/vms/vm5/x")                 // not a pid
	got, err := findVMMsIn(proc, vms, os.Getuid())
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]int{}
	for _, p := range got {
		ids[p.vmID] = p.pid
		if p.startTime != 777 {
			t.Errorf("start time %d", p.startTime)
		}
	}
	if len(ids) != 2 || ids["vm1"] != 10 || ids["vm2"] != 11 {
		t.Fatalf("found %v", ids)
	}
	if got, _ := findVMMsIn(proc, vms, os.Getuid()+1); len(got) != 0 {
		t.Fatalf("another user's processes matched: %v", got)
	}
}

// A failed create keeps its console log under logs/failed/ (the newest 20)
// and the error names the kept file, which exists.
func TestFailedCreateKeepsConsoleLog(t *testing.T) {
	ts := newTestSvc(t)
	ts.ping = errors.New("agent never answers")
	ctx := context.Background()
	os.MkdirAll(ts.layout.FailedLogsDir(), 0o700)
	for i := 0; i < maxFailedLogs+3; i++ {
		os.WriteFile(filepath.Join(ts.layout.FailedLogsDir(), fmt.Sprintf("19990101T0000%02d.000Z-old-x.log", i)), []byte("old"), 0o600)
	}
	vm := ts.newVM(t, "boom", store.StateCreating)
	// the VMM writes its console as it boots
	ts.drv.onStart = func(cfg vmm.MachineConfig) {
		os.WriteFile(filepath.Join(cfg.Dir, "console.log"), []byte("Kernel panic - not syncing: No working init found\n"), 0o600)
	}
	op := &createOp{status: api.CreateStatus{OpID: "op2"}, done: make(chan struct{})}
	ts.runCreate(ctx, vm, op, nil, "")
	msg := op.snapshot().Error
	i := strings.Index(msg, ts.layout.FailedLogsDir())
	if i < 0 {
		t.Fatalf("error does not name the kept log: %s", msg)
	}
	kept := strings.Fields(msg[i:])[0]
	kept = strings.TrimRight(kept, ")")
	b, err := os.ReadFile(kept)
	if err != nil || !strings.Contains(string(b), "No working init") {
		t.Fatalf("kept log %s: %q %v", kept, b, err)
	}
	ents, _ := os.ReadDir(ts.layout.FailedLogsDir())
	if len(ents) != maxFailedLogs {
		t.Fatalf("%d failed logs kept, want %d", len(ents), maxFailedLogs)
	}
}

// Cancelling a create (op.cancel) during the agent wait undoes everything.
func TestCancelCreateUndoes(t *testing.T) {
	ts := newTestSvc(t)
	ts.ping = errBlock
	ctx := logging.WithOpID(context.Background(), "op-cancel-1")
	vm := ts.newVM(t, "cx", store.StateCreating)
	cctx, cancel := context.WithCancelCause(ctx)
	op := &createOp{status: api.CreateStatus{OpID: "op-cancel-1"}, done: make(chan struct{}), cancel: cancel}
	ts.mu.Lock()
	ts.creates["op-cancel-1"] = op
	ts.mu.Unlock()
	go ts.runCreate(cctx, vm, op, nil, "")
	deadline := time.Now().Add(5 * time.Second)
	for ts.runtime(vm.ID) == nil && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if !ts.createOp("op-cancel-1").cancelOp() {
		t.Fatal("cancel says the create had finished")
	}
	select {
	case <-op.done:
	case <-time.After(5 * time.Second):
		t.Fatal("create did not end within 5s of its cancel")
	}
	if st := op.snapshot(); !strings.Contains(st.Error, "cancel") {
		t.Fatalf("status: %+v", st)
	}
	ts.assertClean(t, vm)
	if _, err := ts.st.GetVM(ctx, vm.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("record left: %v", err)
	}
	if op.cancelOp() {
		t.Fatal("a finished create claims to be cancelled")
	}
}

// State changes reach the event stream with their op id and reason.
func TestEventsCarryOpIDAndReason(t *testing.T) {
	ts := newTestSvc(t)
	_, ch, stop := ts.events.subscribe(true)
	defer stop()
	ctx := logging.WithOpID(context.Background(), "op-ev-1")
	vm := ts.newVM(t, "ev", store.StateStopped)
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	ts.drv.inst(vm.ID).exit(vmm.ExitStatus{Code: 3})
	var got []api.Event
	deadline := time.After(5 * time.Second)
	for len(got) < 2 {
		select {
		case ev := <-ch:
			got = append(got, ev)
		case <-deadline:
			t.Fatalf("events so far: %+v", got)
		}
	}
	if got[0].Type != api.EventVMStarted || got[0].OpID != "op-ev-1" || got[0].VM != "ev" {
		t.Fatalf("first event: %+v", got[0])
	}
	if got[1].Type != api.EventVMStopped || !strings.Contains(got[1].Reason, "status 3") || got[1].OpID == "" {
		t.Fatalf("second event: %+v", got[1])
	}
	past, _, _ := ts.events.subscribe(false)
	if len(past) != 2 {
		t.Fatalf("recent events: %+v", past)
	}
}

// A stopping bangerd cancels a create still running and waits for its undo.
func TestShutdownCancelsRunningCreate(t *testing.T) {
	ts := newTestSvc(t)
	ts.ping = errBlock
	ctx := logging.WithOpID(context.Background(), "op-shut-1")
	vm := ts.newVM(t, "sh", store.StateCreating)
	op := &createOp{status: api.CreateStatus{OpID: "op-shut-1"}, done: make(chan struct{})}
	ts.mu.Lock()
	ts.creates["op-shut-1"] = op
	ts.mu.Unlock()
	ts.goCreate(ctx, vm, op, nil, "")
	deadline := time.Now().Add(5 * time.Second)
	for ts.runtime(vm.ID) == nil && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	d := &Daemon{vms: ts.vmService, log: logging.Discard()}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d.cancelRunningOps(sctx)
	select {
	case <-op.done:
	default:
		t.Fatal("shutdown returned before the create finished undoing")
	}
	if st := op.snapshot(); !strings.Contains(st.Error, "shutting down") {
		t.Fatalf("status: %+v", st)
	}
	ts.assertClean(t, vm)
	if _, err := ts.st.GetVM(ctx, vm.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("record left: %v", err)
	}
}

// A release that fails leaves the VM in the error state with why it ended
// and what failed; stop, start and a bangerd restart release it again from
// the record, and the error state ends with the resources released.
func TestFailedReleaseLeavesErrorUntilReleased(t *testing.T) {
	for _, retry := range []string{"stop", "start", "reconcile", "kill"} {
		t.Run(retry, func(t *testing.T) {
			ts := newTestSvc(t)
			ctx := context.Background()
			vm := ts.newVM(t, "e", store.StateStopped)
			if err := ts.start(ctx, vm, nil); err != nil {
				t.Fatal(err)
			}
			ts.probe.mu.Lock()
			ts.probe.releaseFails = 1
			ts.probe.mu.Unlock()
			ts.drv.inst(vm.ID).exit(vmm.ExitStatus{Code: -1, Signal: "segmentation fault"})
			var got *store.VM
			for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				got, _ = ts.st.GetVM(ctx, vm.ID)
				if got.State != store.StateRunning && ts.runtime(vm.ID) == nil {
					break
				}
			}
			if got.State != store.StateError || !strings.Contains(got.LastError, "segmentation fault") ||
				!strings.Contains(got.LastError, "releasing its resources failed: ") || !strings.Contains(got.LastError, "probe cannot release") {
				t.Fatalf("after a crash whose release failed: %s %q", got.State, got.LastError)
			}
			if ts.probe.held() != 1 {
				t.Fatalf("%d resources held, want the one whose release failed", ts.probe.held())
			}
			crash, _, _ := strings.Cut(got.LastError, "; then ")
			switch retry {
			case "stop":
				if err := ts.stop(ctx, got, time.Second); err != nil {
					t.Fatal(err)
				}
			case "kill":
				if err := ts.kill(ctx, got); err != nil {
					t.Fatal(err)
				}
			case "start":
				if err := ts.startVM(ctx, got); err != nil {
					t.Fatal(err)
				}
				if got.State != store.StateRunning || ts.probe.held() != 1 || ts.probe.undos != 2 {
					t.Fatalf("after start: %s, %d resources, %d releases (want running, the new boot's one, 2)", got.State, ts.probe.held(), ts.probe.undos)
				}
				if err := ts.stop(ctx, got, time.Second); err != nil {
					t.Fatal(err)
				}
				crash = ""
			case "reconcile":
				ts.reconcile(ctx)
			}
			got, _ = ts.st.GetVM(ctx, vm.ID)
			if got.State != store.StateStopped || got.LastError != crash {
				t.Fatalf("after %s: %s %q, want stopped %q", retry, got.State, got.LastError, crash)
			}
			ts.assertClean(t, got)
		})
	}
}

// A VM in the error state whose release fails again stays there, and a start
// refuses to boot over what is left.
func TestStartOfErrorVMReleasesFirst(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	vm := ts.newVM(t, "e2", store.StateStopped)
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	ts.probe.mu.Lock()
	ts.probe.releaseFails = 2
	ts.probe.mu.Unlock()
	// Under the VM lock, as the API takes it: the VMM's watcher must not
	// release the runtime at the same time.
	unlock := ts.locks.Lock(vm.ID)
	err := ts.kill(ctx, vm)
	unlock()
	if err != nil {
		t.Fatal(err)
	}
	if vm.State != store.StateError || !strings.HasPrefix(vm.LastError, "releasing its resources failed: ") {
		t.Fatalf("after kill whose release failed: %s %q", vm.State, vm.LastError)
	}
	err = ts.startVM(ctx, vm)
	if err == nil || !strings.Contains(err.Error(), "probe cannot release") {
		t.Fatalf("start over a failed release: %v, want the release's error", err)
	}
	if vm.State != store.StateError || ts.drv.live() != 0 {
		t.Fatalf("after the refused start: %s, %d VMMs", vm.State, ts.drv.live())
	}
	if err := ts.startVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if vm.State != store.StateRunning || vm.LastError != "" || ts.probe.held() != 1 {
		t.Fatalf("after start: %s %q, %d resources", vm.State, vm.LastError, ts.probe.held())
	}
}
