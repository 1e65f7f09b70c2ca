package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/paths"
)

// daemonStartTimeout bounds how long the CLI waits for a bangerd it started.
const daemonStartTimeout = 15 * time.Second

// client returns a client of bangerd, starting bangerd when nothing
// listens on its socket. Whether something listens is a bare connect, not
// a request: the command's own call is its first round trip (banger exec
// is latency-bound).
func (a *App) client(ctx context.Context) (*client.Client, error) {
	layout, err := paths.Resolve("")
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", layout.Socket())
	if err == nil {
		conn.Close()
		return client.New(client.WithSocket(layout.Socket()))
	}
	if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
		return nil, fmt.Errorf("connect to bangerd at %s: %w", layout.Socket(), err)
	}
	if err := a.startDaemon(ctx, layout); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(daemonStartTimeout)
	for {
		c, err := client.Dial(ctx, client.WithSocket(layout.Socket()))
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("bangerd did not come up within %s; see %s", daemonStartTimeout, layout.DaemonLog())
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// bangerdPath finds bangerd next to this executable, else on PATH.
func bangerdPath() (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "bangerd")
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	p, err := exec.LookPath("bangerd")
	if err != nil {
		return "", fmt.Errorf("bangerd is not running and was not found next to banger or on PATH: install it, or start it yourself")
	}
	return p, nil
}

// startDaemon launches bangerd detached (its own session), logging to a file.
func (a *App) startDaemon(ctx context.Context, layout paths.Layout) error {
	bin, err := bangerdPath()
	if err != nil {
		return err
	}
	if err := layout.Ensure(); err != nil {
		return err
	}
	logf, err := os.OpenFile(layout.DaemonLog(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open daemon log: %w", err)
	}
	defer logf.Close()
	// Not CommandContext: the daemon must outlive this command.
	cmd := exec.Command(bin)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if a.debug {
		cmd.Args = append(cmd.Args, "--debug")
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start bangerd: %w", err)
	}
	if a.debug {
		fmt.Fprintf(a.Stderr, "started bangerd (pid %d), logging to %s\n", cmd.Process.Pid, layout.DaemonLog())
	}
	// Reap it if it exits early (e.g. another one won the race); never wait otherwise.
	go cmd.Wait()
	return nil
}

// call performs one RPC.
func (a *App) call(ctx context.Context, method string, params, result any) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	return c.Call(ctx, method, params, result)
}
