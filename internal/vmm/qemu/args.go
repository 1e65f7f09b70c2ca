package qemu

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// Files the driver keeps in the VM directory.
const (
	qmpSocketName   = "qmp.sock"
	agentSocketName = "agent.sock"
	consoleLogName  = "console.log"
	consoleSockName = "console.sock"
	vmmLogName      = "vmm.log"

	// AgentPortName is the virtio-serial port name the guest agent looks for
	// under /sys/class/virtio-ports/*/name when there is no vsock.
	AgentPortName = "banger.agent"

	// microvmTransports is the number of virtio-mmio transports QEMU's
	// microvm machine provides.
	microvmTransports = 8

	// namePrefix starts the -name argument; Adopt recognises banger's QEMUs by it.
	namePrefix = "guest=banger-"
)

// machineOpts is the -machine value. microvm has no PCI and no firmware tables
// besides ACPI; QEMU 7.2 needs:
//   - acpi=on: the Debian cloud kernel has no VIRTIO_MMIO_CMDLINE_DEVICES, so
//     the virtio-mmio devices are only found through ACPI (and ACPI also
//     carries the power button that system_powerdown presses);
//   - isa-serial=on: the console (ttyS0);
//   - rtc=on: a wall clock at boot;
//   - x-option-roms=off: no linuxboot option ROM (the kernel is loaded
//     directly; vmlinux via its PVH note, bzImage works too).
const machineOpts = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on"

var (
	vmIDRe    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	driveIDRe = regexp.MustCompile(`^[a-z0-9_]{1,32}$`)
	tapRe     = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)
)

// layout is where one VM's sockets and logs live.
type layout struct {
	QMPSocket   string
	AgentSocket string
	ConsoleLog  string
	// ConsoleSocket is the serial console: QEMU serves it, bangerd reads it
	// into ConsoleLog (size-capped, rotated; see vmmproc.Console).
	ConsoleSocket string
	VMMLog        string
}

func newLayout(dir string) layout {
	return layout{
		QMPSocket:     filepath.Join(dir, qmpSocketName),
		AgentSocket:   filepath.Join(dir, agentSocketName),
		ConsoleLog:    filepath.Join(dir, consoleLogName),
		ConsoleSocket: filepath.Join(dir, consoleSockName),
		VMMLog:        filepath.Join(dir, vmmLogName),
	}
}

// launchSpec is everything buildArgs needs, already decided.
type launchSpec struct {
	Config  vmm.MachineConfig
	Accel   string // "kvm" or "tcg"
	TSCKHz  int    // 0: do not pass tsc_early_khz
	Channel vmm.GuestChannel
	Paths   layout
	Sandbox bool
	// Incoming: wait paused for a migration stream (a snapshot restore)
	// instead of booting: -incoming defer -S.
	Incoming bool
	// Memory is where the guest's memory lives (see memory.go).
	Memory guestMemory
}

// validateConfig checks a MachineConfig before anything is started.
func validateConfig(cfg vmm.MachineConfig) error {
	var errs []error
	if !vmIDRe.MatchString(cfg.VMID) {
		errs = append(errs, fmt.Errorf("invalid VM id %q: want letters, digits, '_', '.', '-' (at most 64)", cfg.VMID))
	}
	if cfg.Dir == "" || !filepath.IsAbs(cfg.Dir) {
		errs = append(errs, fmt.Errorf("VM directory %q must be an absolute path", cfg.Dir))
	}
	if cfg.VCPUs < 1 || cfg.VCPUs > 255 {
		errs = append(errs, fmt.Errorf("invalid vCPU count %d: want 1 to 255", cfg.VCPUs))
	}
	if cfg.MemoryMiB < 16 {
		errs = append(errs, fmt.Errorf("invalid memory size %d MiB: want at least 16", cfg.MemoryMiB))
	}
	if cfg.KernelPath == "" {
		errs = append(errs, errors.New("no kernel given"))
	}
	for _, p := range []string{cfg.KernelPath, cfg.InitrdPath, cfg.Dir} {
		if strings.ContainsAny(p, "\x00\n") {
			errs = append(errs, fmt.Errorf("path %q contains a NUL or newline", p))
		}
	}
	if strings.ContainsAny(cfg.Cmdline, "\x00\n") {
		errs = append(errs, errors.New("kernel command line contains a NUL or newline"))
	}
	seen := map[string]bool{}
	for i, d := range cfg.Drives {
		if !driveIDRe.MatchString(d.ID) {
			errs = append(errs, fmt.Errorf("drive %d: invalid id %q: want [a-z0-9_]{1,32}", i, d.ID))
		}
		if seen[d.ID] {
			errs = append(errs, fmt.Errorf("drive %d: duplicate id %q", i, d.ID))
		}
		seen[d.ID] = true
		if d.Path == "" || strings.ContainsAny(d.Path, "\x00\n") {
			errs = append(errs, fmt.Errorf("drive %q: invalid path %q", d.ID, d.Path))
		}
	}
	devices := len(cfg.Drives) + 1 // + guest channel
	if cfg.Net != nil {
		devices++
		if !tapRe.MatchString(cfg.Net.Tap) {
			errs = append(errs, fmt.Errorf("invalid tap device name %q", cfg.Net.Tap))
		}
		if hw, err := net.ParseMAC(cfg.Net.MAC); err != nil || len(hw) != 6 {
			errs = append(errs, fmt.Errorf("invalid guest MAC %q: want six colon-separated hex bytes", cfg.Net.MAC))
		} else if hw[0]&1 == 1 {
			errs = append(errs, fmt.Errorf("invalid guest MAC %q: it is a multicast address", cfg.Net.MAC))
		}
	}
	if devices > microvmTransports {
		errs = append(errs, fmt.Errorf("too many devices (%d): QEMU's microvm machine has %d virtio slots (drives + network + guest channel)", devices, microvmTransports))
	}
	return errors.Join(errs...)
}

// optValue escapes a value for QEMU's comma-separated option syntax.
func optValue(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// kernelCmdline appends what the QEMU driver needs to the caller's command line.
func kernelCmdline(base string, accel string, tscKHz int) string {
	// A panic reboots, and -no-reboot turns that into the VMM's exit.
	cmdline := vmmproc.AppendKernelArgs(base, "console=ttyS0", "panic=-1")
	var extra []string
	// microvm has no i8042 keyboard controller: with reboot=k the kernel spins
	// ~1.5 s (under TCG) before falling back. A triple fault resets at once, and
	// -no-reboot makes QEMU exit. The last reboot= wins, so this overrides a
	// reboot=k meant for Firecracker.
	extra = append(extra, "reboot=t")
	cmdline = strings.TrimSpace(cmdline + " " + strings.Join(extra, " "))
	if accel == "tcg" && tscKHz > 0 {
		// Under TCG, microvm sometimes hangs in early TSC calibration without it.
		//
		// tsc=reliable: TCG's TSC is the host's (its rate, tscKHz), held
		// still while the VM is paused, so continuous across pause, save and
		// restore. microvm has no HPET or ACPI PM timer, so the kernel's
		// clocksource watchdog checks the TSC against jiffies, which a busy
		// host delays: a guest here marked its TSC unstable 74 s after boot
		// ("skew is too large") and went on with jiffies as its clock for
		// good (4 ms resolution for every clock_gettime, and its snapshots'
		// clones inherit it).
		cmdline = vmmproc.AppendKernelArgs(cmdline, "tsc_early_khz="+strconv.Itoa(tscKHz), "tsc=reliable")
	}
	return cmdline
}

// processName is what ps and top show for the VMM (at most 15 bytes).
func processName(vmID string) string {
	n := "banger-" + vmID
	if len(n) > 15 {
		n = n[:15]
	}
	return n
}

// buildArgs turns a validated launch spec into qemu-system-x86_64 arguments.
func buildArgs(s launchSpec) ([]string, error) {
	cfg := s.Config
	if s.Accel != "kvm" && s.Accel != "tcg" {
		return nil, fmt.Errorf("internal error: accelerator %q", s.Accel)
	}
	memObject, memMachine := s.Memory.backendArgs(cfg.MemoryMiB)
	a := []string{
		"-name", namePrefix + cfg.VMID + ",process=" + processName(cfg.VMID),
		"-machine", machineOpts + memMachine,
		"-accel", s.Accel,
	}
	if s.Accel == "kvm" {
		a = append(a, "-cpu", "host")
	}
	a = append(a,
		"-smp", strconv.Itoa(cfg.VCPUs),
		"-m", strconv.Itoa(cfg.MemoryMiB)+"M",
	)
	if memObject != "" {
		a = append(a, "-object", memObject)
	}
	a = append(a,
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-msg", "timestamp=on",
	)
	if s.Sandbox {
		// seccomp: the VMM may not exec, change privileges or use obsolete syscalls.
		a = append(a, "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
	}
	a = append(a,
		// The monitor's socket comes first: QEMU makes its chardevs in
		// this order and blocks on the console's (wait=on), so once bangerd's
		// console connection is in, the monitor's socket exists (a restore
		// goes on over it at once, without polling for it).
		"-chardev", "socket,id=qmp,path="+optValue(s.Paths.QMPSocket)+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		// The console is a socket bangerd reads into a capped log, never a
		// file QEMU appends to without limit. wait=on: QEMU waits for bangerd
		// before it runs the guest, so no early boot output is lost. While
		// nobody is connected (bangerd restarting) QEMU drops console output.
		"-chardev", "socket,id=console,path="+optValue(s.Paths.ConsoleSocket)+",server=on,wait=on",
		"-serial", "chardev:console",
		"-kernel", cfg.KernelPath,
	)
	if cfg.InitrdPath != "" {
		a = append(a, "-initrd", cfg.InitrdPath)
	}
	a = append(a, "-append", kernelCmdline(cfg.Cmdline, s.Accel, s.TSCKHz))
	for _, d := range cfg.Drives {
		drive := "id=" + d.ID + ",file=" + optValue(d.Path) + ",format=raw,if=none"
		if d.ReadOnly {
			drive += ",readonly=on"
		} else {
			// Let the guest's discards punch holes in the sparse file.
			drive += ",discard=unmap"
		}
		dev := "virtio-blk-device,drive=" + d.ID
		if len(d.ID) <= 20 { // virtio-blk serial limit
			dev += ",serial=" + d.ID
		}
		a = append(a, "-drive", drive, "-device", dev)
	}
	if cfg.Net != nil {
		a = append(a,
			"-netdev", "tap,id=net0,ifname="+cfg.Net.Tap+",script=no,downscript=no",
			"-device", "virtio-net-device,netdev=net0,mac="+strings.ToLower(cfg.Net.MAC),
		)
	}
	switch s.Channel.Kind {
	case vmm.ChannelVsock:
		if s.Channel.CID < 3 {
			return nil, fmt.Errorf("internal error: vsock CID %d", s.Channel.CID)
		}
		a = append(a, "-device", "vhost-vsock-device,id=vsock0,guest-cid="+strconv.FormatUint(uint64(s.Channel.CID), 10))
	case vmm.ChannelSerial:
		a = append(a,
			"-device", "virtio-serial-device,id=vser0",
			"-chardev", "socket,id=agent,path="+optValue(s.Channel.Path)+",server=on,wait=off",
			// The id matters: QEMU (7.2) stops reading the host socket while
			// the guest has the port closed, and nothing wakes its main loop
			// when the guest opens it, so bytes the host sent meanwhile can sit
			// unread for as long as an idle guest gives no other event. With an
			// id, the open raises a VSERPORT_CHANGE event whose rate-limit
			// timer wakes the main loop, which then reads the socket.
			"-device", "virtserialport,id=agent0,bus=vser0.0,chardev=agent,name="+s.Channel.Name,
		)
	default:
		return nil, fmt.Errorf("internal error: guest channel kind %q", s.Channel.Kind)
	}
	if s.Incoming {
		a = append(a, "-incoming", "defer", "-S")
	}
	return a, nil
}

// guestCID derives a stable vsock context id from the VM id, in [3, 2^32-2]
// (0-2 are reserved, 2^32-1 is VMADDR_CID_ANY).
func guestCID(vmID string) uint32 {
	h := fnv.New32a()
	h.Write([]byte("banger-vsock:" + vmID))
	return 3 + h.Sum32()%(0xFFFFFFFF-3)
}
