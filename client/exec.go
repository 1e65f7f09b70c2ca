package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/api"
	agentapi "github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/guestfs"
)

// Connect opens a raw stream to a running VM's agent (its SSH server),
// spliced by bangerd; the result says which host key to pin and which key
// to log in with. Most callers want SSH or Exec instead.
func (c *Client) Connect(ctx context.Context, vm string) (net.Conn, api.ConnectResult, error) {
	var res api.ConnectResult
	rc, err := c.dial(ctx)
	if err != nil {
		return nil, res, err
	}
	conn, err := rc.Upgrade(ctx, api.MethodVMConnect, api.VMRef{VM: vm}, &res)
	if err != nil {
		rc.Close()
		return nil, res, err
	}
	return conn, res, nil
}

// SSH opens an SSH connection to a running VM's agent as user ("" is the
// VM's default, root), pinning the VM's host key.
func (c *Client) SSH(ctx context.Context, vm, user string) (*ssh.Client, error) {
	conn, res, err := c.Connect(ctx, vm)
	if err != nil {
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
	if user == "" {
		user = res.User
	}
	deadline := time.Now().Add(30 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn.SetDeadline(deadline)
	cc, chans, reqs, err := ssh.NewClientConn(conn, res.VM, &ssh.ClientConfig{
		User: user, Auth: []ssh.AuthMethod{ssh.PublicKeys(uk.Signer)}, HostKeyCallback: ssh.FixedHostKey(hk),
		Config: guest.SSHConfig(), HostKeyAlgorithms: []string{hk.Type()},
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("ssh handshake with %s: %w", vm, err)
	}
	conn.SetDeadline(time.Time{})
	return ssh.NewClient(cc, chans, reqs), nil
}

// WindowSize is a terminal's size in characters.
type WindowSize struct{ Width, Height int }

// ExecOptions say how to run a command in a VM. The zero value runs it as
// root in the image's working directory (else root's home) with no stdin,
// discarding its output.
type ExecOptions struct {
	Env  []string // KEY=VALUE, added to the image's environment
	Dir  string   // working directory in the guest
	User string   // guest user ("" is root)

	Stdin          io.Reader // nil: no input
	Stdout, Stderr io.Writer // nil: discarded

	// TTY runs the command on a terminal (stdout and stderr merge then).
	TTY           bool
	Term          string // TERM (default xterm-256color)
	Width, Height int    // initial size (default 80x24)
	Resize        <-chan WindowSize

	// Signals are forwarded to the command (its process group).
	Signals <-chan os.Signal
}

var envKeyRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// ExitCodeConnectionLost is what Exec returns, with an error, when the
// connection to the guest ended before the command's exit status came.
const ExitCodeConnectionLost = 255

// Exec runs argv in a running VM (a login shell when argv is empty) and
// returns its exit status: its own, or 128+N when signal N killed it (as a
// shell reports it). A command the guest cannot find exits 127, one it cannot
// execute 126. An error means the command's status is unknown: banger could
// not run it, or ctx ended (the command is then hung up).
func (c *Client) Exec(ctx context.Context, vm string, argv []string, o ExecOptions) (int, error) {
	for _, kv := range o.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || !envKeyRe.MatchString(k) {
			return 0, &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("bad environment variable %q: want KEY=VALUE with KEY of letters, digits and _", kv)}
		}
	}
	if !o.TTY {
		code, fallback, err := c.execBulk(ctx, vm, argv, o)
		if !fallback {
			return code, err
		}
	}
	cl, err := c.SSH(ctx, vm, o.User)
	if err != nil {
		return 0, err
	}
	defer cl.Close()
	stop := context.AfterFunc(ctx, func() { cl.Close() })
	defer stop()
	sess, err := cl.NewSession()
	if err != nil {
		return 0, ctxErr(ctx, fmt.Errorf("open a session in %s: %w", vm, err))
	}
	defer sess.Close()
	for _, kv := range o.Env {
		k, v, _ := strings.Cut(kv, "=")
		if err := sess.Setenv(k, v); err != nil {
			return 0, ctxErr(ctx, fmt.Errorf("set %s in the guest: %w", k, err))
		}
	}
	if o.Dir != "" {
		ok, err := sess.SendRequest(agentapi.RequestWorkDir, true, ssh.Marshal(struct{ Dir string }{o.Dir}))
		if err != nil {
			return 0, ctxErr(ctx, fmt.Errorf("set the working directory: %w", err))
		}
		if !ok {
			return 0, &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("working directory %q does not exist in %s", o.Dir, vm)}
		}
	}
	if o.TTY {
		w, h := o.Width, o.Height
		if w <= 0 || h <= 0 {
			w, h = 80, 24
		}
		term := o.Term
		if term == "" {
			term = "xterm-256color"
		}
		if err := sess.RequestPty(term, h, w, ssh.TerminalModes{ssh.ECHO: 1}); err != nil {
			return 0, ctxErr(ctx, fmt.Errorf("request a terminal: %w", err))
		}
	}
	sess.Stdout, sess.Stderr = orDiscard(o.Stdout), orDiscard(o.Stderr)
	if o.Stdin != nil {
		in, err := sess.StdinPipe()
		if err != nil {
			return 0, err
		}
		// Not waited for: a terminal's stdin never ends.
		go func() {
			io.Copy(in, o.Stdin)
			in.Close()
		}()
	}
	if len(argv) == 0 {
		err = sess.Shell()
	} else {
		err = sess.Start(guestfs.ShellJoin(argv))
	}
	if err != nil {
		return 0, ctxErr(ctx, fmt.Errorf("start the command in %s: %w", vm, err))
	}
	defer forwardSignals(o.Signals, func(name string) { sess.Signal(ssh.Signal(name)) })()
	defer forwardEach(o.Resize, func(ws WindowSize) { sess.WindowChange(ws.Height, ws.Width) })()
	return exitStatus(ctx, vm, sess.Wait())
}

func exitStatus(ctx context.Context, vm string, err error) (int, error) {
	var ee *ssh.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &ee):
		if ee.Signal() != "" {
			return 128 + SignalNumber(ee.Signal()), nil
		}
		return ee.ExitStatus(), nil
	case ctx.Err() != nil:
		return ExitCodeConnectionLost, ctxErr(ctx, err)
	}
	var missing *ssh.ExitMissingError
	if errors.As(err, &missing) || errors.Is(err, io.EOF) {
		return ExitCodeConnectionLost, fmt.Errorf("the connection to %s closed before the command finished", vm)
	}
	return ExitCodeConnectionLost, err
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	return err
}

func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}

// signalNumbers are the signals the guest agent delivers, by SSH name, with
// their Linux numbers.
var signalNumbers = map[string]syscall.Signal{
	"ABRT": syscall.SIGABRT, "ALRM": syscall.SIGALRM, "FPE": syscall.SIGFPE, "HUP": syscall.SIGHUP,
	"ILL": syscall.SIGILL, "INT": syscall.SIGINT, "KILL": syscall.SIGKILL, "PIPE": syscall.SIGPIPE,
	"QUIT": syscall.SIGQUIT, "SEGV": syscall.SIGSEGV, "TERM": syscall.SIGTERM, "USR1": syscall.SIGUSR1,
	"USR2": syscall.SIGUSR2, "CONT": syscall.SIGCONT, "STOP": syscall.SIGSTOP, "TSTP": syscall.SIGTSTP,
	"WINCH": syscall.SIGWINCH,
	// exit-signal names the guest may report beyond those it delivers
	"BUS": syscall.SIGBUS, "TRAP": syscall.SIGTRAP, "SYS": syscall.SIGSYS, "XCPU": syscall.SIGXCPU,
	"XFSZ": syscall.SIGXFSZ, "VTALRM": syscall.SIGVTALRM, "PROF": syscall.SIGPROF, "TTIN": syscall.SIGTTIN,
	"TTOU": syscall.SIGTTOU, "URG": syscall.SIGURG, "IO": syscall.SIGIO, "PWR": syscall.SIGPWR,
}

// ForwardedSignals are the signals an interactive client should forward to
// a command (SIGWINCH is a window change, not forwarded).
var ForwardedSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT,
	syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGALRM, syscall.SIGCONT, syscall.SIGTSTP}

// SignalNumber is the Linux number of an SSH signal name ("INT", "SIGINT"),
// 0 when unknown.
func SignalNumber(name string) int {
	return int(signalNumbers[strings.TrimPrefix(strings.ToUpper(name), "SIG")])
}

// forwardSignals sends each signal from sigs that the agent can deliver,
// by its SSH name, until the returned stop is called. A nil sigs forwards
// nothing.
func forwardSignals(sigs <-chan os.Signal, send func(name string)) (stop func()) {
	return forwardEach(sigs, func(s os.Signal) {
		if name := signalName(s); name != "" {
			send(name)
		}
	})
}

// forwardEach calls fn with each value from src, in a goroutine, until the
// returned stop is called. A nil src starts nothing.
func forwardEach[T any](src <-chan T, fn func(T)) (stop func()) {
	if src == nil {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case v := <-src:
				fn(v)
			}
		}
	}()
	return func() { close(done) }
}

// signalName is the SSH name of s when the agent can deliver it, else "".
func signalName(s os.Signal) string {
	ss, ok := s.(syscall.Signal)
	if !ok {
		return ""
	}
	for _, n := range []string{"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
		"USR1", "USR2", "CONT", "STOP", "TSTP", "WINCH"} {
		if signalNumbers[n] == ss {
			return n
		}
	}
	return ""
}
