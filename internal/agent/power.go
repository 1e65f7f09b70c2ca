package agent

import (
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
// the agent (as PID 1) powers off.
const killGrace = 3 * time.Second

// initGrace bounds how long an image's init gets to power off before the
// agent does it itself.
const initGrace = 90 * time.Second

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
	base := filepath.Base(strings.TrimSuffix(exe, " (deleted)"))
	var sig syscall.Signal
	switch {
	case strings.Contains(exe, "systemd"):
		sig = sigSystemdPoweroff
	case base == "busybox" || strings.HasSuffix(exe, "/busybox"):
		sig = sigBusyboxPoweroff
	}
	if sig != 0 {
		if err := syscall.Kill(1, sig); err == nil {
			log.Info("asked the image's init to power off", "init", exe, "signal", int(sig))
			// If init does not get there, do it ourselves.
			time.Sleep(initGrace)
			log.Warn("the image's init did not power off in time; rebooting now", "init", exe)
		} else {
			log.Warn("could not signal the image's init", "init", exe, "error", err)
		}
	}
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
}

// finalShutdown is PID 1's end: stop every process, flush and reboot. It
// does not return.
func finalShutdown(log *slog.Logger) {
	start := time.Now()
	log.Debug("stopping all processes", "count", userProcesses())
	_ = syscall.Kill(-1, syscall.SIGTERM)
	deadline := time.Now().Add(killGrace)
	for time.Now().Before(deadline) && userProcesses() > 0 {
		reapAll()
		time.Sleep(50 * time.Millisecond)
	}
	if n := userProcesses(); n > 0 {
		log.Info("killing processes that ignored SIGTERM", "count", n)
		_ = syscall.Kill(-1, syscall.SIGKILL)
		time.Sleep(100 * time.Millisecond)
		reapAll()
	}
	log.Debug("processes stopped", "after", time.Since(start).Round(time.Millisecond))
	unix.Sync()
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		log.Debug("remount / read-only", "error", err)
	}
	unix.Sync()
	log.Info("rebooting to end the VM", "after", time.Since(start).Round(time.Millisecond))
	for {
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
		time.Sleep(time.Second)
	}
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

// userProcesses counts live processes other than this one, skipping kernel
// threads (empty cmdline) and zombies.
func userProcesses() int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	self := os.Getpid()
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || len(cmd) == 0 {
			continue
		}
		n++
	}
	return n
}
