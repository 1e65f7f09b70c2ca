package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/portspec"
	"github.com/bangerdev/banger/internal/sshconfig"
	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/termsafe"

	"github.com/bangerdev/banger/api"
)

// guestToolCommands are ssh-config, ssh-proxy, cp, ports, port-forward and stats.
func (a *App) guestToolCommands() []*cobra.Command {
	return []*cobra.Command{a.sshConfigCommand(), a.sshProxyCommand(), a.cpCommand(),
		a.portsCommand(), a.portForwardCommand(), a.statsCommand()}
}

// ---- ssh-config, ssh-proxy ----

func (a *App) sshConfigCommand() *cobra.Command {
	var prefix string
	var install bool
	cmd := &cobra.Command{
		Use:   "ssh-config [VM]",
		Short: "Print OpenSSH Host entries for VMs (banger-<name>), or --install them into ~/.ssh/config",
		Long: "Prints OpenSSH Host entries for the running VMs (or one VM, running or not), named\n" +
			"banger-<name> so they never clash with real hosts. Connections go through `banger\n" +
			"ssh-proxy`, and the VMs' host keys are pinned in a known_hosts file bangerd maintains.\n\n" +
			"bangerd also keeps such a file current as VMs come and go; --install adds one\n" +
			"`Include` line for it to ~/.ssh/config (once), after which `ssh banger-dev`, scp,\n" +
			"rsync, git and editors' remote SSH (VS Code Remote-SSH) work by name.",
		Example: "  banger ssh-config --install && ssh banger-dev\n" +
			"  banger ssh-config dev > dev.conf && ssh -F dev.conf banger-dev\n" +
			"  banger ssh-config --prefix '' dev",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 || install && len(args) > 0 {
				return usagef("usage: %s [VM] | --install", cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			var p api.SSHConfigParams
			if len(args) == 1 {
				p.VM = args[0]
			}
			var res api.SSHConfigResult
			if err := a.call(cmd.Context(), api.MethodVMSSHConfig, p, &res); err != nil {
				return err
			}
			if install {
				return a.installSSHConfig(res)
			}
			self, err := os.Executable()
			if err != nil {
				return fmt.Errorf("find the banger executable for ProxyCommand: %w", err)
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			_, err = io.WriteString(a.Stdout, renderSSHConfig(res, self, os.Getenv("BANGER_HOME"), prefix))
			return err
		},
	}
	cmd.Flags().StringVar(&prefix, "prefix", sshconfig.Prefix, "prefix of the host names")
	cmd.Flags().BoolVar(&install, "install", false, "add an Include of the config bangerd keeps to ~/.ssh/config (idempotent)")
	return cmd
}

// installSSHConfig includes bangerd's config from ~/.ssh/config.
func (a *App) installSSHConfig(res api.SSHConfigResult) error {
	if res.ConfigFile == "" {
		return errors.New("this bangerd does not keep an ssh config; upgrade it")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return err
	}
	target := filepath.Join(home, ".ssh", "config")
	changed, err := sshconfig.Install(target, res.ConfigFile)
	if err != nil {
		return fmt.Errorf("install the banger ssh config into %s: %w", target, err)
	}
	if a.output == "json" {
		return a.printJSON(map[string]any{"ssh_config": target, "include": res.ConfigFile, "changed": changed})
	}
	if changed {
		fmt.Fprintf(a.Stdout, "added %q to %s\n", sshconfig.IncludeLine(res.ConfigFile), target)
	} else {
		fmt.Fprintf(a.Stdout, "%s already includes %s\n", target, res.ConfigFile)
	}
	fmt.Fprintf(a.Stdout, "VMs are reachable as banger-<name>, e.g. ssh banger-%s\n", firstHost(res))
	return nil
}

func firstHost(res api.SSHConfigResult) string {
	if len(res.Hosts) > 0 {
		return res.Hosts[0].Name
	}
	return "dev"
}

// renderSSHConfig writes OpenSSH Host entries named prefix+VM. bangerHome,
// when set, is passed to the proxy so that it talks to the same bangerd.
func renderSSHConfig(res api.SSHConfigResult, self, bangerHome, prefix string) string {
	names := make([]string, 0, len(res.Hosts))
	for _, h := range res.Hosts {
		names = append(names, h.Name)
	}
	return sshconfig.Render(sshconfig.Params{Prefix: prefix, User: res.User, IdentityFile: res.IdentityFile,
		KnownHosts: res.KnownHosts, Banger: self, BangerHome: bangerHome}, names)
}

func (a *App) sshProxyCommand() *cobra.Command {
	return &cobra.Command{
		Use:    "ssh-proxy VM",
		Short:  "Connect stdin/stdout to a VM's SSH server (an OpenSSH ProxyCommand)",
		Hidden: true,
		Args:   exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.sshProxy(cmd.Context(), args[0])
		},
	}
}

// sshProxy splices stdin/stdout with the guest agent's SSH server.
func (a *App) sshProxy(ctx context.Context, vm string) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	conn, _, err := c.Connect(ctx, vm)
	if err != nil {
		return err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	go func() {
		io.CopyBuffer(conn, a.Stdin, make([]byte, 256<<10))
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	}()
	_, err = io.CopyBuffer(a.Stdout, conn, make([]byte, 256<<10))
	if err != nil && ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("connection to %s: %w", vm, err)
	}
	return nil
}

// ---- ports ----

func (a *App) portsCommand() *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:     "ports VM",
		Short:   "List the listening TCP and UDP sockets in a VM",
		Example: "  banger ports dev\n  banger ports dev --format '{{.Proto}} {{.Port}} {{.Process}}'",
		Args:    exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var res api.PortsResult
			if err := a.call(cmd.Context(), api.MethodVMPorts, api.VMRef{VM: args[0]}, &res); err != nil {
				return err
			}
			if format != "" {
				items := make([]any, len(res.Ports))
				for i := range res.Ports {
					items[i] = res.Ports[i]
				}
				return a.renderItems(format, items)
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			rows := make([][]string, 0, len(res.Ports))
			for _, p := range res.Ports {
				pid := "-"
				if p.PID > 0 {
					pid = strconv.Itoa(p.PID)
				}
				// guest-provided (a process names itself): a.table strips each cell;
				// the process is stripped first so that one of only controls shows "-"
				rows = append(rows, []string{p.Proto, p.Address, strconv.Itoa(p.Port), pid, orDash(termsafe.Line(p.Process))})
			}
			return a.table([]string{"PROTO", "ADDRESS", "PORT", "PID", "PROCESS"}, rows)
		},
	}
	addFormat(cmd, &format)
	return cmd
}

// ---- port-forward ----

// forwardSpec is a parsed [HOST:]PORT[:GUEST_PORT].
type forwardSpec = portspec.Spec

func parseForward(s string) (forwardSpec, error) { return portspec.Parse(s) }

func (a *App) portForwardCommand() *cobra.Command {
	var auto bool
	cmd := &cobra.Command{
		Use:   "port-forward VM [[HOST:]PORT[:GUEST_PORT]...]",
		Short: "Expose a VM's ports on this host (127.0.0.1 unless HOST says otherwise) until Ctrl-C",
		Long: "Listens on this host and carries each connection to a port in the VM, over the VM's\n" +
			"agent (no network needed). Give several specs to forward several ports. PORT 0 picks\n" +
			"a free port (printed; under -o json, one JSON line with every chosen port). --auto\n" +
			"follows the guest: every TCP port something listens on in the VM is forwarded to the\n" +
			"same port on 127.0.0.1 (or a free one when that is taken) while it listens.",
		Example: "  banger port-forward dev 8080\n" +
			"  banger port-forward dev 8080:80 0:5432 127.0.0.1:9000:9000\n" +
			"  banger port-forward dev --auto",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) < 2 && !auto {
				return usagef("usage: %s VM [HOST:]PORT[:GUEST_PORT]... (or --auto)", cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			var specs []forwardSpec
			for _, s := range args[1:] {
				spec, err := parseForward(s)
				if err != nil {
					return &UsageError{err}
				}
				specs = append(specs, spec)
			}
			return a.portForward(cmd.Context(), args[0], specs, auto)
		},
	}
	cmd.Flags().BoolVar(&auto, "auto", false, "forward every TCP port the guest listens on, following it as ports open and close")
	return cmd
}

// forwarder carries local TCP connections to guest ports over one SSH
// connection, reconnecting when it breaks.
type forwarder struct {
	a  *App
	vm string

	mu sync.Mutex
	cl *ssh.Client
}

func (f *forwarder) client(ctx context.Context) (*ssh.Client, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cl != nil {
		return f.cl, nil
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cl, err := f.a.sshTo(cctx, f.vm)
	if err != nil {
		return nil, err
	}
	f.cl = cl
	go func() {
		cl.Wait()
		f.mu.Lock()
		if f.cl == cl {
			f.cl = nil
		}
		f.mu.Unlock()
	}()
	return cl, nil
}

func (f *forwarder) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cl != nil {
		f.cl.Close()
		f.cl = nil
	}
}

// dial opens a direct-tcpip channel to a guest port (IPv4 loopback, then IPv6).
func (f *forwarder) dial(ctx context.Context, guestPort int) (net.Conn, error) {
	cl, err := f.client(ctx)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	port := strconv.Itoa(guestPort)
	c, err := cl.DialContext(dctx, "tcp", net.JoinHostPort("127.0.0.1", port))
	if err == nil {
		return c, nil
	}
	var oe *ssh.OpenChannelError
	if !errors.As(err, &oe) {
		return nil, err
	}
	if c6, err6 := cl.DialContext(dctx, "tcp", net.JoinHostPort("::1", port)); err6 == nil {
		return c6, nil
	}
	return nil, fmt.Errorf("nothing accepts connections on port %d in %s (%v)", guestPort, f.vm, err)
}

// serve accepts on ln until it is closed, carrying connections to guestPort.
func (f *forwarder) serve(ctx context.Context, ln net.Listener, guestPort int, wg *sync.WaitGroup) {
	defer wg.Done()
	for {
		lconn, err := ln.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer lconn.Close()
			gconn, err := f.dial(ctx, guestPort)
			if err != nil {
				fmt.Fprintf(f.a.Stderr, "port-forward: %s: %s\n", lconn.RemoteAddr(), termsafe.String(err.Error()))
				return
			}
			defer gconn.Close()
			done := context.AfterFunc(ctx, func() { lconn.Close(); gconn.Close() })
			defer done()
			system.Splice(lconn, gconn)
		}()
	}
}

// boundForward is a forward as listening: the chosen port when PORT was 0.
type boundForward struct {
	Host      string `json:"host"`
	Port      int    `json:"port"`
	GuestPort int    `json:"guest_port"`
	Auto      bool   `json:"auto,omitempty"`
}

func listenSpec(ctx context.Context, spec forwardSpec) (net.Listener, boundForward, error) {
	var lc net.ListenConfig
	addr := net.JoinHostPort(spec.Host, strconv.Itoa(spec.Port))
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, boundForward{}, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return ln, boundForward{Host: spec.Host, Port: ln.Addr().(*net.TCPAddr).Port, GuestPort: spec.GuestPort}, nil
}

func (a *App) portForward(ctx context.Context, vm string, specs []forwardSpec, auto bool) error {
	f := &forwarder{a: a, vm: vm}
	defer f.close()
	// Connect first: a stopped VM or unknown name fails now, not at the first connection.
	if _, err := f.client(ctx); err != nil {
		return err
	}
	var wg sync.WaitGroup
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
		wg.Wait()
	}()
	var bound []boundForward
	explicit := map[int]bool{}
	for _, spec := range specs {
		ln, b, err := listenSpec(ctx, spec)
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		bound = append(bound, b)
		explicit[spec.GuestPort] = true
		wg.Add(1)
		go f.serve(ctx, ln, spec.GuestPort, &wg)
	}
	if a.output == "json" {
		b, _ := json.Marshal(map[string]any{"vm": vm, "forwards": bound})
		fmt.Fprintf(a.Stdout, "%s\n", b)
	} else {
		for _, b := range bound {
			fmt.Fprintf(a.Stdout, "Forwarding %s -> %s:%d\n", net.JoinHostPort(b.Host, strconv.Itoa(b.Port)), vm, b.GuestPort)
		}
		fmt.Fprintln(a.Stdout, "(Ctrl-C to stop)")
	}
	if !auto {
		<-ctx.Done()
		return nil
	}
	return a.followPorts(ctx, f, explicit, &wg)
}

// maxAutoForwards bounds the host listeners --auto opens: the guest
// chooses them, so it must not be able to take every free localhost port
// or the CLI's file descriptors (a ports reply may list 8192 sockets).
const maxAutoForwards = 64

// followPorts forwards each TCP port the guest listens on (but those
// forwarded explicitly and SSH's 22) while it listens, as Lima does.
// At most maxAutoForwards at once.
func (a *App) followPorts(ctx context.Context, f *forwarder, explicit map[int]bool, wg *sync.WaitGroup) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	active := map[int]net.Listener{}
	capped := false
	defer func() {
		for _, ln := range active {
			ln.Close()
		}
	}()
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		res, err := c.Ports(pctx, f.vm)
		cancel()
		if err == nil {
			seen := map[int]bool{}
			for _, p := range res.Ports {
				if (p.Proto != "tcp" && p.Proto != "tcp6") || p.Port == 22 || explicit[p.Port] || p.Port <= 0 || p.Port > 65535 {
					continue
				}
				seen[p.Port] = true
				if active[p.Port] != nil {
					continue
				}
				if len(active) >= maxAutoForwards {
					if !capped {
						capped = true
						fmt.Fprintf(a.Stderr, "port-forward: the guest listens on more than %d TCP ports; forwarding only %d of them\n", maxAutoForwards, maxAutoForwards)
					}
					continue
				}
				ln, b, lerr := listenSpec(ctx, forwardSpec{Host: "127.0.0.1", Port: p.Port, GuestPort: p.Port})
				if lerr != nil {
					ln, b, lerr = listenSpec(ctx, forwardSpec{Host: "127.0.0.1", Port: 0, GuestPort: p.Port})
				}
				if lerr != nil {
					fmt.Fprintf(a.Stderr, "port-forward: guest port %d: %v\n", p.Port, lerr)
					continue
				}
				active[p.Port] = ln
				b.Auto = true
				a.reportForward(f.vm, b, "forwarding")
				wg.Add(1)
				go f.serve(ctx, ln, p.Port, wg)
			}
			for port, ln := range active {
				if !seen[port] {
					ln.Close()
					delete(active, port)
					a.reportForward(f.vm, boundForward{Host: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port, GuestPort: port, Auto: true}, "stopped")
				}
			}
		} else if ctx.Err() == nil {
			fmt.Fprintf(a.Stderr, "port-forward: list the guest's ports: %s\n", termsafe.String(err.Error()))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (a *App) reportForward(vm string, b boundForward, event string) {
	if a.output == "json" {
		out, _ := json.Marshal(map[string]any{"event": event, "vm": vm, "forward": b})
		fmt.Fprintf(a.Stdout, "%s\n", out)
		return
	}
	arrow := "->"
	if event == "stopped" {
		arrow = "-/->"
	}
	fmt.Fprintf(a.Stdout, "%s %s %s %s:%d (guest listener)\n", strings.ToUpper(event[:1])+event[1:], net.JoinHostPort(b.Host, strconv.Itoa(b.Port)), arrow, vm, b.GuestPort)
}

// ---- stats ----

func (a *App) statsCommand() *cobra.Command {
	var watch bool
	var format string
	cmd := &cobra.Command{
		Use:     "stats VM",
		Short:   "Show a VM's resource use: the VMM on the host, memory, load, disk and uptime in the guest",
		Example: "  banger stats dev\n  banger stats dev -w\n  banger stats dev --format '{{.Latest.Host.RSSBytes}}'",
		Args:    exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if watch {
				return a.watchStats(cmd.Context(), args[0])
			}
			var res api.StatsResult
			if err := a.call(cmd.Context(), api.MethodVMStats, api.StatsParams{VM: args[0], History: a.output == "json"}, &res); err != nil {
				return err
			}
			return a.showOutput(res, format, func() error {
				a.printStats(res)
				return nil
			})
		},
	}
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "print a new sample as bangerd takes it, until Ctrl-C")
	addFormat(cmd, &format)
	return cmd
}

func (a *App) printStats(res api.StatsResult) {
	fmt.Fprintf(a.Stdout, "VM       %s (%d vCPU, %s)\n", res.VM, res.VCPUs, mib(res.MemoryMiB))
	s := res.Latest
	if s == nil {
		fmt.Fprintln(a.Stdout, "no samples yet")
		return
	}
	if h := s.Host; h != nil {
		fmt.Fprintf(a.Stdout, "VMM      pid %d, CPU %s, RSS %s\n", h.PID, cpuText(h.CPUPercent), sizeBytes(h.RSSBytes))
	} else {
		fmt.Fprintf(a.Stdout, "VMM      unavailable: %s\n", termsafe.Line(s.HostError))
	}
	if g := s.Guest; g != nil {
		fmt.Fprintf(a.Stdout, "Memory   %s used of %s\n", sizeBytes(g.MemUsedBytes), sizeBytes(g.MemTotalBytes))
		fmt.Fprintf(a.Stdout, "Load     %.2f %.2f %.2f\n", g.Load1, g.Load5, g.Load15)
		fmt.Fprintf(a.Stdout, "Disk     %s used of %s (root)\n", sizeBytes(g.DiskUsedBytes), sizeBytes(g.DiskTotalBytes))
		fmt.Fprintf(a.Stdout, "Uptime   %s\n", g.Uptime.Round(time.Second))
	} else {
		fmt.Fprintf(a.Stdout, "Guest    unavailable: %s\n", termsafe.Line(s.GuestError))
	}
	fmt.Fprintf(a.Stdout, "Sampled  %s (%d kept, every %gs)\n", ago(s.Time), res.Kept, res.IntervalSeconds)
}

func (a *App) watchStats(ctx context.Context, vm string) error {
	var last time.Time
	header := false
	for {
		var res api.StatsResult
		if err := a.call(ctx, api.MethodVMStats, api.StatsParams{VM: vm}, &res); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if s := res.Latest; s != nil && s.Time.After(last) {
			last = s.Time
			if a.output == "json" {
				b, _ := json.Marshal(s)
				fmt.Fprintf(a.Stdout, "%s\n", termsafe.EscapeJSON(b))
			} else {
				if !header {
					fmt.Fprintf(a.Stdout, "%-8s  %6s  %9s  %19s  %5s  %19s  %s\n", "TIME", "CPU", "VMM RSS", "MEMORY", "LOAD", "DISK", "UPTIME")
					header = true
				}
				fmt.Fprintln(a.Stdout, statsRow(s))
			}
		}
		interval := time.Duration(res.IntervalSeconds * float64(time.Second))
		if interval <= 0 {
			interval = 2 * time.Second
		}
		// poll a little after the next sample is due
		wait := time.Until(last.Add(interval)) + 200*time.Millisecond
		if wait < 200*time.Millisecond || wait > interval+time.Second {
			wait = interval / 2
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

func statsRow(s *api.StatsSample) string {
	cpu, rss := "-", "-"
	if h := s.Host; h != nil {
		cpu, rss = cpuText(h.CPUPercent), sizeBytes(h.RSSBytes)
	}
	mem, load, disk, up := "-", "-", "-", "-"
	if g := s.Guest; g != nil {
		mem = sizeBytes(g.MemUsedBytes) + "/" + sizeBytes(g.MemTotalBytes)
		load = fmt.Sprintf("%.2f", g.Load1)
		disk = sizeBytes(g.DiskUsedBytes) + "/" + sizeBytes(g.DiskTotalBytes)
		up = g.Uptime.Round(time.Second).String()
	}
	return fmt.Sprintf("%-8s  %6s  %9s  %19s  %5s  %19s  %s", s.Time.Local().Format("15:04:05"), cpu, rss, mem, load, disk, up)
}

func cpuText(p *float64) string {
	if p == nil {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", *p)
}
