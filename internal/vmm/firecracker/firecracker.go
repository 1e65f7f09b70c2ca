// Package firecracker is banger's Firecracker VMM driver (vmm.Driver).
//
// Start launches `firecracker --api-sock <dir>/fc.sock --id <vm id>` in its own
// session (so that bangerd can restart without killing it), with the guest's
// serial console (Firecracker's stdout) going into the FIFO <dir>/console.fifo,
// which bangerd reads into the size-capped, rotated <dir>/console.log
// (vmmproc.Console; while no bangerd reads it, console output is dropped),
// and Firecracker's stderr to <dir>/vmm.log. It then configures the machine over
// the API socket, in this order:
//
//	PUT /logger             <dir>/firecracker.log, level Info
//	PUT /metrics            <dir>/metrics.json
//	PUT /machine-config     vcpu_count, mem_size_mib, smt=false
//	PUT /boot-source        kernel, initrd, boot_args (+ console=ttyS0 reboot=k panic=-1 pci=off unless set)
//	PUT /drives/{id}        one per drive, in order, is_root_device=false (banger boots from its initrd)
//	PUT /network-interfaces/eth0   when a tap is given
//	PUT /vsock              guest_cid 3, uds_path <dir>/v.sock
//	PUT /actions            InstanceStart
//
// and checks that GET / reports the instance Running. The host reaches the
// guest agent through Firecracker's hybrid vsock: connect to <dir>/v.sock,
// write "CONNECT <port>\n", read "OK <n>\n".
//
// Any refusal surfaces Firecracker's fault_message ("firecracker refused
// boot-source: ...") and the process is killed: a failed Start leaves nothing
// running.
//
// Written against the pinned API in shared/firecracker-v1.16.1 and tested
// against a fake firecracker (package fakefc) that checks every request
// against firecracker.yaml.
package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// DriverName is the value of vmm.Handles.Driver for this driver.
const DriverName = "firecracker"

// GuestCID is the vsock context id every guest gets (each VM has its own
// hybrid-vsock socket, so the CID need not be unique).
const GuestCID = 3

// File names inside the VM directory (and, in jailer mode, inside the jail).
const (
	APISocketName  = "fc.sock"
	VsockName      = "v.sock"
	ConsoleLogName = "console.log"
	// ConsoleFIFOName is Firecracker's stdout (the serial console); bangerd
	// reads it into ConsoleLogName.
	ConsoleFIFOName = "console.fifo"
	VMMLogName      = "vmm.log"
	FCLogName       = "firecracker.log"
	MetricsName     = "metrics.json"
)

// JailerOptions turn on jailer mode.
//
// In jailer mode bangerd runs Firecracker's jailer instead of firecracker:
//
//	jailer --id <vm id> --exec-file <ExecFile> --uid <UID> --gid <GID>
//	       --chroot-base-dir <ChrootBaseDir> --cgroup-version <CgroupVersion>
//	       -- --api-sock /fc.sock
//
// The jailer (which must run as root) builds the jail
// <ChrootBaseDir>/<basename ExecFile>/<vm id>/root, copies the firecracker
// binary into it, creates /dev/kvm and /dev/net/tun there, pivots into it,
// drops to UID:GID and execs firecracker in the same process (no --daemonize,
// no --new-pid-ns, so the PID bangerd watches is firecracker's and the
// console still reaches console.log). Before launching, the driver hard-links
// the kernel, initrd, drives, log and metrics files into the jail (they must
// be on the same filesystem as ChrootBaseDir and accessible to UID:GID), and
// gives Firecracker jail-relative paths; the API and vsock sockets live in the
// jail and Handles name their host paths. When the VMM exits, the driver
// removes <ChrootBaseDir>/<basename ExecFile>/<vm id>. No cgroups are
// created (--cgroup-version 2 without --cgroup).
type JailerOptions struct {
	Binary        string // jailer binary; default "jailer" from PATH
	ExecFile      string // firecracker binary to jail; default Options.Binary looked up on PATH
	UID, GID      int    // identity firecracker runs as inside the jail
	ChrootBaseDir string // default /srv/jailer
	CgroupVersion int    // 1 or 2; default 2
}

// Options configure the driver.
type Options struct {
	Binary string         // firecracker binary; default "firecracker" from PATH
	Jailer *JailerOptions // nil: run firecracker directly
	Logger *slog.Logger   // default slog.Default()

	// SocketTimeout bounds the wait for the API socket after launch (default 10s).
	SocketTimeout time.Duration
	// KVMDevice is the device Preflight checks for read-write access
	// (default /dev/kvm).
	KVMDevice string
	// ConsoleMax caps each of the two console log files. Default
	// vmmproc.ConsoleFileMax.
	ConsoleMax int64
}

// Driver runs VMs under Firecracker. It is safe for concurrent use.
type Driver struct {
	opts Options
	log  *slog.Logger
}

var _ vmm.Driver = (*Driver)(nil)

// New returns a Firecracker driver.
func New(opts Options) *Driver {
	if opts.Binary == "" {
		opts.Binary = "firecracker"
	}
	if opts.SocketTimeout <= 0 {
		opts.SocketTimeout = 10 * time.Second
	}
	if j := opts.Jailer; j != nil {
		jj := *j
		if jj.Binary == "" {
			jj.Binary = "jailer"
		}
		if jj.ExecFile == "" {
			jj.ExecFile = opts.Binary
		}
		if jj.ChrootBaseDir == "" {
			jj.ChrootBaseDir = "/srv/jailer"
		}
		if jj.CgroupVersion == 0 {
			jj.CgroupVersion = 2
		}
		opts.Jailer = &jj
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	return &Driver{opts: opts, log: l.With("driver", DriverName)}
}

// Name implements vmm.Driver.
func (d *Driver) Name() string { return DriverName }

// Capabilities implements vmm.Driver.
func (d *Driver) Capabilities() vmm.Capabilities {
	return vmm.Capabilities{Vsock: true, GracefulStop: true, Initrd: true, Network: true}
}

// Preflight implements vmm.Driver: the binaries are found and runnable and
// /dev/kvm is usable.
func (d *Driver) Preflight(ctx context.Context) error {
	fcBin := d.opts.Binary
	if d.opts.Jailer != nil {
		fcBin = d.opts.Jailer.ExecFile
	}
	path, err := exec.LookPath(fcBin)
	if err != nil {
		return fmt.Errorf("firecracker binary %q not found: %w (hint: install Firecracker v1.16 — the static release binary — on PATH, or use the qemu driver)", fcBin, err)
	}
	vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(vctx, path, "--version").CombinedOutput()
	if err != nil {
		return fmt.Errorf("cannot run %s --version: %w: %s", path, err, firstLine(string(out)))
	}
	d.log.Debug("firecracker found", "path", path, "version", firstLine(string(out)))
	if j := d.opts.Jailer; j != nil {
		if _, err := exec.LookPath(j.Binary); err != nil {
			return fmt.Errorf("jailer binary %q not found: %w (hint: install the jailer from the same Firecracker release, or turn jailer mode off)", j.Binary, err)
		}
		if os.Geteuid() != 0 {
			return errors.New("jailer mode needs root: the jailer creates device nodes and a chroot (hint: run bangerd as root, or turn jailer mode off)")
		}
		if !filepath.IsAbs(j.ChrootBaseDir) {
			return fmt.Errorf("jailer chroot base dir %q must be an absolute path", j.ChrootBaseDir)
		}
	}
	dev := d.opts.KVMDevice
	if dev == "" {
		dev = "/dev/kvm"
	}
	return checkKVM(dev)
}

func checkKVM(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	switch {
	case err == nil:
		f.Close()
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s not found: KVM is not available on this host (hint: enable virtualization (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd, or use the qemu driver)", dev)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("no read-write access to %s: %w (hint: add your user to the kvm group with `sudo usermod -aG kvm $USER`, then log in again)", dev, err)
	default:
		return fmt.Errorf("cannot open %s: %w", dev, err)
	}
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

var (
	instanceIDRe = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)
	driveIDRe    = regexp.MustCompile(`^[a-z0-9_]{1,64}$`)
)

func validate(cfg vmm.MachineConfig) error {
	if !instanceIDRe.MatchString(cfg.VMID) {
		return fmt.Errorf("vm id %q cannot be a Firecracker instance id (letters, digits and '-', at most 64)", cfg.VMID)
	}
	if !filepath.IsAbs(cfg.Dir) {
		return fmt.Errorf("vm directory %q must be an absolute path", cfg.Dir)
	}
	if st, err := os.Stat(cfg.Dir); err != nil {
		return fmt.Errorf("vm directory: %w", err)
	} else if !st.IsDir() {
		return fmt.Errorf("vm directory %s is not a directory", cfg.Dir)
	}
	if cfg.VCPUs < 1 || cfg.VCPUs > 32 {
		return fmt.Errorf("firecracker supports 1 to 32 vCPUs, not %d", cfg.VCPUs)
	}
	if cfg.MemoryMiB < 1 {
		return fmt.Errorf("memory size %d MiB is not valid", cfg.MemoryMiB)
	}
	if cfg.KernelPath == "" {
		return errors.New("no kernel given")
	}
	if err := regularFile("kernel", cfg.KernelPath); err != nil {
		return err
	}
	if cfg.InitrdPath != "" {
		if err := regularFile("initrd", cfg.InitrdPath); err != nil {
			return err
		}
	}
	seen := map[string]bool{}
	for _, dr := range cfg.Drives {
		if !driveIDRe.MatchString(dr.ID) {
			return fmt.Errorf("drive id %q is not valid ([a-z0-9_], at most 64)", dr.ID)
		}
		if seen[dr.ID] {
			return fmt.Errorf("drive id %q is used twice", dr.ID)
		}
		seen[dr.ID] = true
		if err := regularFile("drive "+dr.ID, dr.Path); err != nil {
			return err
		}
	}
	if n := cfg.Net; n != nil {
		if n.Tap == "" || len(n.Tap) > 15 || strings.ContainsAny(n.Tap, "/ \t\n\x00") {
			return fmt.Errorf("tap device name %q is not valid", n.Tap)
		}
		if n.MAC != "" {
			hw, err := net.ParseMAC(n.MAC)
			if err != nil || len(hw) != 6 {
				return fmt.Errorf("guest MAC %q is not a valid Ethernet address", n.MAC)
			}
		}
	}
	if cfg.GuestPort == 0 {
		return errors.New("no vsock port given for the guest agent")
	}
	return nil
}

func regularFile(what, p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s %s is not a regular file", what, p)
	}
	return nil
}

// BootArgs returns cmdline with what banger's Firecracker guests need appended
// when the command line does not already set it: the serial console, power-off
// on reboot (Firecracker exits), no reboot on panic, no PCI probing (virtio
// devices are on MMIO).
func BootArgs(cmdline string) string {
	return vmmproc.AppendKernelArgs(cmdline, "console=ttyS0", "reboot=k", "panic=-1", "pci=off")
}

// layout is where everything goes, as the host and as Firecracker see it.
type layout struct {
	dir      string
	jailDir  string // <base>/<exec name>/<id>; "" when not jailed
	jailRoot string // jailDir/root

	apiSock, vsock, console, vmmLog, fcLog, metrics string // host paths

	// Paths given to Firecracker.
	fcAPISock, fcVsock, fcLog2, fcMetrics, fcKernel, fcInitrd string
	fcDrives                                                  []string

	// A restore: the saved state (host paths) and as Firecracker sees them.
	stateFile, memFile, fcStateFile, fcMemFile string
}

func (d *Driver) jailDir(vmID string) string {
	j := d.opts.Jailer
	return filepath.Join(j.ChrootBaseDir, filepath.Base(j.ExecFile), vmID)
}

// driveLink is the name under which Firecracker opens a drive, relative to
// its working directory (the VM directory, or the jail's root). A snapshot
// records these names, so a VM restored in another directory opens its own
// disks, not the source's.
func driveLink(id string) string { return "drive-" + id }

func (d *Driver) layout(cfg vmm.MachineConfig, stateDir string) layout {
	l := d.layout1(cfg)
	if stateDir != "" {
		l.stateFile, l.memFile = filepath.Join(stateDir, StateFileName), filepath.Join(stateDir, MemFileName)
		l.fcStateFile, l.fcMemFile = l.stateFile, l.memFile
		if l.jailDir != "" {
			l.fcStateFile, l.fcMemFile = "/"+StateFileName, "/"+MemFileName
		}
	}
	return l
}

func (d *Driver) layout1(cfg vmm.MachineConfig) layout {
	l := layout{
		dir:     cfg.Dir,
		console: filepath.Join(cfg.Dir, ConsoleLogName),
		vmmLog:  filepath.Join(cfg.Dir, VMMLogName),
		fcLog:   filepath.Join(cfg.Dir, FCLogName),
		metrics: filepath.Join(cfg.Dir, MetricsName),
	}
	if d.opts.Jailer == nil {
		l.apiSock = filepath.Join(cfg.Dir, APISocketName)
		l.vsock = filepath.Join(cfg.Dir, VsockName)
		l.fcAPISock, l.fcVsock, l.fcLog2, l.fcMetrics = l.apiSock, l.vsock, l.fcLog, l.metrics
		l.fcKernel, l.fcInitrd = cfg.KernelPath, cfg.InitrdPath
		for _, dr := range cfg.Drives {
			l.fcDrives = append(l.fcDrives, driveLink(dr.ID))
		}
		return l
	}
	l.jailDir = d.jailDir(cfg.VMID)
	l.jailRoot = filepath.Join(l.jailDir, "root")
	l.apiSock = filepath.Join(l.jailRoot, APISocketName)
	l.vsock = filepath.Join(l.jailRoot, VsockName)
	l.fcAPISock, l.fcVsock = "/"+APISocketName, "/"+VsockName
	l.fcLog2, l.fcMetrics = "/"+FCLogName, "/"+MetricsName
	l.fcKernel = "/vmlinux"
	if cfg.InitrdPath != "" {
		l.fcInitrd = "/initrd"
	}
	for _, dr := range cfg.Drives {
		l.fcDrives = append(l.fcDrives, "/"+driveLink(dr.ID))
	}
	return l
}

// prepare removes stale sockets, creates the files Firecracker expects to
// exist (it opens log and metrics files without creating them) and, in jailer
// mode, populates the jail.
func (d *Driver) prepare(cfg vmm.MachineConfig, l layout) error {
	for _, p := range []string{l.apiSock, l.vsock} {
		if err := vmmproc.CheckSocketPath(p); err != nil {
			return err
		}
	}
	if l.jailDir != "" {
		// A jail left by an earlier run of this VM: start from scratch.
		if err := os.RemoveAll(l.jailDir); err != nil {
			return fmt.Errorf("remove stale jail: %w", err)
		}
		if err := os.MkdirAll(l.jailRoot, 0o755); err != nil {
			return fmt.Errorf("create jail: %w", err)
		}
	}
	for _, p := range []string{l.apiSock, l.vsock} {
		if err := vmmproc.RemoveSocket(p); err != nil {
			return err
		}
	}
	for _, p := range []string{l.fcLog, l.metrics} {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return fmt.Errorf("create %s: %w", filepath.Base(p), err)
		}
		f.Close()
	}
	if l.jailDir == "" {
		// The drives under fixed names in the VM directory (see driveLink).
		for _, dr := range cfg.Drives {
			if err := relink(dr.Path, filepath.Join(cfg.Dir, driveLink(dr.ID))); err != nil {
				return err
			}
		}
		return nil
	}
	j := d.opts.Jailer
	links := [][2]string{{l.fcLog, l.fcLog2}, {l.metrics, l.fcMetrics}, {cfg.KernelPath, l.fcKernel}}
	if cfg.InitrdPath != "" {
		links = append(links, [2]string{cfg.InitrdPath, l.fcInitrd})
	}
	for i, dr := range cfg.Drives {
		links = append(links, [2]string{dr.Path, l.fcDrives[i]})
	}
	if l.stateFile != "" {
		links = append(links, [2]string{l.stateFile, l.fcStateFile}, [2]string{l.memFile, l.fcMemFile})
	}
	for _, ln := range links {
		dst := filepath.Join(l.jailRoot, ln[1])
		if err := os.Link(ln[0], dst); err != nil {
			hint := ""
			if errors.Is(err, syscall.EXDEV) {
				hint = fmt.Sprintf(" (hint: the jailer's chroot base dir %s must be on the same filesystem as banger's data)", j.ChrootBaseDir)
			}
			return fmt.Errorf("link %s into the jail: %w%s", ln[0], err, hint)
		}
	}
	if os.Geteuid() == 0 {
		for _, p := range []string{l.fcLog, l.metrics} {
			if err := os.Chown(p, j.UID, j.GID); err != nil {
				return fmt.Errorf("give %s to the jailed uid: %w", filepath.Base(p), err)
			}
		}
	}
	return nil
}

// relink points the symlink link at target, replacing an earlier symlink
// there; anything else at link is an error.
func relink(target, link string) error {
	abs, err := filepath.Abs(target)
	if err != nil {
		return err
	}
	if fi, err := os.Lstat(link); err == nil {
		if fi.Mode().Type() != fs.ModeSymlink {
			return fmt.Errorf("%s exists and is not a symlink; remove it or pick another VM directory", link)
		}
		if err := os.Remove(link); err != nil {
			return err
		}
	}
	if err := os.Symlink(abs, link); err != nil {
		return fmt.Errorf("link drive into the VM directory: %w", err)
	}
	return nil
}

func (d *Driver) command(cfg vmm.MachineConfig, l layout) *exec.Cmd {
	var args []string
	var bin string
	if j := d.opts.Jailer; j != nil {
		bin = j.Binary
		args = []string{
			"--id", cfg.VMID,
			"--exec-file", j.ExecFile,
			"--uid", strconv.Itoa(j.UID),
			"--gid", strconv.Itoa(j.GID),
			"--chroot-base-dir", j.ChrootBaseDir,
			"--cgroup-version", strconv.Itoa(j.CgroupVersion),
			"--",
			"--api-sock", l.fcAPISock,
		}
	} else {
		bin = d.opts.Binary
		args = []string{"--api-sock", l.fcAPISock, "--id", cfg.VMID}
	}
	// Not CommandContext: the VMM must outlive the request that started it.
	// Start bounds every wait itself and kills the process on failure.
	cmd := exec.Command(bin, args...)
	cmd.Dir = cfg.Dir
	return cmd
}

// Start implements vmm.Driver.
func (d *Driver) Start(ctx context.Context, cfg vmm.MachineConfig) (vmm.Instance, error) {
	inst, err := d.launch(ctx, cfg, "")
	if err != nil {
		return nil, err
	}
	return inst, nil
}

// launch starts Firecracker for cfg and boots the machine, or, with a
// stateDir, loads the state saved there and resumes it.
func (d *Driver) launch(ctx context.Context, cfg vmm.MachineConfig, stateDir string) (*instance, error) {
	if err := validate(cfg); err != nil {
		return nil, err
	}
	if j := d.opts.Jailer; j != nil {
		p, err := exec.LookPath(j.ExecFile)
		if err != nil {
			return nil, fmt.Errorf("firecracker binary %q not found: %w", j.ExecFile, err)
		}
		jj := *j
		jj.ExecFile, _ = filepath.Abs(p)
		dd := *d
		dd.opts.Jailer = &jj
		d = &dd
	}
	l := d.layout(cfg, stateDir)
	if err := d.prepare(cfg, l); err != nil {
		d.removeJail(l.jailDir)
		return nil, err
	}
	fifo := filepath.Join(cfg.Dir, ConsoleFIFOName)
	consoleR, err := vmmproc.OpenConsoleFIFO(fifo, true)
	if err != nil {
		d.removeJail(l.jailDir)
		return nil, err
	}
	// Cannot block: bangerd's read end is open.
	console, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		consoleR.Close()
		d.removeJail(l.jailDir)
		return nil, fmt.Errorf("open console FIFO: %w", err)
	}
	defer console.Close()
	log := d.log.With("vm", cfg.VMID)
	con, err := vmmproc.StartConsole(consoleR, l.console, d.opts.ConsoleMax, log)
	if err != nil {
		d.removeJail(l.jailDir)
		return nil, err
	}
	vmmLog, err := os.OpenFile(l.vmmLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		con.Stop()
		d.removeJail(l.jailDir)
		return nil, fmt.Errorf("open vmm log: %w", err)
	}
	defer vmmLog.Close()

	cmd := d.command(cfg, l)
	cmd.Stdout, cmd.Stderr = console, vmmLog
	began := time.Now()
	proc, err := system.StartDetached(cmd)
	if err != nil {
		con.Stop()
		d.removeJail(l.jailDir)
		return nil, fmt.Errorf("launch %s: %w", cmd.Path, err)
	}
	h := vmm.Handles{
		VMID:       cfg.VMID,
		Driver:     DriverName,
		PID:        proc.PID,
		StartTime:  proc.StartTime,
		APISocket:  l.apiSock,
		Channel:    vmm.GuestChannel{Kind: vmm.ChannelVsockUDS, Path: l.vsock, CID: GuestCID, Port: cfg.GuestPort},
		ConsoleLog: l.console,
		VMMLog:     l.vmmLog,
	}
	if cfg.Net != nil {
		h.Tap = cfg.Net.Tap
	}
	inst := d.newInstance(h, proc, false, l.jailDir, l.fcLog, con)
	log.DebugContext(ctx, "firecracker launched", "pid", proc.PID, "api_socket", l.apiSock)
	if cfg.Spawned != nil {
		cfg.Spawned(h)
	}

	boot := d.boot
	if stateDir != "" {
		boot = d.restore
	}
	if err := boot(ctx, inst, cfg, l); err != nil {
		log.WarnContext(ctx, "firecracker start failed; killing it", "pid", proc.PID, "error", err.Error())
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if kerr := inst.Kill(kctx); kerr != nil {
			log.ErrorContext(ctx, "could not kill firecracker after a failed start", "pid", proc.PID, "error", kerr.Error())
		}
		return nil, err
	}
	log.InfoContext(ctx, "firecracker started", "pid", proc.PID, "took", time.Since(began).Round(time.Millisecond))
	return inst, nil
}

// boot waits for the API and configures and starts the machine.
func (d *Driver) boot(ctx context.Context, inst *instance, cfg vmm.MachineConfig, l layout) error {
	if err := d.waitAPI(ctx, inst); err != nil {
		return err
	}
	c := inst.api
	type step struct {
		path, what string
		body       any
	}
	steps := []step{
		{"/logger", "logger", apiLogger{LogPath: l.fcLog2, Level: "Info", ShowLevel: true}},
		{"/metrics", "metrics", apiMetrics{MetricsPath: l.fcMetrics}},
		{"/machine-config", "machine-config", apiMachineConfig{VCPUCount: cfg.VCPUs, MemSizeMiB: cfg.MemoryMiB}},
		{"/boot-source", "boot-source", apiBootSource{KernelImagePath: l.fcKernel, InitrdPath: l.fcInitrd, BootArgs: BootArgs(cfg.Cmdline)}},
	}
	for i, dr := range cfg.Drives {
		steps = append(steps, step{"/drives/" + dr.ID, "drive " + dr.ID, apiDrive{DriveID: dr.ID, PathOnHost: l.fcDrives[i], IsReadOnly: dr.ReadOnly}})
	}
	if n := cfg.Net; n != nil {
		steps = append(steps, step{"/network-interfaces/eth0", "network interface", apiNetworkInterface{IfaceID: "eth0", HostDevName: n.Tap, GuestMAC: n.MAC}})
	}
	steps = append(steps,
		step{"/vsock", "vsock", apiVsock{GuestCID: GuestCID, UDSPath: l.fcVsock}},
		step{"/actions", "InstanceStart", apiAction{ActionType: "InstanceStart"}},
	)
	for _, s := range steps {
		if err := c.put(ctx, s.path, s.what, s.body); err != nil {
			return inst.explain(err)
		}
	}
	var info apiInstanceInfo
	if err := c.do(ctx, "GET", "/", "instance info", nil, &info); err != nil {
		return inst.explain(err)
	}
	if info.State != "Running" {
		return fmt.Errorf("firecracker reports the instance %q after InstanceStart, not Running", info.State)
	}
	return nil
}

// waitAPI polls until the API socket accepts connections, the process exits,
// or the deadline passes.
func (d *Driver) waitAPI(ctx context.Context, inst *instance) error {
	ctx, cancel := context.WithTimeout(ctx, d.opts.SocketTimeout)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		var dl net.Dialer
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		conn, err := dl.DialContext(dctx, "unix", inst.h.APISocket)
		dcancel()
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-inst.Exited():
			return inst.exitError("before its API socket came up")
		case <-ctx.Done():
			select {
			case <-inst.Exited():
				return inst.exitError("before its API socket came up")
			default:
			}
			return fmt.Errorf("firecracker's API socket %s did not come up within %v: %w (see %s)", inst.h.APISocket, d.opts.SocketTimeout, ctx.Err(), inst.h.VMMLog)
		case <-tick.C:
		}
	}
}

func (d *Driver) removeJail(dir string) {
	if dir == "" {
		return
	}
	if err := os.RemoveAll(dir); err != nil {
		d.log.Warn("could not remove firecracker jail", "dir", dir, "error", err)
	}
}
