package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	agentapi "github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/guest"
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
	// As bangerd does, with the VM's lock held (else the VMM's watcher may
	// release the runtime at the same time, and stop return mid-release).
	if err := locked(ts, vm, func() error { return ts.stop(ctx, vm, 5*time.Second) }); err != nil {
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

// Restore makes the fake driver a vmm.Restorer: a restored VMM is a new one.
func (d *fakeDriver) Restore(ctx context.Context, cfg vmm.MachineConfig, dir string) (vmm.Instance, error) {
	if _, err := os.Stat(filepath.Join(dir, "state")); err != nil {
		return nil, fmt.Errorf("no saved state: %w", err)
	}
	return d.Start(ctx, cfg)
}

// reidAgent records the host key it was made with and the identities it gave.
type reidAgent struct {
	*fakeAgent
	hostKey string
	bulkKey []byte
	log     *reidLog
}

type reidLog struct {
	mu    sync.Mutex
	calls []reidCall
	execs [][]string
	made  int           // agent clients made
	gate  chan struct{} // when set, Exec waits for it to close
}

// Exec records the command (the pool's warm-up).
func (a *reidAgent) Exec(ctx context.Context, cmd []string, stdin io.Reader, stdout, stderr io.Writer, opts guest.ExecOptions) (int, error) {
	a.log.mu.Lock()
	gate := a.log.gate
	a.log.execs = append(a.log.execs, cmd)
	a.log.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	return 0, nil
}

type reidCall struct {
	hostKey string
	bulkKey []byte
	p       agentapi.Reidentify
}

func (a *reidAgent) Reidentify(ctx context.Context, p agentapi.Reidentify) error {
	a.log.mu.Lock()
	defer a.log.mu.Unlock()
	a.log.calls = append(a.log.calls, reidCall{a.hostKey, a.bulkKey, p})
	return nil
}

// logReidentify makes every agent ts connects to record its reidentify
// calls (and execs) in the returned log.
func (ts *testSvc) logReidentify() *reidLog {
	rl := &reidLog{}
	base := ts.newAgent
	ts.newAgent = func(tr *guest.Transport, hostKey string, bulkKey []byte) (guestAgent, error) {
		a, err := base(tr, hostKey, bulkKey)
		if err != nil {
			return nil, err
		}
		rl.mu.Lock()
		rl.made++
		rl.mu.Unlock()
		return &reidAgent{fakeAgent: a.(*fakeAgent), hostKey: hostKey, bulkKey: bulkKey, log: rl}, nil
	}
	return rl
}

// snapshotCapable gives ts's fake VMMs snapshots and each VM a writable disk.
func (ts *testSvc) snapshotCapable() {
	ts.drv.wrap = func(in *fakeInst) vmm.Instance {
		os.WriteFile(filepath.Join(ts.vmDir(in.h.VMID), rwDiskName), []byte("disk"), 0o600)
		return &snapInst{fakeInst: in}
	}
}

func TestForkRestoresAndReidentifies(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	src, _ := runningSnapVM(t, ts, "src")
	rl := ts.logReidentify()
	srcKey, err := hostKeyPub(ts.vmDir(src.ID))
	if err != nil {
		t.Fatal(err)
	}
	res, err := ts.fork(ctx, api.ForkParams{VM: "src", Count: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.VMs) != 2 || res.VMs[0].Name != "src-fork-1" || res.VMs[1].Name != "src-fork-2" {
		t.Fatalf("fork result %+v", res)
	}
	if len(rl.calls) != 2 {
		t.Fatalf("%d reidentify calls, want 2", len(rl.calls))
	}
	// the client that reidentified a clone is its agent client from then
	// on: the wait for the agent reuses its stream, no second connection
	if rl.made != 2 {
		t.Errorf("%d agent clients made for 2 clones, want 2", rl.made)
	}
	seen := map[string]bool{}
	for i, c := range rl.calls {
		clone := res.VMs[i]
		if c.hostKey != srcKey {
			t.Errorf("clone %d was reached with host key %q, want the source's", i, c.hostKey)
		}
		newKey, _ := hostKeyPub(ts.vmDir(clone.ID))
		if newKey == srcKey || !strings.Contains(c.p.HostKey, "PRIVATE KEY") {
			t.Errorf("clone %d keeps the source's host key", i)
		}
		if c.p.Hostname != clone.Name || len(c.p.MachineID) != 32 || len(c.p.RNGSeed) == 0 || c.p.TimeUnixNano == 0 {
			t.Errorf("clone %d identity %+v", i, c.p)
		}
		if seen[c.p.MachineID] {
			t.Errorf("machine-id %s given twice", c.p.MachineID)
		}
		seen[c.p.MachineID] = true
		// the clone's bulk key, not the source's that its memory holds
		srcBulk, _ := bulkKey(ts.vmDir(src.ID))
		// reached with the source's bulk key (a control stream, no SSH
		// handshake), recorded in the snapshot
		if len(srcBulk) == 0 || !bytes.Equal(c.bulkKey, srcBulk) {
			t.Errorf("clone %d was reached with bulk key %x, want the source's %x", i, c.bulkKey, srcBulk)
		}
		if bk, err := bulkKey(ts.vmDir(clone.ID)); err != nil || !bytes.Equal(c.p.BulkKey, bk) || bytes.Equal(bk, srcBulk) {
			t.Errorf("clone %d was given bulk key %x, its own is %x (%v), the source's %x", i, c.p.BulkKey, bk, err, srcBulk)
		}
		got, _ := ts.st.GetVM(ctx, clone.ID)
		if got.State != store.StateRunning || got.MemoryMiB != src.MemoryMiB || got.ImageID != src.ImageID {
			t.Errorf("clone %d record %+v", i, got)
		}
		if _, err := os.Stat(filepath.Join(ts.vmDir(clone.ID), rwDiskName)); err != nil {
			t.Errorf("clone %d has no disk copy: %v", i, err)
		}
	}
	// The fork's snapshot is gone; its image is free again once the VMs are.
	if l, _ := ts.st.ListSnapshots(ctx); len(l) != 0 {
		t.Errorf("fork left snapshots: %v", l)
	}
	if ents, _ := os.ReadDir(ts.layout.SnapshotsDir()); len(ents) != 0 {
		t.Errorf("fork left snapshot files: %d", len(ents))
	}
	if _, err := ts.fork(ctx, api.ForkParams{VM: "src", Count: 2}); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("fork over existing names: %v", err)
	}
	if _, err := ts.fork(ctx, api.ForkParams{VM: "src", Count: 99}); err == nil {
		t.Error("fork of 99 clones accepted")
	}

	// vm create --snapshot: the async create path, with its stages.
	sn, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "base"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.createBegin(ctx, api.CreateParams{Name: "x", Snapshot: "base", MemoryMiB: 1024}); err == nil {
		t.Error("create from a snapshot with a memory size accepted")
	}
	st, err := ts.createBegin(ctx, api.CreateParams{Name: "from-base", Snapshot: sn.Name})
	if err != nil {
		t.Fatal(err)
	}
	op := ts.waitCreate(t, st.OpID, 10*time.Second)
	fin := op.snapshot()
	if fin.Error != "" {
		t.Fatalf("create from a snapshot: %s", fin.Error)
	}
	var stages []string
	for _, s := range fin.Stages {
		stages = append(stages, s.Name)
	}
	if got := strings.Join(stages, ","); got != "check,copy disk,prepare host,configure,restore,reidentify,wait for agent" {
		t.Errorf("stages %s", got)
	}
	// The source can go; the clone stays.
	if err := ts.delete(ctx, src, true); err != nil {
		t.Fatal(err)
	}
	if got, _ := ts.st.FindVM(ctx, "from-base"); got == nil || got.State != store.StateRunning {
		t.Errorf("clone after the source was deleted: %+v", got)
	}
}

// banger run: the first create of a spec boots cold and saves the spec's
// base snapshot; the next one restores it; a dropped base is made again.
func TestRunBaseSnapshot(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	ts.snapshotCapable()
	rl := ts.logReidentify()
	create := func(name string) []string {
		t.Helper()
		st, err := ts.createBegin(ctx, api.CreateParams{Name: name, Image: "img", Kernel: "k", MemoryMiB: 256, DiskMiB: 256, Base: true})
		if err != nil {
			t.Fatal(err)
		}
		op := ts.waitCreate(t, st.OpID, 10*time.Second)
		fin := op.snapshot()
		if fin.Error != "" {
			t.Fatalf("create %s: %s", name, fin.Error)
		}
		var names []string
		for _, s := range fin.Stages {
			names = append(names, s.Name)
		}
		return names
	}
	first := strings.Join(create("one"), ",")
	if !strings.Contains(first, "boot") || !strings.HasSuffix(first, "save base snapshot") {
		t.Fatalf("first run stages: %s", first)
	}
	// the source ran a command before its base was saved (warmBeforeBase)
	rl.mu.Lock()
	execs := slices.Clone(rl.execs)
	rl.mu.Unlock()
	if len(execs) != 1 || strings.Join(execs[0], " ") != "true" {
		t.Fatalf("commands run before the base snapshot: %q", execs)
	}
	l, _ := ts.st.ListSnapshots(ctx)
	if len(l) != 1 || !strings.HasPrefix(l[0].Name, basePrefix) {
		t.Fatalf("snapshots after the first run: %+v", l)
	}
	second := strings.Join(create("two"), ",")
	if !strings.Contains(second, "restore") || strings.Contains(second, "save base") {
		t.Fatalf("second run stages: %s", second)
	}
	if len(rl.calls) != 1 || rl.calls[0].p.Hostname != "two" {
		t.Fatalf("reidentify calls %+v", rl.calls)
	}
	// Another spec (memory) has its own base.
	if _, err := ts.createBegin(ctx, api.CreateParams{Name: "three", Image: "img", Kernel: "k", MemoryMiB: 512, DiskMiB: 256, Base: true}); err != nil {
		t.Fatal(err)
	}
	// Deleting the image's base snapshots frees it (they are caches).
	waitForOps(t, ts)
	ts.dropBases(ctx, func(sn *store.Snapshot) bool { return sn.ImageID == "img" })
	if l, _ := ts.st.ListSnapshots(ctx); len(l) != 0 {
		t.Fatalf("bases left: %+v", l)
	}
}

// waitForOps waits until every create operation has finished.
func waitForOps(t *testing.T, ts *testSvc) {
	t.Helper()
	ts.mu.Lock()
	var ops []*createOp
	for _, op := range ts.creates {
		ops = append(ops, op)
	}
	ts.mu.Unlock()
	for _, op := range ops {
		select {
		case <-op.done:
		case <-time.After(10 * time.Second):
			t.Fatal("create did not finish")
		}
	}
}

// The ready pool: set fills it (hidden from vm ls), a run of the same spec
// takes a VM from it (renamed, told its hostname), and it refills; the
// memory budget stops it with a note.
func TestReadyPool(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	ts.snapshotCapable()
	rl := ts.logReidentify()
	ts.pool = newReadyPool(ts.layout.DataDir, nil, 600)
	spec := api.PoolSpec{Image: "img", Kernel: "k", MemoryMiB: 256, DiskMiB: 256, Size: 2}
	if _, err := ts.poolSet(ctx, spec); err != nil {
		t.Fatal(err)
	}
	ts.poolRefill(ctx)
	pools, _ := ts.poolList(ctx, struct{}{})
	if len(pools) != 1 || pools[0].Ready != 2 {
		t.Fatalf("pools after refill: %+v", pools[0])
	}
	vms, _ := ts.st.ListVMs(ctx)
	for _, vm := range vms {
		if !vm.Pool || !strings.HasPrefix(vm.Name, "pool-") {
			t.Errorf("pool VM %s not marked", vm.Name)
		}
	}
	// The pools.json survives a restart.
	if p2 := newReadyPool(ts.layout.DataDir, nil, 0); len(p2.specs) != 1 || p2.specs[0].Size != 2 {
		t.Errorf("pools.json: %+v", p2.specs)
	}

	st, err := ts.createBegin(ctx, api.CreateParams{Name: "job", Image: "img", Kernel: "k", MemoryMiB: 256, DiskMiB: 256, Base: true})
	if err != nil {
		t.Fatal(err)
	}
	if !st.Done || st.VM == nil || st.VM.Name != "job" || len(st.Stages) != 1 || st.Stages[0].Name != "claim from pool" {
		t.Fatalf("claim status %+v", st)
	}
	v, _ := ts.st.FindVM(ctx, "job")
	if v.Pool || v.State != store.StateRunning {
		t.Errorf("claimed VM %+v", v)
	}
	// The second pool VM was restored from the base the first one saved;
	// the claim only renames.
	// Each pool VM was warmed up when it was made (an exec of true and a
	// rename to its own name), so that the claim runs warm code.
	if n := len(rl.calls); n != 4 || rl.calls[n-1].p.Hostname != "job" || rl.calls[n-1].p.HostKey != "" {
		t.Errorf("reidentify calls %+v", rl.calls)
	}
	renames := 0
	for _, c := range rl.calls {
		if strings.HasPrefix(c.p.Hostname, "pool-") && c.p.HostKey == "" && c.p.MachineID == "" {
			renames++
		}
	}
	// Three execs of true: the first pool VM's before its base was saved
	// (warmBeforeBase), then each pool VM's warm-up.
	if renames != 2 || len(rl.execs) != 3 || strings.Join(rl.execs[0], " ") != "true" || strings.Join(rl.execs[1], " ") != "true" || strings.Join(rl.execs[2], " ") != "true" {
		t.Errorf("warm-up: %d renames, execs %q", renames, rl.execs)
	}
	// A different spec is not served from this pool.
	st2, err := ts.createBegin(ctx, api.CreateParams{Name: "other", Image: "img", Kernel: "k", MemoryMiB: 512, DiskMiB: 256, Base: true})
	if err != nil || st2.Done {
		t.Fatalf("another spec: %+v %v", st2, err)
	}
	waitForOps(t, ts)
	// Refill up to the budget (600 MiB: 256 ready + 256 more fits, a third does not).
	ts.poolRefill(ctx)
	pools, _ = ts.poolList(ctx, struct{}{})
	if pools[0].Ready != 2 {
		t.Errorf("after the claim and a refill: %+v", pools[0])
	}
	if _, err := ts.poolSet(ctx, api.PoolSpec{Image: "img", Kernel: "k", MemoryMiB: 256, DiskMiB: 256, Size: 3}); err != nil {
		t.Fatal(err)
	}
	ts.poolRefill(ctx)
	pools, _ = ts.poolList(ctx, struct{}{})
	if pools[0].Ready != 2 || !strings.Contains(pools[0].Note, "budget") {
		t.Errorf("over the budget: %+v", pools[0])
	}
	// Size 0 empties it.
	if _, err := ts.poolSet(ctx, api.PoolSpec{Image: "img", Kernel: "k", MemoryMiB: 256, DiskMiB: 256, Size: 0}); err != nil {
		t.Fatal(err)
	}
	if members, _ := ts.poolMembers(ctx, ""); len(members) != 0 {
		t.Errorf("pool VMs left after size 0: %d", len(members))
	}
	if pools, _ := ts.poolList(ctx, struct{}{}); len(pools) != 0 {
		t.Errorf("pools after size 0: %+v", pools)
	}
}

// A bangerd that died in the middle of `snapshot create` left the snapshot's
// directory (written before its record); the next start removes it and keeps
// every recorded snapshot's files.
func TestReconcileRemovesUnrecordedSnapshotDir(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	runningSnapVM(t, ts, "src")
	sn, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "kept"})
	if err != nil {
		t.Fatal(err)
	}
	stray := ts.snapshotDir(newID())
	if err := os.MkdirAll(filepath.Join(stray, snapStateDir), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stray, snapDiskName), []byte("half a disk"), 0o600); err != nil {
		t.Fatal(err)
	}

	ts.reconcile(ctx)

	if _, err := os.Stat(stray); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the directory of the interrupted snapshot is left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(ts.snapshotDir(sn.ID), snapDiskName)); err != nil {
		t.Errorf("the recorded snapshot's files were removed: %v", err)
	}
}

// A guest memory file left on the tmpfs by a VMM that exited while no
// bangerd watched is removed at the next start; the file of a VMM that was
// adopted is kept, and a memory directory that is not this user's private
// one is left alone.
func TestReconcileRemovesStrayMemFiles(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	vm, _ := runningSnapVM(t, ts, "src")
	dir := ts.layout.MemoryDirs()[0]
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	kept, stray := filepath.Join(dir, vm.ID+".ram"), filepath.Join(dir, "0123456789abcdef.ram")
	for _, p := range []string{kept, stray} {
		if err := os.WriteFile(p, []byte("memory"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ts.runtime(vm.ID).handles.MemFile = kept

	ts.reapStrayMemFiles(ctx) // the step of reconcile that runs after adoption

	if _, err := os.Stat(stray); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stray memory file is left: %v", err)
	}
	if _, err := os.Stat(kept); err != nil {
		t.Errorf("the running VM's memory file was removed: %v", err)
	}
	// Not this user's private directory (mode 0755): untouched.
	if err := os.WriteFile(stray, []byte("memory"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	ts.reapStrayMemFiles(ctx)
	if _, err := os.Stat(stray); err != nil {
		t.Errorf("a file in a directory with mode 0755 was removed: %v", err)
	}
}

// A pool VM is ready only once warmed up: until then `pool ls` counts it as
// starting and a claim passes it by at once (the run restores from the base
// instead) rather than waiting on its lock for the warm-up.
func TestPoolVMReadyOnlyWhenWarm(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	ts.snapshotCapable()
	rl := ts.logReidentify()
	rl.gate = make(chan struct{})
	ts.pool = newReadyPool(ts.layout.DataDir, nil, 600)
	spec := api.PoolSpec{Image: "img", Kernel: "k", MemoryMiB: 256, DiskMiB: 256, Size: 1}
	if _, err := ts.poolSet(ctx, spec); err != nil {
		t.Fatal(err)
	}
	key, _, _, err := ts.specKey(ctx, poolDefaults(spec))
	if err != nil {
		t.Fatal(err)
	}
	refilled := make(chan struct{})
	go func() { ts.poolRefill(ctx); close(refilled) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		rl.mu.Lock()
		n := len(rl.execs)
		rl.mu.Unlock()
		if n > 0 {
			break // the pool VM runs and its warm-up has begun
		}
		if time.Now().After(deadline) {
			t.Fatal("the pool VM's warm-up did not begin")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if pools, _ := ts.poolList(ctx, struct{}{}); len(pools) != 1 || pools[0].Ready != 0 || pools[0].Starting != 1 {
		t.Errorf("pool during the warm-up: %+v", pools)
	}
	claimed := make(chan *store.VM, 1)
	go func() { vm, _ := ts.claimPool(ctx, key, "early", ""); claimed <- vm }()
	select {
	case vm := <-claimed:
		if vm != nil {
			t.Errorf("a VM still warming up was claimed: %s", vm.Name)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the claim waited for the warm-up")
	}
	close(rl.gate)
	<-refilled
	if pools, _ := ts.poolList(ctx, struct{}{}); len(pools) != 1 || pools[0].Ready != 1 {
		t.Errorf("pool after the warm-up: %+v", pools)
	}
	if vm, err := ts.claimPool(ctx, key, "job", ""); vm == nil || err != nil {
		t.Fatalf("claim after the warm-up: %v %v", vm, err)
	}
}

// TestSpoolDevice: a VM started cold gets a spool drive (its file made
// afresh, the magic at the start, removed when the runtime ends); a clone
// gets one only when its snapshot's source had one, since the saved
// devices must match.
func TestSpoolDevice(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	var mu sync.Mutex
	spools := map[string]string{} // VM id → the spool drive's path, "" for none
	ts.drv.onStart = func(cfg vmm.MachineConfig) {
		mu.Lock()
		defer mu.Unlock()
		spools[cfg.VMID] = ""
		for _, d := range cfg.Drives {
			if d.ID == "spool" {
				spools[cfg.VMID] = d.Path
			}
		}
	}
	drive := func(id string) string {
		mu.Lock()
		defer mu.Unlock()
		p, ok := spools[id]
		if !ok {
			t.Fatalf("VM %s not started", id)
		}
		return p
	}
	// a stale file from an earlier boot is replaced, not reused
	src := ts.newVM(t, "src", store.StateStopped)
	os.MkdirAll(ts.vmDir(src.ID), 0o700)
	os.WriteFile(filepath.Join(ts.vmDir(src.ID), spoolName), []byte("stale"), 0o600)
	ts.snapshotCapable()
	if err := ts.start(ctx, src, nil); err != nil {
		t.Fatal(err)
	}
	p := drive(src.ID)
	if p != filepath.Join(ts.vmDir(src.ID), spoolName) {
		t.Fatalf("spool drive %q", p)
	}
	b, err := os.ReadFile(p)
	if err != nil || len(b) != bulk.SpoolSize || !bytes.HasPrefix(b, []byte(bulk.SpoolMagic)) {
		t.Fatalf("spool file: %d bytes, %v", len(b), err)
	}
	// a clone of it has one too
	if _, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "with"}); err != nil {
		t.Fatal(err)
	}
	ts.logReidentify()
	res, err := ts.fork(ctx, api.ForkParams{VM: "src", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	if drive(res.VMs[0].ID) == "" {
		t.Error("clone of a VM with a spool has none")
	}
	// a snapshot taken by an older bangerd (no "spool" in source.json):
	// its clones get none
	sn, err := ts.snapshotCreate(ctx, api.SnapshotCreateParams{VM: "src", Name: "old"})
	if err != nil {
		t.Fatal(err)
	}
	sp := filepath.Join(ts.snapshotDir(sn.ID), snapSourceName)
	var src0 snapSource
	b, _ = os.ReadFile(sp)
	if err := json.Unmarshal(b, &src0); err != nil || !src0.Spool {
		t.Fatalf("source.json %s: %v", b, err)
	}
	src0.Spool = false // omitted from the JSON, as an older bangerd wrote it
	b, _ = json.Marshal(src0)
	if bytes.Contains(b, []byte("spool")) {
		t.Fatalf("source.json without a spool says %s", b)
	}
	os.WriteFile(sp, b, 0o600)
	st, err := ts.createBegin(ctx, api.CreateParams{Name: "old-clone", Snapshot: "old"})
	if err != nil {
		t.Fatal(err)
	}
	if fin := ts.waitCreate(t, st.OpID, 10*time.Second).snapshot(); fin.Error != "" {
		t.Fatal(fin.Error)
	}
	oc, _ := ts.st.FindVM(ctx, "old-clone")
	if drive(oc.ID) != "" {
		t.Error("clone of an old snapshot got a spool drive")
	}
	if _, err := os.Stat(filepath.Join(ts.vmDir(oc.ID), spoolName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("clone of an old snapshot has a spool file: %v", err)
	}
	// stopping the source removes its spool file
	if err := locked(ts, src, func() error { return ts.stop(ctx, src, 5*time.Second) }); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("spool file after stop: %v", err)
	}
}
