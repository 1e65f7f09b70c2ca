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
// upgrade loses none of it (run once per start-up, before anything reads
// them; a directory without such files costs three failed opens).
const (
	legacyExpiryFile = "expires_at"
	legacyPortsFile  = "ports.json"
	legacyPoolFile   = "pool"
)

func (s *vmService) importLegacyFiles(ctx context.Context, vms []*store.VM) {
	for _, vm := range vms {
		dir := s.vmDir(vm.ID)
		if b, ok := s.readLegacy(ctx, vm, dir, legacyExpiryFile); ok {
			if at, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(string(b))); err != nil {
				s.log.WarnContext(ctx, "legacy expiry file unreadable; the VM keeps no expiry", "vm", vm.Name, "error", err.Error())
			} else if err := s.store.SetVMExpiry(ctx, vm.ID, at); err != nil {
				s.log.ErrorContext(ctx, "import a legacy expiry", "vm", vm.Name, "error", err.Error())
				continue
			} else {
				vm.ExpiresAt = &at
			}
			s.removeLegacy(ctx, vm, dir, legacyExpiryFile)
		}
		if b, ok := s.readLegacy(ctx, vm, dir, legacyPortsFile); ok {
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
		if b, ok := s.readLegacy(ctx, vm, dir, legacyPoolFile); ok {
			key := strings.TrimSpace(string(b))
			if key == "" {
				key = "legacy" // still a pool VM: hidden, and never claimed by a spec
			}
			if err := s.store.SetVMPool(ctx, vm.ID, key); err != nil {
				s.log.ErrorContext(ctx, "import a legacy pool marker", "vm", vm.Name, "error", err.Error())
				continue
			}
			vm.Pool = true
			s.removeLegacy(ctx, vm, dir, legacyPoolFile)
		}
	}
}

// readLegacy reads a small regular file of the VM's directory, without
// following a link; ok is false when there is none.
func (s *vmService) readLegacy(ctx context.Context, vm *store.VM, dir, name string) ([]byte, bool) {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
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
