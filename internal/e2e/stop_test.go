package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

// busyboxInitImage returns a copy of the busybox image at rootfs with
// busybox as /sbin/init and an inittab whose ::shutdown actions leave a mark
// on the root (then busybox's usual umount -a -r).
func busyboxInitImage(t *testing.T, rootfs string) string {
	t.Helper()
	debugfs, err := exec.LookPath("debugfs")
	if err != nil {
		t.Skipf("debugfs not installed (e2fsprogs): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	img := filepath.Join(dir, "bbinit.ext4")
	if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", rootfs, img).CombinedOutput(); err != nil {
		t.Fatalf("copy %s: %v\n%s", rootfs, err, out)
	}
	inittab := filepath.Join(dir, "inittab")
	tab := "::shutdown:/bin/sh -c 'echo ran > /root/shutdown-ran'\n::shutdown:/bin/umount -a -r\n"
	if err := os.WriteFile(inittab, []byte(tab), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, req := range []string{"symlink /sbin/init /bin/busybox", "write " + inittab + " /etc/inittab", "sif /etc/inittab uid 0", "sif /etc/inittab gid 0"} {
		out, err := exec.CommandContext(ctx, debugfs, "-w", "-R", req, img).CombinedOutput()
		if err != nil || strings.Contains(string(out), "rror") {
			t.Fatalf("debugfs %q: %v\n%s", req, err, out)
		}
	}
	return img
}

// TestStopLeavesWritableDiskClean stops a VM of each kind of busybox image
// (busybox as init; no init, the agent stays PID 1) with a process that
// ignores SIGTERM holding a file open for writing on the root: the stop
// must still end with the writable disk remounted read-only (no journal to
// replay: the host's file says so, and the guest kernel's log at the next
// start has no "recovery complete"), the image's ::shutdown actions run,
// and the data written before the stop there after the start.
func TestStopLeavesWritableDiskClean(t *testing.T) {
	h, d, _ := realHome(t)
	img := copyIntoHome(t, h, busyboxInitImage(t, testenv.BusyboxRootfs(t, 64)))
	mustBanger(t, h, "image", "import", img, "--name", "bbinit")
	os.Remove(img)

	for _, c := range []struct {
		name, image string
		init        bool
	}{
		{"initbb", "bbinit", true},
		{"noinit", "busybox", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			pid1 := "/init"
			if c.init {
				pid1 = "busybox"
			}
			stopLeavesDiskClean(t, h, d, c.name, c.image, pid1, nil, c.init)
		})
	}
}

// TestStopSystemdLeavesWritableDiskClean is TestStopLeavesWritableDiskClean
// for a systemd image (Debian bookworm with systemd-sysv, built with
// debootstrap): systemd-shutdown never sees the writable disk, so the agent
// takes over at its SIGTERM. The process ignoring SIGTERM was started by the
// agent (in init.scope: systemd's unit stop leaves it alone) and
// systemd-shutdown would wait 90 s for it; the stop must not. A unit's
// ExecStop leaves the mark: systemd's own stop of its units still runs.
func TestStopSystemdLeavesWritableDiskClean(t *testing.T) {
	testenv.RequireQEMU(t)
	if os.Geteuid() != 0 {
		t.Skip("debootstrap without root needs fakechroot; this test builds the systemd image on the root path, as TestRunPreparesDefaults does (CI is root)")
	}
	for _, tool := range []string{"debootstrap", "apt-get"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (the systemd image is built with debootstrap from the host's apt mirror): %v", tool, err)
		}
	}
	h := home(t)
	deb := copyIntoHome(t, h, testenv.KernelPackage(t))
	d := startDaemon(t, h, "BANGER_VMM=qemu")
	mustBanger(t, h, "kernel", "import", "--deb", deb, "--name", "debian")
	os.Remove(deb)
	mustBanger(t, h, "image", "build", "--debootstrap", "bookworm", "--packages", "systemd-sysv", "--name", "deb-systemd")
	const unit = `[Unit]
Description=leaves a mark when systemd stops it
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sh -c "echo ran > /root/shutdown-ran"
`
	stopLeavesDiskClean(t, h, d, "sd", "deb-systemd", "/systemd", func() {
		// The agent serves before systemd has its socket up. (systemd
		// stays "starting" for 90 s: without udev, dev-ttyS0.device never
		// comes for serial-getty.)
		testenv.WaitFor(t, 60*time.Second, "systemd's socket", func() bool {
			_, _, code := banger(t, h, "exec", "sd", "--", "test", "-S", "/run/systemd/private")
			return code == 0
		})
		mustBanger(t, h, "exec", "sd", "--", "sh", "-c",
			"printf '%s' '"+unit+"' > /etc/systemd/system/mark.service && systemctl daemon-reload && systemctl start mark.service")
	}, true)
}

// stopLeavesDiskClean creates VM name of image (PID 1's executable must
// contain pid1), runs prepare, writes a file, starts a process that ignores
// SIGTERM holding a file open for writing, stops the VM and checks the
// writable disk: clean on the host, no journal replayed at the next start,
// the file there, and (mark) /root/shutdown-ran written by the image's
// shutdown.
func stopLeavesDiskClean(t *testing.T, h string, d *daemonProc, name, image, pid1 string, prepare func(), mark bool) {
	t.Helper()
	if _, errOut, code := banger(t, h, "vm", "create", name, "--image", image, "--memory", "256M", "--disk", "256M"); code != 0 {
		t.Fatalf("create: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	v := showVM(t, h, name)
	t.Cleanup(func() { banger(t, h, "vm", "delete", name, "--force") })
	if got := mustBanger(t, h, "exec", name, "--", "readlink", "/proc/1/exe"); !strings.Contains(got, pid1) {
		t.Fatalf("PID 1 is %q, want %q", got, pid1)
	}
	if prepare != nil {
		prepare()
	}
	mustBanger(t, h, "exec", name, "--", "sh", "-c", "echo kept > /root/kept")
	// Holds /root/held open for writing and ignores SIGTERM: only
	// SIGKILL lets the writable disk go read-only.
	mustBanger(t, h, "exec", name, "--", "sh", "-c",
		`setsid sh -c 'trap "" TERM; exec 3>>/root/held; while :; do echo x >&3; sleep 1; done' </dev/null >/dev/null 2>&1 &`)
	testenv.WaitFor(t, 10*time.Second, "the stubborn process to start", func() bool {
		out, _, _ := banger(t, h, "exec", name, "--", "cat", "/root/held")
		return strings.Contains(out, "x")
	})

	start := time.Now()
	mustBanger(t, h, "vm", "stop", name, "--timeout", "30s")
	t.Logf("BENCH stop %s: %v (with a process ignoring SIGTERM)", name, time.Since(start).Round(time.Millisecond))
	if v := showVM(t, h, name); v.State != "stopped" || v.LastError != "" {
		t.Fatalf("after stop: %+v", v)
	}
	console, _ := os.ReadFile(filepath.Join(h, "vms", v.ID, "console.log"))
	defer func() {
		if t.Failed() {
			t.Logf("console of the stop:\n%s", console)
		}
	}()
	testenv.RequireCleanExt4(t, filepath.Join(h, "vms", v.ID, "rw.ext4"))

	mustBanger(t, h, "vm", "start", name)
	dmesg := mustBanger(t, h, "exec", name, "--", "sh", "-c", "dmesg | grep EXT4-fs")
	if strings.Count(dmesg, "mounted filesystem") < 2 {
		t.Fatalf("the guest kernel's log lacks the image's and the writable disk's mounts:\n%s", dmesg)
	}
	if strings.Contains(dmesg, "recovery complete") || strings.Contains(dmesg, "orphan cleanup") {
		t.Fatalf("the writable disk's journal was replayed at start:\n%s", dmesg)
	}
	if out := mustBanger(t, h, "exec", name, "--", "cat", "/root/kept"); strings.TrimSpace(out) != "kept" {
		t.Fatalf("file written before the stop: %q", out)
	}
	if mark {
		if out := mustBanger(t, h, "exec", name, "--", "cat", "/root/shutdown-ran"); strings.TrimSpace(out) != "ran" {
			t.Fatalf("the image's shutdown action did not run: %q", out)
		}
	}
}
