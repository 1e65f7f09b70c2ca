// Package vmmproc is the process-backed half of a VMM driver, shared by the
// qemu and firecracker drivers: watching the VMM process until it exits,
// Wait and Kill, the identity check before adopting a VMM started by an
// earlier bangerd, removal of the sockets a dead VMM leaves behind, reading
// the tail of a log for an error message, the kernel command line helper, and
// the size-capped console log (console.go).
//
// A driver's instance embeds *Proc and adds what only it knows: how to ask its
// VMM for the machine state and how to ask the guest to power off.
package vmmproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
)

// MaxSocketPath is the longest unix socket path Linux accepts
// (paths.MaxSocketPath, the one place the number is written).
const MaxSocketPath = paths.MaxSocketPath

// DefaultKillTimeout bounds Kill when its ctx has no deadline.
const DefaultKillTimeout = 10 * time.Second

// CheckSocketPath returns a user-facing error when path cannot be a unix
// socket address.
func CheckSocketPath(path string) error {
	if len(path) > MaxSocketPath {
		return fmt.Errorf("socket path %s is %d bytes, longer than the %d that unix sockets allow; hint: use a shorter BANGER_HOME (or data directory)", path, len(path), MaxSocketPath)
	}
	return nil
}

// RemoveSocket removes path if it is a socket (a VMM killed with SIGKILL
// leaves its sockets behind). Nothing there is fine; anything else there is
// an error, and is left alone.
func RemoveSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket; remove it or pick another VM directory", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

// tailMax bounds how much of a log Tail reads.
const tailMax = 8 << 10

// Tail returns the last n non-empty lines of the file at path, each trimmed,
// keeping only lines filter accepts (all when nil). It reads at most the
// file's last 8 KiB; a missing or unreadable file gives nil.
func Tail(path string, n int, filter func(string) bool) []string {
	if path == "" {
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > tailMax {
		if _, err := f.Seek(-tailMax, io.SeekEnd); err != nil {
			return nil
		}
	}
	b, err := io.ReadAll(io.LimitReader(f, tailMax))
	if err != nil {
		return nil
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && (filter == nil || filter(l)) {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

// AppendKernelArgs appends each of args ("key" or "key=value") to the kernel
// command line unless the command line already has that key.
func AppendKernelArgs(cmdline string, args ...string) string {
	fields := strings.Fields(cmdline)
	has := func(key string) bool {
		for _, f := range fields {
			if f == key || strings.HasPrefix(f, key+"=") {
				return true
			}
		}
		return false
	}
	for _, a := range args {
		key, _, _ := strings.Cut(a, "=")
		if !has(key) {
			fields = append(fields, a)
		}
	}
	return strings.Join(fields, " ")
}

// Exit is how the process ended, for a driver's Config.Status.
type Exit struct {
	Code    int    // exit code; -1 when signalled or unknown
	Signal  string // signal name when signalled
	Adopted bool   // the process was adopted: its exit status is unknown
	Killed  bool   // Kill was called
	At      time.Time
}

// Config describes one watched VMM process.
type Config struct {
	Name    string // "qemu", "firecracker": used in messages
	Handles vmm.Handles
	Proc    *system.Process
	Adopted bool
	Log     *slog.Logger
	// Sockets are removed once the process has exited.
	Sockets []string
	// AfterExit runs once the process has exited, after the sockets are
	// removed and before Exited closes (e.g. removing a jail).
	AfterExit func()
	// Status phrases the exit; it runs once, before Exited closes.
	Status func(Exit) vmm.ExitStatus
	// Console, when set, is stopped (its last bytes written) before Exited closes.
	Console *Console
}

// Proc is one VMM process being watched. It implements Handles, Exited, Wait
// and Kill of vmm.Instance.
type Proc struct {
	cfg    Config
	exited chan struct{}
	status vmm.ExitStatus // valid once exited is closed

	mu     sync.Mutex
	killed bool
}

// Watch starts watching cfg.Proc.
func Watch(cfg Config) *Proc {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	p := &Proc{cfg: cfg, exited: make(chan struct{})}
	go p.watch()
	return p
}

// watch records the exit and removes what the dead VMM leaves behind before
// announcing the exit, so that a new start in the same directory never races
// with this cleanup.
func (p *Proc) watch() {
	<-p.cfg.Proc.Done()
	at := time.Now()
	code, sig := p.cfg.Proc.Exit()
	if p.cfg.Console != nil {
		p.cfg.Console.Stop()
	}
	for _, s := range p.cfg.Sockets {
		if s == "" {
			continue
		}
		if err := RemoveSocket(s); err != nil {
			p.cfg.Log.Debug("leftover "+p.cfg.Name+" socket", "path", s, "error", err)
		}
	}
	if p.cfg.AfterExit != nil {
		p.cfg.AfterExit()
	}
	p.mu.Lock()
	e := Exit{Code: code, Signal: sig, Adopted: p.cfg.Adopted, Killed: p.killed, At: at}
	p.mu.Unlock()
	if p.cfg.Status != nil {
		p.status = p.cfg.Status(e)
	} else {
		p.status = vmm.ExitStatus{Code: code, Signal: sig, At: at, Reason: p.cfg.Name + " exited"}
	}
	p.cfg.Log.Info(p.cfg.Name+" exited", "code", p.status.Code, "signal", p.status.Signal, "reason", p.status.Reason)
	close(p.exited)
}

// Handles implements vmm.Instance.
func (p *Proc) Handles() vmm.Handles { return p.cfg.Handles }

// Process is the watched process.
func (p *Proc) Process() *system.Process { return p.cfg.Proc }

// Adopted reports whether the process was adopted rather than started.
func (p *Proc) Adopted() bool { return p.cfg.Adopted }

// Exited implements vmm.Instance.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// HasExited reports whether the process has exited (and its leftovers are gone).
func (p *Proc) HasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Status is how the process ended; valid once Exited is closed.
func (p *Proc) Status() vmm.ExitStatus {
	<-p.exited
	return p.status
}

// Wait implements vmm.Instance.
func (p *Proc) Wait(ctx context.Context) (vmm.ExitStatus, error) {
	select {
	case <-p.exited:
		return p.status, nil
	case <-ctx.Done():
		return vmm.ExitStatus{}, ctx.Err()
	}
}

// Kill implements vmm.Instance: SIGKILL, then wait for the exit and its
// cleanup (bounded by ctx, or DefaultKillTimeout when ctx has no deadline).
func (p *Proc) Kill(ctx context.Context) error {
	if p.HasExited() {
		return nil
	}
	p.mu.Lock()
	p.killed = true
	p.mu.Unlock()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultKillTimeout)
		defer cancel()
	}
	pid := p.cfg.Proc.PID
	if err := p.cfg.Proc.KillAndWait(ctx); err != nil {
		return fmt.Errorf("kill %s (pid %d): %w", p.cfg.Name, pid, err)
	}
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%s (pid %d) exited but its cleanup did not finish: %w", p.cfg.Name, pid, ctx.Err())
	}
}

// AdoptProcess checks that h names a live process of driver name (same PID
// and start time, the command line accepted by match) and starts watching
// its exit. match returns the VM id found on the command line, or an error
// saying why the process is not this VM's VMM. Every refusal wraps vmm.ErrGone.
func AdoptProcess(h vmm.Handles, name string, match Match) (*system.Process, error) {
	if h.Driver != "" && h.Driver != name {
		return nil, fmt.Errorf("handles belong to the %q driver, not %q", h.Driver, name)
	}
	if h.PID <= 0 || h.APISocket == "" {
		return nil, fmt.Errorf("%w: handles name no process or API socket", vmm.ErrGone)
	}
	if err := identify(h, name, match); err != nil {
		return nil, err
	}
	proc, err := system.Adopt(h.PID, h.StartTime)
	if err != nil {
		return nil, fmt.Errorf("%s pid %d: %v: %w", name, h.PID, err, vmm.ErrGone)
	}
	return proc, nil
}
