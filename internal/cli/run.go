package cli

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
)

// Defaults `banger run` prepares when the home has no kernel or image.
const (
	defaultKernelPackage = "linux-image-cloud-amd64"
	defaultSuite         = "bookworm"
)

func (a *App) runCommand() *cobra.Command {
	var cf createFlags
	var ef execFlags
	var rm, cold bool
	run := &cobra.Command{
		Use:   "run [flags] [-- CMD...]",
		Short: "Create a VM and run a command (or the image's entrypoint, or a shell) in it",
		Long: "Creates a VM and runs CMD in it. Without CMD it runs the image's entrypoint and command\n" +
			"when it has them, else an interactive shell. -e/--env-file, -w, -u, -i and -t work as for\n" +
			"exec. With no kernel or image yet, banger prepares Debian's cloud kernel and a Debian\n" +
			defaultSuite + " image first.\n\n" +
			"The first run of a spec (image, kernel, cpus, memory, disk) boots cold and saves a base\n" +
			"snapshot right after boot; later runs of that spec restore it (each VM still gets its own\n" +
			"name, address, keys and machine-id). --cold boots without it.\n\n" +
			"For agents and scripts, use --rm: the VM is deleted when the command ends, whatever\n" +
			"its status, so nothing is left behind. The exit status is the command's; 125 means\n" +
			"banger itself failed.",
		Example: "  banger run --rm -- uname -a\n" +
			"  banger run --rm -e CI=1 --workspace . -- make test\n" +
			"  banger run --name dev --cpus 2 --memory 2G",
		Annotations: map[string]string{annotationDockerExit: "1"},
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := cf.params()
			if err != nil {
				return err
			}
			p.Base = !cold && p.Snapshot == ""
			o, err := ef.options()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if err := cf.resolveWorkspace(ctx, &p); err != nil {
				return err
			}
			if err := a.prepareDefaults(ctx, p); err != nil {
				return err
			}
			v, err := a.createVM(ctx, p, false)
			if err != nil {
				return err
			}
			if rm {
				defer a.call(context.WithoutCancel(ctx), api.MethodVMDelete, api.DeleteParams{VM: v.ID, Force: true}, nil)
			}
			if len(p.Ports) > 0 {
				if got, err := a.getVM(ctx, v.ID); err == nil {
					a.printForwards(a.Stderr, got)
				}
			}
			var ic api.ImageConfig
			if err := a.call(ctx, api.MethodImageConfig, api.NameRef{Name: v.ImageID}, &ic); err != nil {
				return err
			}
			argv := commandFor(ic, args)
			interactive := ef.interactive || len(argv) == 0
			o.TTY = o.TTY || len(argv) == 0
			if p.Workspace != "" {
				dest, err := a.pushWorkspace(ctx, v.Name, p.Workspace, "")
				if err != nil {
					return err
				}
				if o.Dir == "" {
					o.Dir = dest
				}
			}
			return exitWith(a.execInGuest(ctx, v.ID, argv, o, interactive))
		},
	}
	run.Flags().SetInterspersed(false)
	cf.add(run, true)
	run.Flags().BoolVar(&cold, "cold", false, "boot cold: neither use nor save the spec's base snapshot")
	ef.add(run.Flags(), true)
	run.Flags().BoolVar(&rm, "rm", false, "delete the VM when the command ends (what agents and scripts want)")
	return run
}

// commandFor applies the image's entrypoint and command the way container
// runtimes do: args replace Cmd, Entrypoint always comes first; no args and
// no Entrypoint/Cmd means an interactive shell.
func commandFor(ic api.ImageConfig, args []string) []string {
	if len(args) > 0 {
		return append(append([]string{}, ic.Entrypoint...), args...)
	}
	return append(append([]string{}, ic.Entrypoint...), ic.Cmd...)
}

// prepareDefaults imports Debian's cloud kernel and builds a Debian image
// when the home has none and the user named none.
func (a *App) prepareDefaults(ctx context.Context, p api.CreateParams) error {
	if p.Kernel == "" {
		var ks []*api.Kernel
		if err := a.call(ctx, api.MethodKernelList, nil, &ks); err != nil {
			return err
		}
		if len(ks) == 0 {
			fmt.Fprintf(a.Stderr, "no kernel yet: importing Debian's cloud kernel (%s)…\n", defaultKernelPackage)
			var k api.Kernel
			if err := a.call(ctx, api.MethodKernelImport, api.KernelImportParams{Package: defaultKernelPackage}, &k); err != nil {
				return fmt.Errorf("prepare the default kernel: %w", err)
			}
			fmt.Fprintf(a.Stderr, "imported kernel %s\n", k.Name)
		}
	}
	if p.Image == "" {
		var ims []*api.Image
		if err := a.call(ctx, api.MethodImageList, nil, &ims); err != nil {
			return err
		}
		if len(ims) == 0 {
			fmt.Fprintf(a.Stderr, "no image yet: building Debian %s with debootstrap from your apt mirror…\n", defaultSuite)
			if err := a.imageOp(ctx, api.MethodImageBuildBegin, api.ImageOpParams{Suite: defaultSuite}, "built"); err != nil {
				return fmt.Errorf("prepare the default image (or import one: banger image import|pull): %w", err)
			}
		}
	}
	return nil
}
