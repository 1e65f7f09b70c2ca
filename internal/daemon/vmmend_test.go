package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// fakeVMMEnv makes the test binary a fake VMM (TestMain): a process that
// does nothing until it is signalled, or its stdin closes (the test died).
const fakeVMMEnv = "BANGER_TEST_FAKE_VMM"

// fakeVMMArg0 is the fake VMM's argv[0]: a name findVMMs takes for a VMM.
const fakeVMMArg0 = "qemu-system-bangertest"

func TestMain(m *testing.M) {
	if os.Getenv(fakeVMMEnv) != "" {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// ---- procDriver: a driver whose VMMs are real processes ----

// procDriver starts fake VMM processes whose command line names the VM's
// API socket (like QEMU's), adopts and ends them with vmmproc's identity
// checks, and can be told to fail kills, adoptions and ends.
type procDriver struct {
	t *testing.T

	mu        sync.Mutex
	killFails int   // the next instance Kills that fail, the VMM left running
	endFails  int   // the next Ends that fail, the VMM left running
	adoptErr  error // Adopt fails with it though the VMM runs
	procs     map[string][]*system.Process
	overlap   []string // VMs that got a VMM while one of theirs still ran
}

func newProcDriver(t *testing.T) *procDriver {
	return &procDriver{t: t, procs: map[string][]*system.Process{}}
}

func (d *procDriver) Name() string                        { return "fake" }
func (d *procDriver) Preflight(ctx context.Context) error { return nil }
func (d *procDriver) Capabilities() vmm.Capabilities {
	return vmm.Capabilities{Vsock: true, GracefulStop: true}
}

func (d *procDriver) Start(ctx context.Context, cfg vmm.MachineConfig) (vmm.Instance, error) {
	for _, p := range d.all(cfg.VMID) {
		if system.SameProcess(p.PID, p.StartTime) {
			d.mu.Lock()
			d.overlap = append(d.overlap, cfg.VMID)
			d.mu.Unlock()
		}
	}
	proc, h, err := startFakeVMM(d.t, cfg.VMID, cfg.Dir)
	if err != nil {
		return nil, err
	}
	h.Channel = vmm.GuestChannel{Kind: vmm.ChannelVsock, CID: 3, Port: cfg.GuestPort}
	d.mu.Lock()
	d.procs[cfg.VMID] = append(d.procs[cfg.VMID], proc)
	d.mu.Unlock()
	if cfg.Spawned != nil {
		cfg.Spawned(h)
	}
	return d.watch(h, proc, false), nil
}

// startFakeVMM starts a fake VMM for VM id with its sockets in dir.
func startFakeVMM(t *testing.T, id, dir string) (*system.Process, vmm.Handles, error) {
	sock := filepath.Join(dir, "api.sock")
	cmd := exec.Command(os.Args[0])
	cmd.Args = []string{fakeVMMArg0, "-name", "guest=banger-" + id, "-qmp", sock}
	cmd.Env = append(os.Environ(), fakeVMMEnv+"=1")
	r, w, err := os.Pipe()
	if err != nil {
		return nil, vmm.Handles{}, err
	}
	cmd.Stdin = r
	proc, err := system.StartDetached(cmd)
	r.Close()
	if err != nil {
		w.Close()
		return nil, vmm.Handles{}, err
	}
	t.Cleanup(func() {
		proc.KillAndWait(context.Background())
		w.Close()
	})
	return proc, vmm.Handles{Driver: "fake", VMID: id, PID: proc.PID, StartTime: proc.StartTime, APISocket: sock}, nil
}

// matchFakeVMM is the fake VMM's command line check (vmmproc.Match).
func matchFakeVMM(h vmm.Handles) vmmproc.Match {
	return func(argv []string) (string, error) {
		if len(argv) != 5 || argv[0] != fakeVMMArg0 || argv[4] != h.APISocket {
			return "", fmt.Errorf("not the fake VMM serving %s", h.APISocket)
		}
		return strings.TrimPrefix(argv[2], "guest=banger-"), nil
	}
}

func (d *procDriver) watch(h vmm.Handles, proc *system.Process, adopted bool) vmm.Instance {
	return &procInst{Proc: vmmproc.Watch(vmmproc.Config{Name: "fakevmm", Handles: h, Proc: proc, Adopted: adopted,
		Log: logging.Discard(), Sockets: []string{h.APISocket}}), d: d}
}

func (d *procDriver) Adopt(ctx context.Context, h vmm.Handles) (vmm.Instance, error) {
	d.mu.Lock()
	aerr := d.adoptErr
	d.mu.Unlock()
	if aerr != nil {
		return nil, aerr
	}
	proc, err := vmmproc.AdoptProcess(h, "fake", matchFakeVMM(h))
	if err != nil {
		return nil, err
	}
	return d.watch(h, proc, true), nil
}

// End implements vmmEnder, like the qemu and firecracker drivers.
func (d *procDriver) End(ctx context.Context, h vmm.Handles, grace time.Duration) error {
	if d.take(&d.endFails) {
		return fmt.Errorf("injected: fakevmm pid %d: %w", h.PID, vmmproc.ErrStillRunning)
	}
	return vmmproc.End(ctx, h, "fakevmm", matchFakeVMM(h), grace)
}

func (d *procDriver) take(n *int) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if *n > 0 {
		*n--
		return true
	}
	return false
}

func (d *procDriver) set(f func()) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f()
}

func (d *procDriver) all(id string) []*system.Process {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*system.Process(nil), d.procs[id]...)
}

// live returns the VMMs of VM id that still run.
func (d *procDriver) live(id string) []*system.Process {
	var out []*system.Process
	for _, p := range d.all(id) {
		if system.SameProcess(p.PID, p.StartTime) {
			out = append(out, p)
		}
	}
	return out
}

type procInst struct {
	*vmmproc.Proc
	d *procDriver
}

// Kill fails while the driver says so, leaving the VMM running (a VMM that
// did not die, a kill that returned an error).
func (i *procInst) Kill(ctx context.Context) error {
	if i.d.take(&i.d.killFails) {
		return fmt.Errorf("injected: kill fakevmm (pid %d): it did not die", i.Handles().PID)
	}
	return i.Proc.Kill(ctx)
}
func (i *procInst) Shutdown(ctx context.Context) error { return nil }
func (i *procInst) State(ctx context.Context) (vmm.State, error) {
	if i.HasExited() {
		return vmm.StateExited, nil
	}
	return vmm.StateRunning, nil
}

// startDecoy starts `sleep 60`: a process that is not a VMM.
func startDecoy(t *testing.T) *system.Process {
	t.Helper()
	proc, err := system.StartDetached(exec.Command("sleep", "60"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.KillAndWait(context.Background()) })
	return proc
}

func (p *probeCap) has(name string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.resources[name]
}

func alive(p *system.Process) bool { return system.SameProcess(p.PID, p.StartTime) }

// noOverlap fails t if a VM's resources were released while its VMM ran
// (early, newProcSvc's probe) or a VM got a second VMM while one ran.
func (p *procDriver) noOverlap(t *testing.T, early func() []string) {
	t.Helper()
	if e := early(); len(e) != 0 {
		t.Fatalf("released while their VMM ran: %v", e)
	}
	p.mu.Lock()
	overlap := p.overlap
	p.mu.Unlock()
	if len(overlap) != 0 {
		t.Fatalf("a VMM was started while one of the same VM ran: %v", overlap)
	}
}

// newProcSvc is newTestSvc with a procDriver, and a probe that records any
// tap released while its VM's VMM still ran.
func newProcSvc(t *testing.T) (*testSvc, *procDriver, func() []string) {
	ts := newTestSvc(t)
	pd := newProcDriver(t)
	ts.drivers["fake"] = pd
	ts.vmmGrace = 5 * time.Second
	var mu sync.Mutex
	var early []string
	ts.probe.onRelease = func(name string) {
		id := strings.TrimPrefix(name, "tap-")
		if len(pd.live(id)) > 0 {
			mu.Lock()
			early = append(early, name)
			mu.Unlock()
		}
	}
	// The fake VMMs are killed by cleanups registered later, which run
	// first; their watchers then release the VMs, writing into the VM
	// directories. Wait for those releases before the temporary directory
	// is removed (it failed with "directory not empty" otherwise).
	t.Cleanup(func() {
		vms, err := ts.st.ListVMs(context.Background())
		if err != nil {
			return
		}
		deadline := time.Now().Add(10 * time.Second)
		for _, vm := range vms {
			for ts.runtime(vm.ID) != nil && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			unlock := ts.locks.Lock(vm.ID) // a release in flight holds it
			unlock()
		}
	})
	return ts, pd, func() []string { mu.Lock(); defer mu.Unlock(); return append([]string(nil), early...) }
}

// failStartLeavingVMM boots vm with a guest agent that never answers and a
// VMM kill that fails, so the failed start's release leaves the VMM running:
// the VM ends in the error state, its tap and handles.json kept.
func failStartLeavingVMM(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM) *system.Process {
	t.Helper()
	ctx := context.Background()
	pd.set(func() { pd.killFails = 1 })
	ts.ping = errors.New("agent says no")
	err := ts.start(ctx, vm, nil)
	ts.ping = nil
	if err == nil {
		t.Fatal("start succeeded")
	}
	live := pd.live(vm.ID)
	if len(live) != 1 {
		t.Fatalf("%d VMMs of %s run, want the one whose kill failed", len(live), vm.Name)
	}
	got, _ := ts.st.GetVM(ctx, vm.ID)
	if got.State != store.StateError || !strings.Contains(got.LastError, "still running") || !strings.Contains(got.LastError, "did not die") {
		t.Fatalf("after a start whose VMM kill failed: %s %q", got.State, got.LastError)
	}
	if !ts.probe.has("tap-" + vm.ID) {
		t.Fatal("the tap was released while the VMM still ran")
	}
	if _, err := os.Stat(filepath.Join(ts.vmDir(vm.ID), handlesName)); err != nil {
		t.Fatalf("handles.json, which names the VMM, was removed: %v", err)
	}
	if ts.runtime(vm.ID) != nil {
		t.Fatal("runtime kept")
	}
	*vm = *got
	return live[0]
}

// A VM left in the error state by a VMM kill that failed: every retry ends
// that VMM (and only it) before releasing anything, and a start boots only
// once it is gone, so its disk never has two VMMs.
func TestErrorVMWithLiveVMMIsEndedFirst(t *testing.T) {
	for _, retry := range []string{"start", "stop", "kill", "delete", "reconcile"} {
		for _, handles := range []string{"recorded", "lost"} {
			t.Run(retry+"/handles "+handles, func(t *testing.T) {
				ts, pd, early := newProcSvc(t)
				ctx := context.Background()
				// A bystander: another VM's VMM, running.
				other := ts.newVM(t, "other", store.StateStopped)
				if err := ts.start(ctx, other, nil); err != nil {
					t.Fatal(err)
				}
				decoy := startDecoy(t)
				vm := ts.newVM(t, "e", store.StateStopped)
				first := failStartLeavingVMM(t, ts, pd, vm)
				if handles == "lost" {
					// e.g. a bangerd that died before writing it: the VMM is
					// found in /proc by its command line.
					os.Remove(filepath.Join(ts.vmDir(vm.ID), handlesName))
				}
				var err error
				switch retry {
				case "start":
					err = ts.startVM(ctx, vm)
				case "stop":
					err = ts.stop(ctx, vm, time.Second)
				case "kill":
					err = ts.kill(ctx, vm)
				case "delete":
					err = ts.delete(ctx, vm, false)
				case "reconcile":
					ts.reconcile(ctx)
				}
				if err != nil {
					t.Fatalf("%s: %v", retry, err)
				}
				if alive(first) {
					t.Fatalf("%s left the VMM of the failed start running", retry)
				}
				pd.noOverlap(t, early)
				if !alive(decoy) {
					t.Fatal("a process that is no VMM was ended")
				}
				if len(pd.live(other.ID)) != 1 {
					t.Fatal("another VM's VMM was ended")
				}
				got, err := ts.st.GetVM(ctx, vm.ID)
				switch {
				case retry == "delete":
					if !errors.Is(err, store.ErrNotFound) {
						t.Fatalf("record after delete: %v", err)
					}
				case retry == "start":
					if got.State != store.StateRunning || len(pd.live(vm.ID)) != 1 {
						t.Fatalf("after start: %s, %d VMMs", got.State, len(pd.live(vm.ID)))
					}
				default:
					if got.State != store.StateStopped || !strings.Contains(got.LastError, "agent says no") {
						t.Fatalf("after %s: %s %q, want stopped with the start's error", retry, got.State, got.LastError)
					}
				}
				if n := ts.probe.held(); n != map[bool]int{true: 2, false: 1}[retry == "start"] {
					t.Fatalf("%d taps held after %s", n, retry)
				}
			})
		}
	}
}

// While the VMM of its last boot cannot be ended, a VM in the error state is
// neither started (a second VMM on its disk) nor deleted (its VMM left
// behind), and the error says why and what to do.
func TestStartRefusesWhileLastVMMLives(t *testing.T) {
	ts, pd, early := newProcSvc(t)
	ctx := context.Background()
	vm := ts.newVM(t, "e", store.StateStopped)
	first := failStartLeavingVMM(t, ts, pd, vm)
	pd.set(func() { pd.endFails = 2 })
	err := ts.startVM(ctx, vm)
	if err == nil || rpc.CodeOf(err) != rpc.CodeFailedPrecondition || !strings.Contains(err.Error(), "still running") ||
		!strings.Contains(err.Error(), "banger vm start e") {
		t.Fatalf("start while the last VMM runs: %v", err)
	}
	t.Logf("start refused: %v", err)
	if len(pd.all(vm.ID)) != 1 || !alive(first) {
		t.Fatalf("%d VMMs started for the VM, want only the first", len(pd.all(vm.ID)))
	}
	if vm.State != store.StateError || !ts.probe.has("tap-"+vm.ID) {
		t.Fatalf("after the refused start: %s, tap held %v", vm.State, ts.probe.has("tap-"+vm.ID))
	}
	err = ts.delete(ctx, vm, false)
	if err == nil || !strings.Contains(err.Error(), "still running") {
		t.Fatalf("delete while the VMM runs: %v", err)
	}
	if _, err := ts.st.GetVM(ctx, vm.ID); err != nil {
		t.Fatalf("the record naming the VMM was removed: %v", err)
	}
	if err := ts.startVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if alive(first) || len(pd.live(vm.ID)) != 1 || vm.State != store.StateRunning {
		t.Fatalf("after start: first alive %v, %d VMMs, %s", alive(first), len(pd.live(vm.ID)), vm.State)
	}
	if e := early(); len(e) != 0 {
		t.Fatalf("released while their VMM ran: %v", e)
	}
}

// bangerd restarted and finds a VM recorded running whose VMM still runs
// but cannot be adopted: reconcile ends it before releasing its tap.
func TestReconcileEndsUnadoptableVMM(t *testing.T) {
	ts, pd, early := newProcSvc(t)
	ctx := context.Background()
	decoy := startDecoy(t)
	vm := ts.newVM(t, "r", store.StateStopped)
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	first := pd.live(vm.ID)[0]
	// The bangerd that started it is gone: drop the runtime, not the VMM.
	ts.forgetRuntime(vm.ID, ts.runtime(vm.ID))
	pd.set(func() { pd.adoptErr = fmt.Errorf("qemu pid %d reports shutdown: %w", first.PID, vmm.ErrGone) })
	ts.reconcile(ctx)
	if alive(first) {
		t.Fatal("reconcile left the unadoptable VMM running")
	}
	if e := early(); len(e) != 0 {
		t.Fatalf("released while their VMM ran: %v", e)
	}
	if !alive(decoy) {
		t.Fatal("a process that is no VMM was ended")
	}
	got, _ := ts.st.GetVM(ctx, vm.ID)
	if got.State != store.StateStopped || ts.probe.held() != 0 {
		t.Fatalf("after reconcile: %s %q, %d taps", got.State, got.LastError, ts.probe.held())
	}
}

// The release from the record ends only a process that is provably the VM's
// VMM: a PID now used by another program, another VM's VMM, or the VMM's PID
// with another start time are left alone, and the VM still ends stopped.
func TestRecordedReleaseLeavesOtherProcesses(t *testing.T) {
	for _, tc := range []string{"pid reused by another program", "another VM's VMM", "another start time"} {
		t.Run(tc, func(t *testing.T) {
			ts, pd, _ := newProcSvc(t)
			ctx := context.Background()
			other := ts.newVM(t, "other", store.StateStopped)
			if err := ts.start(ctx, other, nil); err != nil {
				t.Fatal(err)
			}
			otherVMM := pd.live(other.ID)[0]
			decoy := startDecoy(t)
			vm := ts.newVM(t, "e", store.StateError)
			dir := ts.vmDir(vm.ID)
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			h := vmm.Handles{Driver: "fake", VMID: vm.ID, APISocket: filepath.Join(dir, "api.sock")}
			target := decoy
			switch tc {
			case "pid reused by another program":
				h.PID, h.StartTime = decoy.PID, decoy.StartTime
			case "another VM's VMM":
				h.PID, h.StartTime, target = otherVMM.PID, otherVMM.StartTime, otherVMM
			case "another start time":
				h.PID, h.StartTime, target = otherVMM.PID, otherVMM.StartTime+1, otherVMM
			}
			if err := writeJSONAtomic(filepath.Join(dir, handlesName), h); err != nil {
				t.Fatal(err)
			}
			if err := ts.stop(ctx, vm, time.Second); err != nil {
				t.Fatal(err)
			}
			if !alive(target) || !alive(decoy) || !alive(otherVMM) {
				t.Fatal("a process that is not the VM's VMM was ended")
			}
			if vm.State != store.StateStopped {
				t.Fatalf("after stop: %s %q", vm.State, vm.LastError)
			}
		})
	}
}
