package qemu

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
)

// Real boots under QEMU. Each boot is bounded by bootTimeout and its QEMU is
// killed at test end. The guest is a tiny initramfs (static busybox as /init)
// whose behaviour is picked on the kernel command line with banger.test=ACTION.

const (
	bootTimeout = 60 * time.Second // generous: CI machines run several boots at once under TCG
	readyMarker = "BANGER-TEST-READY"
)

// Modules the test guest loads, in dependency order (see
// shared/notes/real-vms-here.md), plus the ACPI power button.
var testModules = []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console", "button", "evdev", "failover", "net_failover", "virtio_net"}

const testInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.load); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
action=
for w in $(cat /proc/cmdline); do
	case "$w" in banger.test=*) action="${w#banger.test=}";; esac
done
echo "` + readyMarker + ` action=$action"
if [ "$action" = snapshot ]; then
	# A counter in the guest's memory: a restored copy keeps counting.
	(i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.2; done) &
	action=echo
fi
case "$action" in
poweroff)
	poweroff -f ;;
reboot)
	reboot -f ;;
echo)
	# Echo the agent port back to the host.
	for p in /sys/class/virtio-ports/*; do
		if [ "$(cat $p/name)" = banger.agent ]; then port=/dev/${p##*/}; fi
	done
	echo "agent port $port"
	# A virtio-serial port can be opened once: one read-write descriptor.
	exec 3<>$port
	echo "agent port open"
	# A read while no host is connected returns EOF at once: read again.
	while :; do cat <&3 >&3; sleep 0.1; done ;;
net)
	echo "eth0 mac $(cat /sys/class/net/eth0/address)"
	poweroff -f ;;
powerbutton)
	# Power off when the ACPI power button is pressed (like acpid/logind).
	for e in /sys/class/input/event*; do
		if [ "$(cat $e/device/name)" = "Power Button" ]; then dev=/dev/input/${e##*/}; fi
	done
	# Open the device before saying so: a press before the open is lost.
	exec 4<$dev
	echo "power button at $dev"
	dd of=/dev/null bs=24 count=1 <&4 2>/dev/null
	echo "power button pressed"
	poweroff -f ;;
esac
while true; do sleep 3600; done
`

var initrdMemo struct {
	once sync.Once
	path string
	err  error
}

// testKernel returns the guest kernel and a test initramfs for it.
func testKernel(t *testing.T) (vmlinux, initrd string) {
	t.Helper()
	testenv.RequireQEMU(t)
	k := testenv.GuestKernel(t)
	bb, err := staticBusybox()
	if err != nil {
		t.Skipf("static busybox not installed (Debian package busybox-static): %v", err)
	}
	initrdMemo.once.Do(func() {
		dir, err := os.MkdirTemp("", "banger-qemu-test-")
		if err != nil {
			initrdMemo.err = err
			return
		}
		initrdMemo.path = filepath.Join(dir, "initrd.cpio.gz")
		initrdMemo.err = writeTestInitrd(initrdMemo.path, bb, k.ModulesDir)
	})
	if initrdMemo.err != nil {
		t.Fatalf("build test initramfs: %v", initrdMemo.err)
	}
	return k.VmlinuxPath, initrdMemo.path
}

// testMemDir is the test driver's memory directory (made by the driver when
// /dev/shm is a tmpfs), removed by TestMain.
var testMemDir = fmt.Sprintf("/dev/shm/banger-qemu-test-%d", os.Getpid())

func TestMain(m *testing.M) {
	code := m.Run()
	os.RemoveAll(testMemDir)
	if fallbackMemo.dir != "" {
		os.RemoveAll(fallbackMemo.dir)
	}
	if initrdMemo.path != "" {
		os.RemoveAll(filepath.Dir(initrdMemo.path))
	}
	os.Exit(code)
}

// staticBusybox finds a statically linked busybox.
func staticBusybox() (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox", "/usr/lib/initramfs-tools/bin/busybox"} {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		static := true
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				static = false
			}
		}
		f.Close()
		if static {
			return p, nil
		}
	}
	return "", errors.New("no statically linked busybox in /bin, /usr/bin")
}

func writeTestInitrd(dst, busybox, modulesDir string) error {
	mods := map[string]string{}
	err := filepath.WalkDir(modulesDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := strings.TrimSuffix(d.Name(), ".ko")
		if !d.IsDir() && strings.HasSuffix(d.Name(), ".ko") {
			mods[name] = p
		}
		return nil
	})
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	w := cpio.NewWriter(zw)
	add := func(name string, mode cpio.FileMode, body []byte) error {
		if err := w.WriteHeader(&cpio.Header{Name: name, Mode: mode, Size: int64(len(body))}); err != nil {
			return err
		}
		_, err := w.Write(body)
		return err
	}
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"} {
		if err := add(d, cpio.TypeDir|0o755, nil); err != nil {
			return err
		}
	}
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	if err := add("bin/busybox", cpio.TypeReg|0o755, bb); err != nil {
		return err
	}
	if err := add("bin/sh", cpio.TypeSymlink|0o777, []byte("busybox")); err != nil {
		return err
	}
	if err := add("init", cpio.TypeReg|0o755, []byte(testInit)); err != nil {
		return err
	}
	for _, m := range testModules {
		p, ok := mods[m]
		if !ok {
			return fmt.Errorf("module %s.ko not found under %s", m, modulesDir)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := add("lib/modules/"+m+".ko", cpio.TypeReg|0o644, b); err != nil {
			return err
		}
	}
	if err := add("modules.load", cpio.TypeReg|0o644, []byte(strings.Join(testModules, "\n")+"\n")); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return os.WriteFile(dst, buf.Bytes(), 0o644)
}

var driverMemo struct {
	once sync.Once
	d    *Driver
}

// testDriver is shared by the boot tests so that the KVM probe runs once.
func testDriver() *Driver {
	driverMemo.once.Do(func() {
		driverMemo.d = New(Options{Accel: os.Getenv("BANGER_TEST_QEMU_ACCEL"), MemoryDirs: []string{testMemDir}})
	})
	return driverMemo.d
}

// boot starts a test guest running action; the VMM is killed at test end.
func boot(t *testing.T, action string, mutate func(*vmm.MachineConfig)) (vmm.Instance, vmm.MachineConfig) {
	t.Helper()
	return bootWith(t, testDriver(), action, mutate)
}

// bootWith is boot with driver d.
func bootWith(t *testing.T, d *Driver, action string, mutate func(*vmm.MachineConfig)) (vmm.Instance, vmm.MachineConfig) {
	t.Helper()
	vmlinux, initrd := testKernel(t)
	dir := shortDir(t)
	cfg := vmm.MachineConfig{
		VMID:       fmt.Sprintf("t%x", time.Now().UnixNano()),
		Dir:        filepath.Join(dir, "vm"),
		VCPUs:      1,
		MemoryMiB:  256,
		KernelPath: vmlinux,
		InitrdPath: initrd,
		Cmdline:    "reboot=k banger.test=" + action,
		GuestPort:  1024,
	}
	if mutate != nil {
		mutate(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	start := time.Now()
	inst, err := d.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Logf("Start returned after %v (pid %d)", time.Since(start).Round(time.Millisecond), inst.Handles().PID)
	t.Cleanup(func() {
		kctx, kcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer kcancel()
		if err := inst.Kill(kctx); err != nil {
			t.Errorf("cleanup kill: %v", err)
		}
	})
	return inst, cfg
}

// waitConsole polls the console log until it contains want.
func waitConsole(t *testing.T, inst vmm.Instance, want string, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		b, _ := os.ReadFile(inst.Handles().ConsoleLog)
		if bytes.Contains(b, []byte(want)) {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("console has no %q after %v; console tail:\n%s\nvmm log:\n%s", want, timeout, tail(b, 2000), readTail(inst.Handles().VMMLog, 10))
		}
		select {
		case <-inst.Exited():
			b, _ := os.ReadFile(inst.Handles().ConsoleLog)
			if bytes.Contains(b, []byte(want)) {
				return time.Since(start)
			}
			st, _ := inst.Wait(context.Background())
			t.Fatalf("qemu exited (%s) before the console showed %q; console tail:\n%s", st.Reason, want, tail(b, 2000))
		case <-tick.C:
		}
	}
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func waitExit(t *testing.T, inst vmm.Instance, timeout time.Duration) vmm.ExitStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	st, err := inst.Wait(ctx)
	if err != nil {
		b, _ := os.ReadFile(inst.Handles().ConsoleLog)
		t.Fatalf("qemu did not exit within %v: %v; console tail:\n%s", timeout, err, tail(b, 2000))
	}
	return st
}

func TestBootKillAndAdopt(t *testing.T) {
	inst, cfg := boot(t, "echo", nil)
	h := inst.Handles()
	if h.Driver != DriverName || h.PID <= 0 || h.StartTime == 0 || h.APISocket != filepath.Join(cfg.Dir, "qmp.sock") {
		t.Errorf("handles: %+v", h)
	}
	argv, err := system.ProcessCmdline(h.PID)
	if err != nil || !strings.Contains(strings.Join(argv, " "), cfg.VMID) {
		t.Errorf("qemu command line does not name the VM id %s: %q (%v)", cfg.VMID, argv, err)
	}
	took := waitConsole(t, inst, readyMarker, bootTimeout)
	t.Logf("guest userspace ready %v after Start returned", took.Round(time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if st, err := inst.State(ctx); err != nil || st != vmm.StateRunning {
		t.Fatalf("State = %q, %v; want running", st, err)
	}

	// The guest channel works end to end.
	switch h.Channel.Kind {
	case vmm.ChannelSerial:
		if h.Channel.Path != filepath.Join(cfg.Dir, "agent.sock") || h.Channel.Name != AgentPortName {
			t.Errorf("serial channel: %+v", h.Channel)
		}
		// Only once the guest holds the port open.
		waitConsole(t, inst, "agent port open", 20*time.Second)
		// Twice: a restarted bangerd connects again to the same port.
		for _, msg := range []string{"ping over virtio-serial\n", "again after a reconnect\n"} {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", h.Channel.Path)
			if err != nil {
				t.Fatalf("dial agent socket: %v", err)
			}
			c.SetDeadline(time.Now().Add(15 * time.Second))
			if _, err := c.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || line != msg {
				b, _ := os.ReadFile(h.ConsoleLog)
				t.Fatalf("echo of %q over the agent channel = %q, %v; console tail:\n%s", msg, line, err, tail(b, 1500))
			}
			c.Close()
		}
	case vmm.ChannelVsock:
		if h.Channel.CID != guestCID(cfg.VMID) || h.Channel.Port != cfg.GuestPort {
			t.Errorf("vsock channel: %+v", h.Channel)
		}
	}

	// A second bangerd adopts it from its handles.
	adopted, err := testDriver().Adopt(ctx, h)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if st, err := adopted.State(ctx); err != nil || st != vmm.StateRunning {
		t.Fatalf("adopted State = %q, %v; want running", st, err)
	}
	// Adoption refuses other processes.
	wrong := h
	wrong.StartTime++
	if _, err := testDriver().Adopt(ctx, wrong); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("Adopt with another start time: %v, want ErrGone", err)
	}
	other := h
	other.VMID = "fedcba9876543210"
	if _, err := testDriver().Adopt(ctx, other); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("Adopt with another VM's id: %v, want ErrGone", err)
	}
	if h.VMID == "" {
		t.Errorf("Handles carry no VM id")
	}
	self := h
	self.PID = os.Getpid()
	self.StartTime, _ = system.ProcessStartTime(self.PID)
	if _, err := testDriver().Adopt(ctx, self); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("Adopt of a live process that is not this VM's qemu: %v, want ErrGone", err)
	}

	start := time.Now()
	if err := adopted.Kill(ctx); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	t.Logf("Kill took %v", time.Since(start).Round(time.Millisecond))
	for name, i := range map[string]vmm.Instance{"started": inst, "adopted": adopted} {
		select {
		case <-i.Exited():
		case <-time.After(10 * time.Second):
			t.Fatalf("%s instance: Exited not closed after Kill", name)
		}
	}
	st := waitExit(t, inst, time.Second)
	if st.Signal != "killed" || st.Code != -1 || !strings.Contains(st.Reason, "killed") {
		t.Errorf("exit status of the started instance: %+v", st)
	}
	if st, err := inst.State(ctx); err != nil || st != vmm.StateExited {
		t.Errorf("State after kill = %q, %v", st, err)
	}
	if _, err := os.Stat(h.APISocket); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("QMP socket left behind: %v", err)
	}
	if _, err := testDriver().Adopt(ctx, h); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("Adopt of a dead VMM: %v, want ErrGone", err)
	}
	if err := inst.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown after exit: %v", err)
	}
}

func TestBootGuestPowerOff(t *testing.T) {
	for _, action := range []string{"poweroff", "reboot"} {
		t.Run(action, func(t *testing.T) {
			start := time.Now()
			inst, _ := boot(t, action, nil)
			st := waitExit(t, inst, bootTimeout)
			t.Logf("guest %s: qemu exited %v after launch", action, time.Since(start).Round(time.Millisecond))
			if st.Code != 0 || st.Signal != "" {
				t.Fatalf("exit status %+v, want code 0", st)
			}
			if l, _ := os.ReadFile(inst.Handles().VMMLog); len(l) > 0 {
				t.Logf("vmm log:\n%s", l)
			}
			b, _ := os.ReadFile(inst.Handles().ConsoleLog)
			if !bytes.Contains(b, []byte(readyMarker)) {
				t.Errorf("console has no marker:\n%s", tail(b, 2000))
			}
		})
	}
}

// TestBootWithTap attaches the guest to a tap device made in a private network
// namespace (never the machine's own): QEMU is started from a thread that
// entered that namespace, and inherits it.
func TestBootWithTap(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("making a tap device in a private network namespace needs root")
	}
	vmlinux, initrd := testKernel(t)
	const mac = "06:00:ac:1e:00:05"
	cfg := vmm.MachineConfig{
		VMID: fmt.Sprintf("n%x", time.Now().UnixNano()), Dir: filepath.Join(shortDir(t), "vm"),
		VCPUs: 1, MemoryMiB: 256, KernelPath: vmlinux, InitrdPath: initrd,
		Cmdline: "banger.test=net", Net: &vmm.NetInterface{Tap: "bqtap0", MAC: mac},
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	type result struct {
		inst vmm.Instance
		err  error
	}
	done := make(chan result, 1)
	go func() {
		// Never unlocked: the thread ends with this goroutine, and so does
		// its namespace once QEMU has gone.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- result{err: fmt.Errorf("unshare network namespace: %w", err)}
			return
		}
		tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: cfg.Net.Tap}, Mode: netlink.TUNTAP_MODE_TAP}
		if err := netlink.LinkAdd(tap); err != nil {
			done <- result{err: fmt.Errorf("create tap: %w", err)}
			return
		}
		if err := netlink.LinkSetUp(tap); err != nil {
			done <- result{err: fmt.Errorf("set tap up: %w", err)}
			return
		}
		inst, err := testDriver().Start(ctx, cfg)
		done <- result{inst, err}
	}()
	r := <-done
	if r.err != nil {
		t.Fatalf("Start with a tap: %v", r.err)
	}
	inst := r.inst
	t.Cleanup(func() {
		kctx, kcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer kcancel()
		inst.Kill(kctx)
	})
	if inst.Handles().Tap != "bqtap0" {
		t.Errorf("handles tap %q", inst.Handles().Tap)
	}
	waitConsole(t, inst, "eth0 mac "+mac, bootTimeout)
	if st := waitExit(t, inst, bootTimeout); st.Code != 0 {
		t.Errorf("exit status %+v", st)
	}
}

// TestBootDisksAndShutdown boots with the read-only image and a writable disk,
// checks that a second VM may share the image read-only while nobody may open
// it read-write, then powers the guest off with Shutdown (the ACPI power
// button, acted on by the guest as acpid or the agent would).
func TestBootDisksAndShutdown(t *testing.T) {
	rootfs := testenv.BusyboxRootfs(t, 16)
	rw := filepath.Join(t.TempDir(), "rw.img")
	if err := os.WriteFile(rw, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(rw, 64<<20); err != nil {
		t.Fatal(err)
	}
	inst, _ := boot(t, "powerbutton", func(c *vmm.MachineConfig) {
		c.Drives = []vmm.Drive{{ID: "root", Path: rootfs, ReadOnly: true}, {ID: "rw", Path: rw}}
	})

	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	t.Run("image shared read-only", func(t *testing.T) {
		// Start returns once QEMU runs, i.e. after it opened and locked its disks.
		other, _ := boot(t, "sleep", func(c *vmm.MachineConfig) {
			c.Drives = []vmm.Drive{{ID: "root", Path: rootfs, ReadOnly: true}}
		})
		if err := other.Kill(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("image not writable while in use", func(t *testing.T) {
		vmlinux, initrd := testKernel(t)
		_, err := testDriver().Start(ctx, vmm.MachineConfig{
			VMID: "locked", Dir: filepath.Join(shortDir(t), "vm"), VCPUs: 1, MemoryMiB: 128,
			KernelPath: vmlinux, InitrdPath: initrd,
			Drives: []vmm.Drive{{ID: "root", Path: rootfs}},
		})
		if err == nil || !strings.Contains(err.Error(), "lock") {
			t.Fatalf("read-write use of an image in use: err = %v, want a lock error", err)
		}
		t.Logf("error shown to the user: %v", err)
	})

	waitConsole(t, inst, "power button at /dev/input/event", bootTimeout)
	b, _ := os.ReadFile(inst.Handles().ConsoleLog)
	for _, disk := range []string{"[vda] 32768 512-byte", "[vdb] 131072 512-byte"} {
		if !bytes.Contains(b, []byte(disk)) {
			t.Errorf("console does not show disk %q:\n%s", disk, tail(b, 3000))
		}
	}
	start := time.Now()
	if err := inst.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	st := waitExit(t, inst, 30*time.Second)
	t.Logf("Shutdown to exit: %v", time.Since(start).Round(time.Millisecond))
	if st.Code != 0 {
		t.Fatalf("exit status %+v, want 0", st)
	}
}

func TestProbeKVMHere(t *testing.T) {
	testenv.RequireQEMU(t)
	vmlinux, _ := testKernel(t)
	d := New(Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bin, _, err := d.binary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c, err := d.chooseAccel(ctx, bin, vmlinux)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("chose %s in %v: %s", c.Accel, took.Round(time.Millisecond), c.Reason)
	if took > DefaultProbeTimeout+3*time.Second {
		t.Errorf("probe took %v, bound is %v", took, DefaultProbeTimeout)
	}
	if c.Accel != AccelKVM && c.Accel != AccelTCG {
		t.Fatalf("accel %q", c.Accel)
	}
	// Cached: the second call does not probe again.
	start = time.Now()
	c2, err := d.chooseAccel(ctx, bin, vmlinux)
	if err != nil || c2 != c || time.Since(start) > 100*time.Millisecond {
		t.Errorf("second chooseAccel = %+v, %v in %v", c2, err, time.Since(start))
	}
	r := d.Describe(ctx)
	if r.Err != nil || r.Accel != c.Accel {
		t.Errorf("Describe = %+v", r)
	}
	t.Logf("doctor:\n%s", strings.Join(r.Lines(), "\n"))
}
