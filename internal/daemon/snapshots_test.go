package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
)

// snapInst is a fake VMM that can pause and save its state.
type snapInst struct {
	*fakeInst
	mu      sync.Mutex
	paused  bool
	calls   []string
	saveErr error
}

func (i *snapInst) Pause(ctx context.Context) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.calls = append(i.calls, "pause")
	i.paused = true
	return nil
}

func (i *snapInst) Resume(ctx context.Context) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.calls = append(i.calls, "resume")
	i.paused = false
	return nil
}

func (i *snapInst) SaveState(ctx context.Context, dir string) (vmm.SavedState, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.calls = append(i.calls, "save")
	if !i.paused {
		return vmm.SavedState{}, errors.New("not paused")
	}
	if i.saveErr != nil {
		return vmm.SavedState{}, i.saveErr
	}
	if err := os.WriteFile(filepath.Join(dir, "state"), []byte("memory"), 0o600); err != nil {
		return vmm.SavedState{}, err
	}
	return vmm.SavedState{Driver: "fake", Files: []string{"state"}, Bytes: 4096}, nil
}

func (i *snapInst) log() string {
	i.mu.Lock()
	defer i.mu.Unlock()
	return strings.Join(i.calls, ",")
}

// runningSnapVM starts a VM whose VMM can snapshot, with a writable disk.
func runningSnapVM(t *testing.T, ts *testSvc, name string) (*store.VM, *snapInst) {
	t.Helper()
	ctx := context.Background()
	vm := ts.newVM(t, name, store.StateStopped)
	var si *snapInst
	ts.drv.wrap = func(in *fakeInst) vmm.Instance {
		si = &snapInst{fakeInst: in}
		return si
	}
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(ts.vmDir(vm.ID), rwDiskName)
	f, err := os.Create(disk)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("written by the guest"), 1<<20)
	f.Truncate(64 << 20)
	f.Close()
	return vm, si
}

func TestSnapshotCreateListDelete(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	vm, si := runningSnapVM(t, ts, "src")

	sn, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "snap1"})
	if err != nil {
		t.Fatal(err)
	}
	if got := si.log(); got != "pause,save,resume" {
		t.Errorf("VMM calls %q, want pause,save,resume", got)
	}
	if ts.runtime(vm.ID).paused.Load() {
		t.Error("the VM stayed paused after the snapshot")
	}
	if sn.Name != "snap1" || sn.SourceVM != "src" || sn.Image != "img" || sn.Kernel != "k" || sn.StateBytes != 4096 || sn.DiskBytes <= 0 || sn.DiskBytes > 1<<20 {
		t.Errorf("snapshot record %+v", sn)
	}
	dir := ts.snapshotDir(sn.ID)
	if b, err := os.ReadFile(filepath.Join(dir, snapStateDir, "state")); err != nil || string(b) != "memory" {
		t.Errorf("saved state: %q, %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, snapDiskName)); err != nil || len(b) != 64<<20 || !strings.Contains(string(b[1<<20:1<<20+64]), "written by the guest") {
		t.Errorf("disk copy: %d bytes, %v", len(b), err)
	}
	if _, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "snap1"}); err == nil {
		t.Error("a second snapshot with the same name was made")
	}
	if _, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "Bad Name"}); err == nil {
		t.Error("an invalid snapshot name was accepted")
	}

	// A failed save resumes the VM and leaves nothing behind.
	si.saveErr = errors.New("disk full")
	if _, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "snap2"}); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("failed save: %v", err)
	}
	if ts.runtime(vm.ID).paused.Load() {
		t.Error("the VM stayed paused after a failed snapshot")
	}
	if ents, _ := os.ReadDir(ts.layout.SnapshotsDir()); len(ents) != 1 {
		t.Errorf("snapshot directories: %d, want 1", len(ents))
	}
	si.saveErr = nil

	// The image cannot be deleted from under the snapshot.
	if err := ts.st.DeleteImage(ctx, "img"); !errors.Is(err, store.ErrConflict) {
		t.Errorf("image deleted from under a snapshot: %v", err)
	}
	l, err := ts.st.ListSnapshots(ctx)
	if err != nil || len(l) != 1 {
		t.Fatalf("list: %v, %v", l, err)
	}
	if _, err := ts.snapshotDelete(ctx, api.NameRef{Name: "snap1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("snapshot files left: %v", err)
	}
	if _, err := ts.snapshotDelete(ctx, api.NameRef{Name: "snap1"}); err == nil {
		t.Error("deleted a snapshot twice")
	}

	// --stop: the VM ends stopped, its resources released.
	if _, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "last", Stop: true}); err != nil {
		t.Fatal(err)
	}
	if vm, _ = ts.st.GetVM(ctx, vm.ID); vm.State != store.StateStopped {
		t.Errorf("after snapshot --stop the VM is %s", vm.State)
	}
	ts.assertClean(t, vm)
	if _, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "stopped"}); err == nil {
		t.Error("snapshot of a stopped VM")
	}
}

func TestPauseResume(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	vm, si := runningSnapVM(t, ts, "p")
	if err := ts.pause(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := ts.pause(ctx, vm); err != nil {
		t.Fatal(err)
	}
	v := &store.VM{ID: vm.ID}
	ts.markPaused(v)
	if !v.Paused {
		t.Error("vm.get does not say paused")
	}
	if _, _, _, err := ts.runningAgent(ctx, "p"); err == nil || !strings.Contains(err.Error(), "paused") {
		t.Errorf("guest call on a paused VM: %v", err)
	}
	// A snapshot of a paused VM leaves it paused.
	if _, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "p", Name: "paused"}); err != nil {
		t.Fatal(err)
	}
	if !ts.runtime(vm.ID).paused.Load() {
		t.Error("a paused VM was resumed by a snapshot")
	}
	if err := ts.resume(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if got := si.log(); got != "pause,save,resume" {
		t.Errorf("VMM calls %q", got)
	}
	// Stopping a paused VM resumes it first, so that it can power off.
	if err := ts.pause(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := ts.stop(ctx, vm, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(si.log(), "pause,resume") {
		t.Errorf("stop of a paused VM: calls %q", si.log())
	}
	ts.assertClean(t, vm)
	if err := ts.pause(ctx, vm); err == nil {
		t.Error("paused a stopped VM")
	}
}
