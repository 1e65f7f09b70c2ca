package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/crypto/ssh"
	"golang.org/x/term"

	"github.com/bangerdev/banger/internal/guest"
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
	var res api.ConnectResult
	conn, err := c.Upgrade(ctx, api.MethodVMConnect, api.VMRef{VM: vm}, &res)
	if err != nil {
		c.Close()
		return nil, err
	}
	hk, err := guest.ParsePublicKey(res.HostKey)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("VM host key: %w", err)
	}
	uk, err := guest.LoadOrCreateUserKey(res.KeyPath)
	if err != nil {
		conn.Close()
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	cc, chans, reqs, err := ssh.NewClientConn(conn, res.VM, &ssh.ClientConfig{
		User: res.User, Auth: []ssh.AuthMethod{ssh.PublicKeys(uk.Signer)}, HostKeyCallback: ssh.FixedHostKey(hk),
		Config: guest.SSHConfig(), HostKeyAlgorithms: []string{hk.Type()},
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("ssh handshake with %s: %w", vm, err)
	}
	conn.SetDeadline(time.Time{})
	return ssh.NewClient(cc, chans, reqs), nil
}

// runInGuest runs argv (or a login shell when empty) and returns its exit status.
func (a *App) runInGuest(ctx context.Context, vm string, argv []string, tty bool) (int, error) {
	cl, err := a.sshTo(ctx, vm)
	if err != nil {
		return 0, err
	}
	defer cl.Close()
	sess, err := cl.NewSession()
	if err != nil {
		return 0, fmt.Errorf("open session: %w", err)
	}
	defer sess.Close()
	sess.Stdout, sess.Stderr = a.Stdout, a.Stderr
	stdinFile, isFile := a.Stdin.(*os.File)
	if tty && isFile && term.IsTerminal(int(stdinFile.Fd())) {
		fd := int(stdinFile.Fd())
		w, h, _ := term.GetSize(fd)
		if err := sess.RequestPty(envOr("TERM", "xterm-256color"), h, w, ssh.TerminalModes{ssh.ECHO: 1}); err != nil {
			return 0, fmt.Errorf("request a terminal: %w", err)
		}
		old, err := term.MakeRaw(fd)
		if err == nil {
			defer term.Restore(fd, old)
		}
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if w, h, err := term.GetSize(fd); err == nil {
					sess.WindowChange(h, w)
				}
			}
		}()
		sess.Stdin = a.Stdin
	} else {
		in, err := sess.StdinPipe()
		if err != nil {
			return 0, err
		}
		go func() {
			io.Copy(in, a.Stdin)
			in.Close()
		}()
	}
	if len(argv) == 0 {
		err = sess.Shell()
		if err == nil {
			err = sess.Wait()
		}
	} else {
		err = sess.Run(shellJoin(argv))
	}
	var ee *ssh.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &ee):
		if ee.Signal() != "" {
			return 128 + signalNumber(ee.Signal()), nil
		}
		return ee.ExitStatus(), nil
	case errors.Is(err, io.EOF), strings.Contains(err.Error(), "exited without exit status"):
		return 255, fmt.Errorf("the connection to %s closed before the command finished", vm)
	}
	return 0, err
}

func signalNumber(name string) int {
	switch name {
	case "HUP":
		return 1
	case "INT":
		return 2
	case "KILL":
		return 9
	case "TERM":
		return 15
	}
	return 1
}

// shellJoin quotes argv for the guest's shell.
func shellJoin(argv []string) string {
	parts := make([]string, len(argv))
	for i, a := range argv {
		if a != "" && strings.IndexFunc(a, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,@+%", r))
		}) < 0 {
			parts[i] = a
			continue
		}
		parts[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(parts, " ")
}

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
