package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

func (a *App) systemCommands() []*cobra.Command {
	return nil
}

// addServiceCommands adds top-level commands of the other services.
func (a *App) addServiceCommands(root *cobra.Command) {
	root.AddCommand(a.guestCommands()...)
	root.AddCommand(a.kernelCommand(), a.imageCommand(), a.runCommand())
}

var _ = fmt.Sprint
