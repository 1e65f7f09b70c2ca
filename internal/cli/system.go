package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
)

// addServiceCommands adds top-level commands of the other services.
func (a *App) addServiceCommands(root *cobra.Command) {
	root.AddCommand(a.guestCommands()...)
	root.AddCommand(a.guestToolCommands()...)
	root.AddCommand(a.kernelCommand(), a.imageCommand(), a.runCommand(), a.doctorCommand(), a.workspaceCommand(), a.mcpCommand())
}

func (a *App) doctorCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check this host can run VMs, and say which VMM banger uses and why",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var res api.DoctorResult
			if err := a.call(cmd.Context(), api.MethodDoctor, nil, &res); err != nil {
				return err
			}
			bad := 0
			for _, c := range res.Checks {
				if !c.OK {
					bad++
				}
			}
			if a.output == "json" {
				if err := a.printJSON(res); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(a.Stdout, "VMM: %s (%s)\n", res.Driver, res.DriverReason)
				for _, c := range res.Checks {
					mark := "ok  "
					if !c.OK {
						mark = "FAIL"
					}
					fmt.Fprintf(a.Stdout, "%s %-14s %s\n", mark, c.Name, c.Detail)
				}
			}
			if bad > 0 {
				return &ExitError{Code: 1}
			}
			return nil
		},
	}
}
