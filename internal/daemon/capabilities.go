package daemon

import (
	"context"

	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
)

// startEnv is what the start pipeline hands to capabilities for one boot.
type startEnv struct {
	VM     *store.VM
	Image  *store.Image
	Kernel *store.Kernel
	Dir    string
	Boot   *bootcfg.Config
	Mach   *vmm.MachineConfig
	Driver vmm.Driver
	// Handles is filled after the VMM has started.
	Handles *vmm.Handles
	// Restore is set when this start restores a snapshot.
	Restore *restoreSource
}

// A capability plugs into the start pipeline. Each hook is optional: a
// capability implements the interfaces of the stages it takes part in, so
// networking, disks, keys and workspaces extend VM start without touching
// the core. Hooks run in registration order; undo hooks in reverse.
type capability interface{ Name() string }

// startPrereq checks, before anything is made, that the VM can start.
type startPrereq interface {
	StartPrereq(ctx context.Context, env *startEnv) error
}

// hostPreparer makes host resources (disks, taps). It returns the undo that
// releases them; the start pipeline registers it on the runtime's cleanup, so
// it runs once when the runtime ends for any reason (failed start, stop,
// VMM crash, delete).
type hostPreparer interface {
	PrepareHost(ctx context.Context, env *startEnv) (undo func(context.Context) error, err error)
}

// guestConfigContributor adds to the guest's boot configuration.
type guestConfigContributor interface {
	ContributeGuestConfig(ctx context.Context, env *startEnv) error
}

// machineConfigContributor adds to the VMM's machine configuration.
type machineConfigContributor interface {
	ContributeMachineConfig(ctx context.Context, env *startEnv) error
}

// stateCleaner releases the per-boot resources a VM record names, for a VM
// whose runtime this bangerd does not hold (a bangerd restart found its VMM
// gone, or adopted it): it rebuilds the undo of hostPreparer from the record.
type stateCleaner interface {
	CleanupState(ctx context.Context, vm *store.VM) error
}

// configChanger validates and applies `vm set` changes; running says whether
// the VM is running (changes then apply at the next start).
type configChanger interface {
	ApplyConfigChange(ctx context.Context, old, updated *store.VM, running bool) error
}
