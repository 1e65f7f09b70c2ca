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
	"github.com/bangerdev/banger/internal/guestfs"
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

// runInGuest runs argv (or a login shell when empty) and returns its exit status.
func (a *App) runInGuest(ctx context.Context, vm string, argv []string, tty bool) (int, error) {
	return a.execInGuest(ctx, vm, argv, client.ExecOptions{TTY: tty})
}

// execInGuest runs argv with o, wiring the App's stdio, the terminal (raw
// mode and window size when o.TTY and stdin is one) and the signals this
// process receives, which go to the command.
func (a *App) execInGuest(ctx context.Context, vm string, argv []string, o client.ExecOptions) (int, error) {
	c, err := a.client(ctx)
	if err != nil {
		return 0, err
	}
	o.Stdout, o.Stderr = a.Stdout, a.Stderr
	if o.Stdin == nil {
		o.Stdin = a.Stdin
	}
	stdinFile, isFile := a.Stdin.(*os.File)
	if o.TTY {
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

// shellJoin quotes argv for the guest's shell.
func shellJoin(argv []string) string { return guestfs.ShellJoin(argv) }

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func (a *App) guestCommands() []*cobra.Command {
	var tty bool
	exec := &cobra.Command{
		Use:   "exec VM -- CMD [ARGS...]",
		Short: "Run a command in a VM; exits with its status",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			code, err := a.runInGuest(cmd.Context(), args[0], args[1:], tty)
			if err != nil {
				return err
			}
			if code != 0 {
				return &ExitError{Code: code}
			}
			return nil
		},
	}
	exec.Flags().BoolVarP(&tty, "tty", "t", false, "allocate a terminal")
	sshCmd := &cobra.Command{
		Use:   "ssh VM [-- CMD...]",
		Short: "Open a shell in a VM, or run a command",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			code, err := a.runInGuest(cmd.Context(), args[0], args[1:], len(args) == 1 || tty)
			if err != nil {
				return err
			}
			if code != 0 {
				return &ExitError{Code: code}
			}
			return nil
		},
	}
	sshCmd.Flags().BoolVarP(&tty, "tty", "t", false, "allocate a terminal for CMD")
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
