package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
)

// instance is one QEMU process. QMP connections are opened per operation
// (QEMU serves one monitor client at a time, and a held connection would lock
// out a developer's own socat), serialised by qmpMu.
type instance struct {
	h       vmm.Handles
	proc    *system.Process
	adopted bool
	log     *slog.Logger

	qmpMu  sync.Mutex
	exited chan struct{}
	status vmm.ExitStatus // valid once exited is closed
}

var _ vmm.Instance = (*instance)(nil)

func newInstance(h vmm.Handles, proc *system.Process, adopted bool, log *slog.Logger) *instance {
	i := &instance{h: h, proc: proc, adopted: adopted, log: log, exited: make(chan struct{})}
	go i.watch()
	return i
}

func (i *instance) watch() {
	<-i.proc.Done()
	at := time.Now()
	code, sig := i.proc.Exit()
	i.status = exitStatus(code, sig, i.adopted, readTail(i.h.VMMLog, 5), at)
	for _, s := range []string{i.h.APISocket, i.serialSocket()} {
		if s != "" {
			if err := removeSocket(s); err != nil {
				i.log.Debug("leftover qemu socket", "path", s, "err", err)
			}
		}
	}
	i.log.Info("qemu exited", "code", i.status.Code, "signal", i.status.Signal, "reason", i.status.Reason)
	close(i.exited)
}

func (i *instance) serialSocket() string {
	if i.h.Channel.Kind == vmm.ChannelSerial {
		return i.h.Channel.Path
	}
	return ""
}

// exitStatus phrases how QEMU ended. logTail is the end of its log (stderr),
// where QEMU says why it failed.
func exitStatus(code int, sig string, adopted bool, logTail string, at time.Time) vmm.ExitStatus {
	st := vmm.ExitStatus{Code: code, Signal: sig, At: at}
	switch {
	case sig != "":
		st.Code = -1
		st.Reason = "qemu was killed by signal: " + sig
	case code == 0 && strings.Contains(logTail, "terminating on signal"):
		// QEMU exits 0 on SIGTERM/SIGINT/SIGHUP and says so on stderr.
		st.Reason = "qemu was stopped: " + logTail
	case code == 0:
		st.Reason = "the guest powered off or rebooted"
	case code > 0:
		st.Reason = fmt.Sprintf("qemu exited with status %d", code)
	case adopted:
		st.Reason = "qemu exited (its exit status is unknown: it was started by an earlier bangerd)"
	default:
		st.Reason = "qemu exited"
	}
	if (code != 0 || sig != "") && logTail != "" {
		st.Reason += ": " + logTail
	}
	return st
}

// readTail returns the last n non-empty lines of the file at path, joined by
// "; ", reading at most its last 8 KiB.
func readTail(path string, n int) string {
	if path == "" {
		return ""
	}
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > tailMax {
		if _, err := f.Seek(-tailMax, io.SeekEnd); err != nil {
			return ""
		}
	}
	b, err := io.ReadAll(io.LimitReader(f, tailMax))
	if err != nil {
		return ""
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "; ")
}

// Handles implements vmm.Instance.
func (i *instance) Handles() vmm.Handles { return i.h }

// Exited implements vmm.Instance.
func (i *instance) Exited() <-chan struct{} { return i.exited }

func (i *instance) hasExited() bool {
	select {
	case <-i.exited:
		return true
	default:
		return false
	}
}

// Wait implements vmm.Instance.
func (i *instance) Wait(ctx context.Context) (vmm.ExitStatus, error) {
	select {
	case <-i.exited:
		return i.status, nil
	case <-ctx.Done():
		return vmm.ExitStatus{}, ctx.Err()
	}
}

// withDefaultTimeout bounds ctx when it has no deadline.
func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, defaultOpTimeout)
}

// qmp runs fn on a fresh QMP connection. Once QEMU has exited it returns an
// error wrapping vmm.ErrGone.
func (i *instance) qmp(ctx context.Context, fn func(ctx context.Context, q *QMP) error) error {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	if i.hasExited() {
		return fmt.Errorf("qemu pid %d: %w", i.h.PID, vmm.ErrGone)
	}
	i.qmpMu.Lock()
	defer i.qmpMu.Unlock()
	// Stop waiting as soon as QEMU exits.
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	go func() {
		select {
		case <-i.exited:
			stop(vmm.ErrGone)
		case <-ctx.Done():
		}
	}()
	q, err := DialQMP(ctx, i.h.APISocket)
	if err == nil {
		err = fn(ctx, q)
		q.Close()
	}
	if err != nil && i.hasExited() {
		return fmt.Errorf("qemu pid %d: %w", i.h.PID, vmm.ErrGone)
	}
	return err
}

type statusInfo struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

func (i *instance) queryStatus(ctx context.Context) (statusInfo, error) {
	var st statusInfo
	err := i.qmp(ctx, func(ctx context.Context, q *QMP) error {
		return q.Execute(ctx, "query-status", nil, &st)
	})
	return st, err
}

// State implements vmm.Instance.
func (i *instance) State(ctx context.Context) (vmm.State, error) {
	if i.hasExited() {
		return vmm.StateExited, nil
	}
	st, err := i.queryStatus(ctx)
	if err != nil {
		if errors.Is(err, vmm.ErrGone) {
			return vmm.StateExited, nil
		}
		return vmm.StateUnknown, fmt.Errorf("ask qemu for the machine state: %w", err)
	}
	return mapStatus(st.Status), nil
}

// mapStatus maps QEMU's RunState names onto vmm.State.
func mapStatus(s string) vmm.State {
	switch s {
	case "running":
		return vmm.StateRunning
	case "paused", "suspended", "debug", "prelaunch", "inmigrate", "postmigrate", "finish-migrate", "save-vm", "restore-vm", "colo":
		return vmm.StatePaused
	case "shutdown":
		// With -no-reboot QEMU is on its way out.
		return vmm.StateExited
	default:
		return vmm.StateUnknown
	}
}

// Shutdown implements vmm.Instance: it presses the ACPI power button and does
// not wait. See the package comment for what the guest needs to act on it.
func (i *instance) Shutdown(ctx context.Context) error {
	err := i.qmp(ctx, func(ctx context.Context, q *QMP) error {
		return q.Execute(ctx, "system_powerdown", nil, nil)
	})
	if errors.Is(err, vmm.ErrGone) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("ask qemu to power the guest off: %w", err)
	}
	return nil
}

// Kill implements vmm.Instance: SIGKILL, then wait for the exit (bounded by ctx,
// or a default when ctx has none).
func (i *instance) Kill(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	if err := i.proc.KillAndWait(ctx); err != nil {
		return fmt.Errorf("kill qemu (pid %d): %w", i.h.PID, err)
	}
	select {
	case <-i.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("kill qemu (pid %d): %w", i.h.PID, ctx.Err())
	}
}

// waitRunning waits until QEMU answers on QMP and reports the machine running,
// or fails with QEMU's own words when it exits first.
func (i *instance) waitRunning(ctx context.Context) error {
	const poll = 20 * time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	var lastErr error
	for {
		select {
		case <-i.exited:
			return fmt.Errorf("qemu failed to start: %s", i.status.Reason)
		case <-ctx.Done():
			msg := fmt.Sprintf("qemu did not report the machine running in time: %v", ctx.Err())
			if lastErr != nil {
				msg += " (last error: " + lastErr.Error() + ")"
			}
			if tail := readTail(i.h.VMMLog, 5); tail != "" {
				msg += "; qemu log: " + tail
			}
			return errors.New(msg)
		case <-t.C:
		}
		st, err := i.queryStatus(ctx)
		if err == nil {
			if st.Status == "running" {
				return nil
			}
			return fmt.Errorf("qemu reports the machine %q instead of running; qemu log: %s", st.Status, readTail(i.h.VMMLog, 5))
		}
		lastErr = err
		t.Reset(poll)
	}
}
