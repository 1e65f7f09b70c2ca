package vmmproc

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
)

// DefaultEndGrace is how long End waits after SIGTERM before SIGKILL.
const DefaultEndGrace = 3 * time.Second

// ErrStillRunning is wrapped by End's error when the VMM it was asked to end
// still runs at its deadline, SIGKILL included (a process stuck in the
// kernel, say): whatever the VM holds on the host must be kept until it is gone.
var ErrStillRunning = errors.New("the VMM is still running")

// Match checks the command line of a process against the VMM the handles
// name; it returns the VM id found there, or why the process is not it.
type Match func(argv []string) (vmID string, err error)

// identify is the check AdoptProcess and End share: h names a live process
// (same PID and start time, not a zombie) that match accepts, for h's VM.
// Every refusal wraps vmm.ErrGone.
func identify(h vmm.Handles, name string, match Match) error {
	if h.PID <= 0 {
		return fmt.Errorf("%w: handles name no process", vmm.ErrGone)
	}
	if !system.SameProcess(h.PID, h.StartTime) {
		return fmt.Errorf("%s pid %d is not running (or was reused): %w", name, h.PID, vmm.ErrGone)
	}
	argv, err := system.ProcessCmdline(h.PID)
	if err != nil {
		return fmt.Errorf("%s pid %d: read its command line: %v: %w", name, h.PID, err, vmm.ErrGone)
	}
	vmID, err := match(argv)
	if err != nil {
		return fmt.Errorf("pid %d: %v: %w", h.PID, err, vmm.ErrGone)
	}
	if h.VMID != "" && vmID != h.VMID {
		return fmt.Errorf("pid %d runs VM %s, not %s: %w", h.PID, vmID, h.VMID, vmm.ErrGone)
	}
	return nil
}

// End ends the VMM process h names, for a caller that holds no instance of
// it (a release retried from a VM's record): only a process that passes
// AdoptProcess's checks (same PID and start time, a command line match
// accepts, for h's VM) is signalled, and through a pidfd opened before the
// check, so a PID reused in between is never hit. It sends SIGTERM (QEMU
// and Firecracker exit cleanly on it), SIGKILL once grace has passed, and
// waits for the process to be gone, all bounded by ctx (DefaultKillTimeout
// when ctx has no deadline).
//
// A process that is gone, or is not that VMM (its PID reused by another
// process), is left alone: End returns nil, nothing of the VM runs. It
// returns an error wrapping ErrStillRunning when the VMM outlives the
// deadline.
func End(ctx context.Context, h vmm.Handles, name string, match Match, grace time.Duration) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, grace+DefaultKillTimeout)
		defer cancel()
	}
	if h.PID <= 0 {
		return nil
	}
	fd, err := unix.PidfdOpen(h.PID, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		// No pidfd (a kernel before 5.3): signal by PID, checking the
		// identity again right before each signal.
		fd = -1
	} else {
		defer unix.Close(fd)
	}
	if err := identify(h, name, match); err != nil {
		return nil // gone, or not this VM's VMM: nothing to end
	}
	alive := func() bool {
		if fd >= 0 {
			n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
			if err != nil {
				return !errors.Is(err, unix.EBADF)
			}
			return n == 0
		}
		return system.SameProcess(h.PID, h.StartTime)
	}
	signal := func(sig syscall.Signal) error {
		var err error
		if fd >= 0 {
			err = unix.PidfdSendSignal(fd, sig, nil, 0)
		} else if system.SameProcess(h.PID, h.StartTime) {
			err = syscall.Kill(h.PID, sig)
		} else {
			return nil
		}
		if err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("signal %s pid %d: %w", name, h.PID, err)
		}
		return nil
	}
	// waitGone polls until the process is gone or until d (or ctx) runs out.
	waitGone := func(d time.Duration) bool {
		until := time.Now().Add(d)
		if dl, ok := ctx.Deadline(); ok && dl.Before(until) {
			until = dl
		}
		for {
			if !alive() {
				return true
			}
			if !time.Now().Before(until) || ctx.Err() != nil {
				return false
			}
			t := time.NewTimer(min(10*time.Millisecond, time.Until(until)))
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
		}
	}
	if err := signal(syscall.SIGTERM); err != nil {
		return err
	}
	if waitGone(grace) {
		return nil
	}
	if err := signal(syscall.SIGKILL); err != nil {
		return err
	}
	if waitGone(time.Until(deadlineOf(ctx))) {
		return nil
	}
	return fmt.Errorf("%s (pid %d) did not exit after SIGTERM and SIGKILL: %w", name, h.PID, ErrStillRunning)
}

func deadlineOf(ctx context.Context) time.Time {
	dl, _ := ctx.Deadline()
	return dl
}
