package firecracker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc/fakefctest"
)

func TestMain(m *testing.M) { os.Exit(fakefctest.RunTests(m)) }

const testPort = 1024

// machine makes a VM directory with a kernel, an initrd and three drives
// (image rootfs read-only, writable disk, boot config), like bangerd does.
func machine(t *testing.T) vmm.MachineConfig {
	t.Helper()
	dir := t.TempDir()
	files := t.TempDir()
	write := func(name string) string {
		p := filepath.Join(files, name)
		if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return vmm.MachineConfig{
		VMID:       "0123456789abcdef",
		Dir:        dir,
		VCPUs:      2,
		MemoryMiB:  512,
		KernelPath: write("vmlinux"),
		InitrdPath: write("initrd.cpio.gz"),
		Cmdline:    "quiet banger.debug=1",
		Drives: []vmm.Drive{
			{ID: "image", Path: write("rootfs.ext4"), ReadOnly: true},
			{ID: "rw", Path: write("rw.ext4")},
			{ID: "bootcfg", Path: write("bootcfg.img"), ReadOnly: true},
		},
		GuestPort: testPort,
	}
}

func start(t *testing.T, d *Driver, cfg vmm.MachineConfig) vmm.Instance {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	inst, err := d.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { killForCleanup(t, inst) })
	return inst
}

func killForCleanup(t *testing.T, inst vmm.Instance) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := inst.Kill(ctx); err != nil {
		t.Errorf("cleanup kill: %v", err)
	}
}

func wait(t *testing.T, inst vmm.Instance) vmm.ExitStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := inst.Wait(ctx)
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	return st
}

func body(t *testing.T, r fakefc.Record) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.Body, &m); err != nil {
		t.Fatalf("%s %s: body %q: %v", r.Method, r.Path, r.Body, err)
	}
	return m
}

// findProcesses lists live processes whose command line mentions s.
func findProcesses(s string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		args, err := system.ProcessCmdline(pid)
		if err != nil || !strings.Contains(strings.Join(args, " "), s) {
			continue
		}
		if st, err := system.ProcessStartTime(pid); err == nil && system.SameProcess(pid, st) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestStartConfiguresMachineAsSpecified(t *testing.T) {
	fc := fakefctest.Setup(t)
	d := New(Options{Binary: fc.Binary})
	cfg := machine(t)
	inst := start(t, d, cfg)

	want := []string{
		"PUT /logger",
		"PUT /metrics",
		"PUT /machine-config",
		"PUT /boot-source",
		"PUT /drives/image",
		"PUT /drives/rw",
		"PUT /drives/bootcfg",
		"PUT /vsock",
		"PUT /actions InstanceStart",
		"GET /",
	}
	reqs := fc.APIRequests(t)
	if got := fakefctest.Sequence(reqs); !reflect.DeepEqual(got, want) {
		t.Fatalf("request sequence:\n got %q\nwant %q", got, want)
	}
	for _, r := range reqs {
		if r.Verdict != fakefc.VerdictOK {
			t.Errorf("%s %s: verdict %s: %s", r.Method, r.Path, r.Verdict, r.Fault)
		}
	}
	wantBodies := map[string]map[string]any{
		"/logger":         {"log_path": filepath.Join(cfg.Dir, FCLogName), "level": "Info", "show_level": true, "show_log_origin": false},
		"/metrics":        {"metrics_path": filepath.Join(cfg.Dir, MetricsName)},
		"/machine-config": {"vcpu_count": 2.0, "mem_size_mib": 512.0, "smt": false},
		"/boot-source": {
			"kernel_image_path": cfg.KernelPath,
			"initrd_path":       cfg.InitrdPath,
			"boot_args":         "quiet banger.debug=1 console=ttyS0 reboot=k panic=-1 pci=off",
		},
		// Relative to the VM directory, where each is a link to the drive.
		"/drives/image":   {"drive_id": "image", "path_on_host": "drive-image", "is_root_device": false, "is_read_only": true},
		"/drives/rw":      {"drive_id": "rw", "path_on_host": "drive-rw", "is_root_device": false, "is_read_only": false},
		"/drives/bootcfg": {"drive_id": "bootcfg", "path_on_host": "drive-bootcfg", "is_root_device": false, "is_read_only": true},
		"/vsock":          {"guest_cid": 3.0, "uds_path": filepath.Join(cfg.Dir, VsockName)},
		"/actions":        {"action_type": "InstanceStart"},
	}
	for _, r := range reqs {
		if r.Method != "PUT" {
			continue
		}
		if got := body(t, r); !reflect.DeepEqual(got, wantBodies[r.Path]) {
			t.Errorf("PUT %s body:\n got %v\nwant %v", r.Path, got, wantBodies[r.Path])
		}
	}
	for _, dr := range cfg.Drives {
		if target, err := os.Readlink(filepath.Join(cfg.Dir, "drive-"+dr.ID)); err != nil || target != dr.Path {
			t.Errorf("drive link %s -> %q (%v), want %s", dr.ID, target, err, dr.Path)
		}
	}

	h := inst.Handles()
	wantH := vmm.Handles{
		Driver:     DriverName,
		VMID:       cfg.VMID,
		PID:        h.PID,
		StartTime:  h.StartTime,
		APISocket:  filepath.Join(cfg.Dir, APISocketName),
		Channel:    vmm.GuestChannel{Kind: vmm.ChannelVsockUDS, Path: filepath.Join(cfg.Dir, VsockName), CID: 3, Port: testPort},
		ConsoleLog: filepath.Join(cfg.Dir, ConsoleLogName),
		VMMLog:     filepath.Join(cfg.Dir, VMMLogName),
	}
	if !reflect.DeepEqual(h, wantH) {
		t.Errorf("handles:\n got %+v\nwant %+v", h, wantH)
	}
	if !system.SameProcess(h.PID, h.StartTime) {
		t.Errorf("pid %d with start time %d is not running", h.PID, h.StartTime)
	}
	// Detached: its own session.
	if sid, err := sessionID(h.PID); err != nil || sid != h.PID {
		t.Errorf("firecracker session id = %d (%v), want its own pid %d", sid, err, h.PID)
	}
	st, err := inst.State(context.Background())
	if err != nil || st != vmm.StateRunning {
		t.Errorf("State = %q, %v; want running", st, err)
	}
	if !fakefctest.Contains(h.ConsoleLog, "running, 2 vCPUs, 512 MiB") {
		t.Errorf("console log lacks the guest's boot line")
	}
	if !fakefctest.Contains(filepath.Join(cfg.Dir, FCLogName), "Successfully started microvm") {
		t.Errorf("firecracker log file was not written through the configured logger")
	}
}

func sessionID(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return strconv.Atoi(f[3]) // field 6
}

func TestStartWithNetworkAndVsock(t *testing.T) {
	fc := fakefctest.Setup(t)
	d := New(Options{Binary: fc.Binary})
	cfg := machine(t)
	cfg.Net = &vmm.NetInterface{Tap: "bgtap0a1b2c", MAC: "06:00:ac:1e:00:05"}
	cfg.InitrdPath = ""
	cfg.Cmdline = "console=hvc0 panic=5"
	inst := start(t, d, cfg)

	var netReq, boot *fakefc.Record
	reqs := fc.APIRequests(t)
	for i := range reqs {
		switch reqs[i].Path {
		case "/network-interfaces/eth0":
			netReq = &reqs[i]
		case "/boot-source":
			boot = &reqs[i]
		}
	}
	if netReq == nil {
		t.Fatalf("no PUT /network-interfaces/eth0 in %q", fakefctest.Sequence(reqs))
	}
	if got, want := body(t, *netReq), map[string]any{"iface_id": "eth0", "host_dev_name": "bgtap0a1b2c", "guest_mac": "06:00:ac:1e:00:05"}; !reflect.DeepEqual(got, want) {
		t.Errorf("network body %v, want %v", got, want)
	}
	if got, want := body(t, *boot), map[string]any{"kernel_image_path": cfg.KernelPath, "boot_args": "console=hvc0 panic=5 reboot=k pci=off"}; !reflect.DeepEqual(got, want) {
		t.Errorf("boot-source body %v, want %v", got, want)
	}
	if got := inst.Handles().Tap; got != "bgtap0a1b2c" {
		t.Errorf("Handles.Tap = %q", got)
	}

	// The host side of the hybrid vsock: CONNECT, OK, then a stream.
	ch := inst.Handles().Channel
	conn, err := net2Dial(ch.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "CONNECT %d\nhello guest\n", ch.Port)
	br := bufio.NewReader(conn)
	ok, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("vsock answer %q, %v; want OK <port>", ok, err)
	}
	echo, err := br.ReadString('\n')
	if err != nil || echo != "hello guest\n" {
		t.Fatalf("vsock stream echoed %q, %v", echo, err)
	}
}

func net2Dial(p string) (net.Conn, error) { return net.DialTimeout("unix", p, 5*time.Second) }

func TestShutdownPowersOffAndRestartReusesDir(t *testing.T) {
	fc := fakefctest.Setup(t)
	d := New(Options{Binary: fc.Binary})
	cfg := machine(t)
	inst := start(t, d, cfg)
	if err := inst.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	st := wait(t, inst)
	if st.Code != 0 || st.Signal != "" || st.Reason != "the guest powered off" || st.At.IsZero() {
		t.Errorf("exit status %+v, want code 0, guest powered off", st)
	}
	select {
	case <-inst.Exited():
	default:
		t.Error("Exited not closed after Wait returned")
	}
	if s, err := inst.State(context.Background()); s != vmm.StateExited || err != nil {
		t.Errorf("State after exit = %q, %v", s, err)
	}
	if err := inst.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown of an exited VM: %v", err)
	}
	for _, p := range []string{inst.Handles().APISocket, inst.Handles().Channel.Path} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind after exit (%v)", p, err)
		}
	}
	seq := fakefctest.Sequence(fc.APIRequests(t))
	if last := seq[len(seq)-1]; last != "PUT /actions SendCtrlAltDel" {
		t.Errorf("last request %q, want SendCtrlAltDel", last)
	}
	// A second boot in the same directory.
	inst2 := start(t, d, cfg)
	if s, err := inst2.State(context.Background()); s != vmm.StateRunning || err != nil {
		t.Fatalf("restarted State = %q, %v", s, err)
	}
	if !fakefctest.Contains(inst2.Handles().ConsoleLog, "Power down") {
		t.Error("console log of the first boot was not kept")
	}
}

func TestKill(t *testing.T) {
	fc := fakefctest.Setup(t)
	d := New(Options{Binary: fc.Binary})
	cfg := machine(t)
	inst := start(t, d, cfg)
	h := inst.Handles()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := inst.Kill(ctx); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	st := wait(t, inst)
	if st.Signal != "killed" || st.Code != -1 || st.Reason != "firecracker was killed by banger" {
		t.Errorf("exit status %+v", st)
	}
	if system.SameProcess(h.PID, h.StartTime) {
		t.Errorf("pid %d still running after Kill", h.PID)
	}
	if err := inst.Kill(ctx); err != nil {
		t.Errorf("second Kill: %v", err)
	}
}

func TestStartFailuresSurfaceAndLeaveNothingRunning(t *testing.T) {
	for _, tc := range []struct {
		name, fail string
		want       string
	}{
		{"boot-source refused", "boot-source:Invalid kernel image: bad ELF magic", "firecracker refused boot-source: Invalid kernel image: bad ELF magic"},
		{"drive refused", "drives/rw:Unable to open the block device: Permission denied", "firecracker refused drive rw: Unable to open the block device: Permission denied"},
		{"vsock refused", "vsock:Cannot create backend for vsock device", "firecracker refused vsock: Cannot create backend for vsock device"},
		{"start refused", "InstanceStart:Failed to start microVM: KVM_CREATE_VM failed", "firecracker refused InstanceStart: Failed to start microVM: KVM_CREATE_VM failed"},
		{"exit at launch", "exit-at-launch:Error creating the Vmm: /dev/kvm: Permission denied", "firecracker exited before its API socket came up (status 1): Error creating the Vmm: /dev/kvm: Permission denied"},
		{"no api socket", "no-api-socket", "did not come up within"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fc := fakefctest.Setup(t)
			fc.Fail(t, tc.fail)
			d := New(Options{Binary: fc.Binary, SocketTimeout: 500 * time.Millisecond})
			cfg := machine(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			inst, err := d.Start(ctx, cfg)
			if err == nil {
				killForCleanup(t, inst)
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\nwant it to contain %q", err, tc.want)
			}
			sock := filepath.Join(cfg.Dir, APISocketName)
			if pids := findProcesses(sock); len(pids) > 0 {
				t.Errorf("processes left running after a failed start: %v", pids)
			}
			if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("API socket left behind (%v)", err)
			}
		})
	}
}

func TestCrashAfterStart(t *testing.T) {
	fc := fakefctest.Setup(t)
	fc.Fail(t, "crash-after-start:Vmm error: vCPU 0 exited with an unexpected error")
	d := New(Options{Binary: fc.Binary})
	inst := start(t, d, machine(t))
	st := wait(t, inst)
	if st.Code != 1 || !strings.Contains(st.Reason, "firecracker exited with status 1: fakefc: Vmm error: vCPU 0 exited with an unexpected error") {
		t.Errorf("exit status %+v", st)
	}
}

func TestAdopt(t *testing.T) {
	fc := fakefctest.Setup(t)
	opts := Options{Binary: fc.Binary}
	cfg := machine(t)
	first := start(t, New(opts), cfg)
	h := first.Handles()

	// A restarted bangerd: a new driver adopts the VMM from its handles.
	d := New(opts)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	inst, err := d.Adopt(ctx, h)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if got := inst.Handles(); !reflect.DeepEqual(got, h) {
		t.Errorf("adopted handles %+v, want %+v", got, h)
	}
	if s, err := inst.State(ctx); s != vmm.StateRunning || err != nil {
		t.Fatalf("adopted State = %q, %v", s, err)
	}

	for _, tc := range []struct {
		name string
		mod  func(*vmm.Handles)
	}{
		{"start time differs", func(h *vmm.Handles) { h.StartTime++ }},
		{"another VM's id", func(h *vmm.Handles) { h.VMID = "fedcba9876543210" }},
		{"another VM's socket", func(h *vmm.Handles) { h.APISocket = filepath.Join(t.TempDir(), APISocketName) }},
		{"not a firecracker", func(h *vmm.Handles) {
			h.PID = os.Getpid()
			h.StartTime, _ = system.ProcessStartTime(h.PID)
		}},
		{"no such pid", func(h *vmm.Handles) { h.PID = 1 << 22 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hh := h
			tc.mod(&hh)
			if _, err := d.Adopt(ctx, hh); !errors.Is(err, vmm.ErrGone) {
				t.Errorf("Adopt = %v, want ErrGone", err)
			}
		})
	}
	if _, err := d.Adopt(ctx, vmm.Handles{Driver: "qemu", PID: h.PID}); err == nil || errors.Is(err, vmm.ErrGone) {
		t.Errorf("Adopt of another driver's handles = %v, want a plain error", err)
	}

	if err := inst.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown through the adopted instance: %v", err)
	}
	select {
	case <-inst.Exited():
	case <-ctx.Done():
		t.Fatal("adopted instance did not see the exit")
	}
	st := wait(t, inst)
	if st.Code != -1 || !strings.Contains(st.Reason, "adopted") {
		t.Errorf("adopted exit status %+v", st)
	}
	if _, err := d.Adopt(ctx, h); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("Adopt after exit = %v, want ErrGone", err)
	}
}

func TestJailerMode(t *testing.T) {
	fc := fakefctest.Setup(t)
	base := t.TempDir()
	d := New(Options{Binary: fc.Binary, Jailer: &JailerOptions{
		Binary:        fc.Jailer,
		UID:           os.Getuid(),
		GID:           os.Getgid(),
		ChrootBaseDir: base,
	}})
	cfg := machine(t)
	cfg.VMID = "jailed-vm-1"
	// The jail must be on the same filesystem as the VM's files (hard links).
	inst := start(t, d, cfg)
	jail := filepath.Join(base, "firecracker", cfg.VMID)
	root := filepath.Join(jail, "root")
	h := inst.Handles()
	if h.APISocket != filepath.Join(root, APISocketName) || h.Channel.Path != filepath.Join(root, VsockName) {
		t.Errorf("handles %+v do not point into the jail %s", h, root)
	}
	args, _ := system.ProcessCmdline(h.PID)
	if flagValue(args, "--id") != cfg.VMID || flagValue(args, "--api-sock") != "/"+APISocketName {
		t.Errorf("jailed firecracker command line %q", args)
	}
	for _, r := range fc.APIRequests(t) {
		switch r.Path {
		case "/boot-source":
			if got := body(t, r); got["kernel_image_path"] != "/vmlinux" || got["initrd_path"] != "/initrd" {
				t.Errorf("boot-source inside the jail: %v", got)
			}
		case "/drives/rw":
			if got := body(t, r); got["path_on_host"] != "/drive-rw" {
				t.Errorf("drive inside the jail: %v", got)
			}
		case "/vsock":
			if got := body(t, r); got["uds_path"] != "/"+VsockName {
				t.Errorf("vsock inside the jail: %v", got)
			}
		}
	}
	// Adopt resolves the jailed socket path.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	adopted, err := d.Adopt(ctx, h)
	if err != nil {
		t.Fatalf("Adopt jailed: %v", err)
	}
	if err := adopted.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	wait(t, inst)
	<-adopted.Exited()
	if _, err := os.Stat(jail); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("jail %s left behind after exit (%v)", jail, err)
	}
	if !fakefctest.Contains(filepath.Join(cfg.Dir, FCLogName), "Successfully started") {
		t.Error("firecracker log in the VM directory was not written through the jail link")
	}
}

func TestInvalidConfigsLaunchNothing(t *testing.T) {
	fc := fakefctest.Setup(t)
	d := New(Options{Binary: fc.Binary})
	for _, tc := range []struct {
		name string
		mod  func(*vmm.MachineConfig)
		want string
	}{
		{"bad vm id", func(c *vmm.MachineConfig) { c.VMID = "../x" }, "Firecracker instance id"},
		{"relative dir", func(c *vmm.MachineConfig) { c.Dir = "vms/x" }, "absolute"},
		{"no vcpus", func(c *vmm.MachineConfig) { c.VCPUs = 0 }, "1 to 32 vCPUs"},
		{"too many vcpus", func(c *vmm.MachineConfig) { c.VCPUs = 33 }, "1 to 32 vCPUs"},
		{"no memory", func(c *vmm.MachineConfig) { c.MemoryMiB = 0 }, "memory"},
		{"missing kernel", func(c *vmm.MachineConfig) { c.KernelPath = "/nonexistent/vmlinux" }, "kernel"},
		{"missing initrd", func(c *vmm.MachineConfig) { c.InitrdPath = "/nonexistent/initrd" }, "initrd"},
		{"bad drive id", func(c *vmm.MachineConfig) { c.Drives[0].ID = "Root-FS" }, "drive id"},
		{"duplicate drive id", func(c *vmm.MachineConfig) { c.Drives[1].ID = c.Drives[0].ID }, "used twice"},
		{"missing drive", func(c *vmm.MachineConfig) { c.Drives[1].Path = "/nonexistent/rw" }, "drive rw"},
		{"bad tap", func(c *vmm.MachineConfig) { c.Net = &vmm.NetInterface{Tap: "a-very-long-tap-name"} }, "tap"},
		{"bad mac", func(c *vmm.MachineConfig) { c.Net = &vmm.NetInterface{Tap: "tap0", MAC: "zz:00"} }, "MAC"},
		{"no port", func(c *vmm.MachineConfig) { c.GuestPort = 0 }, "vsock port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := machine(t)
			tc.mod(&cfg)
			inst, err := d.Start(context.Background(), cfg)
			if err == nil {
				killForCleanup(t, inst)
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
		})
	}
	if n := len(fc.Records(t)); n != 0 {
		t.Errorf("a firecracker was launched for an invalid config (%d records)", n)
	}
}

func TestSocketPathTooLong(t *testing.T) {
	fc := fakefctest.Setup(t)
	d := New(Options{Binary: fc.Binary})
	cfg := machine(t)
	cfg.Dir = filepath.Join(cfg.Dir, strings.Repeat("d", 100))
	if err := os.Mkdir(cfg.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := d.Start(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "longer than the 107") {
		t.Fatalf("Start = %v, want a socket path length error", err)
	}
}

// TestFakeCatchesDeviations proves the suite fails a driver that deviates from
// the spec: requests with the kinds of mistake a driver could make are sent
// through the driver's own API client to a running fake, and each must be
// refused with a fault_message and recorded as a violation.
func TestFakeCatchesDeviations(t *testing.T) {
	fc := fakefctest.Setup(t)
	fc.AllowViolations()
	d := New(Options{Binary: fc.Binary})
	cfg := machine(t)
	inst := start(t, d, cfg).(*instance)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name, method, path string
		body               any
		want               string
	}{
		{"missing required field", "PUT", "/vsock", map[string]any{"uds_path": "/tmp/x.sock"}, "guest_cid: missing required field"},
		{"wrong type", "PUT", "/machine-config", map[string]any{"vcpu_count": "2", "mem_size_mib": 256}, "vcpu_count: expected an integer"},
		{"bad enum", "PUT", "/actions", map[string]any{"action_type": "Reboot"}, `"Reboot" is not one of`},
		{"unknown field", "PUT", "/drives/extra", map[string]any{"drive_id": "extra", "path_on_host": cfg.Drives[0].Path, "is_root_device": false, "is_read_only": true, "read_only": true}, "read_only: unknown field"},
		{"config after start", "PUT", "/boot-source", apiBootSource{KernelImagePath: cfg.KernelPath}, "not supported after starting the microVM"},
		{"id mismatch", "PATCH", "/drives/rw", map[string]any{"drive_id": "image"}, "does not match"},
		{"second start", "PUT", "/actions", apiAction{ActionType: "InstanceStart"}, "after starting"},
		{"unknown path", "PUT", "/machine", apiMachineConfig{VCPUCount: 1, MemSizeMiB: 128}, "no such API path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(fc.Violations(t))
			err := inst.api.do(ctx, tc.method, tc.path, tc.name, tc.body, nil)
			var ae *apiError
			if !errors.As(err, &ae) || ae.Status != 400 || !strings.Contains(ae.Fault, tc.want) {
				t.Fatalf("answer %v, want a 400 whose fault_message mentions %q", err, tc.want)
			}
			if got := len(fc.Violations(t)); got != before+1 {
				t.Errorf("violations recorded: %d, want %d", got, before+1)
			}
		})
	}
	if s, err := inst.State(ctx); s != vmm.StateRunning || err != nil {
		t.Errorf("State after refused requests = %q, %v", s, err)
	}
}

func TestPreflight(t *testing.T) {
	fc := fakefctest.Setup(t)
	err := New(Options{Binary: fc.Binary}).Preflight(context.Background())
	if kerr := checkKVM("/dev/kvm"); kerr != nil {
		if err == nil || !strings.Contains(err.Error(), "kvm") {
			t.Errorf("Preflight without usable /dev/kvm = %v, want a kvm error", err)
		}
	} else if err != nil {
		t.Errorf("Preflight: %v", err)
	}
	err = New(Options{Binary: filepath.Join(t.TempDir(), "no-firecracker")}).Preflight(context.Background())
	if err == nil || !strings.Contains(err.Error(), "not found") || !strings.Contains(err.Error(), "hint") {
		t.Errorf("Preflight with a missing binary = %v", err)
	}
	if err := checkKVM(filepath.Join(t.TempDir(), "kvm")); err == nil || !strings.Contains(err.Error(), "KVM is not available") {
		t.Errorf("checkKVM of a missing device = %v", err)
	}
	if os.Geteuid() != 0 {
		err = New(Options{Binary: fc.Binary, Jailer: &JailerOptions{Binary: fc.Jailer}}).Preflight(context.Background())
		if err == nil || !strings.Contains(err.Error(), "needs root") {
			t.Errorf("jailer Preflight as non-root = %v", err)
		}
	}
}

func TestBootArgs(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "console=ttyS0 reboot=k panic=-1 pci=off"},
		{"quiet", "quiet console=ttyS0 reboot=k panic=-1 pci=off"},
		{"console=hvc0 reboot=t panic=1 pci=on", "console=hvc0 reboot=t panic=1 pci=on"},
		{"  a   b ", "a b console=ttyS0 reboot=k panic=-1 pci=off"},
		{"consoleblank=0", "consoleblank=0 console=ttyS0 reboot=k panic=-1 pci=off"},
	} {
		if got := BootArgs(tc.in); got != tc.want {
			t.Errorf("BootArgs(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestFlagValue(t *testing.T) {
	args := []string{"firecracker", "--id=abc", "--api-sock", "/x/fc.sock", "--level"}
	if flagValue(args, "--id") != "abc" || flagValue(args, "--api-sock") != "/x/fc.sock" || flagValue(args, "--level") != "" || flagValue(args, "--nope") != "" {
		t.Error("flagValue")
	}
}

func TestVsockForwardAndRefusedPort(t *testing.T) {
	fc := fakefctest.Setup(t)
	agent := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", agent)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, "agent-hello")
			c.Close()
		}
	}()
	t.Setenv(fakefc.EnvVsockForward, agent)
	t.Setenv(fakefc.EnvVsockPorts, strconv.Itoa(testPort))
	inst := start(t, New(Options{Binary: fc.Binary}), machine(t))
	ch := inst.Handles().Channel

	dial := func(port uint32) (string, error) {
		c, err := net2Dial(ch.Path)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "CONNECT %d\n", port)
		var sb strings.Builder
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			sb.WriteString(line)
			if err != nil {
				return sb.String(), nil
			}
		}
	}
	got, err := dial(testPort)
	if err != nil || !strings.HasPrefix(got, "OK ") || !strings.HasSuffix(got, "\nagent-hello\n") {
		t.Errorf("forwarded stream %q, %v", got, err)
	}
	if got, err := dial(testPort + 1); err != nil || got != "" {
		t.Errorf("connection to a port nobody listens on: %q, %v; want it closed without OK", got, err)
	}

	// DialVsock keeps what the guest says right after OK.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := DialVsock(ctx, ch.Path, ch.Port)
	if err != nil {
		t.Fatalf("DialVsock: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if line, err := bufio.NewReader(c).ReadString('\n'); line != "agent-hello\n" || err != nil {
		t.Errorf("after DialVsock read %q, %v", line, err)
	}
	if _, err := DialVsock(ctx, ch.Path, testPort+1); err == nil || !strings.Contains(err.Error(), "is the guest agent listening") {
		t.Errorf("DialVsock to a closed port = %v", err)
	}
}

func TestConcurrentStarts(t *testing.T) {
	fc := fakefctest.Setup(t)
	d := New(Options{Binary: fc.Binary})
	const n = 3
	insts := make(chan vmm.Instance, n)
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		cfg := machine(t)
		cfg.VMID = fmt.Sprintf("vm-%d", i)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			inst, err := d.Start(ctx, cfg)
			if err != nil {
				errs <- err
				return
			}
			insts <- inst
		}()
	}
	for i := 0; i < n; i++ {
		select {
		case err := <-errs:
			t.Error(err)
		case inst := <-insts:
			t.Cleanup(func() { killForCleanup(t, inst) })
			if s, err := inst.State(context.Background()); s != vmm.StateRunning || err != nil {
				t.Errorf("State = %q, %v", s, err)
			}
		}
	}
}
