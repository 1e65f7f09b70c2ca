package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/latelog"
)

// Signals that make an image's init power the machine off.
const (
	sigSystemdPoweroff = syscall.Signal(38) // SIGRTMIN+4 with glibc's SIGRTMIN (34)
	sigBusyboxPoweroff = syscall.SIGUSR2
)

// killGrace bounds how long processes get between SIGTERM and SIGKILL when
// the agent stops them itself (as PID 1, or when the image's init did not
// power off).
const killGrace = 3 * time.Second

// busyboxTermGrace bounds how long processes get between busybox init's
// SIGTERM to all and the agent's SIGKILL. busybox init sends SIGKILL to
// every process (the agent included) 1 s after its SIGTERM, so the agent's
// whole end (grace, kill, sync, remount, reboot) must fit well inside that
// second; it stops waiting as soon as the processes are gone.
const busyboxTermGrace = 400 * time.Millisecond

// killWait bounds the wait for processes to go after SIGKILL.
const killWait = 150 * time.Millisecond

// remountWait bounds the retries of a read-only remount that finds the
// filesystem busy (a process killed a moment ago still closing its files).
const remountWait = 100 * time.Millisecond

// stopPoll is how often a stop looks at what is left.
const stopPoll = 10 * time.Millisecond

// initGrace bounds how long an image's init gets to power off before the
// agent does it itself.
const initGrace = 90 * time.Second

// writableRoot is the root of the writable disk's ext4 mount (rwDir in the
// initramfs), opened O_PATH before the switch to the new root: after it,
// the mount is out of every process's reach by path (it stays in the
// initramfs, under the overlay that became /) and absent from
// /proc/mounts, so no init's `umount -a` sees it. A stop remounts it
// read-only through this handle, which leaves its journal clean. PID 1
// opens it (close-on-exec: the image's init does not inherit it) and hands
// it to the server child (serve --rw-fd). Nil: no writable ext4 disk.
var writableRoot *os.File

// exitHeld is set while the agent waits for busybox init to signal every
// process: the SIGTERM that follows must not end the server process, which
// still has the VM to end.
var exitHeld atomic.Bool

// initKind tells how to ask an image's init (the target of /proc/1/exe) to
// power off.
type initKind int

const (
	initOther initKind = iota
	initSystemd
	initBusybox
)

func classifyInit(exe string) initKind {
	exe = strings.TrimSuffix(exe, " (deleted)")
	switch {
	case strings.Contains(exe, "systemd"):
		return initSystemd
	case filepath.Base(exe) == "busybox":
		return initBusybox
	}
	return initOther
}

// powerOff ends the guest. The kernel runs with reboot=t on QEMU microvm and
// reboot=k on Firecracker, and the VMM exits on a guest reboot (QEMU
// -no-reboot, Firecracker always), so "power off" is a reboot.
func powerOff(log *slog.Logger, reason string) {
	latelog.Flush()
	log.Info("powering off", "reason", reason)
	if os.Getpid() == 1 {
		finalShutdown(log)
		return
	}
	exe, _ := os.Readlink("/proc/1/exe")
	switch classifyInit(exe) {
	case initSystemd:
		systemdPowerOff(log, exe) // returns only when init did not get there
	case initBusybox:
		busyboxPowerOff(log, exe) // returns only when init did not get there
	default:
		log.Info("the image's init has no known power off request; stopping the VM itself", "init", exe)
	}
	s := newStopper(log, nil)
	s.stopProcesses(true, killGrace)
	s.end()
}

// busyboxPowerOff asks busybox init to power off (SIGUSR2) and lets it run
// the image's inittab ::shutdown actions. busybox then sends SIGTERM to
// every process, sleeps 1 s, sends SIGKILL, sleeps 1 s more and reboots:
// those sleeps were most of a stop, and no inittab /banger/rw is in (see
// writableRoot), so the writable disk was left with its journal dirty. So
// the agent takes over at that SIGTERM: it lets the processes go (as soon
// as they have, or SIGKILL after busyboxTermGrace), remounts / and the
// writable disk read-only and reboots, before busybox's first sleep is
// over. It returns only when init did not get as far as the SIGTERM.
func busyboxPowerOff(log *slog.Logger, exe string) {
	initPowerOff(log, exe, sigBusyboxPoweroff, busyboxTermGrace, func(string) bool { return true })
}

// systemdPowerOff asks systemd to power off (SIGRTMIN+4). systemd stops
// its units (the agent is none: it was started before systemd, which put it
// in init.scope, and is left alone), then becomes systemd-shutdown, which
// sends SIGTERM to every process left, the agent and what it started
// included, waits for its children (up to DefaultTimeoutStopSec, 90 s),
// SIGKILL, unmounts what it sees and powers off. It never sees the writable
// disk (see writableRoot): every stop left its journal dirty. So the agent
// takes over at systemd-shutdown's SIGTERM, as it does at busybox's: the
// processes left go (as soon as they have, or SIGKILL after killGrace,
// where systemd-shutdown would have waited up to 90 s), / and the writable
// disk read-only, reboot. systemd-shutdown waits for the agent meanwhile
// (it is its child). A SIGTERM while PID 1 is not yet systemd-shutdown is
// not the end (see takeOverAt). It returns only when init did not get as
// far as systemd-shutdown.
func systemdPowerOff(log *slog.Logger, exe string) {
	initPowerOff(log, exe, sigSystemdPoweroff, killGrace, isSystemdShutdown)
}

// isSystemdShutdown reports whether exe, PID 1's executable when a
// SIGTERM reached the agent, is systemd-shutdown: the SIGTERM is then its
// last round to every process. "" (unreadable) counts as yes: the agent
// asked for the power off, and ending the VM is what it waits for.
func isSystemdShutdown(exe string) bool {
	exe = strings.TrimSuffix(exe, " (deleted)")
	return exe == "" || filepath.Base(exe) == "systemd-shutdown"
}

// initPowerOff sends sig to the image's init (exe) and waits for init's
// SIGTERM to every process; at the first one that final says is the last
// round (given PID 1's executable then), the agent ends the VM itself:
// the other processes get up to grace to go, then SIGKILL, and end (sync,
// read-only remounts, reboot). The agent's server must not exit on that
// SIGTERM (exitHeld). It returns only when init sent no such SIGTERM
// within initGrace, or could not be signalled.
func initPowerOff(log *slog.Logger, exe string, sig syscall.Signal, grace time.Duration, final func(pid1exe string) bool) {
	// busybox's default ::shutdown action (umount -a -r) unmounts /proc:
	// keep it open to see which processes are left.
	proc, err := os.Open("/proc")
	if err != nil {
		log.Warn("open /proc", "error", err)
		return
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	exitHeld.Store(true)
	if err := syscall.Kill(1, sig); err != nil {
		log.Warn("could not signal the image's init", "init", exe, "error", err)
		signal.Stop(term)
		exitHeld.Store(false)
		proc.Close()
		return
	}
	log.Info("asked the image's init to power off", "init", exe, "signal", int(sig))
	t := time.NewTimer(initGrace)
	defer t.Stop()
	pid1 := func() string { return readPID1Exe(proc) }
	if takeOverAt(log, term, t.C, pid1, final) {
		s := newStopper(log, proc)
		s.stopProcesses(false, grace)
		s.end()
		return // not reached: end reboots
	}
	log.Warn("the image's init did not power off in time; stopping the VM now", "init", exe)
	proc.Close()
}

// takeOverAt waits for the SIGTERM (on term) at which the agent ends the
// VM itself: one for which final(PID 1's executable) holds. It reports
// false when timeout fires first. Other SIGTERMs are logged and waited
// past.
func takeOverAt(log *slog.Logger, term <-chan os.Signal, timeout <-chan time.Time, pid1 func() string, final func(string) bool) bool {
	for {
		select {
		case <-term:
			exe := pid1()
			if final(exe) {
				log.Info("the image's init is at its last step; ending the VM", "init", exe)
				return true
			}
			log.Info("SIGTERM before the image's init's last step; waiting on", "init", exe)
		case <-timeout:
			return false
		}
	}
}

// readPID1Exe is the target of /proc/1/exe under proc (an open /proc); ""
// when it cannot be read.
func readPID1Exe(proc *os.File) string {
	buf := make([]byte, 4096)
	n, err := unix.Readlinkat(int(proc.Fd()), "1/exe", buf)
	if err != nil || n <= 0 {
		return ""
	}
	return string(buf[:n])
}

// finalShutdown is PID 1's end: stop every process, flush, remount
// read-only and reboot. It does not return.
func finalShutdown(log *slog.Logger) {
	s := newStopper(log, nil)
	s.stopProcesses(true, killGrace)
	s.end()
}

// stopper ends the VM: its steps are fields so that tests can drive them.
type stopper struct {
	log *slog.Logger
	// others counts the live processes other than PID 1 and this one.
	others func() int
	// signal sends sig to every process but PID 1 and this one (kill -1).
	signal func(syscall.Signal) error
	// reap collects exited children (what PID 1 must do).
	reap    func()
	sync    func()
	remount []remountStep // in order
	reboot  func()
	poll    time.Duration
	now     func() time.Time
	sleep   func(time.Duration)
}

// remountStep makes one filesystem read-only.
type remountStep struct {
	what string
	do   func() error
}

// newStopper returns the real stopper. proc is an open /proc (nil: open it
// now).
func newStopper(log *slog.Logger, proc *os.File) *stopper {
	if proc == nil {
		proc, _ = os.Open("/proc")
	}
	s := &stopper{
		log:    log,
		others: func() int { return countProcesses(proc, os.Getpid()) },
		signal: func(sig syscall.Signal) error { return syscall.Kill(-1, sig) },
		reap:   func() {},
		sync:   unix.Sync,
		reboot: func() {
			for {
				_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
				time.Sleep(time.Second)
			}
		},
		poll:  stopPoll,
		now:   time.Now,
		sleep: time.Sleep,
	}
	if os.Getpid() == 1 {
		s.reap = reapAll
	}
	s.remount = []remountStep{{"/", func() error {
		return unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	}}}
	if writableRoot != nil {
		fd := int(writableRoot.Fd())
		s.remount = append(s.remount, remountStep{"the writable disk", func() error { return remountReadOnly(fd) }})
	}
	return s
}

// stopProcesses sends SIGTERM to every other process (when term; busybox
// init has sent it already otherwise), waits up to grace for them to go,
// then sends SIGKILL to those left and waits up to killWait for them.
func (s *stopper) stopProcesses(term bool, grace time.Duration) {
	start := s.now()
	if term {
		s.log.Debug("stopping all processes", "count", s.others())
		_ = s.signal(syscall.SIGTERM)
	}
	if s.waitGone(grace) {
		s.log.Debug("processes stopped", "after", s.now().Sub(start).Round(time.Millisecond))
		return
	}
	s.log.Info("killing processes that ignored SIGTERM", "count", s.others())
	_ = s.signal(syscall.SIGKILL)
	if !s.waitGone(killWait) {
		s.log.Warn("processes left after SIGKILL", "count", s.others())
	}
}

// waitGone reports whether every other process is gone within d.
func (s *stopper) waitGone(d time.Duration) bool {
	deadline := s.now().Add(d)
	for {
		s.reap()
		if s.others() == 0 {
			return true
		}
		if !s.now().Before(deadline) {
			return false
		}
		s.sleep(s.poll)
	}
}

// end flushes, makes every filesystem read-only (the writable disk's
// journal is then clean: the next boot has nothing to replay) and reboots.
func (s *stopper) end() {
	start := s.now()
	s.sync()
	for _, r := range s.remount {
		if err := s.remountRetry(r); err != nil {
			s.log.Warn("could not remount read-only", "filesystem", r.what, "error", err)
		}
	}
	s.sync()
	s.log.Info("rebooting to end the VM", "after", s.now().Sub(start).Round(time.Millisecond))
	s.reboot()
}

// remountRetry runs r, again while the filesystem is busy, up to remountWait.
func (s *stopper) remountRetry(r remountStep) error {
	deadline := s.now().Add(remountWait)
	for {
		err := r.do()
		if err == nil || !errors.Is(err, unix.EBUSY) || !s.now().Before(deadline) {
			return err
		}
		s.sleep(s.poll)
	}
}

// remountReadOnly makes the filesystem whose mount root fd is (an O_PATH
// handle does) read-only: fspick and fsconfig reconfigure (Linux 5.2+),
// else mount(2) through /proc/self/fd.
func remountReadOnly(fd int) error {
	fs, err := unix.Fspick(fd, "", unix.FSPICK_EMPTY_PATH|unix.FSPICK_CLOEXEC)
	if errors.Is(err, unix.ENOSYS) {
		return unix.Mount("", fmt.Sprintf("/proc/self/fd/%d", fd), "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	}
	if err != nil {
		return fmt.Errorf("fspick: %w", err)
	}
	defer unix.Close(fs)
	if err := unix.FsconfigSetFlag(fs, "ro"); err != nil {
		return fmt.Errorf("fsconfig ro: %w", err)
	}
	if err := unix.FsconfigReconfigure(fs); err != nil {
		return fmt.Errorf("fsconfig reconfigure: %w", err)
	}
	return nil
}

// reapAll collects every exited child (PID 1 at shutdown only).
func reapAll() {
	for {
		pid, err := unix.Wait4(-1, nil, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}

// countProcesses counts the live processes in proc (an open /proc) other
// than PID 1 and self, skipping kernel threads (empty cmdline) and zombies
// (the same). A /proc that cannot be read counts as none.
func countProcesses(proc *os.File, self int) int {
	if proc == nil {
		return 0
	}
	dfd, err := unix.Openat(int(proc.Fd()), ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0
	}
	d := os.NewFile(uintptr(dfd), "/proc")
	names, _ := d.Readdirnames(-1)
	d.Close()
	n := 0
	buf := make([]byte, 1)
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil || pid == self || pid == 1 {
			continue
		}
		fd, err := unix.Openat(int(proc.Fd()), name+"/cmdline", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue
		}
		k, _ := unix.Read(fd, buf)
		unix.Close(fd)
		if k > 0 {
			n++
		}
	}
	return n
}
