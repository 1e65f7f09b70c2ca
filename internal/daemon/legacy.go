package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/store"
)

// Before schema 4 a VM's expiry, published ports and pool membership lived
// in small files in its directory. importLegacyFiles moves what a VM
// directory still holds into the record and removes the files, so an
// upgrade loses none of it. It runs at start-up, before anything reads them,
// and looks only at the VMs the store lists as pending (migration 0005: the
// VMs of a database upgraded past schema 4, until their import is done), so
// once the import has happened a start opens no file for it.
const (
	legacyExpiryFile = "expires_at"
	legacyPortsFile  = "ports.json"
	legacyPoolFile   = "pool"
)

func (s *vmService) importLegacyFiles(ctx context.Context, vms []*store.VM) {
	pending, err := s.store.LegacyFilesPending(ctx)
	if err != nil {
		s.log.ErrorContext(ctx, "list VMs with legacy files", "error", err.Error())
		return
	}
	if len(pending) == 0 {
		return
	}
	byID := make(map[string]*store.VM, len(vms))
	for _, vm := range vms {
		byID[vm.ID] = vm
	}
	for _, id := range pending {
		vm := byID[id]
		if vm == nil {
			continue // deleted since: its row went with it
		}
		if !s.importLegacyVM(ctx, vm) {
			continue // a store write failed: the next start tries again
		}
		if err := s.store.LegacyFilesImported(ctx, vm.ID); err != nil {
			s.log.ErrorContext(ctx, "record legacy files imported", "vm", vm.Name, "error", err.Error())
		}
	}
}

// importLegacyVM imports and removes the legacy files of one VM; it is false
// when a store write failed (the files are kept for another try).
func (s *vmService) importLegacyVM(ctx context.Context, vm *store.VM) bool {
	dir := s.vmDir(vm.ID)
	ok := true
	if b, found := s.readLegacy(ctx, vm, dir, legacyExpiryFile); found {
		if at, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(string(b))); err != nil {
			s.log.WarnContext(ctx, "legacy expiry file unreadable; the VM keeps no expiry", "vm", vm.Name, "error", err.Error())
			s.removeLegacy(ctx, vm, dir, legacyExpiryFile)
		} else if err := s.store.SetVMExpiry(ctx, vm.ID, at); err != nil {
			s.log.ErrorContext(ctx, "import a legacy expiry", "vm", vm.Name, "error", err.Error())
			ok = false
		} else {
			vm.ExpiresAt = &at
			s.removeLegacy(ctx, vm, dir, legacyExpiryFile)
		}
	}
	if b, found := s.readLegacy(ctx, vm, dir, legacyPortsFile); found {
		var strs []string
		err := json.Unmarshal(b, &strs)
		if err == nil {
			ps, perr := parsePorts(strs)
			if perr != nil {
				err = perr
			} else if err = s.store.SetVMForwards(ctx, vm.ID, forwardsOf(ps)); err == nil {
				vm.Forwards = forwardsOf(ps)
			}
		}
		if err != nil {
			s.log.WarnContext(ctx, "import legacy published ports", "vm", vm.Name, "error", err.Error())
		}
		s.removeLegacy(ctx, vm, dir, legacyPortsFile)
	}
	if b, found := s.readLegacy(ctx, vm, dir, legacyPoolFile); found {
		key := strings.TrimSpace(string(b))
		if key == "" {
			key = "legacy" // still a pool VM: hidden, and never claimed by a spec
		}
		if err := s.store.SetVMPool(ctx, vm.ID, key); err != nil {
			s.log.ErrorContext(ctx, "import a legacy pool marker", "vm", vm.Name, "error", err.Error())
			ok = false
		} else {
			vm.Pool = true
			s.removeLegacy(ctx, vm, dir, legacyPoolFile)
		}
	}
	return ok
}

// readLegacy reads a small regular file of the VM's directory, without
// following a link; ok is false when there is none.
func (s *vmService) readLegacy(ctx context.Context, vm *store.VM, dir, name string) ([]byte, bool) {
	open := s.openLegacy
	if open == nil {
		open = os.OpenFile
	}
	f, err := open(filepath.Join(dir, name), os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			s.log.WarnContext(ctx, "legacy VM file unreadable", "vm", vm.Name, "file", name, "error", err.Error())
		}
		return nil, false
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return nil, false
	}
	b, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return nil, false
	}
	return b, true
}

func (s *vmService) removeLegacy(ctx context.Context, vm *store.VM, dir, name string) {
	if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.WarnContext(ctx, "remove a legacy VM file", "vm", vm.Name, "file", name, "error", err.Error())
	}
}
