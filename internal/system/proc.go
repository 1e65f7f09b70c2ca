// Package system holds small host-level helpers shared by several services:
// detached processes, process identity from /proc, and watching processes that
// are not our children.
package system

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ProcessStartTime returns field 22 of /proc/<pid>/stat (start time in clock
// ticks since boot). Together with the PID it identifies a process across PID
// reuse.
func ProcessStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	return parseStartTime(string(b))
}

func parseStartTime(stat string) (uint64, error) {
	// comm (field 2) may contain spaces and parentheses: split after the last ')'.
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc stat line")
	}
	fields := strings.Fields(stat[i+1:])
	// fields[0] is field 3 (state); field 22 is fields[19].
	if len(fields) < 20 {
		return 0, fmt.Errorf("malformed /proc stat line: %d fields", len(fields))
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// ProcessCmdline returns the NUL-separated command line of pid as a slice.
func ProcessCmdline(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, err
	}
	s := strings.TrimRight(string(b), "\x00")
	if s == "" {
		return nil, nil
	}
	return strings.Split(s, "\x00"), nil
}

// SameProcess reports whether pid is alive, not a zombie, and started at startTime.
func SameProcess(pid int, startTime uint64) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	st, err := parseStartTime(string(b))
	if err != nil || st != startTime {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	fields := strings.Fields(string(b)[i+1:])
	return len(fields) > 0 && fields[0] != "Z" && fields[0] != "X"
}

// Process is a process being watched until it exits: either our child
// (started by StartDetached) or an adopted one (Adopt).
type Process struct {
	PID       int
	StartTime uint64

	done     chan struct{}
	mu       sync.Mutex
	exitCode int
	signal   string
	waitErr  error
}

// StartDetached starts cmd in a new session (so that signals to bangerd's
// process group never reach it) and watches it. The caller must not call
// cmd.Wait; use Process.Done and Process.ExitStatus.
func StartDetached(cmd *exec.Cmd) (*Process, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Process{PID: cmd.Process.Pid, done: make(chan struct{}), exitCode: -1}
	p.StartTime, _ = ProcessStartTime(p.PID)
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		if cmd.ProcessState != nil {
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				p.signal = ws.Signal().String()
			} else {
				p.exitCode = cmd.ProcessState.ExitCode()
			}
		} else {
			p.waitErr = err
		}
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// ErrNotSameProcess is returned by Adopt when the PID is gone or was reused.
var ErrNotSameProcess = errors.New("process is gone or its PID was reused")

// Adopt watches a process that is not our child, identified by PID and start
// time. Its exit code cannot be known; Done closes when it has exited.
func Adopt(pid int, startTime uint64) (*Process, error) {
	if !SameProcess(pid, startTime) {
		return nil, ErrNotSameProcess
	}
	p := &Process{PID: pid, StartTime: startTime, done: make(chan struct{}), exitCode: -1}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		// Old kernels: poll /proc.
		go func() {
			t := time.NewTicker(200 * time.Millisecond)
			defer t.Stop()
			for range t.C {
				if !SameProcess(pid, startTime) {
					close(p.done)
					return
				}
			}
		}()
		return p, nil
	}
	// The PID could have been reused between the check and pidfd_open.
	if !SameProcess(pid, startTime) {
		unix.Close(fd)
		return nil, ErrNotSameProcess
	}
	go func() {
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if err == nil || !errors.Is(err, unix.EINTR) {
				break
			}
		}
		close(p.done)
	}()
	return p, nil
}

// Done is closed once the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exit returns the exit code (-1 when unknown or signalled) and the signal name.
// Valid after Done is closed.
func (p *Process) Exit() (code int, signal string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitCode, p.signal
}

// Signal sends sig to the process if it is still the same process.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := syscall.Kill(p.PID, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal pid %d: %w", p.PID, err)
	}
	return nil
}

// Wait waits until the process exits or ctx is done.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// KillAndWait sends SIGKILL and waits (bounded by ctx) for the exit.
func (p *Process) KillAndWait(ctx context.Context) error {
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	return p.Wait(ctx)
}
