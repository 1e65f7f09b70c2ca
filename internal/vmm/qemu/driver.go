// Package qemu is the vmm.Driver for qemu-system-x86_64 with the microvm
// machine type: direct kernel boot, virtio-mmio disks and network, the guest
// agent reached over vhost-vsock when the host has it and over a virtio-serial
// port otherwise, and QMP for control.
//
// A guest reboot or power-off ends the QEMU process (-no-reboot, and the kernel
// command line gets panic=-1 reboot=t).
//
// Shutdown presses the ACPI power button (QMP system_powerdown). On microvm that
// is an ACPI GED event: the guest needs the ACPI button driver (button.ko in
// the Debian cloud kernel) and a userspace that acts on KEY_POWER (systemd-logind,
// acpid, or the banger agent). Without that the request is silently ignored, so
// it is only a fallback after asking the agent.
package qemu

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// DriverName is the driver's name in Handles.
const DriverName = "qemu"

// Defaults.
const (
	DefaultBinary       = "qemu-system-x86_64"
	DefaultStartTimeout = 30 * time.Second
	// defaultOpTimeout bounds QMP exchanges and kills when ctx has no deadline.
	defaultOpTimeout = 10 * time.Second
	// adoptCheckTimeout bounds Adopt's look at the monitor.
	adoptCheckTimeout = 3 * time.Second
)

// Options configure a Driver. The zero value is usable.
type Options struct {
	// Binary is the QEMU executable, a path or a name looked up in PATH.
	// Default qemu-system-x86_64.
	Binary string
	// Accel is "auto" (default: KVM when a probe shows it works, else TCG),
	// "kvm" or "tcg".
	Accel string
	// ProbeKernel is a guest kernel used to probe KVM before the first Start
	// (so that Preflight and Describe can tell). Without it the first Start
	// probes with its own kernel.
	ProbeKernel string
	// ProbeTimeout bounds the KVM probe. Default DefaultProbeTimeout.
	ProbeTimeout time.Duration
	// StartTimeout bounds Start when ctx allows longer. Default DefaultStartTimeout.
	StartTimeout time.Duration
	// NoSandbox turns off QEMU's seccomp sandbox (-sandbox on,...: no exec, no
	// privilege changes, no obsolete syscalls), used when QEMU has it.
	NoSandbox bool
	// ConsoleMax caps each of the two console log files (console.log and
	// console.log.1). Default vmmproc.ConsoleFileMax.
	ConsoleMax int64
	// MemoryDirs are where a guest's memory may be kept as a file, in order
	// of preference (paths.Layout.MemoryDirs); a directory is used only when
	// it is on a tmpfs, private to the user and has room. Without one the
	// guest gets anonymous memory and its snapshots stream all of it.
	MemoryDirs []string
	Logger     *slog.Logger
}

// Driver runs VMs under qemu-system-x86_64. Safe for concurrent use.
type Driver struct {
	opts Options
	log  *slog.Logger

	kvmPath   string
	vsockPath string
	cpuinfo   string

	accelSem chan struct{} // guards accel; a channel so waiting honours ctx
	accel    *accelChoice

	once     sync.Once
	vsockErr error // nil: vhost-vsock usable
	tscKHz   int
	binMu    sync.Mutex
	binCache map[string]binaryInfo
}

type binaryInfo struct {
	version string
	sandbox bool // built with seccomp (-sandbox)
	err     error
}

// New returns a Driver. Options are checked by Preflight and Start.
func New(opts Options) *Driver {
	if opts.Binary == "" {
		opts.Binary = DefaultBinary
	}
	if opts.Accel == "" {
		opts.Accel = AccelAuto
	}
	if opts.ProbeTimeout <= 0 {
		opts.ProbeTimeout = DefaultProbeTimeout
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = DefaultStartTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Driver{
		opts:      opts,
		log:       log.With("driver", DriverName),
		kvmPath:   "/dev/kvm",
		vsockPath: "/dev/vhost-vsock",
		cpuinfo:   "/proc/cpuinfo",
		accelSem:  make(chan struct{}, 1),
		binCache:  map[string]binaryInfo{},
	}
}

var _ vmm.Driver = (*Driver)(nil)

// Name implements vmm.Driver.
func (d *Driver) Name() string { return DriverName }

// hostFacts reads what does not change while the driver lives.
func (d *Driver) hostFacts() {
	d.once.Do(func() {
		d.vsockErr = checkDevice(d.vsockPath)
		if b, err := os.ReadFile(d.cpuinfo); err == nil {
			d.tscKHz = cpuKHz(b)
		}
	})
}

// Capabilities implements vmm.Driver.
func (d *Driver) Capabilities() vmm.Capabilities {
	d.hostFacts()
	return vmm.Capabilities{
		Vsock:        d.vsockErr == nil,
		GracefulStop: true, // ACPI power button; see the package comment
		Initrd:       true,
		Network:      true,
	}
}

// binary resolves the QEMU executable and checks (once per path) that it has
// the microvm machine with the options banger uses.
func (d *Driver) binary(ctx context.Context) (string, binaryInfo, error) {
	path, err := exec.LookPath(d.opts.Binary)
	if err != nil {
		return "", binaryInfo{}, fmt.Errorf("%s not found: %w; hint: install QEMU (Debian/Ubuntu: apt install qemu-system-x86) or set the qemu binary path", d.opts.Binary, err)
	}
	d.binMu.Lock()
	info, ok := d.binCache[path]
	d.binMu.Unlock()
	if ok {
		return path, info, info.err
	}
	info, transient := inspectBinary(ctx, path)
	if !transient {
		d.binMu.Lock()
		d.binCache[path] = info
		d.binMu.Unlock()
	}
	return path, info, info.err
}

// inspectBinary runs `qemu -version` and `qemu -machine microvm,help`.
// transient is true when the failure came from ctx and may go away.
func inspectBinary(ctx context.Context, path string) (info binaryInfo, transient bool) {
	run := func(args ...string) (string, error) {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		cmd := exec.CommandContext(cctx, path, args...)
		cmd.WaitDelay = time.Second
		out, err := cmd.CombinedOutput()
		if err != nil {
			return string(out), fmt.Errorf("%s %s: %w: %s", path, strings.Join(args, " "), err, lastLine(string(out)))
		}
		return string(out), nil
	}
	out, err := run("-version")
	if err != nil {
		return binaryInfo{err: fmt.Errorf("cannot run qemu: %w", err)}, ctx.Err() != nil
	}
	info.version = strings.TrimSpace(strings.SplitN(out, "\n", 2)[0])
	out, err = run("-machine", "microvm,help")
	if err != nil {
		info.err = fmt.Errorf("qemu has no microvm machine type (need QEMU 6.0 or later built with microvm): %w", err)
		return info, ctx.Err() != nil
	}
	var missing []string
	for _, opt := range []string{"acpi=", "isa-serial=", "rtc=", "x-option-roms="} {
		if !strings.Contains(out, opt) {
			missing = append(missing, strings.TrimSuffix(opt, "="))
		}
	}
	if len(missing) > 0 {
		info.err = fmt.Errorf("%s: its microvm machine lacks %s; hint: install QEMU 7.2 or later", info.version, strings.Join(missing, ", "))
		return info, false
	}
	// "-sandbox help" fails either way; a QEMU without seccomp says so.
	out, _ = run("-sandbox", "help")
	if ctx.Err() != nil {
		return info, true
	}
	info.sandbox = !strings.Contains(out, "not enabled")
	return info, false
}

// Report is the driver's view of this host, in words, for `banger doctor`.
type Report struct {
	Binary  string // resolved path; empty when not found
	Version string // first line of `qemu -version`
	// Accel is "kvm" or "tcg"; empty while undecided (Accel auto, no probe yet).
	Accel         string
	AccelReason   string
	Channel       vmm.ChannelKind // how guests will be reached
	ChannelReason string
	// Err is what Preflight returns: nil when VMs can run.
	Err error
}

// Lines renders the report as short user-facing lines.
func (r Report) Lines() []string {
	var l []string
	if r.Binary != "" {
		l = append(l, fmt.Sprintf("qemu: %s (%s)", r.Binary, r.Version))
	}
	if r.Err != nil {
		l = append(l, "problem: "+r.Err.Error())
	}
	switch {
	case r.Accel != "":
		l = append(l, fmt.Sprintf("acceleration: %s: %s", r.Accel, r.AccelReason))
	case r.AccelReason != "":
		l = append(l, "acceleration: "+r.AccelReason)
	}
	if r.Channel != "" {
		l = append(l, fmt.Sprintf("guest channel: %s: %s", r.Channel, r.ChannelReason))
	}
	return l
}

// Describe checks the host like Preflight and says what was chosen and why. It
// may run the KVM probe (bounded by Options.ProbeTimeout) when Options.ProbeKernel
// is set.
func (d *Driver) Describe(ctx context.Context) Report {
	var r Report
	d.hostFacts()
	if d.vsockErr == nil {
		r.Channel, r.ChannelReason = vmm.ChannelVsock, d.vsockPath+" is usable"
	} else {
		r.Channel = vmm.ChannelSerial
		r.ChannelReason = deviceProblem(d.vsockPath, d.vsockErr, "kvm") + "; the agent is reached over a virtio-serial port instead (hint: modprobe vhost_vsock for vsock)"
	}
	bin, info, err := d.binary(ctx)
	r.Binary, r.Version = bin, info.version
	if err != nil {
		r.Err = err
		return r
	}
	c, err := d.chooseAccel(ctx, bin, "")
	switch {
	case err != nil:
		r.Err = err
	case c.Accel == "":
		r.AccelReason = "auto: KVM is probed at the first VM start"
	default:
		r.Accel, r.AccelReason = c.Accel, c.Reason
	}
	return r
}

// DescribeHost implements vmm.Describer.
func (d *Driver) DescribeHost(ctx context.Context) []string {
	return d.Describe(ctx).Lines()
}

var _ vmm.Describer = (*Driver)(nil)

// Preflight implements vmm.Driver.
func (d *Driver) Preflight(ctx context.Context) error {
	return d.Describe(ctx).Err
}

// Start implements vmm.Driver.
func (d *Driver) Start(ctx context.Context, cfg vmm.MachineConfig) (vmm.Instance, error) {
	inst, err := d.launch(ctx, cfg, launchOpts{})
	if err != nil {
		return nil, err
	}
	return inst, nil
}

// launchOpts is what differs between a boot and a restore.
type launchOpts struct {
	// Incoming: QEMU waits (paused, -incoming defer -S) for a migration
	// stream instead of booting the kernel.
	Incoming bool
	// SnapshotRAM, when set, is the snapshot's memory file, mapped privately
	// as the guest's memory. Otherwise launch puts the memory in a file of
	// its own in a memory directory when it can.
	SnapshotRAM *os.File
}

// launch starts QEMU for cfg. With o.Incoming, QEMU waits (paused, -incoming
// defer -S) for a migration stream instead of booting the kernel, and launch
// returns once the monitor answers.
func (d *Driver) launch(ctx context.Context, cfg vmm.MachineConfig, o launchOpts) (*instance, error) {
	incoming := o.Incoming
	if err := validateConfig(cfg); err != nil {
		return nil, fmt.Errorf("invalid machine config: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, d.opts.StartTimeout)
	defer cancel()
	for _, f := range []struct{ what, path string }{{"kernel", cfg.KernelPath}, {"initrd", cfg.InitrdPath}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return nil, fmt.Errorf("%s %s: %w", f.what, f.path, err)
		}
	}
	for _, dr := range cfg.Drives {
		if _, err := os.Stat(dr.Path); err != nil {
			return nil, fmt.Errorf("disk %s: %w", dr.ID, err)
		}
	}
	bin, info, err := d.binary(ctx)
	if err != nil {
		return nil, err
	}
	accel, err := d.chooseAccel(ctx, bin, cfg.KernelPath)
	if err != nil {
		return nil, err
	}
	d.hostFacts()

	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create VM directory: %w", err)
	}
	paths := newLayout(cfg.Dir)
	ch := vmm.GuestChannel{Kind: vmm.ChannelSerial, Path: paths.AgentSocket, Name: AgentPortName}
	if d.vsockErr == nil {
		ch = vmm.GuestChannel{Kind: vmm.ChannelVsock, CID: guestCID(cfg.VMID), Port: cfg.GuestPort}
	}
	sockets := []string{paths.QMPSocket, paths.ConsoleSocket}
	if ch.Kind == vmm.ChannelSerial {
		sockets = append(sockets, ch.Path)
	}
	for _, s := range sockets {
		if err := vmmproc.CheckSocketPath(s); err != nil {
			return nil, err
		}
		// A previous QEMU killed with SIGKILL leaves its sockets behind.
		if err := vmmproc.RemoveSocket(s); err != nil {
			return nil, err
		}
	}
	mem := guestMemory{Kind: memSnapshot, Path: "/dev/fd/" + strconv.Itoa(snapshotRAMFD), File: o.SnapshotRAM}
	if o.SnapshotRAM == nil {
		mem = d.sharedMemory(cfg.VMID, cfg.MemoryMiB)
	}
	memStarted := false
	if mem.Kind == memShared {
		defer func() {
			if !memStarted {
				removeMemFile(mem.Path)
			}
		}()
	}
	args, err := buildArgs(launchSpec{
		Config: cfg, Accel: accel.Accel, TSCKHz: d.tscKHz, Channel: ch, Paths: paths,
		Sandbox: info.sandbox && !d.opts.NoSandbox, Incoming: incoming, Memory: mem,
	})
	if err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(paths.VMMLog, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create VMM log: %w", err)
	}
	// Not exec.CommandContext: the VMM must outlive ctx (and bangerd). Every
	// failure path below kills it.
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Dir = cfg.Dir
	if mem.File != nil {
		cmd.ExtraFiles = []*os.File{mem.File} // fd 3 (snapshotRAMFD)
	}
	proc, err := system.StartDetached(cmd)
	logf.Close()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	if proc.StartTime == 0 {
		// Read again: without it the handles could never be adopted.
		proc.StartTime, _ = system.ProcessStartTime(proc.PID)
	}
	h := vmm.Handles{
		VMID:       cfg.VMID,
		Driver:     DriverName,
		PID:        proc.PID,
		StartTime:  proc.StartTime,
		APISocket:  paths.QMPSocket,
		Channel:    ch,
		ConsoleLog: paths.ConsoleLog,
		VMMLog:     paths.VMMLog,
	}
	if mem.Kind == memShared {
		h.MemFile = mem.Path
	}
	if cfg.Net != nil {
		h.Tap = cfg.Net.Tap
	}
	log := d.log.With("vm", cfg.VMID, "pid", proc.PID)
	log.DebugContext(ctx, "qemu launched", "accel", accel.Accel, "args", args)
	if mem.Kind == memAnon {
		log.InfoContext(ctx, "guest memory", "memory", mem.Kind, "why", mem.Why)
	} else {
		log.InfoContext(ctx, "guest memory", "memory", mem.Kind, "path", h.MemFile)
	}
	if cfg.Spawned != nil {
		cfg.Spawned(h)
	}
	// QEMU waits for this connection before it runs the guest (wait=on).
	conn, err := vmmproc.DialConsole(ctx, paths.ConsoleSocket, proc.Done())
	var console *vmmproc.Console
	if err == nil {
		console, err = vmmproc.StartConsole(conn, paths.ConsoleLog, d.opts.ConsoleMax, log)
	}
	if err != nil {
		kctx, kcancel := context.WithTimeout(context.WithoutCancel(ctx), defaultOpTimeout)
		defer kcancel()
		if kerr := proc.KillAndWait(kctx); kerr != nil {
			log.ErrorContext(ctx, "could not kill qemu after a failed start", "error", kerr)
		}
		_ = vmmproc.RemoveSocket(paths.QMPSocket)
		_ = vmmproc.RemoveSocket(paths.ConsoleSocket)
		// (the deferred removal takes the memory file: QEMU is gone)
		if tail := readTail(paths.VMMLog, 5); tail != "" {
			err = fmt.Errorf("%w; qemu log: %s", err, tail)
		}
		return nil, fmt.Errorf("qemu failed to start: %w", err)
	}
	inst := newInstance(h, proc, false, console, log)
	memStarted = true // from here the instance removes it when QEMU exits
	// A restore's load asks for "inmigrate" on the connection it goes on
	// with (one monitor connection fewer before the guest runs).
	if !incoming {
		if err := inst.waitStatus(ctx, "running"); err != nil {
			kctx, kcancel := context.WithTimeout(context.WithoutCancel(ctx), defaultOpTimeout)
			defer kcancel()
			if kerr := inst.Kill(kctx); kerr != nil {
				log.ErrorContext(ctx, "could not kill qemu after a failed start", "error", kerr.Error())
			}
			return nil, err
		}
	}
	log.InfoContext(ctx, "qemu started", "accel", accel.Accel, "channel", ch.Kind)
	return inst, nil
}

// Adopt implements vmm.Driver. The process must be the same one (PID and start
// time) and its command line must name the QMP socket of these handles (that
// path is unique to the VM's directory).
func (d *Driver) Adopt(ctx context.Context, h vmm.Handles) (vmm.Instance, error) {
	var vmID string
	match := adoptMatch(h)
	proc, err := vmmproc.AdoptProcess(h, DriverName, func(argv []string) (id string, err error) {
		vmID, err = match(argv)
		return vmID, err
	})
	if err != nil {
		return nil, err
	}
	log := d.log.With("vm", vmID, "pid", h.PID)
	// A short look at the monitor and the console: a QEMU that does not
	// answer is still ours to kill, so this must not hold up a restarting
	// bangerd. Console output written while no bangerd was connected is lost.
	sctx, cancel := context.WithTimeout(ctx, adoptCheckTimeout)
	defer cancel()
	var console *vmmproc.Console
	var conn net.Conn
	if _, err = os.Lstat(consoleSocket(h)); err == nil {
		// Absent for a QEMU started before consoles went through bangerd.
		conn, err = vmmproc.DialConsole(sctx, consoleSocket(h), proc.Done())
	}
	if err == nil {
		console, err = vmmproc.StartConsole(conn, h.ConsoleLog, d.opts.ConsoleMax, log)
	}
	if err != nil {
		log.WarnContext(ctx, "adopted qemu: its console is not captured", "error", err)
	}
	inst := newInstance(h, proc, true, console, log)
	st, err := inst.State(sctx)
	switch {
	case st == vmm.StateExited:
		return nil, fmt.Errorf("qemu pid %d: %w", h.PID, vmm.ErrGone)
	case err != nil:
		// Still ours: Kill works by PID. State reports the problem again.
		log.WarnContext(ctx, "adopted qemu does not answer on its monitor socket", "error", err.Error())
	default:
		log.InfoContext(ctx, "qemu adopted", "state", st)
	}
	return inst, nil
}

// End ends the QEMU h names if it is provably that VM's (the checks of
// Adopt, see vmmproc.End): SIGTERM, SIGKILL after grace. It is for a
// caller that holds no instance of it, such as a release retried from the
// VM's record; nil when no such process runs.
func (d *Driver) End(ctx context.Context, h vmm.Handles, grace time.Duration) error {
	if h.Driver != "" && h.Driver != DriverName {
		return fmt.Errorf("handles belong to the %q driver, not %q", h.Driver, DriverName)
	}
	return vmmproc.End(ctx, h, DriverName, adoptMatch(h), grace)
}

// adoptMatch is the command line check of Adopt and End.
func adoptMatch(h vmm.Handles) vmmproc.Match {
	return func(argv []string) (string, error) {
		id, ok := matchCmdline(argv, h.APISocket)
		if !ok {
			return "", fmt.Errorf("not this VM's qemu (its command line does not name %s)", h.APISocket)
		}
		return id, nil
	}
}

// matchCmdline reports whether argv is a banger QEMU whose QMP socket is
// qmpSocket, and returns the VM id from its -name.
func matchCmdline(argv []string, qmpSocket string) (vmID string, ok bool) {
	if qmpSocket == "" {
		return "", false
	}
	wantQMP := "socket,id=qmp,path=" + optValue(qmpSocket) + ","
	var named, qmp bool
	for i, a := range argv {
		if a == "-name" && i+1 < len(argv) && strings.HasPrefix(argv[i+1], namePrefix) {
			named = true
			vmID, _, _ = strings.Cut(strings.TrimPrefix(argv[i+1], namePrefix), ",")
		}
		if a == "-chardev" && i+1 < len(argv) && strings.HasPrefix(argv[i+1], wantQMP) {
			qmp = true
		}
	}
	return vmID, named && qmp
}
