package cli

import (
	"context"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/crypto/ssh"
	"golang.org/x/term"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/termsafe"

	"github.com/bangerdev/banger/api"
)

// sshTo opens an SSH connection to a VM's agent through bangerd (vm.connect
// splices this connection to the guest), pinning the VM's host key.
func (a *App) sshTo(ctx context.Context, vm string) (*ssh.Client, error) {
	c, err := a.client(ctx)
	if err != nil {
		return nil, err
	}
	return c.SSH(ctx, vm, "")
}

// execInGuest runs argv with o, wiring the App's stdio (stdin only when
// interactive), the terminal (raw mode and window size when o.TTY, interactive
// and stdin is one) and the signals this process receives, which go to the
// command.
func (a *App) execInGuest(ctx context.Context, vm string, argv []string, o client.ExecOptions, interactive bool) (int, error) {
	c, err := a.client(ctx)
	if err != nil {
		return 0, err
	}
	o.Stdout, o.Stderr = a.Stdout, a.Stderr
	if interactive && o.Stdin == nil {
		o.Stdin = a.Stdin
	}
	stdinFile, isFile := a.Stdin.(*os.File)
	if o.TTY && interactive {
		if isFile && term.IsTerminal(int(stdinFile.Fd())) {
			fd := int(stdinFile.Fd())
			o.Width, o.Height, _ = term.GetSize(fd)
			o.Term = envOr("TERM", "xterm-256color")
			old, err := term.MakeRaw(fd)
			if err == nil {
				defer term.Restore(fd, old)
			}
			winch := make(chan os.Signal, 1)
			signal.Notify(winch, syscall.SIGWINCH)
			defer signal.Stop(winch)
			resize := make(chan client.WindowSize, 1)
			done := make(chan struct{})
			defer close(done)
			go func() {
				for {
					select {
					case <-done:
						return
					case <-winch:
						if w, h, err := term.GetSize(fd); err == nil {
							select {
							case resize <- client.WindowSize{Width: w, Height: h}:
							default:
							}
						}
					}
				}
			}()
			o.Resize = resize
		}
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, client.ForwardedSignals...)
	defer signal.Stop(sigs)
	o.Signals = sigs
	// Signals go to the command, so the context's own cancellation on
	// SIGINT/SIGTERM must not hang it up.
	return c.Exec(context.WithoutCancel(ctx), vm, argv, o)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func (a *App) guestCommands() []*cobra.Command {
	var ef execFlags
	exec := &cobra.Command{
		Use:   "exec [flags] VM -- CMD [ARGS...]",
		Short: "Run a command in a VM; exits with its status",
		Long: "Runs CMD in a running VM, as docker exec does: -e/--env-file set variables, -w the\n" +
			"working directory, -u the user, -i attaches stdin, -t allocates a terminal (-it for an\n" +
			"interactive program). Signals banger receives go to the command. The exit status is the\n" +
			"command's (128+N when signal N ended it, 126 when it cannot be executed, 127 when it is\n" +
			"not found); 125 means banger itself failed (no such VM, VM stopped, bad flag).",
		Example: "  banger exec dev -- uname -a\n" +
			"  banger exec -e A=1 -w /tmp dev -- sh -c 'echo $A; pwd'\n" +
			"  banger exec -it dev -- top\n" +
			"  tar c src | banger exec -i dev -- tar x -C /root",
		Annotations: map[string]string{annotationDockerExit: "1"},
		Args:        cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, argv, err := vmAndCommand(cmd, args, true)
			if err != nil {
				return err
			}
			o, err := ef.options()
			if err != nil {
				return err
			}
			return exitWith(a.execInGuest(cmd.Context(), vm, argv, o, ef.interactive))
		},
	}
	exec.Flags().SetInterspersed(false)
	ef.add(exec.Flags(), true)
	var sf execFlags
	sshCmd := &cobra.Command{
		Use:   "ssh [flags] VM [-- CMD...]",
		Short: "Open a shell in a VM, or run a command",
		Long: "Opens a login shell in a running VM, or runs CMD with stdin attached (like ssh).\n" +
			"The exit status is the command's; 125 means banger itself failed.",
		Example: "  banger ssh dev\n" +
			"  banger ssh -u nobody dev -- id",
		Annotations: map[string]string{annotationDockerExit: "1"},
		Args:        cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, argv, err := vmAndCommand(cmd, args, false)
			if err != nil {
				return err
			}
			o, err := sf.options()
			if err != nil {
				return err
			}
			o.TTY = o.TTY || len(argv) == 0
			return exitWith(a.execInGuest(cmd.Context(), vm, argv, o, true))
		},
	}
	sshCmd.Flags().SetInterspersed(false)
	sf.add(sshCmd.Flags(), false)
	var follow, raw bool
	logs := &cobra.Command{
		Use:   "logs VM",
		Short: "Show a VM's console log",
		Long: "Show a VM's console log. The guest writes it, so terminal control sequences\n" +
			"(colours, cursor movement, title and clipboard writes) are removed unless --raw.",
		Args: exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var out io.Writer = a.Stdout
			if !raw {
				tw := termsafe.NewWriter(a.Stdout)
				defer tw.Flush()
				out = tw
			}
			var off int64
			for {
				var res api.LogsResult
				if err := a.call(cmd.Context(), api.MethodVMLogs, api.LogsParams{VM: args[0], Offset: off}, &res); err != nil {
					return err
				}
				io.WriteString(out, res.Data)
				off = res.NextOffset
				if !follow {
					return nil
				}
				if res.Data == "" {
					select {
					case <-cmd.Context().Done():
						return nil
					case <-time.After(300 * time.Millisecond):
					}
				}
			}
		},
	}
	logs.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output")
	logs.Flags().BoolVar(&raw, "raw", false, "print the log with its control sequences (for a terminal you trust with them)")
	return []*cobra.Command{exec, sshCmd, logs}
}

// exitWith turns a guest command's status into the command's result.
func exitWith(code int, err error) error {
	if err != nil {
		return err
	}
	if code != 0 {
		return &ExitError{Code: code}
	}
	return nil
}
