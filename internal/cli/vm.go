package cli

import (
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
)

func (a *App) vmCommand() *cobra.Command {
	vm := &cobra.Command{Use: "vm", Short: "Manage VMs"}
	vm.AddCommand(&cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List VMs",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var vms []*api.VM
			if err := a.call(cmd.Context(), api.MethodVMList, nil, &vms); err != nil {
				return err
			}
			if vms == nil {
				vms = []*api.VM{}
			}
			if a.output == "json" {
				return a.printJSON(vms)
			}
			rows := make([][]string, 0, len(vms))
			for _, v := range vms {
				state := v.State
				if v.Paused {
					state += " (paused)"
				}
				rows = append(rows, []string{v.ID[:min(12, len(v.ID))], v.Name, state, orDash(v.Image), strconv.Itoa(v.VCPUs), mib(v.MemoryMiB), mib(v.DiskMiB), orDash(v.IP), ago(v.CreatedAt)})
			}
			return a.table([]string{"ID", "NAME", "STATE", "IMAGE", "CPUS", "MEMORY", "DISK", "IP", "CREATED"}, rows)
		},
	})
	vm.AddCommand(&cobra.Command{
		Use:   "show VM",
		Short: "Show one VM",
		Args:  exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var v api.VM
			if err := a.call(cmd.Context(), api.MethodVMGet, api.VMRef{VM: args[0]}, &v); err != nil {
				return err
			}
			return a.showVM(&v)
		},
	})
	a.addVMLifecycleCommands(vm)
	a.addVMPauseCommands(vm)
	return vm
}

func (a *App) showVM(v *api.VM) error {
	if a.output == "json" {
		return a.printJSON(v)
	}
	rows := [][]string{
		{"id", v.ID}, {"name", v.Name}, {"state", v.State}, {"image", orDash(v.Image)}, {"kernel", orDash(v.Kernel)},
		{"cpus", strconv.Itoa(v.VCPUs)}, {"memory", mib(v.MemoryMiB)}, {"disk", mib(v.DiskMiB)},
		{"ip", orDash(v.IP)}, {"mac", orDash(v.MAC)}, {"driver", orDash(v.Driver)},
		{"created", v.CreatedAt.Local().Format("2006-01-02 15:04:05")}, {"updated", v.UpdatedAt.Local().Format("2006-01-02 15:04:05")},
	}
	if v.LastError != "" {
		rows = append(rows, []string{"last error", v.LastError})
	}
	for _, r := range rows {
		fmt.Fprintf(a.Stdout, "%-10s %s\n", r[0]+":", r[1])
	}
	return nil
}
