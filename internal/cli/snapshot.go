package cli

import (
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
)

// snapshotCommand is `banger snapshot create|ls|rm`.
func (a *App) snapshotCommand() *cobra.Command {
	sc := &cobra.Command{Use: "snapshot", Short: "Save running VMs (memory, devices, writable disk) and manage the snapshots",
		Example: "  banger snapshot create dev warm\n  banger vm create dev2 --snapshot warm\n  banger snapshot ls"}
	var stop bool
	create := &cobra.Command{
		Use:     "create VM [NAME]",
		Short:   "Pause a running VM, save it, and resume it (--stop: stop it instead)",
		Example: "  banger snapshot create dev warm\n  banger snapshot create dev --stop",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 {
				return usagef("usage: %s VM [NAME]", cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			p := api.SnapshotCreateParams{VM: args[0], Stop: stop}
			if len(args) == 2 {
				p.Name = args[1]
			}
			var sn api.Snapshot
			if err := a.call(cmd.Context(), api.MethodSnapshotCreate, p, &sn); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(sn)
			}
			fmt.Fprintf(a.Stdout, "created snapshot %s of %s (state %s, disk %s)\n", sn.Name, sn.SourceVM, sizeBytes(sn.StateBytes), sizeBytes(sn.DiskBytes))
			return nil
		},
	}
	create.Flags().BoolVar(&stop, "stop", false, "stop the VM after saving it instead of resuming it")
	sc.AddCommand(create)
	var snFormat string
	snls := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List snapshots", Args: noArgs,
		Example: "  banger snapshot ls\n  banger snapshot ls --format '{{.Name}} {{.SourceVM}}'",
		RunE: func(cmd *cobra.Command, args []string) error {
			var l []*api.Snapshot
			if err := a.call(cmd.Context(), api.MethodSnapshotList, nil, &l); err != nil {
				return err
			}
			return listOutput(a, l, false, snFormat, func(s *api.Snapshot) string { return s.Name }, func() error {
				rows := make([][]string, 0, len(l))
				for _, s := range l {
					rows = append(rows, []string{s.Name, orDash(s.SourceVM), orDash(s.Image), strconv.Itoa(s.VCPUs), mib(s.MemoryMiB),
						sizeBytes(s.StateBytes + s.DiskBytes), s.Driver, ago(s.CreatedAt)})
				}
				return a.table([]string{"NAME", "FROM", "IMAGE", "CPUS", "MEMORY", "ON DISK", "DRIVER", "CREATED"}, rows)
			})
		},
	}
	addFormat(snls, &snFormat)
	sc.AddCommand(snls)
	rm := a.rmCommand(api.MethodSnapshotDelete, "a snapshot")
	rm.Short = "Remove a snapshot (VMs made from it keep running)"
	rm.Example = "  banger snapshot rm warm"
	sc.AddCommand(rm)
	return sc
}

// vmForkCommand is `banger vm fork VM [NAME] [--count N]`.
func (a *App) vmForkCommand() *cobra.Command {
	var count int
	c := &cobra.Command{
		Use:     "fork VM [NAME]",
		Short:   "Clone a running VM: each clone keeps its memory and processes, with its own name, address, keys and machine-id",
		Example: "  banger vm fork dev dev2\n  banger vm fork dev workers --count 4",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 {
				return usagef("usage: %s VM [NAME] [--count N]", cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			p := api.ForkParams{VM: args[0], Count: count}
			if len(args) == 2 {
				p.Name = args[1]
			}
			var res api.ForkResult
			err := a.call(cmd.Context(), api.MethodVMFork, p, &res)
			if a.output == "json" && err == nil {
				return a.printJSON(res)
			}
			for i, v := range res.VMs {
				ms := 0.0
				if i < len(res.CloneMS) {
					ms = res.CloneMS[i]
				}
				fmt.Fprintf(a.Stdout, "%s is running (%s, %.0f ms after a %.0f ms snapshot)\n", v.Name, orDash(v.IP), ms, res.SnapshotMS)
			}
			return err
		},
	}
	c.Flags().IntVar(&count, "count", 1, "how many clones (named NAME-1..NAME-N when more than one)")
	return c
}

// addVMPauseCommands adds `vm pause` and `vm resume`.
func (a *App) addVMPauseCommands(vm *cobra.Command) {
	vm.AddCommand(a.vmForkCommand())
	for _, c := range []struct{ use, method, short, done string }{
		{"pause", api.MethodVMPause, "Stop a running VM's vCPUs (its memory and processes stay)", "paused"},
		{"resume", api.MethodVMResume, "Run a paused VM again", "resumed"},
	} {
		vm.AddCommand(&cobra.Command{
			Use: c.use + " VM", Short: c.short, Args: exactArgs(1, "VM"), Example: "  banger vm " + c.use + " dev",
			RunE: func(cmd *cobra.Command, args []string) error {
				var v api.VM
				if err := a.call(cmd.Context(), c.method, api.VMRef{VM: args[0]}, &v); err != nil {
					return err
				}
				if a.output == "json" {
					return a.printJSON(v)
				}
				fmt.Fprintf(a.Stdout, "%s %s\n", c.done, v.Name)
				return nil
			},
		})
	}
}
