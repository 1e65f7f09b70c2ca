package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/bangerdev/banger/internal/rpc"

	"github.com/bangerdev/banger/api"
)

func absPath(p string) (string, error) {
	if p == "" {
		return "", nil
	}
	return filepath.Abs(p)
}

func (a *App) kernelCommand() *cobra.Command {
	k := &cobra.Command{Use: "kernel", Short: "Manage guest kernels"}
	var p api.KernelImportParams
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
			var res api.Kernel
			if err := a.call(cmd.Context(), api.MethodKernelImport, p, &res); err != nil {
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
	var kFormat string
	kls := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List kernels", Args: noArgs,
		Example: "  banger kernel ls\n  banger kernel ls --format '{{.Name}} {{.Version}}'",
		RunE: func(cmd *cobra.Command, args []string) error {
			var ks []*api.Kernel
			if err := a.call(cmd.Context(), api.MethodKernelList, nil, &ks); err != nil {
				return err
			}
			return listOutput(a, ks, false, kFormat, func(k *api.Kernel) string { return k.ID }, func() error {
				var rows [][]string
				for _, k := range ks {
					rows = append(rows, []string{k.Name, orDash(k.Version), sizeBytes(k.SizeBytes), ago(k.CreatedAt)})
				}
				return a.table([]string{"NAME", "VERSION", "SIZE", "CREATED"}, rows)
			})
		},
	}
	addFormat(kls, &kFormat)
	k.AddCommand(kls)
	k.AddCommand(a.rmCommand(api.MethodKernelDelete, "a kernel"))
	return k
}

func (a *App) rmCommand(method, what string) *cobra.Command {
	return &cobra.Command{
		Use: "rm NAME", Aliases: []string{"delete"}, Short: "Remove " + what + " (refused while a VM uses it)", Args: exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var res api.DeleteResult
			if err := a.call(cmd.Context(), method, api.NameRef{Name: args[0]}, &res); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.Stdout, "removed %s\n", res.Deleted)
			return nil
		},
	}
}

func (a *App) imageCommand() *cobra.Command {
	im := &cobra.Command{Use: "image", Short: "Manage root filesystem images"}
	var name string
	var headroom int
	imp := &cobra.Command{
		Use:   "import FILE|DIR",
		Short: "Import an ext4 root filesystem, a docker save tarball or an OCI layout (tarball or directory)",
		Args:  exactArgs(1, "FILE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := absPath(args[0])
			if err != nil {
				return err
			}
			return a.imageOp(cmd.Context(), api.MethodImageImportBegin, api.ImageOpParams{Name: name, Path: p, HeadroomMiB: headroom}, "imported")
		},
	}
	imp.Flags().StringVar(&name, "name", "", "name (default: from the file name)")
	imp.Flags().IntVar(&headroom, "headroom", 0, "free space in MiB beyond the content (default 64)")
	im.AddCommand(imp)

	var pp api.ImageOpParams
	var pullNoWait, buildNoWait bool
	pull := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull a linux/amd64 image from an OCI registry (debian:bookworm means Docker Hub)",
		Args:  exactArgs(1, "REF"),
		RunE: func(cmd *cobra.Command, args []string) error {
			pp.Ref = args[0]
			return a.imageOpWait(cmd.Context(), api.MethodImagePullBegin, pp, "pulled", pullNoWait)
		},
	}
	pull.Flags().StringVar(&pp.Name, "name", "", "name (default: from the reference, e.g. debian-bookworm)")
	pull.Flags().BoolVar(&pp.Insecure, "insecure", false, "use plain HTTP for the registry")
	pull.Flags().IntVar(&pp.HeadroomMiB, "headroom", 0, "free space in MiB beyond the content (default 64)")
	pull.Flags().BoolVar(&pullNoWait, "no-wait", false, "return once the pull has begun (Ctrl-C otherwise cancels it)")
	im.AddCommand(pull)

	var bp api.ImageOpParams
	var pkgs string
	build := &cobra.Command{
		Use:   "build --debootstrap SUITE",
		Short: "Build a Debian image with debootstrap from the host's configured mirror",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if bp.Suite == "" {
				return usagef("give --debootstrap SUITE (e.g. bookworm)")
			}
			bp.Packages = nil
			for _, p := range strings.Split(pkgs, ",") {
				if p = strings.TrimSpace(p); p != "" {
					bp.Packages = append(bp.Packages, p)
				}
			}
			return a.imageOpWait(cmd.Context(), api.MethodImageBuildBegin, bp, "built", buildNoWait)
		},
	}
	build.Flags().StringVar(&bp.Suite, "debootstrap", "", "Debian suite to bootstrap (e.g. bookworm)")
	build.Flags().StringVar(&bp.Mirror, "mirror", "", "Debian mirror URL (default: the host's apt sources)")
	build.Flags().StringVar(&pkgs, "packages", "", "extra packages, comma-separated")
	build.Flags().StringVar(&bp.Name, "name", "", "name (default: debian-SUITE)")
	build.Flags().IntVar(&bp.HeadroomMiB, "headroom", 0, "free space in MiB beyond the content (default 64)")
	build.Flags().BoolVar(&buildNoWait, "no-wait", false, "return once the build has begun (Ctrl-C otherwise cancels it)")
	im.AddCommand(build)
	var imFormat string
	ils := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List images", Args: noArgs,
		Example: "  banger image ls\n  banger image ls --format '{{.Name}} {{size .SizeBytes}}'",
		RunE: func(cmd *cobra.Command, args []string) error {
			var ims []*api.Image
			if err := a.call(cmd.Context(), api.MethodImageList, nil, &ims); err != nil {
				return err
			}
			return listOutput(a, ims, false, imFormat, func(i *api.Image) string { return i.ID }, func() error {
				var rows [][]string
				for _, i := range ims {
					d := i.Digest
					if len(d) > 19 {
						d = d[:19]
					}
					rows = append(rows, []string{i.Name, sizeBytes(i.SizeBytes), orDash(d), orDash(i.Source), ago(i.CreatedAt)})
				}
				return a.table([]string{"NAME", "SIZE", "DIGEST", "SOURCE", "CREATED"}, rows)
			})
		},
	}
	addFormat(ils, &imFormat)
	im.AddCommand(ils)
	im.AddCommand(a.rmCommand(api.MethodImageDelete, "an image"))
	return im
}

// imageOp starts a long image operation and follows it to the end, with a
// progress bar on a terminal (none under -o json or when stderr is not one).
func (a *App) imageOp(ctx context.Context, method string, p api.ImageOpParams, verb string) error {
	return a.imageOpWait(ctx, method, p, verb, false)
}

// imageOpWait is imageOp; with noWait it returns once the operation has
// begun, saying how to follow and cancel it.
func (a *App) imageOpWait(ctx context.Context, method string, p api.ImageOpParams, verb string, noWait bool) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	var st api.ImageOpStatus
	if err := c.Call(ctx, method, p, &st); err != nil {
		return err
	}
	if noWait {
		if a.output == "json" {
			return a.printJSON(st)
		}
		fmt.Fprintf(a.Stdout, "image %s begun (%s); follow with: banger events -f; cancel with: banger op cancel %s\n", st.Kind, st.OpID, st.OpID)
		return nil
	}
	show := a.output != "json" && a.stderrIsTerminal()
	var bar *progressbar.ProgressBar
	phase := ""
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	poll := func(ctx context.Context) error {
		for !st.Done {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-tick.C:
			}
			if err := c.Call(rpc.WithOpID(ctx, st.OpID), api.MethodImageOpStatus, api.ImageOpStatusParams{OpID: st.OpID}, &st); err != nil {
				return err
			}
			if show {
				a.showImagePhase(st, &bar, &phase)
			}
		}
		return nil
	}
	if err := a.followCancellable(ctx, c, "the image "+st.Kind, st.OpID, poll); err != nil {
		return err
	}
	if bar != nil {
		bar.Finish()
	}
	if st.Error != "" {
		return fmt.Errorf("%s (%s)", st.Error, st.OpID)
	}
	if a.output == "json" {
		return a.printJSON(st.Image)
	}
	res := st.Image
	if st.Reused {
		verb += " (same image already present: reused)"
	}
	fmt.Fprintf(a.Stdout, "%s image %s (%s, %s)\n", verb, res.Name, sizeBytes(res.SizeBytes), orDash(res.Digest))
	return nil
}

// showImagePhase draws an image operation's progress on stderr.
func (a *App) showImagePhase(st api.ImageOpStatus, barp **progressbar.ProgressBar, phase *string) {
	if st.Phase != *phase {
		if *barp != nil {
			(*barp).Finish()
		}
		*phase = st.Phase
		total := st.Total
		if total <= 0 {
			total = -1
		}
		*barp = progressbar.NewOptions64(total, progressbar.OptionSetWriter(a.Stderr), progressbar.OptionSetDescription(fmt.Sprintf("%-8s", st.Phase)),
			progressbar.OptionShowBytes(true), progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionClearOnFinish(),
			progressbar.OptionSetWidth(30))
	}
	if st.Total > 0 {
		(*barp).ChangeMax64(st.Total)
	}
	(*barp).Set64(st.Current)
}

func (a *App) stderrIsTerminal() bool {
	f, ok := a.Stderr.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
