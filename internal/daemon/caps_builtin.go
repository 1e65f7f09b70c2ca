package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
)

// diskCap provides the per-VM disks: the shared read-only image, a sparse
// writable disk (the overlay's upper layer) made on first start and grown when
// disk_mib grows, and the boot config device. The writable disk is a sparse
// copy of a cached per-size ext4 template (internal/disk): its cost does not
// grow with the disk's size. A spare disk per recently used size waits in
// the cache and is renamed into place, so the copy is off the create path.
type diskCap struct{ maker *disk.Maker }

// diskSpares bounds the spare writable disks kept ready (one per size, for
// the sizes made most recently; ~200 KiB each on the host at 64 GiB).
const diskSpares = 4

// newDiskCap keeps the writable disk templates and spares under cacheDir.
func newDiskCap(cacheDir string, log *slog.Logger) diskCap {
	return diskCap{maker: &disk.Maker{Dir: filepath.Join(cacheDir, "rwdisk"), Label: bootcfg.RWLabel, Spares: diskSpares, Logger: log,
		Fault: func(step string) { fault("disk-refill-" + step) }}}
}

func (diskCap) Name() string { return "disks" }

const rwDiskName = "rw.ext4"

func (c diskCap) PrepareHost(ctx context.Context, env *startEnv) (func(context.Context) error, error) {
	p := filepath.Join(env.Dir, rwDiskName)
	want := int64(env.VM.DiskMiB) << 20
	st, err := os.Stat(p)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := c.maker.Make(ctx, p, want); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	case st.Size() < want:
		if err := growRWDisk(p, want); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// growRWDisk makes the writable disk file longer, and does nothing else:
// the guest wrote that filesystem, so the host never checks, parses or
// resizes it (e2fsck/resize2fs on hostile metadata would run host code on
// guest bytes). The agent grows the filesystem online at the next boot.
func growRWDisk(p string, size int64) error {
	f, err := os.OpenFile(p, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("grow writable disk: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("grow writable disk: %w", err)
	}
	return nil
}

func (diskCap) ContributeMachineConfig(ctx context.Context, env *startEnv) error {
	env.Mach.Drives = append(env.Mach.Drives,
		vmm.Drive{ID: "rootfs", Path: env.Image.RootfsPath, ReadOnly: true},
		vmm.Drive{ID: "rw", Path: filepath.Join(env.Dir, rwDiskName)},
		vmm.Drive{ID: "bootcfg", Path: filepath.Join(env.Dir, bootcfgName), ReadOnly: true},
	)
	return nil
}

func (diskCap) ApplyConfigChange(ctx context.Context, old, updated *store.VM, running bool) error {
	if updated.DiskMiB < old.DiskMiB {
		return fmt.Errorf("disks only grow: %d MiB is smaller than the current %d MiB", updated.DiskMiB, old.DiskMiB)
	}
	return nil
}

const bootcfgName = "bootcfg.img"

// keysCap gives the guest its per-VM SSH host key (generated at first start,
// kept in the VM directory, pinned by the host) and authorises the user's key.
type keysCap struct{ userKeyPath string }

func (keysCap) Name() string { return "keys" }

const hostKeyName = "host_key"

// bulkKeyName is the file (0600, in the VM directory) holding the key of
// the current boot's bulk streams.
const bulkKeyName = "bulk_key"

// writePrivate replaces path with data, mode 0600, atomically.
func writePrivate(path string, data []byte) error {
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// bulkKey reads the current boot's bulk key of a VM.
func bulkKey(dir string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(dir, bulkKeyName))
	if err != nil {
		return nil, fmt.Errorf("VM bulk key missing (restart the VM to make one): %w", err)
	}
	if len(b) != bulk.KeySize {
		return nil, fmt.Errorf("VM bulk key has %d bytes, want %d", len(b), bulk.KeySize)
	}
	return b, nil
}

func (k keysCap) ContributeGuestConfig(ctx context.Context, env *startEnv) error {
	hk, err := loadOrCreateHostKey(env.Dir)
	if err != nil {
		return err
	}
	uk, err := guest.LoadOrCreateUserKey(k.userKeyPath)
	if err != nil {
		return fmt.Errorf("user key: %w", err)
	}
	env.Boot.HostKey = hk
	// A fresh bulk key at every start, kept for vm.bulk (see package bulk).
	bk, err := bulk.NewKey()
	if err != nil {
		return err
	}
	if err := writePrivate(filepath.Join(env.Dir, bulkKeyName), bk); err != nil {
		return fmt.Errorf("bulk key: %w", err)
	}
	env.Boot.BulkKey = bk
	env.Boot.AuthorizedKeys = append(env.Boot.AuthorizedKeys, uk.AuthorizedLine())
	return nil
}

func loadOrCreateHostKey(dir string) (string, error) {
	p := filepath.Join(dir, hostKeyName)
	if b, err := os.ReadFile(p); err == nil {
		return string(b), nil
	}
	hk, err := guest.GenerateHostKey()
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(p+".pub", []byte(hk.AuthorizedLine()+"\n"), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(p, hk.PrivatePEM, 0o600); err != nil {
		return "", err
	}
	return string(hk.PrivatePEM), nil
}

// hostKeyPub returns the pinned public host key line of a VM.
func hostKeyPub(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, hostKeyName+".pub"))
	if err != nil {
		return "", fmt.Errorf("VM host key missing: %w", err)
	}
	return string(b), nil
}

var _ = strconv.Itoa
