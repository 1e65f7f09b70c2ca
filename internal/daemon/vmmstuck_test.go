package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/testenv"
)

// A VMM that outlives SIGKILL (stuck in the kernel, D state): the stop or
// kill that could not end it records the VM in the error state saying so,
// keeps the runtime, and every later path converges.

// stuckStopTimeout is the stop timeout of the first stop: the fake guest
// never powers off, so that stop always ends in a kill.
const stuckStopTimeout = 50 * time.Millisecond

// stuckReason is the reason the VM ends stopped with, once its VMM is gone,
// after first ("stop" or "kill") could not end it.
func stuckReason(first string) string {
	if first == "stop" {
		return fmt.Sprintf("killed after the %s stop timeout", stuckStopTimeout)
	}
	return ""
}

// stopEvents counts the vm.stopped events of VM id.
func stopEvents(ts *testSvc, id string) int {
	past, _, _ := ts.events.subscribe(false)
	n := 0
	for _, ev := range past {
		if ev.Type == api.EventVMStopped && ev.VMID == id {
			n++
		}
	}
	return n
}

// locked runs fn holding vm's lock, as the RPC handlers do (withVM): the
// VMM's watcher then cannot release the VM half-way through it.
func locked(ts *testSvc, vm *store.VM, fn func() error) error {
	unlock := ts.locks.Lock(vm.ID)
	defer unlock()
	return fn()
}

// wantStuckMessage checks that msg says that the VMM of vm (pid) did not
// end after SIGKILL, and what to do about it.
func wantStuckMessage(t *testing.T, what, msg, name string, pid int) {
	t.Helper()
	for _, want := range []string{
		"did not end after SIGKILL", fmt.Sprintf("pid %d", pid), "it did not die",
		fmt.Sprintf("ps -o pid,stat,wchan,cmd -p %d", pid),
		"banger vm kill " + name + " retries", "banger vm delete --force " + name,
	} {
		if !strings.Contains(msg, want) {
			t.Fatalf("%s does not say %q: %s", what, want, msg)
		}
	}
}

// stickVM starts a VM and ends it with first ("stop" or "kill") while its
// VMM outlives the kill, and checks what that leaves: the VM in the error
// state saying why and what to do, its runtime, tap, handles.json and VMM
// kept, no vm.stopped published, an error that says the same.
func stickVM(t *testing.T, ts *testSvc, pd *procDriver, first string) (*store.VM, *system.Process, *runtime) {
	t.Helper()
	ctx := context.Background()
	vm := ts.newVM(t, "e", store.StateStopped)
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	rt := ts.runtime(vm.ID)
	proc := pd.live(vm.ID)[0]
	pd.set(func() { pd.killFails = 1 })
	var err error
	switch first {
	case "stop":
		err = locked(ts, vm, func() error { return ts.stop(ctx, vm, stuckStopTimeout) })
	case "kill":
		err = locked(ts, vm, func() error { return ts.kill(ctx, vm) })
	}
	if err == nil {
		t.Fatalf("%s succeeded though the VMM outlived SIGKILL", first)
	}
	if !errors.Is(err, errVMMAlive) || rpc.CodeOf(err) != rpc.CodeFailedPrecondition {
		t.Fatalf("%s: error %v (code %s) does not say the VMM is alive", first, err, rpc.CodeOf(err))
	}
	wantStuckMessage(t, first+"'s error", err.Error(), vm.Name, proc.PID)
	t.Logf("%s: %v", first, err)
	got, err := ts.st.GetVM(ctx, vm.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != store.StateError {
		t.Fatalf("after a %s whose VMM outlived SIGKILL the VM is %s, want error", first, got.State)
	}
	wantStuckMessage(t, "last error", got.LastError, vm.Name, proc.PID)
	if r := endReason(got); r != stuckReason(first) {
		t.Fatalf("endReason of %q = %q, want %q", got.LastError, r, stuckReason(first))
	}
	if ts.runtime(vm.ID) != rt {
		t.Fatal("the runtime of a VMM that may still run was dropped")
	}
	if !alive(proc) || !ts.probe.has("tap-"+vm.ID) {
		t.Fatalf("VMM alive %v, tap held %v", alive(proc), ts.probe.has("tap-"+vm.ID))
	}
	if _, err := os.Stat(filepath.Join(ts.vmDir(vm.ID), handlesName)); err != nil {
		t.Fatalf("handles.json, which names the VMM, was removed: %v", err)
	}
	if n := stopEvents(ts, vm.ID); n != 0 {
		t.Fatalf("%d vm.stopped events for a VM whose VMM still runs", n)
	}
	// got, not vm: the runtime's cleanup still reads the record the start
	// was given.
	return got, proc, rt
}

func TestStopKillOutlivedBySIGKILLRecordsError(t *testing.T) {
	for _, first := range []string{"stop", "kill"} {
		t.Run(first, func(t *testing.T) {
			ts, pd, early := newProcSvc(t)
			stickVM(t, ts, pd, first)
			if e := early(); len(e) != 0 {
				t.Fatalf("released while their VMM ran: %v", e)
			}
		})
	}
}

// After a stop or kill whose VMM outlived SIGKILL, every next step
// converges: a retried kill or stop, a start, a delete, the VMM exiting by
// itself, a bangerd restart; none releases what the VMM uses while it runs,
// and none starts a second VMM on its disk.
func TestVMMOutlivingSIGKILLConverges(t *testing.T) {
	type outcome int
	const (
		stuck   outcome = iota // still error, runtime and VMM kept
		stopped                // stopped with the first op's reason, all released
		running                // started again, on a new VMM
		deleted                // record gone, all released
	)
	tests := []struct {
		next string
		// run does the next step; it returns the error of the call.
		run  func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, proc *system.Process) error
		want outcome
		code string // the error's code, "" for none
		msg  []string
	}{
		{next: "kill again, still stuck", want: stuck, code: rpc.CodeFailedPrecondition,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				pd.set(func() { pd.killFails = 1 })
				return locked(ts, vm, func() error { return ts.kill(context.Background(), vm) })
			}},
		{next: "kill again", want: stopped,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				return locked(ts, vm, func() error { return ts.kill(context.Background(), vm) })
			}},
		// The retried stop goes straight to the kill: with an hour's
		// timeout it would otherwise wait for the (context's) deadline and
		// end "killed after the 1h0m0s stop timeout".
		{next: "stop again, still stuck", want: stuck, code: rpc.CodeFailedPrecondition,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				pd.set(func() { pd.killFails = 1 })
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				return locked(ts, vm, func() error { return ts.stop(ctx, vm, time.Hour) })
			}},
		{next: "stop again", want: stopped,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				return locked(ts, vm, func() error { return ts.stop(ctx, vm, time.Hour) })
			}},
		{next: "start, still stuck", want: stuck, code: rpc.CodeFailedPrecondition, msg: []string{"was not started", "a second VMM on its writable disk"},
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				pd.set(func() { pd.killFails = 1 })
				return locked(ts, vm, func() error { return ts.startVM(context.Background(), vm) })
			}},
		{next: "start", want: running,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				return locked(ts, vm, func() error { return ts.startVM(context.Background(), vm) })
			}},
		{next: "delete --force, still stuck", want: stuck, code: rpc.CodeFailedPrecondition, msg: []string{"was not deleted", "leave that VMM behind"},
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				pd.set(func() { pd.killFails = 1 })
				return locked(ts, vm, func() error { return ts.delete(context.Background(), vm, true) })
			}},
		{next: "delete without --force", want: stuck, code: rpc.CodeConflict, msg: []string{"--force"},
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				return locked(ts, vm, func() error { return ts.delete(context.Background(), vm, false) })
			}},
		{next: "delete --force", want: deleted,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, _ *system.Process) error {
				return locked(ts, vm, func() error { return ts.delete(context.Background(), vm, true) })
			}},
		// The VMM finally exits: its watcher releases the runtime.
		{next: "VMM exits", want: stopped,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, proc *system.Process) error {
				if err := proc.KillAndWait(context.Background()); err != nil {
					t.Fatal(err)
				}
				testenv.WaitFor(t, 10*time.Second, "the watcher releases the VM", func() bool { return ts.runtime(vm.ID) == nil })
				unlock := ts.locks.Lock(vm.ID) // the release is done
				unlock()
				return nil
			}},
		// ... and that release fails: the VM is in the (release-failed)
		// error state, and the next kill releases it from the record.
		{next: "VMM exits, its release fails, kill", want: stopped,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, proc *system.Process) error {
				ts.probe.mu.Lock()
				ts.probe.releaseFails = 1
				ts.probe.mu.Unlock()
				if err := proc.KillAndWait(context.Background()); err != nil {
					t.Fatal(err)
				}
				testenv.WaitFor(t, 10*time.Second, "the watcher releases the VM", func() bool { return ts.runtime(vm.ID) == nil })
				unlock := ts.locks.Lock(vm.ID)
				got, err := ts.st.GetVM(context.Background(), vm.ID)
				unlock()
				if err != nil {
					t.Fatal(err)
				}
				if got.State != store.StateError || !strings.Contains(got.LastError, releaseFailed) || strings.Contains(got.LastError, vmmStuck) {
					t.Fatalf("after a failed release: %s %q", got.State, got.LastError)
				}
				*vm = *got
				return locked(ts, vm, func() error { return ts.kill(context.Background(), vm) })
			}},
		// bangerd restarts: the runtime is gone, the record says error.
		{next: "bangerd restart, VMM gone", want: stopped,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, proc *system.Process) error {
				ts.forgetRuntime(vm.ID, ts.runtime(vm.ID))
				if err := proc.KillAndWait(context.Background()); err != nil {
					t.Fatal(err)
				}
				ts.reconcile(context.Background())
				return nil
			}},
		{next: "bangerd restart, VMM ends", want: stopped,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, proc *system.Process) error {
				ts.forgetRuntime(vm.ID, ts.runtime(vm.ID))
				ts.reconcile(context.Background())
				return nil
			}},
		// Still stuck at the restart: kept in error (the fake VMM dies at
		// the stray sweep that follows; a stuck one would not), and the
		// next kill releases it from the record.
		{next: "bangerd restart, still stuck, kill", want: stopped,
			run: func(t *testing.T, ts *testSvc, pd *procDriver, vm *store.VM, proc *system.Process) error {
				ts.forgetRuntime(vm.ID, ts.runtime(vm.ID))
				pd.set(func() { pd.killFails = 2 }) // reconcile's kill, the release's gate
				ts.reconcile(context.Background())
				got, err := ts.st.GetVM(context.Background(), vm.ID)
				if err != nil {
					t.Fatal(err)
				}
				if got.State != store.StateError || !strings.Contains(got.LastError, "still running") || !ts.probe.has("tap-"+vm.ID) {
					t.Fatalf("after a restart that could not end the VMM: %s %q, tap held %v", got.State, got.LastError, ts.probe.has("tap-"+vm.ID))
				}
				*vm = *got
				return locked(ts, vm, func() error { return ts.kill(context.Background(), vm) })
			}},
	}
	for _, first := range []string{"stop", "kill"} {
		for _, tt := range tests {
			t.Run(first+"/"+tt.next, func(t *testing.T) {
				ts, pd, early := newProcSvc(t)
				ctx := context.Background()
				vm, proc, rt := stickVM(t, ts, pd, first)
				err := tt.run(t, ts, pd, vm, proc)
				if rpc.CodeOf(err) != tt.code {
					t.Fatalf("%s: error %v (code %q), want code %q", tt.next, err, rpc.CodeOf(err), tt.code)
				}
				if err != nil {
					t.Logf("%s: %v", tt.next, err)
					for _, want := range tt.msg {
						if !strings.Contains(err.Error(), want) {
							t.Fatalf("%s: error does not say %q: %v", tt.next, want, err)
						}
					}
				}
				pd.noOverlap(t, early)
				got, gerr := ts.st.GetVM(ctx, vm.ID)
				switch tt.want {
				case stuck:
					if gerr != nil {
						t.Fatal(gerr)
					}
					if got.State != store.StateError || ts.runtime(vm.ID) != rt || !alive(proc) || !ts.probe.has("tap-"+vm.ID) {
						t.Fatalf("after %s: %s, runtime kept %v, VMM alive %v, tap held %v", tt.next, got.State, ts.runtime(vm.ID) == rt, alive(proc), ts.probe.has("tap-"+vm.ID))
					}
					wantStuckMessage(t, "last error", got.LastError, vm.Name, proc.PID)
					if r := endReason(got); r != stuckReason(first) {
						t.Fatalf("the reason of the %s was lost: %q", first, got.LastError)
					}
					if len(pd.all(vm.ID)) != 1 {
						t.Fatalf("%d VMMs started", len(pd.all(vm.ID)))
					}
					if n := stopEvents(ts, vm.ID); n != 0 {
						t.Fatalf("%d vm.stopped events", n)
					}
				case stopped:
					if gerr != nil {
						t.Fatal(gerr)
					}
					if got.State != store.StateStopped || got.LastError != stuckReason(first) {
						t.Fatalf("after %s: %s %q, want stopped %q", tt.next, got.State, got.LastError, stuckReason(first))
					}
					if alive(proc) || ts.runtime(vm.ID) != nil || ts.probe.held() != 0 {
						t.Fatalf("after %s: VMM alive %v, runtime %v, %d taps", tt.next, alive(proc), ts.runtime(vm.ID) != nil, ts.probe.held())
					}
					if _, err := os.Stat(filepath.Join(ts.vmDir(vm.ID), handlesName)); !errors.Is(err, os.ErrNotExist) {
						t.Fatalf("handles.json left: %v", err)
					}
					// A restarted bangerd's subscribers saw no vm.stopped of
					// it; a release from its record publishes none.
					if n := stopEvents(ts, vm.ID); n != 1 && !strings.HasPrefix(tt.next, "bangerd restart") {
						t.Fatalf("%d vm.stopped events, want 1", n)
					}
				case running:
					if gerr != nil {
						t.Fatal(gerr)
					}
					if got.State != store.StateRunning || got.LastError != "" || alive(proc) || len(pd.live(vm.ID)) != 1 || ts.runtime(vm.ID) == rt {
						t.Fatalf("after %s: %s %q, old VMM alive %v, %d VMMs", tt.next, got.State, got.LastError, alive(proc), len(pd.live(vm.ID)))
					}
					// The old runtime was released (its agent connection
					// closed, vm.stopped published), not just replaced.
					if n := ts.closed.get(); n != 1 {
						t.Fatalf("%d agent connections closed, want the old runtime's", n)
					}
					if n := stopEvents(ts, vm.ID); n != 1 {
						t.Fatalf("%d vm.stopped events, want 1", n)
					}
				case deleted:
					if !errors.Is(gerr, store.ErrNotFound) {
						t.Fatalf("record after %s: %v", tt.next, gerr)
					}
					if alive(proc) || ts.runtime(vm.ID) != nil || ts.probe.held() != 0 {
						t.Fatalf("after %s: VMM alive %v, runtime %v, %d taps", tt.next, alive(proc), ts.runtime(vm.ID) != nil, ts.probe.held())
					}
				}
			})
		}
	}
}
