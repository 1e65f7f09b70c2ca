package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/portspec"
	"github.com/bangerdev/banger/internal/termsafe"
	"github.com/bangerdev/banger/internal/userconfig"
)

type createFlags struct {
	name, image, kernel, memory, disk, driver, workspace string
	cpus                                                 int
	noWait, noWorkspace                                  bool
	snapshot                                             string
	cmd                                                  *cobra.Command
	ttl                                                  time.Duration
	publish                                              []string
	size                                                 string
}

func (f *createFlags) add(cmd *cobra.Command, withName bool) {
	fl := cmd.Flags()
	if withName {
		fl.StringVar(&f.name, "name", "", "VM name (default: a random one)")
	}
	fl.StringVar(&f.image, "image", "", "image (default: the configured one, else the newest)")
	fl.StringVar(&f.kernel, "kernel", "", "kernel (default: the configured one, else the newest)")
	fl.StringVar(&f.size, "size", "", "size profile: small, medium, large or one from the config (banger config get sizes); --cpus/--memory/--disk override it")
	fl.IntVar(&f.cpus, "cpus", 1, "virtual CPUs")
	fl.StringVar(&f.memory, "memory", "512M", "memory, e.g. 512M or 2G")
	fl.StringVar(&f.disk, "disk", "4G", "writable disk size, e.g. 10G")
	fl.StringVar(&f.driver, "vmm", "", "VMM driver: qemu or firecracker (default: auto)")
	fl.StringVar(&f.workspace, "workspace", "", "copy the git repository at DIR into the VM (/root/<name>)")
	fl.BoolVar(&f.noWorkspace, "no-workspace", false, "copy no repository into the VM (the default)")
	fl.StringVar(&f.snapshot, "snapshot", "", "make the VM from a snapshot (banger snapshot ls): it resumes where the snapshot was taken, with its own identity")
	fl.StringArrayVarP(&f.publish, "publish", "p", nil, "publish a VM port on this host while it runs: [HOST:]PORT:GUEST_PORT (HOST 127.0.0.1; PORT 0 picks one), repeatable")
	fl.DurationVar(&f.ttl, "ttl", 0, "delete the VM this long after it is created, e.g. 30m or 2h (bangerd does it, even if this command is gone)")
	cmd.MarkFlagsMutuallyExclusive("workspace", "no-workspace")
	f.cmd = cmd
}

// resolveWorkspace checks --workspace before the VM is made and stores the
// repository's root in p.
func (f *createFlags) resolveWorkspace(ctx context.Context, p *api.CreateParams) error {
	if f.workspace == "" || f.noWorkspace {
		return nil
	}
	top, err := workspaceTop(ctx, f.workspace)
	if err != nil {
		return usagef("--workspace: %v", err)
	}
	p.Workspace = top
	return nil
}

func (f *createFlags) params() (api.CreateParams, error) {
	if f.ttl < 0 {
		return api.CreateParams{}, usagef("--ttl must be positive")
	}
	var ports []string
	for _, s := range f.publish {
		sp, err := portspec.Parse(s)
		if err != nil {
			return api.CreateParams{}, usagef("-p: %v", err)
		}
		ports = append(ports, sp.String())
	}
	if f.snapshot != "" {
		for _, n := range []string{"image", "kernel", "cpus", "memory", "disk", "vmm", "size"} {
			if f.changed(n) {
				return api.CreateParams{}, usagef("--%s: a VM made from a snapshot has the snapshot's image, kernel, cpus, memory, disk and VMM", n)
			}
		}
		return api.CreateParams{Name: f.name, Snapshot: f.snapshot, TTLSeconds: f.ttl.Seconds(), Ports: ports}, nil
	}
	if err := f.applySize(); err != nil {
		return api.CreateParams{}, err
	}
	mem, err := parseSize(f.memory)
	if err != nil {
		return api.CreateParams{}, usagef("--memory: %v", err)
	}
	disk, err := parseSize(f.disk)
	if err != nil {
		return api.CreateParams{}, usagef("--disk: %v", err)
	}
	return api.CreateParams{Name: f.name, Image: f.image, Kernel: f.kernel, VCPUs: f.cpus, MemoryMiB: mem, DiskMiB: disk, Driver: f.driver,
		TTLSeconds: f.ttl.Seconds(), Ports: ports}, nil
}

func (f *createFlags) changed(flag string) bool {
	return f.cmd != nil && f.cmd.Flags().Changed(flag)
}

// applySize fills cpus, memory and disk not given as flags from --size, else
// from the config's default_size.
func (f *createFlags) applySize() error {
	if f.size == "" && (f.changed("cpus") || f.changed("memory") || f.changed("disk")) {
		return nil
	}
	l, err := paths.Resolve("")
	if err != nil {
		return err
	}
	cfg, err := userconfig.Load(l.ConfigFile())
	if err != nil {
		return err
	}
	prof, ok, err := userconfig.Profile(cfg, f.size)
	if err != nil {
		return usagef("--size: %v", err)
	}
	if !ok {
		return nil
	}
	if !f.changed("cpus") && prof.CPUs > 0 {
		f.cpus = prof.CPUs
	}
	if !f.changed("memory") && prof.Memory != "" {
		f.memory = prof.Memory
	}
	if !f.changed("disk") && prof.Disk != "" {
		f.disk = prof.Disk
	}
	return nil
}

// parseSize reads 512M, 2G, 1024 (MiB) into MiB.
func parseSize(s string) (int, error) { return userconfig.ParseMiB(s) }

// createVM begins a create and, unless noWait, follows its stages.
func (a *App) createVM(ctx context.Context, p api.CreateParams, noWait bool) (*api.VM, error) {
	c, err := a.client(ctx)
	if err != nil {
		return nil, err
	}
	st, err := c.BeginCreate(ctx, p)
	if err != nil {
		return nil, err
	}
	if noWait {
		if a.output == "json" {
			return nil, a.printJSON(st)
		}
		fmt.Fprintf(a.Stdout, "creating %s (%s); follow with: banger vm show %s (or banger events -f); cancel with: banger op cancel %s\n", st.Name, st.OpID, st.Name, st.OpID)
		return nil, nil
	}
	var onStage func(api.Stage)
	if a.output != "json" {
		onStage = func(s api.Stage) {
			mark := "✓"
			if s.Error != "" {
				mark = "✗"
			}
			fmt.Fprintf(a.Stderr, "%s %-18s %6.0f ms\n", mark, s.Name, s.DurationMS)
		}
	}
	var v *api.VM
	err = a.followCancellable(ctx, c, "the create of "+st.Name, st.OpID, func(ctx context.Context) error {
		var err error
		v, err = c.WaitCreate(ctx, st, onStage)
		return err
	})
	return v, err
}

func (a *App) addVMLifecycleCommands(vm *cobra.Command) {
	var cf createFlags
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "Create and boot a VM",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := cf.params()
			if err != nil {
				return err
			}
			p.Name = args[0]
			if err := cf.resolveWorkspace(cmd.Context(), &p); err != nil {
				return err
			}
			if p.Workspace != "" && cf.noWait {
				return usagef("--workspace needs the VM running: drop --no-wait, or push later with banger workspace push")
			}
			v, err := a.createVM(cmd.Context(), p, cf.noWait)
			if err != nil || v == nil {
				return err
			}
			if p.Workspace != "" {
				if _, err := a.pushWorkspace(cmd.Context(), v.Name, p.Workspace, ""); err != nil {
					return fmt.Errorf("%s is running, but its workspace push failed (retry with banger workspace push %s %s): %w", v.Name, v.Name, p.Workspace, err)
				}
			}
			if len(p.Ports) > 0 || p.TTLSeconds > 0 {
				// the record as bangerd reports it now: chosen ports, expiry
				if got, err := a.getVM(cmd.Context(), v.ID); err == nil {
					v = got
				}
			}
			if a.output == "json" {
				return a.printJSON(v)
			}
			fmt.Fprintf(a.Stdout, "%s is running\n", v.Name)
			a.printForwards(a.Stdout, v)
			return nil
		},
	}
	cf.add(create, false)
	create.Flags().BoolVar(&cf.noWait, "no-wait", false, "return once the create has begun")
	vm.AddCommand(create)

	simple := func(use, short, method string) *cobra.Command {
		return &cobra.Command{
			Use: use + " VM", Short: short, Args: exactArgs(1, "VM"),
			RunE: func(cmd *cobra.Command, args []string) error {
				var v api.VM
				if err := a.call(cmd.Context(), method, api.VMRef{VM: args[0]}, &v); err != nil {
					return err
				}
				return a.printVMState(&v)
			},
		}
	}
	vm.AddCommand(simple("start", "Start a stopped VM", "vm.start"))
	vm.AddCommand(simple("kill", "Stop a VM now, without a graceful shutdown", "vm.kill"))
	for _, m := range []struct{ use, short, method string }{
		{"stop", "Shut a VM down gracefully (killed after --timeout)", "vm.stop"},
		{"restart", "Stop and start a VM", "vm.restart"},
	} {
		var timeout time.Duration
		c := &cobra.Command{
			Use: m.use + " VM", Short: m.short, Args: exactArgs(1, "VM"),
			RunE: func(cmd *cobra.Command, args []string) error {
				var v api.VM
				if err := a.call(cmd.Context(), m.method, api.StopParams{VM: args[0], TimeoutSeconds: timeout.Seconds()}, &v); err != nil {
					return err
				}
				return a.printVMState(&v)
			},
		}
		c.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "how long to wait for the guest to power off before killing it")
		vm.AddCommand(c)
	}
	var force, all bool
	del := &cobra.Command{
		Use: "delete VM...", Aliases: []string{"rm"}, Short: "Delete VMs and their disks",
		Example: "  banger vm rm dev\n  banger vm rm -f web db\n  banger vm rm --all --force",
		Args: func(cmd *cobra.Command, args []string) error {
			if all == (len(args) > 0) {
				return usagef("usage: %s VM... (or --all)", cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			c, err := a.client(ctx)
			if err != nil {
				return err
			}
			refs := args
			if all {
				vms, err := c.ListVMs(ctx)
				if err != nil {
					return err
				}
				refs = nil
				for _, v := range vms {
					refs = append(refs, v.ID)
				}
			}
			res, err := a.deleteVMs(ctx, c, refs, force)
			if a.output == "json" {
				if len(args) == 1 && len(res) == 1 {
					if perr := a.printJSON(res[0]); perr != nil {
						return perr
					}
				} else if perr := a.printJSON(res); perr != nil {
					return perr
				}
			}
			return err
		},
	}
	del.Flags().BoolVarP(&force, "force", "f", false, "delete even if running (kills it)")
	del.Flags().BoolVar(&all, "all", false, "delete every VM (running ones need --force)")
	vm.AddCommand(del)

	var pruneFilters []string
	prune := &cobra.Command{
		Use:   "prune",
		Short: "Delete every stopped (or failed) VM, or those matching --filter",
		Example: "  banger vm prune\n" +
			"  banger vm prune --filter name=ci-\n" +
			"  banger vm prune --filter image=debian -o json",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := parseVMFilter(pruneFilters)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			c, err := a.client(ctx)
			if err != nil {
				return err
			}
			vms, err := c.ListVMs(ctx)
			if err != nil {
				return err
			}
			var refs []string
			for _, v := range f.apply(vms) {
				if v.State == api.StateStopped || v.State == api.StateError {
					refs = append(refs, v.ID)
				}
			}
			res, err := a.deleteVMs(ctx, c, refs, false)
			if a.output == "json" {
				if perr := a.printJSON(res); perr != nil {
					return perr
				}
			} else if len(refs) == 0 {
				fmt.Fprintln(a.Stdout, "nothing to prune")
			}
			return err
		},
	}
	prune.Flags().StringArrayVar(&pruneFilters, "filter", nil, "only VMs matching KEY=VALUE: state=, name=SUBSTRING, image=NAME, id=PREFIX (repeatable)")
	vm.AddCommand(prune)

	var setCPUs int
	var setMem, setDisk string
	set := &cobra.Command{
		Use: "set VM", Short: "Change cpus/memory (next start) or grow the disk", Args: exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := api.SetParams{VM: args[0], VCPUs: setCPUs}
			var err error
			if setMem != "" {
				if p.MemoryMiB, err = parseSize(setMem); err != nil {
					return usagef("--memory: %v", err)
				}
			}
			if setDisk != "" {
				if p.DiskMiB, err = parseSize(setDisk); err != nil {
					return usagef("--disk: %v", err)
				}
			}
			var res api.SetResult
			if err := a.call(cmd.Context(), api.MethodVMSet, p, &res); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.Stdout, "%s: %d cpus, %s memory, %s disk\n", res.VM.Name, res.VM.VCPUs, mib(res.VM.MemoryMiB), mib(res.VM.DiskMiB))
			if res.Note != "" {
				fmt.Fprintln(a.Stdout, res.Note)
			}
			return nil
		},
	}
	set.Flags().IntVar(&setCPUs, "cpus", 0, "virtual CPUs")
	set.Flags().StringVar(&setMem, "memory", "", "memory, e.g. 2G")
	set.Flags().StringVar(&setDisk, "disk", "", "disk size (grow only), e.g. 20G")
	vm.AddCommand(set)
}

func (a *App) printVMState(v *api.VM) error {
	if a.output == "json" {
		return a.printJSON(v)
	}
	line := fmt.Sprintf("%s is %s", v.Name, v.State)
	if v.LastError != "" {
		line += " (" + termsafe.String(v.LastError) + ")" // may quote the guest's console
	}
	fmt.Fprintln(a.Stdout, line)
	return nil
}

// deleteVMs deletes refs one by one, printing each (unless -o json), and
// returns what was deleted and the failures joined.
func (a *App) deleteVMs(ctx context.Context, c *client.Client, refs []string, force bool) ([]api.DeleteResult, error) {
	out := []api.DeleteResult{}
	var errs []error
	for _, ref := range refs {
		r, err := c.DeleteVM(ctx, ref, force)
		if err != nil {
			errs = append(errs, err)
			if a.output != "json" && len(refs) > 1 {
				a.printError(err)
			}
			continue
		}
		out = append(out, r)
		if a.output != "json" {
			fmt.Fprintf(a.Stdout, "deleted %s\n", r.Deleted)
		}
	}
	switch {
	case len(errs) == 1 && len(refs) == 1:
		return out, errs[0]
	case len(errs) > 0:
		return out, fmt.Errorf("%d of %d VMs not deleted (see above): %w", len(errs), len(refs), errors.Join(errs...))
	}
	return out, nil
}

func (a *App) getVM(ctx context.Context, ref string) (*api.VM, error) {
	c, err := a.client(ctx)
	if err != nil {
		return nil, err
	}
	return c.GetVM(ctx, ref)
}

// printForwards says where a VM's published ports listen.
func (a *App) printForwards(w io.Writer, v *api.VM) {
	for _, f := range v.Forwards {
		if f.Error != "" {
			fmt.Fprintf(a.Stderr, "cannot publish %s: %s\n", f.Spec, f.Error)
			continue
		}
		fmt.Fprintf(w, "publishing %s -> %s:%d\n", net.JoinHostPort(f.Host, strconv.Itoa(f.Port)), v.Name, f.GuestPort)
	}
}
