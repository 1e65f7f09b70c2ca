package agent_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/kernel"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
)

// bootDeadline bounds one boot, from QEMU's start to the agent's answer.
const bootDeadline = 60 * time.Second

type vm struct {
	t       *testing.T
	dir     string
	cmd     *exec.Cmd
	exited  chan struct{}
	console string
	sock    string
	qmp     string
	tr      *guest.Transport
	client  *guest.Client
	started time.Time
}

type fixture struct {
	qemu, vmlinux, initrd, rootfs, rw string
	kernelVersion                     string
	hostKey                           guest.HostKey
	userKey                           guest.UserKey
	dir                               string
}

func tscKHz(t *testing.T) int {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		t.Fatalf("read /proc/cpuinfo: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return int(math.Round(mhz * 1000))
			}
		}
	}
	t.Fatal("no cpu MHz in /proc/cpuinfo")
	return 0
}

// newFixture gathers the kernel, initrd, busybox root and a fresh writable
// disk (optionally pre-populated from upperDir's content under upper/).
func newFixture(t *testing.T, rwPopulate func(upper string)) *fixture {
	t.Helper()
	qemu := testenv.RequireQEMU(t)
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skipf("mkfs.ext4 not installed (Debian package e2fsprogs): %v", err)
	}
	k := testenv.GuestKernel(t)
	agentBin := testenv.AgentBinary(t)
	initrd := testenv.Initrd(t, agentBin)
	// The power button needs button and evdev; build an initrd with them
	// while the default module list lacks them.
	if mods := kernel.DefaultModules(); !slices.Contains(mods, "button") || !slices.Contains(mods, "evdev") {
		initrd = filepath.Join(t.TempDir(), "initrd-powerbutton.cpio.gz")
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		err := kernel.WriteInitrd(ctx, initrd, kernel.InitrdOptions{Kernel: k, AgentPath: agentBin, Modules: append(mods, "button", "evdev")})
		cancel()
		if err != nil {
			t.Fatalf("build an initrd with the power button modules: %v", err)
		}
	}
	rootfs := testenv.BusyboxRootfs(t, 32)
	dir := t.TempDir()
	rw := filepath.Join(dir, "rw.ext4")
	args := []string{"-q", "-F", "-L", bootcfg.RWLabel}
	if rwPopulate != nil {
		src := filepath.Join(dir, "rw-src")
		rwPopulate(filepath.Join(src, "upper"))
		args = append(args, "-d", src)
	}
	args = append(args, rw, "64M")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, mkfs, args...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	hk, err := guest.GenerateHostKey()
	if err != nil {
		t.Fatal(err)
	}
	uk, err := guest.LoadOrCreateUserKey(filepath.Join(dir, "id_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{qemu: qemu, vmlinux: k.VmlinuxPath, initrd: initrd, rootfs: rootfs, rw: rw,
		kernelVersion: k.Version, hostKey: hk, userKey: uk, dir: dir}
}

func logger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// testMAC is the guest NIC's MAC when a boot has a network.
const testMAC = "06:00:0a:63:00:02"

// boot starts QEMU on the fixture's disks and waits until the agent answers.
// With network set, the guest gets a NIC on an isolated QEMU hub (no host
// side at all: nothing can leave the VM) configured from the boot config.
func (f *fixture) boot(t *testing.T, name string, network bool) *vm {
	t.Helper()
	v := f.start(t, name, network, true)
	v.connect(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), bootDeadline)
	defer cancel()
	if err := v.client.Ping(ctx); err != nil {
		t.Fatalf("agent did not answer: %v", err)
	}
	t.Logf("%s: agent answered %v after qemu start", name, time.Since(v.started).Round(time.Millisecond))
	return v
}

// start launches QEMU (with or without the boot config drive).
func (f *fixture) start(t *testing.T, name string, network, withConfig bool) *vm {
	t.Helper()
	dir := filepath.Join(f.dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var err error
	cfg := &bootcfg.Config{
		Version:        1,
		VMID:           "test-" + name,
		Hostname:       "banger-" + name,
		HostKey:        string(f.hostKey.PrivatePEM),
		AuthorizedKeys: []string{f.userKey.AuthorizedLine()},
		Channel:        bootcfg.Channel{Kind: "serial", Name: api.DefaultSerialName},
		Env:            []string{"IMAGE_ENV=yes"},
	}
	if network {
		cfg.Network = &bootcfg.Network{MAC: testMAC, Address: "10.99.0.2/24", Gateway: "10.99.0.1", DNS: []string{"10.99.0.53"}, MTU: 1400}
	}
	if cfg.RNGSeed, err = bootcfg.NewSeed(); err != nil {
		t.Fatal(err)
	}
	enc, err := bootcfg.Encode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgImg := filepath.Join(dir, "bootcfg.img")
	if err := os.WriteFile(cfgImg, enc, 0o644); err != nil {
		t.Fatal(err)
	}
	v := &vm{t: t, dir: dir, console: filepath.Join(dir, "console.log"), sock: filepath.Join(dir, "agent.sock"), qmp: filepath.Join(dir, "qmp.sock"), exited: make(chan struct{})}
	args := []string{
		"-M", "microvm", "-accel", "tcg", "-m", "256M", "-smp", "1",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-monitor", "none",
		"-kernel", f.vmlinux, "-initrd", f.initrd,
		// reboot=t: microvm has no i8042, so the design's reboot=k only
		// gets there after ~3 s of fallbacks; a triple fault resets at once.
		"-append", fmt.Sprintf("console=ttyS0 reboot=t panic=-1 tsc_early_khz=%d banger.debug", tscKHz(t)),
		"-serial", "file:" + v.console,
		"-qmp", "unix:" + v.qmp + ",server=on,wait=off",
		"-drive", "id=root,file=" + f.rootfs + ",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=root",
		"-drive", "id=rw,file=" + f.rw + ",format=raw,if=none", "-device", "virtio-blk-device,drive=rw",
		"-device", "virtio-serial-device,id=vser0",
		"-chardev", "socket,id=ch0,path=" + v.sock + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=ch0,name=" + api.DefaultSerialName,
	}
	if withConfig {
		args = append(args, "-drive", "id=cfg,file="+cfgImg+",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=cfg")
	}
	if network {
		args = append(args, "-netdev", "hubport,id=n0,hubid=0", "-device", "virtio-net-device,netdev=n0,mac="+testMAC)
	}
	v.cmd = exec.Command(f.qemu, args...)
	var stderr bytes.Buffer
	v.cmd.Stderr = &stderr
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		_ = v.cmd.Wait()
		close(v.exited)
	}()
	t.Cleanup(func() {
		v.kill()
		if t.Failed() || testing.Verbose() {
			b, _ := os.ReadFile(v.console)
			t.Logf("console of %s:\n%s\nqemu stderr:\n%s", name, b, stderr.String())
		}
	})
	// QEMU creates the socket right away.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(v.sock); err == nil {
			break
		}
		select {
		case <-v.exited:
			t.Fatalf("qemu exited early: %s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu did not create its serial socket")
		}
		time.Sleep(10 * time.Millisecond)
	}
	v.started = start
	return v
}

func (v *vm) connect(t *testing.T, f *fixture) {
	t.Helper()
	tr, err := guest.NewTransport(vmm.GuestChannel{Kind: vmm.ChannelSerial, Path: v.sock, Name: api.DefaultSerialName}, logger(t))
	if err != nil {
		t.Fatal(err)
	}
	c, err := guest.NewClient(guest.ClientConfig{Dialer: tr, HostKey: f.hostKey.Public, UserKey: f.userKey.Signer, Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	v.tr, v.client = tr, c
}

func (v *vm) disconnect() {
	if v.client != nil {
		v.client.Close()
		v.tr.Close()
	}
}

func (v *vm) kill() {
	select {
	case <-v.exited:
	default:
		_ = syscall.Kill(v.cmd.Process.Pid, syscall.SIGKILL)
		<-v.exited
	}
	v.disconnect()
}

func (v *vm) exec(t *testing.T, cmd ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code, err := v.client.Exec(ctx, cmd, nil, &out, &errb, guest.ExecOptions{})
	if err != nil || code != 0 {
		t.Fatalf("exec %q: code %d err %v stderr %q", cmd, code, err, errb.String())
	}
	return out.String()
}

// shutdown asks the guest to power off and expects QEMU to exit.
func (v *vm) shutdown(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := v.client.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-v.exited:
		t.Logf("qemu exited %v after the shutdown request", time.Since(start).Round(time.Millisecond))
	case <-ctx.Done():
		t.Fatal("qemu did not exit after the shutdown request")
	}
}

// powerButton presses the ACPI power button through QMP and expects QEMU
// to exit (the agent, as PID 1, powers off).
func (v *vm) powerButton(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", v.qmp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	expect := func(what string) {
		t.Helper()
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("qmp: waiting for %s: %v", what, err)
			}
			if strings.Contains(line, what) {
				return
			}
		}
	}
	expect(`"QMP"`)
	for _, cmd := range []string{"qmp_capabilities", "system_powerdown"} {
		if _, err := fmt.Fprintf(c, `{"execute":%q}`+"\n", cmd); err != nil {
			t.Fatal(err)
		}
		expect(`"return"`)
	}
	start := time.Now()
	select {
	case <-v.exited:
		t.Logf("qemu exited %v after the power button", time.Since(start).Round(time.Millisecond))
	case <-ctx.Done():
		t.Fatal("qemu did not exit after the power button")
	}
}

// TestRealGuestAgentAsInit boots a busybox image without an init: the agent
// stays PID 1. It checks exec, the reconnection of a new host (bangerd
// restart) over the real virtio-serial port, sftp, ports, stats, shutdown,
// that the writable layer survives a second boot, and the ACPI power button.
func TestRealGuestAgentAsInit(t *testing.T) {
	f := newFixture(t, nil)
	v := f.boot(t, "first", true)

	if got := strings.TrimSpace(v.exec(t, "uname", "-r")); got != f.kernelVersion {
		t.Fatalf("uname -r = %q, want %q", got, f.kernelVersion)
	}
	if got := strings.TrimSpace(v.exec(t, "hostname")); got != "banger-first" {
		t.Errorf("hostname = %q", got)
	}
	if got := v.exec(t, "sh", "-c", "echo $IMAGE_ENV $HOME; cat /proc/1/comm; grep -E ' / | /sys/fs/cgroup ' /proc/mounts"); !strings.Contains(got, "yes /root") || !strings.Contains(got, "overlay") || !strings.Contains(got, "cgroup2") {
		t.Errorf("guest environment: %q", got)
	}
	v.exec(t, "sh", "-c", "echo kept > /root/persist")

	// Network from the boot config.
	netOut := v.exec(t, "sh", "-c", "ip -o -4 addr show; ip route; cat /etc/resolv.conf; for i in /sys/class/net/*; do echo $(cat $i/address) $(cat $i/mtu) $(cat $i/operstate); done")
	for _, want := range []string{"10.99.0.2/24", "default via 10.99.0.1", "nameserver 10.99.0.53", testMAC + " 1400"} {
		if !strings.Contains(netOut, want) {
			t.Errorf("guest network lacks %q:\n%s", want, netOut)
		}
	}

	// Orphans are reaped by the agent as PID 1.
	v.exec(t, "sh", "-c", "(sleep 0.2 &) ; exit 0")
	for deadline := time.Now().Add(10 * time.Second); ; {
		z := strings.TrimSpace(v.exec(t, "sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null | grep -c ') Z ' || true"))
		if z == "0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s zombie processes left", z)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// bangerd restarts: a new host connection on the same serial port.
	v.disconnect()
	v.connect(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := v.client.Ping(ctx); err != nil {
		t.Fatalf("ping after reconnect: %v", err)
	}
	t.Logf("reconnected in %v", time.Since(start).Round(time.Millisecond))

	sc, err := v.client.SFTP(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wf, err := sc.Create("/root/sftp.bin")
	if err != nil {
		t.Fatal(err)
	}
	payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	start = time.Now()
	if _, err := wf.ReadFrom(bytes.NewReader(payload)); err != nil {
		t.Fatal(err)
	}
	wf.Close()
	t.Logf("sftp put 1 MiB in %v", time.Since(start).Round(time.Millisecond))
	sc.Close()
	if got := strings.TrimSpace(v.exec(t, "sh", "-c", "wc -c < /root/sftp.bin")); got != strconv.Itoa(len(payload)) {
		t.Fatalf("guest file size %s", got)
	}

	// A listener in the guest shows up in ports with its process.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel2()
	bg := make(chan error, 1)
	go func() {
		_, err := v.client.Exec(ctx2, []string{"nc", "-l", "-p", "8123"}, nil, io.Discard, io.Discard, guest.ExecOptions{})
		bg <- err
	}()
	found := false
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline) && !found; {
		ports, err := v.client.Ports(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range ports {
			if p.Port == 8123 && strings.HasPrefix(p.Proto, "tcp") && p.Process != "" {
				found = true
			}
		}
		if !found {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if !found {
		t.Error("listener on 8123 not reported by Ports")
	}
	cancel2()
	<-bg
	st, err := v.client.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.MemTotalBytes < 100<<20 || st.DiskTotalBytes == 0 || st.Uptime <= 0 {
		t.Errorf("implausible guest stats %+v", st)
	}
	v.shutdown(t)
	v.disconnect()
	testenv.RequireCleanExt4(t, f.rw)

	// Second boot on the same writable disk.
	v2 := f.boot(t, "second", false)
	if got := v2.exec(t, "cat", "/root/persist"); got != "kept\n" {
		t.Fatalf("writable layer lost: %q", got)
	}
	// This time the VMM's ACPI power button ends the VM.
	v2.powerButton(t)
}

// TestRealGuestImageInit gives the image an init (busybox init, through the
// writable layer): the agent hands PID 1 over and keeps serving from a
// child; shutdown goes through the image's init, which runs the inittab's
// ::shutdown actions, and the agent ends the VM with the writable disk
// read-only, its journal clean.
func TestRealGuestImageInit(t *testing.T) {
	f := newFixture(t, func(upper string) {
		for _, d := range []string{"sbin", "etc"} {
			if err := os.MkdirAll(filepath.Join(upper, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Symlink("/bin/busybox", filepath.Join(upper, "sbin", "init")); err != nil {
			t.Fatal(err)
		}
		inittab := "::sysinit:/bin/mount -o remount,rw /\n::shutdown:/bin/touch /root/shutdown-ran\n::shutdown:/bin/umount -a -r\n"
		if err := os.WriteFile(filepath.Join(upper, "etc", "inittab"), []byte(inittab), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	v := f.boot(t, "init", false)
	if got := strings.TrimSpace(v.exec(t, "cat", "/proc/1/comm")); got != "init" {
		t.Errorf("PID 1 is %q, want busybox init", got)
	}
	if got := v.exec(t, "sh", "-c", "cat /proc/$PPID/cmdline | tr '\\0' ' '"); !strings.Contains(got, "serve") {
		t.Errorf("session parent is %q, want banger-agent serve", got)
	}
	// a command inherits no descriptor of the agent's: not the boot
	// config's memfd (the VM's keys), not the writable disk's handle
	if got := strings.Fields(v.exec(t, "ls", "/proc/self/fd")); strings.Join(got, " ") != "0 1 2 3" {
		t.Errorf("a command's descriptors: %v, want 0 1 2 and ls's own directory (3)", got)
	}
	v.shutdown(t)
	testenv.RequireCleanExt4(t, f.rw)
	// the inittab's ::shutdown action ran (its file is in the upper layer)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "debugfs", "-R", "stat /upper/root/shutdown-ran", f.rw).CombinedOutput(); err != nil || strings.Contains(string(out), "not found") {
		t.Errorf("the inittab's ::shutdown action did not run: %v\n%s", err, out)
	}
}

// TestRealGuestBootFailurePowersOff boots without the boot config drive: the
// agent must say why on the console and power off, so that QEMU exits
// instead of hanging.
func TestRealGuestBootFailurePowersOff(t *testing.T) {
	f := newFixture(t, nil)
	v := f.start(t, "noconfig", false, false)
	select {
	case <-v.exited:
	case <-time.After(bootDeadline):
		t.Fatal("qemu still running: the agent did not power off after a failed boot")
	}
	t.Logf("qemu exited %v after start", time.Since(v.started).Round(time.Millisecond))
	b, err := os.ReadFile(v.console)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "BOOT FAILED: find the VM's disks") || !strings.Contains(string(b), "no boot config device") {
		t.Fatalf("console does not say why:\n%s", b)
	}
}
