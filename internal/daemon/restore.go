package daemon

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	agentapi "github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"

	"github.com/bangerdev/banger/api"
)

// snapSourceName is the file in a snapshot directory describing the VM it
// was taken from: what a clone shares with it until the reidentify stage.
const snapSourceName = "source.json"

// snapSource is the source VM's identity at snapshot time.
type snapSource struct {
	// HostKeyPub is the source's pinned SSH host key: the clone answers
	// with it until it is given its own.
	HostKeyPub string `json:"host_key_pub"`
	// MAC is the source's guest MAC: a clone's interface still has it.
	MAC string `json:"mac,omitempty"`
	// BulkKey is the source agent's bulk key, which a clone's agent holds
	// until it is given its own: bangerd reaches and reidentifies the clone
	// over a bulk control stream with it, no SSH handshake. Absent from
	// snapshots taken by an older bangerd (then SSH). The file is 0600, as
	// the saved memory, which holds the key too, is the owner's only.
	BulkKey []byte `json:"bulk_key,omitempty"`
	// Spool: the source had a spool device, so its clones must have one
	// (their saved devices are the source's). Absent from snapshots taken
	// by an older bangerd or of a VM it started: their clones get none.
	Spool bool `json:"spool,omitempty"`
}

// restoreSource is where a VM's first start comes from when it is made
// from a snapshot.
type restoreSource struct {
	snap *store.Snapshot
	dir  string
	src  snapSource
}

// writeSnapSource records the source VM's identity in a snapshot directory.
func (s *vmService) writeSnapSource(vm *store.VM, dir string) error {
	pub, err := hostKeyPub(s.vmDir(vm.ID))
	if err != nil {
		return err
	}
	bk, _ := bulkKey(s.vmDir(vm.ID)) // none (an older bangerd started it): clones are reached over SSH
	_, err = os.Lstat(filepath.Join(s.vmDir(vm.ID), spoolName))
	return writeJSONAtomic(filepath.Join(dir, snapSourceName), snapSource{HostKeyPub: pub, MAC: vm.MAC, BulkKey: bk, Spool: err == nil})
}

// restoreSourceFor loads what restoring sn needs.
func (s *vmService) restoreSourceFor(sn *store.Snapshot) (*restoreSource, error) {
	dir := s.snapshotDir(sn.ID)
	b, err := os.ReadFile(filepath.Join(dir, snapSourceName))
	if err != nil {
		return nil, fmt.Errorf("snapshot %s is incomplete: %w", sn.Name, err)
	}
	rs := &restoreSource{snap: sn, dir: dir}
	if err := json.Unmarshal(b, &rs.src); err != nil || rs.src.HostKeyPub == "" {
		return nil, fmt.Errorf("snapshot %s: unreadable %s: %v", sn.Name, snapSourceName, err)
	}
	if rs.src.BulkKey != nil && len(rs.src.BulkKey) != bulk.KeySize {
		return nil, fmt.Errorf("snapshot %s: %s has a bulk key of %d bytes, want %d", sn.Name, snapSourceName, len(rs.src.BulkKey), bulk.KeySize)
	}
	return rs, nil
}

// stageCopyDisk gives the new VM its own copy of the snapshot's writable disk.
func (s *vmService) stageCopyDisk(ctx context.Context, r *startRun) error {
	dst := filepath.Join(r.env.Dir, rwDiskName)
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("%s already exists; a VM made from a snapshot starts from the snapshot's disk", dst)
	}
	_, err := vmmproc.CopySparse(ctx, filepath.Join(r.env.Restore.dir, snapDiskName), dst)
	return err
}

// stageRestore starts the VMM from the snapshot's saved state.
func (s *vmService) stageRestore(ctx context.Context, r *startRun) error {
	rs, ok := r.env.Driver.(vmm.Restorer)
	if !ok {
		return fmt.Errorf("the %s driver cannot restore snapshots", r.env.Driver.Name())
	}
	return s.launch(ctx, r, func(ctx context.Context) (vmm.Instance, error) {
		return rs.Restore(ctx, *r.env.Mach, filepath.Join(r.env.Restore.dir, snapStateDir))
	})
}

// reidentifier is a guest agent client that can give a clone its identity.
type reidentifier interface {
	Reidentify(ctx context.Context, p agentapi.Reidentify) error
}

// reacher is a guest agent client that can wait for the agent without
// sending it anything (guest.Client.Reach); others are pinged.
type reacher interface {
	Reach(ctx context.Context) error
}

// stageReidentify reaches the clone with its source's keys and gives it
// the identity the configure stage made for it: hostname, SSH host key,
// bulk key, machine-id, entropy, clock, MAC and address. From then on the
// clone answers only with its own pinned host key and accepts only its own
// bulk key. With the source's bulk key recorded, the requests go over a
// bulk control stream (no SSH handshake, whose cold crypto is slow in a
// freshly restored TCG guest); the client, which then pins the clone's own
// host key and presents its own bulk key, becomes the VM's agent client,
// so the wait-for-agent stage's ping reuses its stream.
func (s *vmService) stageReidentify(ctx context.Context, r *startRun) error {
	env, rs := r.env, r.env.Restore
	ctx, cancel := context.WithTimeout(ctx, s.bootTimeout)
	defer cancel()
	r.rt.guestMu.Lock()
	t, err := s.transportLocked(r.rt)
	r.rt.guestMu.Unlock()
	if err != nil {
		return err
	}
	a, err := s.newAgent(t, rs.src.HostKeyPub, rs.src.BulkKey)
	if err != nil {
		return err
	}
	kept := false
	defer func() {
		if !kept {
			a.Close()
		}
	}()
	t0 := time.Now()
	reach := a.Ping
	if ra, ok := a.(reacher); ok {
		reach = ra.Reach // the stream open, no ping's round trip
	}
	if err := reach(ctx); err != nil {
		return fmt.Errorf("the restored guest did not answer: %w%s", err, s.consoleHint(env.VM.ID))
	}
	pingTook := time.Since(t0)
	ri, ok := a.(reidentifier)
	if !ok {
		return errors.New("internal error: the guest agent client cannot reidentify")
	}
	seed, err := bootcfg.NewSeed()
	if err != nil {
		return err
	}
	p := agentapi.Reidentify{
		Hostname: env.Boot.Hostname, HostKey: env.Boot.HostKey, MachineID: newMachineID(),
		RNGSeed: seed, TimeUnixNano: time.Now().UnixNano(), BulkKey: env.Boot.BulkKey,
	}
	if n := env.Boot.Network; n != nil {
		p.Network = &agentapi.ReidentifyNetwork{FromMAC: rs.src.MAC, MAC: n.MAC, Address: n.Address, Gateway: n.Gateway, DNS: n.DNS}
	}
	t1 := time.Now()
	err = ri.Reidentify(ctx, p)
	s.log.InfoContext(ctx, "clone reidentified", "vm", env.VM.Name, "reach_ms", logging.Ms(pingTook), "reidentify_ms", logging.Ms(time.Since(t1)), "ok", err == nil)
	if err != nil {
		return err
	}
	r.rt.guestMu.Lock()
	if r.rt.agent == nil {
		r.rt.agent, kept = a, true
	}
	r.rt.guestMu.Unlock()
	return nil
}

// newMachineID is a random systemd machine-id (128 bits, lowercase hex).
func newMachineID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40 // a v4 UUID, as systemd-machine-id-setup makes
	b[8] = b[8]&0x3f | 0x80
	return hex.EncodeToString(b[:])
}

// createFromSnapshot makes a VM from sn and starts it (restore, reidentify).
// The caller must not hold any VM lock. On failure nothing is left.
func (s *vmService) createFromSnapshot(ctx context.Context, name string, sn *store.Snapshot, progress func(string, bool, error)) (*store.VM, error) {
	if err := validName("vm", name); err != nil {
		return nil, codeErr(rpc.CodeInvalidArgument, err)
	}
	rs, err := s.restoreSourceFor(sn)
	if err != nil {
		return nil, err
	}
	if _, err := s.driver(sn.Driver); err != nil {
		return nil, err
	}
	vm := &store.VM{ID: newID(), Name: name, ImageID: sn.ImageID, KernelID: sn.KernelID, VCPUs: sn.VCPUs, MemoryMiB: sn.MemoryMiB,
		DiskMiB: sn.DiskMiB, State: store.StateCreating, Driver: sn.Driver}
	if err := s.store.CreateVM(ctx, vm); err != nil {
		return nil, storeErr(err)
	}
	unlock := s.locks.Lock(vm.ID)
	defer unlock()
	if err := s.startFrom(ctx, vm, progress, rs); err != nil {
		if rerr := s.removeVM(context.WithoutCancel(ctx), vm); rerr != nil {
			s.log.ErrorContext(ctx, "remove VM after a failed restore", "vm", vm.Name, "error", rerr.Error())
		}
		return nil, err
	}
	return vm, nil
}

// maxForks bounds vm.fork's count.
const maxForks = 16

// fork snapshots a running VM and makes p.Count clones of it. The snapshot
// is removed afterwards: the clones do not need its files.
func (s *vmService) fork(ctx context.Context, p api.ForkParams) (*api.ForkResult, error) {
	if p.Count == 0 {
		p.Count = 1
	}
	if p.Count < 1 || p.Count > maxForks {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "count must be between 1 and %d", maxForks)
	}
	src, err := s.store.FindVM(ctx, p.VM)
	if err != nil {
		return nil, storeErr(err)
	}
	base := p.Name
	if base == "" {
		base = src.Name + "-fork"
	}
	names := []string{base}
	if p.Count > 1 {
		names = names[:0]
		for i := 1; i <= p.Count; i++ {
			names = append(names, fmt.Sprintf("%s-%d", base, i))
		}
	}
	for _, n := range names {
		if err := validName("vm", n); err != nil {
			return nil, codeErr(rpc.CodeInvalidArgument, err)
		}
		if _, err := s.store.FindVM(ctx, n); err == nil {
			return nil, rpc.Errorf(rpc.CodeConflict, "a VM named %q already exists", n)
		}
	}
	began := time.Now()
	// Not synced: the snapshot lives only until its clones are made (they
	// read it through the page cache). If the host loses power in between,
	// the fork-<id> snapshot left behind may be incomplete.
	sn, err := s.snapshotCreateAs(ctx, api.SnapshotCreateParams{VM: src.ID, Name: "fork-" + newID()[:12]}, false)
	if err != nil {
		return nil, err
	}
	defer func() {
		if _, err := s.snapshotDelete(context.WithoutCancel(ctx), api.NameRef{Name: sn.ID}); err != nil {
			s.log.WarnContext(ctx, "remove the fork's snapshot", "snapshot", sn.Name, "error", err.Error())
		}
	}()
	res := &api.ForkResult{SnapshotMS: float64(time.Since(began).Microseconds()) / 1000}
	for _, n := range names {
		t0 := time.Now()
		vm, err := s.createFromSnapshot(ctx, n, sn, nil)
		if err != nil {
			return res, fmt.Errorf("fork %s as %s: %w", src.Name, n, err)
		}
		res.VMs = append(res.VMs, vm)
		res.CloneMS = append(res.CloneMS, float64(time.Since(t0).Microseconds())/1000)
	}
	return res, nil
}

// basePrefix names the base snapshots `banger run` keeps, one per spec.
const basePrefix = "base-"

// baseSnapshot returns the name of the base snapshot for a spec and the
// snapshot when it exists. The name hashes everything a restored guest
// depends on: image, kernel, the initrd (which carries the agent), sizes and
// driver; a new image, kernel or agent gets a new base.
func (s *vmService) baseSnapshot(ctx context.Context, img *store.Image, k *store.Kernel, vcpus, mem, disk int, drv string) (string, *store.Snapshot, error) {
	initrd, err := s.artifacts.initrdFor(ctx, k)
	if err != nil {
		return "", nil, err
	}
	ident := initrd
	if fi, err := os.Stat(initrd); err == nil {
		ident = fmt.Sprintf("%s@%d.%d", initrd, fi.Size(), fi.ModTime().UnixNano())
	}
	h := sha256.Sum256([]byte(fmt.Sprintf("%s\x00%s\x00%s\x00%d\x00%d\x00%d\x00%s", img.ID, k.ID, ident, vcpus, mem, disk, drv)))
	name := basePrefix + hex.EncodeToString(h[:6])
	sn, err := s.store.FindSnapshot(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return name, nil, nil
	}
	if err != nil {
		return "", nil, storeErr(err)
	}
	return name, sn, nil
}

// saveBase snapshots a VM that just booted cold as its spec's base; a
// failure only costs the next run its warm start. The caller holds the VM lock.
func (s *vmService) saveBase(ctx context.Context, vm *store.VM, name string, progress func(string, bool, error)) {
	if _, ok := s.runtime(vm.ID).inst.(vmm.Snapshotter); !ok {
		return
	}
	progress("save base snapshot", false, nil)
	s.warmBeforeBase(ctx, vm)
	_, err := s.snapshotLocked(ctx, vm, api.SnapshotCreateParams{Name: name}, true)
	progress("save base snapshot", true, nil)
	if err != nil {
		s.log.WarnContext(ctx, "save the base snapshot", "vm", vm.Name, "snapshot", name, "error", err.Error())
	}
}

// warmBeforeBase runs `true` in a VM that just booted cold, over a bulk
// session as `banger exec` does, before its base snapshot is saved: what a
// guest does the first time it runs a command (the agent's lazily built
// state, the shell's pages read from the disk into the page cache, the
// dentries on the way) is then in the snapshot, and every run restored from
// it starts from there instead of doing it again on its way to its command
// (the vCPU of a restored TCG guest is its critical path). A failure only
// costs the restored runs that time.
func (s *vmService) warmBeforeBase(ctx context.Context, vm *store.VM) {
	rt := s.runtime(vm.ID)
	if rt == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, poolWarmTimeout)
	defer cancel()
	a, err := s.agent(ctx, vm.ID, rt)
	if err == nil {
		err = execTrue(ctx, a)
	}
	if err != nil {
		s.log.WarnContext(ctx, "run a command before the base snapshot", "vm", vm.Name, "error", err.Error())
	}
}

// dropBases removes the base snapshots that pin an image or kernel (they
// are caches), so that deleting the image or kernel is not refused for them.
func (s *vmService) dropBases(ctx context.Context, match func(*store.Snapshot) bool) {
	l, err := s.store.ListSnapshots(ctx)
	if err != nil {
		return
	}
	for _, sn := range l {
		if strings.HasPrefix(sn.Name, basePrefix) && match(sn) {
			if _, err := s.snapshotDelete(ctx, api.NameRef{Name: sn.ID}); err != nil {
				s.log.WarnContext(ctx, "remove a stale base snapshot", "snapshot", sn.Name, "error", err.Error())
			}
		}
	}
}

// agentapiReidentifyHostname is a reidentify that only renames the guest.
func agentapiReidentifyHostname(name string) agentapi.Reidentify {
	return agentapi.Reidentify{Hostname: name}
}
