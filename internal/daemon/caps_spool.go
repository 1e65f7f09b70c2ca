package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/vmm"
)

// spoolCap gives each VM a spool: a small sparse file attached as a
// virtio-blk drive, through which bangerd carries one file's contents at
// a time to and from the agent (package bulk, SpoolSuffix; vm.bulk with
// BulkParams.Spool in vmapi.go).
type spoolCap struct{}

func (spoolCap) Name() string { return "spool" }

// spoolName is the VM's spool file (package bulk: one file's contents at a
// time between bangerd and the agent, through a block device). It exists
// while, and only while, the VM's VMM has it attached.
const spoolName = "spool.img"

// withSpool says whether this start attaches a spool: always, except when
// it restores a snapshot whose VM had none (its saved devices must match).
func withSpool(env *startEnv) bool { return env.Restore == nil || env.Restore.src.Spool }

// PrepareHost makes the VM's spool file afresh (bulk.SpoolSize bytes,
// sparse, the magic at the start), or removes one left from an earlier
// boot when this one has none. The undo removes it when the runtime ends.
func (spoolCap) PrepareHost(ctx context.Context, env *startEnv) (func(context.Context) error, error) {
	p := filepath.Join(env.Dir, spoolName)
	if err := removeRegular(p); err != nil {
		return nil, fmt.Errorf("remove the old spool: %w", err)
	}
	if !withSpool(env) {
		return nil, nil
	}
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("make the spool: %w", err)
	}
	_, err = f.Write([]byte(bulk.SpoolMagic))
	if err == nil {
		err = f.Truncate(bulk.SpoolSize)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(p)
		return nil, fmt.Errorf("make the spool: %w", err)
	}
	return func(context.Context) error { return removeRegular(p) }, nil
}

// removeRegular removes p when it is a regular file (never what a link
// points to); a missing p is fine.
func removeRegular(p string) error {
	fi, err := os.Lstat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", p)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (spoolCap) ContributeMachineConfig(ctx context.Context, env *startEnv) error {
	if withSpool(env) {
		env.Mach.Drives = append(env.Mach.Drives, vmm.Drive{ID: "spool", Path: filepath.Join(env.Dir, spoolName)})
	}
	return nil
}
