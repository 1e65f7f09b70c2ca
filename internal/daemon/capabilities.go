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

// hostPreparer makes host resources (disks, taps). It returns an undo that
// releases them if a later stage fails.
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

// postStarter runs once the guest agent answers.
type postStarter interface {
	PostStart(ctx context.Context, env *startEnv) error
}

// stateCleaner releases per-boot resources once the VM has stopped (for any
// reason, including a VMM crash or a bangerd restart that found it gone).
type stateCleaner interface {
	CleanupState(ctx context.Context, vm *store.VM) error
}

// deleter releases what a VM owns for good, at delete.
type deleter interface {
	DeleteVM(ctx context.Context, vm *store.VM) error
}

// configChanger validates and applies `vm set` changes; running says whether
// the VM is running (changes then apply at the next start).
type configChanger interface {
	ApplyConfigChange(ctx context.Context, old, updated *store.VM, running bool) error
}
