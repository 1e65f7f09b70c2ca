package cli

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
)

// poolCommand is `banger pool ls|set`.
func (a *App) poolCommand() *cobra.Command {
	pc := &cobra.Command{Use: "pool", Short: "Keep VMs ready for banger run",
		Example: "  banger pool set 2 --memory 256M --disk 256M\n  banger pool ls"}
	var poolFormat string
	pls := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List the ready pools", Args: noArgs,
		Example: "  banger pool ls\n  banger pool ls -o json\n  banger pool ls --format '{{.Ready}}/{{.Size}} {{join .VMs \",\"}}'",
		RunE: func(cmd *cobra.Command, args []string) error {
			var l []*api.Pool
			if err := a.call(cmd.Context(), api.MethodPoolList, nil, &l); err != nil {
				return err
			}
			return listOutput(a, l, false, poolFormat, func(p *api.Pool) string { return strconv.Itoa(p.Size) }, func() error {
				rows := make([][]string, 0, len(l))
				for _, p := range l {
					rows = append(rows, []string{orDash(p.Image), orDash(p.Kernel), strconv.Itoa(p.VCPUs), mib(p.MemoryMiB), mib(p.DiskMiB),
						fmt.Sprintf("%d/%d", p.Ready, p.Size), orDash(strings.Join(p.VMs, ",")), orDash(p.Note)})
				}
				return a.table([]string{"IMAGE", "KERNEL", "CPUS", "MEMORY", "DISK", "READY", "VMS", "NOTE"}, rows)
			})
		},
	}
	addFormat(pls, &poolFormat)
	pc.AddCommand(pls)
	var image, kernel, memory, disk string
	var cpus int
	set := &cobra.Command{
		Use:     "set SIZE",
		Short:   "Keep SIZE VMs of a spec ready (0 removes the pool); banger run with that spec takes one",
		Example: "  banger pool set 2\n  banger pool set 1 --image debian --cpus 2 --memory 1G\n  banger pool set 0",
		Args:    exactArgs(1, "SIZE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			size, err := strconv.Atoi(args[0])
			if err != nil {
				return usagef("SIZE must be a number, not %q", args[0])
			}
			p := api.PoolSpec{Image: image, Kernel: kernel, VCPUs: cpus, Size: size}
			if p.MemoryMiB, err = parseSize(memory); err != nil {
				return usagef("--memory: %v", err)
			}
			if p.DiskMiB, err = parseSize(disk); err != nil {
				return usagef("--disk: %v", err)
			}
			var res api.Pool
			if err := a.call(cmd.Context(), api.MethodPoolSet, p, &res); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.Stdout, "pool of %d (%d cpus, %s memory, %s disk); it fills in the background\n", res.Size, res.VCPUs, mib(res.MemoryMiB), mib(res.DiskMiB))
			return nil
		},
	}
	set.Flags().StringVar(&image, "image", "", "image (default: the configured one, else the newest)")
	set.Flags().StringVar(&kernel, "kernel", "", "kernel (default: the configured one, else the newest)")
	set.Flags().IntVar(&cpus, "cpus", 1, "virtual CPUs")
	set.Flags().StringVar(&memory, "memory", "512M", "memory, e.g. 512M or 2G")
	set.Flags().StringVar(&disk, "disk", "4G", "writable disk size, e.g. 10G")
	pc.AddCommand(set)
	return pc
}
