package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// instance is one QEMU process. QMP connections are opened per operation
// (QEMU serves one monitor client at a time, and a held connection would lock
// out a developer's own socat), serialised by qmpMu.
type instance struct {
	*vmmproc.Proc
	h   vmm.Handles
	log *slog.Logger

	qmpMu sync.Mutex
}

var _ vmm.Instance = (*instance)(nil)

func newInstance(h vmm.Handles, proc *system.Process, adopted bool, console *vmmproc.Console, log *slog.Logger) *instance {
	sockets := []string{h.APISocket, consoleSocket(h)}
	if h.Channel.Kind == vmm.ChannelSerial {
		sockets = append(sockets, h.Channel.Path)
	}
	p := vmmproc.Watch(vmmproc.Config{
		Name: "qemu", Handles: h, Proc: proc, Adopted: adopted, Log: log,
		Sockets: sockets, Console: console,
		AfterExit: func() {
			// The guest's memory, once nothing maps it.
			if h.MemFile != "" {
				if err := removeMemFile(h.MemFile); err != nil {
					log.Warn("remove the guest memory file", "path", h.MemFile, "error", err)
				}
			}
		},
		Status: func(e vmmproc.Exit) vmm.ExitStatus {
			return exitStatus(e.Code, e.Signal, e.Adopted, readTail(h.VMMLog, 5), e.At)
		},
	})
	return &instance{Proc: p, h: h, log: log}
}

// consoleSocket is where QEMU serves the serial console.
func consoleSocket(h vmm.Handles) string {
	return filepath.Join(filepath.Dir(h.APISocket), consoleSockName)
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
// "; ", leaving out QEMU's note that it waits for bangerd on the console socket.
func readTail(path string, n int) string {
	return strings.Join(vmmproc.Tail(path, n, func(l string) bool {
		return !strings.Contains(l, "info: QEMU waiting for connection on")
	}), "; ")
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
	if i.HasExited() {
		return fmt.Errorf("qemu pid %d: %w", i.h.PID, vmm.ErrGone)
	}
	i.qmpMu.Lock()
	defer i.qmpMu.Unlock()
	// Stop waiting as soon as QEMU exits.
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	go func() {
		select {
		case <-i.Exited():
			stop(vmm.ErrGone)
		case <-ctx.Done():
		}
	}()
	q, err := DialQMP(ctx, i.h.APISocket)
	if err == nil {
		err = fn(ctx, q)
		q.Close()
	}
	if err != nil && i.HasExited() {
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
	if i.HasExited() {
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

// waitStatus waits until QEMU answers on QMP and reports the machine in
// status want ("running"; "inmigrate" for a restore), or fails with QEMU's own
// words when it exits first.
func (i *instance) waitStatus(ctx context.Context, want string) error {
	// The monitor usually answers within a few ms of the console connection
	// (a restore waits on this): poll tightly at first, then back off.
	poll := 2 * time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	var lastErr error
	for {
		select {
		case <-i.Exited():
			return fmt.Errorf("qemu failed to start: %s", i.Status().Reason)
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
			if st.Status == want {
				return nil
			}
			return fmt.Errorf("qemu reports the machine %q instead of %s; qemu log: %s", st.Status, want, readTail(i.h.VMMLog, 5))
		}
		lastErr = err
		t.Reset(poll)
		poll = min(2*poll, 20*time.Millisecond)
	}
}
