package cli

import (
	"fmt"
	"strconv"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/termsafe"
)

func (a *App) vmCommand() *cobra.Command {
	vm := &cobra.Command{Use: "vm", Short: "Manage VMs"}
	var quiet, all bool
	var lsFormat string
	var filters []string
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List VMs",
		Example: "  banger vm ls\n" +
			"  banger vm ls -q --filter state=stopped\n" +
			"  banger vm ls --format '{{.Name}} {{.State}} {{.IP}}'\n" +
			"  banger vm ls --format '{{json .}}'",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := parseVMFilter(filters)
			if err != nil {
				return err
			}
			c, err := a.client(cmd.Context())
			if err != nil {
				return err
			}
			vms, err := c.ListVMs(cmd.Context())
			if all {
				vms = nil
				err = c.Call(cmd.Context(), api.MethodVMList, api.VMListParams{All: true}, &vms)
			}
			if err != nil {
				return err
			}
			vms = f.apply(vms)
			return listOutput(a, vms, quiet, lsFormat, func(v *api.VM) string { return v.ID }, func() error {
				rows := make([][]string, 0, len(vms))
				for _, v := range vms {
					state := v.State
					if v.Paused {
						state += " (paused)"
					}
					if v.Pool {
						state += " (pool)"
					}
					rows = append(rows, []string{v.ID[:min(12, len(v.ID))], v.Name, state, orDash(v.Image), strconv.Itoa(v.VCPUs), mib(v.MemoryMiB), mib(v.DiskMiB), orDash(v.IP), ago(v.CreatedAt)})
				}
				return a.table([]string{"ID", "NAME", "STATE", "IMAGE", "CPUS", "MEMORY", "DISK", "IP", "CREATED"}, rows)
			})
		},
	}
	ls.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only VM ids")
	ls.Flags().BoolVar(&all, "all", false, "include the ready pool's unclaimed VMs")
	ls.Flags().StringArrayVar(&filters, "filter", nil, "only VMs matching KEY=VALUE: state=running, name=SUBSTRING, image=NAME, id=PREFIX (repeatable)")
	addFormat(ls, &lsFormat)
	vm.AddCommand(ls)
	var showFormat string
	show := &cobra.Command{
		Use:     "show VM",
		Short:   "Show one VM",
		Example: "  banger vm show dev\n  banger vm show dev --format '{{.IP}}'\n  banger vm show dev -o json",
		Args:    exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var v api.VM
			if err := a.call(cmd.Context(), api.MethodVMGet, api.VMRef{VM: args[0]}, &v); err != nil {
				return err
			}
			return a.showOutput(&v, showFormat, func() error { return a.showVM(&v) })
		},
	}
	addFormat(show, &showFormat)
	vm.AddCommand(show)
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
	if v.ExpiresAt != nil {
		rows = append(rows, []string{"expires", v.ExpiresAt.Local().Format("2006-01-02 15:04:05") + " (" + humanize.Time(*v.ExpiresAt) + ")"})
	}
	if v.LastError != "" {
		rows = append(rows, []string{"last error", termsafe.String(v.LastError)}) // may quote the guest's console
	}
	for _, r := range rows {
		fmt.Fprintf(a.Stdout, "%-10s %s\n", r[0]+":", r[1])
	}
	return nil
}
