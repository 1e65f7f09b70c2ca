package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

func (a *App) systemCommands() []*cobra.Command {
	return nil
}

// addVMLifecycleCommands adds create/start/stop/... to the vm command.
func (a *App) addVMLifecycleCommands(vm *cobra.Command) {}

// addServiceCommands adds top-level commands of the other services.
func (a *App) addServiceCommands(root *cobra.Command) {}

var _ = fmt.Sprint
