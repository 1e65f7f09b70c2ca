package cli

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/daemon"
	"github.com/bangerdev/banger/internal/store"
)

func absPath(p string) (string, error) {
	if p == "" {
		return "", nil
	}
	return filepath.Abs(p)
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fG", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fM", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%dK", n>>10)
}

func (a *App) kernelCommand() *cobra.Command {
	k := &cobra.Command{Use: "kernel", Short: "Manage guest kernels"}
	var p daemon.KernelImportParams
	imp := &cobra.Command{
		Use:   "import [VMLINUX|BZIMAGE]",
		Short: "Import a kernel file, a Debian kernel package (--deb) or one fetched by name (--package)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if len(args) == 1 {
				if p.Path, err = absPath(args[0]); err != nil {
					return err
				}
			}
			if p.Deb, err = absPath(p.Deb); err != nil {
				return err
			}
			if p.Initrd, err = absPath(p.Initrd); err != nil {
				return err
			}
			if p.Path == "" && p.Deb == "" && p.Package == "" {
				return usagef("give a kernel file, --deb FILE or --package NAME")
			}
			if a.output != "json" {
				fmt.Fprintln(a.Stderr, "importing kernel…")
			}
			var res store.Kernel
			if err := a.call(cmd.Context(), "kernel.import", p, &res); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.Stdout, "imported kernel %s (%s)\n", res.Name, orDash(res.Version))
			return nil
		},
	}
	imp.Flags().StringVar(&p.Name, "name", "", "name (default: from the kernel version or file)")
	imp.Flags().StringVar(&p.Initrd, "initrd", "", "an initrd to load before banger's")
	imp.Flags().StringVar(&p.Deb, "deb", "", "a Debian linux-image .deb")
	imp.Flags().StringVar(&p.Package, "package", "", "a Debian kernel package to download with apt-get (e.g. linux-image-cloud-amd64)")
	k.AddCommand(imp)
	k.AddCommand(&cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List kernels", Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var ks []*store.Kernel
			if err := a.call(cmd.Context(), "kernel.list", nil, &ks); err != nil {
				return err
			}
			if a.output == "json" {
				if ks == nil {
					ks = []*store.Kernel{}
				}
				return a.printJSON(ks)
			}
			var rows [][]string
			for _, k := range ks {
				rows = append(rows, []string{k.Name, orDash(k.Version), humanBytes(k.SizeBytes), ago(k.CreatedAt)})
			}
			return a.table([]string{"NAME", "VERSION", "SIZE", "CREATED"}, rows)
		},
	})
	k.AddCommand(a.rmCommand("kernel.delete", "a kernel"))
	return k
}

func (a *App) rmCommand(method, what string) *cobra.Command {
	return &cobra.Command{
		Use: "rm NAME", Aliases: []string{"delete"}, Short: "Remove " + what + " (refused while a VM uses it)", Args: exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var res map[string]string
			if err := a.call(cmd.Context(), method, daemon.NameRef{Name: args[0]}, &res); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.Stdout, "removed %s\n", res["deleted"])
			return nil
		},
	}
}

func (a *App) imageCommand() *cobra.Command {
	im := &cobra.Command{Use: "image", Short: "Manage root filesystem images"}
	var name string
	imp := &cobra.Command{
		Use:   "import FILE",
		Short: "Import an ext4 root filesystem image",
		Args:  exactArgs(1, "FILE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := absPath(args[0])
			if err != nil {
				return err
			}
			var res store.Image
			if err := a.call(cmd.Context(), "image.import", daemon.ImageImportParams{Name: name, Path: p}, &res); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.Stdout, "imported image %s (%s)\n", res.Name, humanBytes(res.SizeBytes))
			return nil
		},
	}
	imp.Flags().StringVar(&name, "name", "", "name (default: from the file name)")
	im.AddCommand(imp)
	im.AddCommand(&cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List images", Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var ims []*store.Image
			if err := a.call(cmd.Context(), "image.list", nil, &ims); err != nil {
				return err
			}
			if a.output == "json" {
				if ims == nil {
					ims = []*store.Image{}
				}
				return a.printJSON(ims)
			}
			var rows [][]string
			for _, i := range ims {
				d := i.Digest
				if len(d) > 19 {
					d = d[:19]
				}
				rows = append(rows, []string{i.Name, humanBytes(i.SizeBytes), orDash(d), ago(i.CreatedAt)})
			}
			return a.table([]string{"NAME", "SIZE", "DIGEST", "CREATED"}, rows)
		},
	})
	im.AddCommand(a.rmCommand("image.delete", "an image"))
	return im
}

func (a *App) runCommand() *cobra.Command {
	var cf createFlags
	var rm bool
	run := &cobra.Command{
		Use:   "run [flags] [-- CMD...]",
		Short: "Create a VM and run a command (or a shell) in it",
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := cf.params()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			v, err := a.createVM(ctx, p, false)
			if err != nil {
				return err
			}
			if rm {
				defer a.call(ctx, "vm.delete", daemon.DeleteParams{VM: v.ID, Force: true}, nil)
			}
			code, err := a.runInGuest(ctx, v.ID, args, len(args) == 0)
			if err != nil {
				return err
			}
			if code != 0 {
				return &ExitError{Code: code}
			}
			return nil
		},
	}
	cf.add(run, true)
	run.Flags().BoolVar(&rm, "rm", false, "delete the VM when the command ends")
	return run
}

var _ = strings.TrimSpace
