// Package agent is banger-agent, the program banger injects into every
// guest as /init of the initramfs.
//
// As PID 1 it mounts the kernel filesystems, loads the modules listed in
// /banger/modules.load, finds its disks by content (boot config, the
// writable disk labelled banger-rw, the image root), joins the image root
// and the writable disk with overlayfs, moves into it, sets the hostname and
// network from the boot config, and then serves the host over SSH (package
// sshd) on vsock or virtio-serial. When the image has its own init, the
// server runs as a detached child ("banger-agent serve") and the image's
// init becomes PID 1; otherwise the agent stays PID 1, reaps orphans and
// powers the machine off on request. A boot that cannot continue logs why on
// the console and powers off, which ends the VMM.
package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/reaper"
	"github.com/bangerdev/banger/internal/agent/sshd"
)

// ServeArg makes banger-agent serve the host with the boot config read from
// fd 3 (or --config PATH).
const ServeArg = "serve"

// diskWait bounds the wait for the virtio block devices.
const diskWait = 10 * time.Second

// imageInit is the image's init, started as PID 1 when present.
const imageInit = "/sbin/init"

const usage = `banger-agent runs inside banger guests as the initramfs's /init.

usage:
  banger-agent                       (as PID 1) boot the guest and serve the host
  banger-agent serve [--config FILE] [--rw-fd N]
                                     serve the host (boot config from fd 3 by default)
  banger-agent sftp-server           serve SFTP on stdin/stdout
`

// Main runs banger-agent with os.Args-style args and returns the exit status.
func Main(args []string) int {
	log := newLogger(os.Stderr, slog.LevelInfo)
	if len(args) > 1 {
		switch args[1] {
		case ServeArg:
			return serveMain(args[2:], log)
		case sshd.SFTPServerArg:
			return sftpMain()
		case "-h", "-help", "--help", "help":
			fmt.Fprint(os.Stdout, usage)
			return 0
		}
	}
	if os.Getpid() == 1 {
		initMain(log)
		return 0 // not reached
	}
	fmt.Fprint(os.Stderr, usage)
	return 2
}

// prefixWriter starts every write (one log record) with a prefix and the
// time since boot (as the kernel's lines have), so the agent's lines stand
// out in the console log and line up with the kernel's.
type prefixWriter struct {
	mu sync.Mutex
	w  io.Writer
	// uptime returns the time since boot; nil leaves it out.
	uptime func() (time.Duration, bool)
}

func bootTime() (time.Duration, bool) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, false
	}
	return time.Duration(ts.Nano()), true
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	prefix := "banger-agent: "
	if p.uptime != nil {
		if d, ok := p.uptime(); ok {
			prefix = fmt.Sprintf("banger-agent: [%5d.%03d] ", d/time.Second, (d%time.Second)/time.Millisecond)
		}
	}
	if _, err := p.w.Write(append([]byte(prefix), b...)); err != nil {
		return 0, err
	}
	return len(b), nil
}

func newLogger(w io.Writer, level slog.Leveler) *slog.Logger {
	return newLoggerClock(w, level, bootTime)
}

func newLoggerClock(w io.Writer, level slog.Leveler, uptime func() (time.Duration, bool)) *slog.Logger {
	return slog.New(slog.NewTextHandler(&prefixWriter{w: w, uptime: uptime}, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
}

// debugRequested reports whether the kernel command line asks for debug
// logs (banger.debug or banger.debug=1).
func debugRequested(cmdline string) bool {
	for _, f := range strings.Fields(cmdline) {
		if f == "banger.debug" || f == "banger.debug=1" {
			return true
		}
	}
	return false
}

func logLevel() slog.Level {
	b, _ := os.ReadFile("/proc/cmdline")
	if debugRequested(string(b)) {
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

var shutdownOnce sync.Once

// shutdown powers off once, however many callers ask.
func shutdown(log *slog.Logger, reason string) {
	shutdownOnce.Do(func() { powerOff(log, reason) })
}

// fatal logs why boot cannot continue and powers off.
func fatal(log *slog.Logger, what string, err error) {
	log.Error("BOOT FAILED: "+what, "error", err)
	shutdown(log, "boot failed")
	select {} // powerOff does not return as PID 1
}

func initMain(log *slog.Logger) {
	start := time.Now()
	defer func() {
		if r := recover(); r != nil {
			log.Error("BOOT FAILED: internal error", "panic", r)
			shutdown(log, "internal error")
		}
	}()
	if err := mountEarly(); err != nil {
		fatal(log, "mount kernel filesystems", err)
	}
	attachConsole()
	log = newLogger(os.Stderr, logLevel())
	os.Setenv("PATH", sshd.DefaultPath)
	release, _ := kernelRelease()
	log.Info("starting", "kernel", release)

	n, errs := loadModules("/lib/modules/"+release, ModulesLoadFile, log)
	for _, err := range errs {
		log.Warn("module not loaded", "error", err)
	}
	log.Debug("modules loaded", "count", n)

	disks, err := waitForDisks(diskWait, log)
	if err != nil {
		fatal(log, "find the VM's disks", err)
	}
	cfg, err := readBootConfig(disks.Config.Path)
	if err != nil {
		fatal(log, "read the boot config", err)
	}
	if err := seedRNG(cfg.RNGSeed); err != nil {
		log.Warn("seed the entropy pool from the boot config", "error", err)
	}
	if err := mountRoot(disks.Root, disks.RW, log); err != nil {
		fatal(log, "mount the root filesystem", err)
	}
	if disks.RW != nil {
		if writableRoot, err = openWritableRoot(rwDir); err != nil {
			log.Warn("the writable disk will not be remounted read-only at power off", "error", err)
		}
	}
	if err := moveKernelMounts(); err != nil {
		fatal(log, "prepare the root filesystem", err)
	}
	if cfg.Hostname != "" {
		if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
			log.Warn("set hostname", "hostname", cfg.Hostname, "error", err)
		}
		if err := writeHostname(newRoot, cfg.Hostname); err != nil {
			log.Warn("write /etc/hostname and /etc/hosts", "error", err)
		}
	}
	if err := configureNetwork(cfg.Network, log); err != nil {
		// The host channel does not need the network: keep going so that
		// the host can still get in and see what is wrong.
		log.Error("network not configured", "error", err)
	}
	if cfg.Network != nil {
		if err := writeResolvConf(newRoot, cfg.Network.DNS); err != nil {
			log.Warn("write /etc/resolv.conf", "error", err)
		}
	}
	freeInitramfs(log)
	if err := switchRoot(); err != nil {
		fatal(log, "switch to the root filesystem", err)
	}
	log.Info("root filesystem ready", "root", disks.Root.Path, "writable", diskPath(disks.RW), "after", time.Since(start).Round(time.Millisecond))

	if hasInit(imageInit) {
		if err := startServeChild(cfg, log); err != nil {
			log.Error("could not start the agent's server; staying PID 1 without the image's init", "error", err)
		} else {
			log.Info("handing PID 1 over to the image's init", "init", imageInit)
			argv := append([]string{imageInit}, os.Args[1:]...)
			err := syscall.Exec(imageInit, argv, os.Environ())
			// Only reached when exec failed; the server child is running,
			// so stay PID 1 and keep reaping.
			log.Error("exec the image's init failed", "init", imageInit, "error", err)
			servePID1(nil, log)
			return
		}
	}
	// No init will mount cgroup2; container tools in the guest want it.
	if err := unix.Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		log.Debug("mount cgroup2", "error", err)
	}
	servePID1(cfg, log)
}

func diskPath(d *Disk) string {
	if d == nil {
		return "(tmpfs)"
	}
	return d.Path
}

// waitForDisks scans block devices until the boot config, writable disk and
// image root are all present, or the deadline passes. Without a writable
// disk at the deadline, it goes on with a warning (tmpfs upper layer).
func waitForDisks(d time.Duration, log *slog.Logger) (Disks, error) {
	deadline := time.Now().Add(d)
	for {
		disks, err := ScanDisks("/sys/block", "/dev")
		if err == nil && disks.complete() {
			log.Debug("disks found", "disks", disks.String())
			return disks, nil
		}
		if time.Now().After(deadline) {
			if err != nil {
				return Disks{}, err
			}
			switch {
			case disks.Config == nil:
				return Disks{}, fmt.Errorf("no boot config device after %s (found: %s; is virtio_blk in the initrd?)", d, disks)
			case disks.Root == nil:
				return Disks{}, fmt.Errorf("no image root filesystem (ext4) after %s (found: %s)", d, disks)
			}
			return disks, nil // no writable disk: mountRoot warns
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// hasInit reports whether p (following symlinks) is an executable file.
func hasInit(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// startServeChild starts "banger-agent serve" in its own session, handing it
// the boot config in a memfd on fd 3.
func startServeChild(cfg *bootcfg.Config, log *slog.Logger) error {
	data, err := bootcfg.Encode(cfg)
	if err != nil {
		return err
	}
	fd, err := unix.MemfdCreate("banger-bootcfg", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd: %w", err)
	}
	mf := os.NewFile(uintptr(fd), "banger-bootcfg")
	defer mf.Close()
	if _, err := mf.Write(data); err != nil {
		return err
	}
	if _, err := mf.Seek(0, io.SeekStart); err != nil {
		return err
	}
	cmd := exec.Command("/proc/self/exe", ServeArg)
	cmd.Args[0] = "banger-agent"
	cmd.ExtraFiles = []*os.File{mf}
	if writableRoot != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, writableRoot) // fd 4
		cmd.Args = append(cmd.Args, rwFDFlag, "4")
	}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.Env = []string{"PATH=" + sshd.DefaultPath}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start banger-agent serve: %w", err)
	}
	log.Debug("agent server started", "pid", cmd.Process.Pid)
	return nil
}

// servePID1 serves the host as PID 1: reaps orphans, turns SIGTERM, SIGINT
// (Ctrl-Alt-Del), SIGPWR and the usual init poweroff signals into a clean
// power off. cfg nil means the server runs elsewhere (a child): only reap.
func servePID1(cfg *bootcfg.Config, log *slog.Logger) {
	// Ctrl-Alt-Del then sends SIGINT instead of an immediate reboot.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	r := reaper.New("/proc", log)
	ctx := context.Background()
	go r.Run(ctx, 30*time.Second)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGPWR, syscall.SIGUSR2, sigSystemdPoweroff, syscall.SIGHUP, syscall.SIGUSR1)
	go func() {
		for s := range sigs {
			if s == syscall.SIGHUP || s == syscall.SIGUSR1 {
				continue
			}
			go shutdown(log, "signal "+s.String())
		}
	}()
	go watchPowerButton(ctx, func() { go shutdown(log, "power button") }, log)
	if cfg == nil {
		select {}
	}
	err := serve(ctx, cfg, r, func() { shutdown(log, "requested by the host") }, log)
	if err == nil {
		err = errors.New("server stopped")
	}
	fatal(log, "serve the host", err)
}

// serveMain is "banger-agent serve": the server when the image's init is PID 1.
func serveMain(args []string, _ *slog.Logger) int {
	log := newLogger(os.Stderr, logLevel())
	sa, err := parseServeArgs(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "banger-agent serve: %v\n\n%s", err, usage)
		return 2
	}
	var src *os.File
	if sa.config != "" {
		if src, err = os.Open(sa.config); err != nil {
			log.Error("open boot config", "error", err)
			return 1
		}
	} else {
		src = os.NewFile(3, "bootcfg")
	}
	if sa.rwFD >= 0 {
		f := os.NewFile(uintptr(sa.rwFD), rwDir)
		if fi, err := f.Stat(); err != nil || !fi.IsDir() {
			log.Warn("the writable disk's handle is not a directory; it will not be remounted read-only at power off", "fd", sa.rwFD, "error", err)
			f.Close()
		} else {
			// inherited without close-on-exec: commands must not get it
			unix.CloseOnExec(sa.rwFD)
			writableRoot = f
		}
	}
	b, err := io.ReadAll(io.LimitReader(src, bootcfg.MaxSize+4096))
	// The boot config holds the VM's secrets (its bulk key, its SSH host
	// key), and fd 3 comes without close-on-exec: closed once read, so
	// that no command the agent starts inherits it.
	src.Close()
	if err != nil {
		log.Error("read boot config", "error", err)
		return 1
	}
	cfg, err := bootcfg.Decode(bytes.NewReader(b))
	if err != nil {
		log.Error("read boot config", "error", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	signal.Ignore(syscall.SIGHUP)
	// systemd-logind handles the power button under systemd; other inits
	// (busybox) have nobody doing it.
	if exe, _ := os.Readlink("/proc/1/exe"); !strings.Contains(exe, "systemd") {
		go watchPowerButton(ctx, func() { go shutdown(log, "power button") }, log)
	}
	err = serve(ctx, cfg, nil, func() { shutdown(log, "requested by the host") }, log)
	if exitHeld.Load() {
		select {} // the power off ends the VM (busyboxPowerOff)
	}
	if err != nil {
		log.Error("cannot serve the host; banger cannot reach this guest", "error", err)
		return 1
	}
	return 0
}

// rwFDFlag names the descriptor of the writable disk's mount root that PID
// 1 hands to "banger-agent serve" (see writableRoot).
const rwFDFlag = "--rw-fd"

type serveArgs struct {
	config string // boot config file; "": fd 3
	rwFD   int    // -1: none
}

// parseServeArgs parses "serve [--config FILE] [--rw-fd N]".
func parseServeArgs(args []string) (serveArgs, error) {
	a := serveArgs{rwFD: -1}
	for i := 0; i < len(args); i += 2 {
		if i+1 >= len(args) {
			return a, fmt.Errorf("%s needs a value", args[i])
		}
		v := args[i+1]
		switch args[i] {
		case "--config":
			if a.config != "" || v == "" {
				return a, errors.New("--config: one non-empty path")
			}
			a.config = v
		case rwFDFlag:
			n, err := strconv.Atoi(v)
			if err != nil || n < 4 || n > 1024 || a.rwFD >= 0 {
				return a, fmt.Errorf("%s %q: want one descriptor number from 4 to 1024", rwFDFlag, v)
			}
			a.rwFD = n
		default:
			return a, fmt.Errorf("unknown argument %q", args[i])
		}
	}
	return a, nil
}

// sftpMain serves SFTP on stdin/stdout (started by the SSH server as the
// session's user).
func sftpMain() int {
	rw := struct {
		io.Reader
		io.WriteCloser
	}{os.Stdin, os.Stdout}
	// Reads of up to SFTPMaxPacket bytes (the bulk path's clients ask for
	// them; others keep asking for 32 KiB).
	srv, err := sftp.NewServer(rw, sftp.WithMaxTxPacket(api.SFTPMaxPacket))
	if err != nil {
		fmt.Fprintln(os.Stderr, "sftp-server:", err)
		return 1
	}
	if err := srv.Serve(); err != nil && !errors.Is(err, io.EOF) {
		fmt.Fprintln(os.Stderr, "sftp-server:", err)
		return 1
	}
	return 0
}
