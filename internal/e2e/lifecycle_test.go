package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

type vmJSON struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	State     string `json:"state"`
	LastError string `json:"last_error"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
}

// realHome prepares a BANGER_HOME with the Debian cloud kernel and a busybox
// image imported through the CLI, and a running bangerd (as nobody when the
// tests run as root: see daemonUID).
func realHome(t *testing.T) (string, *daemonProc, string) {
	t.Helper()
	return realHomeEnv(t)
}

// realHomeEnv is realHome with bangerd given extra environment (KEY=VALUE).
func realHomeEnv(t *testing.T, env ...string) (string, *daemonProc, string) {
	t.Helper()
	testenv.RequireQEMU(t)
	if _, err := os.Stat(filepath.Join(repoRoot(t), "cmd", "banger-agent", "main.go")); err != nil {
		t.Fatalf("cmd/banger-agent is missing: %v", err)
	}
	deb := testenv.KernelPackage(t)
	k := testenv.GuestKernel(t)
	rootfs := testenv.BusyboxRootfs(t, 64)
	h := home(t)
	deb, rootfs = copyIntoHome(t, h, deb), copyIntoHome(t, h, rootfs)
	d := startUserDaemon(t, h, append([]string{"BANGER_VMM=qemu"}, env...)...)
	mustBanger(t, h, "kernel", "import", "--deb", deb, "--name", "debian")
	mustBanger(t, h, "image", "import", rootfs, "--name", "busybox")
	os.Remove(deb)
	os.Remove(rootfs)
	return h, d, k.Version
}

func mustBanger(t *testing.T, h string, args ...string) string {
	t.Helper()
	out, errOut, code := banger(t, h, args...)
	if code != 0 {
		t.Fatalf("banger %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func showVM(t *testing.T, h, name string) vmJSON {
	t.Helper()
	var v vmJSON
	out := mustBanger(t, h, "vm", "show", name, "-o", "json")
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("vm show: %v: %q", err, out)
	}
	return v
}

func vmmPID(t *testing.T, h, id string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h, "vms", id, "handles.json"))
	if err != nil {
		t.Fatalf("handles.json: %v", err)
	}
	var hs struct {
		PID int `json:"pid"`
	}
	json.Unmarshal(b, &hs)
	if hs.PID <= 0 {
		t.Fatalf("no pid in handles.json: %s", b)
	}
	return hs.PID
}

func TestLifecycleRealGuest(t *testing.T) {
	h, d, kver := realHome(t)

	start := time.Now()
	_, errOut, code := banger(t, h, "vm", "create", "alpha", "--memory", "256M", "--disk", "256M")
	if code != 0 {
		t.Fatalf("create: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	t.Logf("create → running in %v; stages:\n%s", time.Since(start), errOut)
	for _, st := range []string{"prepare host", "boot", "wait for agent"} {
		if !strings.Contains(errOut, st) {
			t.Errorf("create progress lacks stage %q: %s", st, errOut)
		}
	}
	v := showVM(t, h, "alpha")
	if v.State != "running" {
		t.Fatalf("state %s", v.State)
	}
	out := mustBanger(t, h, "exec", "alpha", "--", "uname", "-r")
	if strings.TrimSpace(out) != kver {
		t.Fatalf("uname -r = %q, want %q", out, kver)
	}
	// exit status and stderr come back
	_, errOut, code = banger(t, h, "exec", "alpha", "--", "sh", "-c", "echo oops >&2; exit 7")
	if code != 7 || strings.TrimSpace(errOut) != "oops" {
		t.Fatalf("exit 7: got %d, stderr %q", code, errOut)
	}
	// the root overlay is writable and survives a restart; the image is untouched
	mustBanger(t, h, "exec", "alpha", "--", "sh", "-c", "echo kept > /root/note")
	// space freed in the guest goes back to the host at once (discard on
	// the writable disk, discard=unmap on QEMU's drive), not only at delete
	rw := filepath.Join(h, "vms", v.ID, "rw.ext4")
	mustBanger(t, h, "exec", "alpha", "--", "dd", "if=/dev/zero", "of=/root/big", "bs=1M", "count=32", "conv=fsync")
	full := diskUsage(rw)
	mustBanger(t, h, "exec", "alpha", "--", "sh", "-c", "rm /root/big && sync")
	testenv.WaitFor(t, 10*time.Second, "the host's file to shrink after a delete in the guest", func() bool { return diskUsage(rw) <= full-24<<20 })

	mustBanger(t, h, "vm", "stop", "alpha", "--timeout", "30s")
	if v := showVM(t, h, "alpha"); v.State != "stopped" || v.LastError != "" {
		t.Fatalf("after stop: %+v", v)
	}
	mustBanger(t, h, "vm", "start", "alpha")
	if out := mustBanger(t, h, "exec", "alpha", "--", "cat", "/root/note"); strings.TrimSpace(out) != "kept" {
		t.Fatalf("file written before stop: %q", out)
	}
	mustBanger(t, h, "vm", "restart", "alpha")
	if v := showVM(t, h, "alpha"); v.State != "running" {
		t.Fatalf("after restart: %+v", v)
	}
	mustBanger(t, h, "vm", "kill", "alpha")
	if v := showVM(t, h, "alpha"); v.State != "stopped" {
		t.Fatalf("after kill: %+v", v)
	}
	// set: disks only grow; cpus, memory and disk apply at the next start
	if _, errOut, code := banger(t, h, "vm", "set", "alpha", "--disk", "128M"); code != 1 || !strings.Contains(errOut, "only grow") {
		t.Fatalf("shrinking the disk: %d %s", code, errOut)
	}
	// 8G needs more group descriptor blocks than the 256M disk has (1 KiB
	// blocks: 31 more meta groups); the guest adds them online (meta_bg).
	mustBanger(t, h, "vm", "set", "alpha", "--cpus", "2", "--memory", "320M", "--disk", "8G")
	// delete of a running VM needs --force
	mustBanger(t, h, "vm", "start", "alpha")
	if out := mustBanger(t, h, "exec", "alpha", "--", "nproc"); strings.TrimSpace(out) != "2" {
		t.Fatalf("nproc after set --cpus 2: %q", out)
	}
	out = mustBanger(t, h, "exec", "alpha", "--", "sh", "-c", "df -k / | tail -1 | awk '{print $2}'; grep MemTotal /proc/meminfo | awk '{print $2}'")
	f := strings.Fields(out)
	if len(f) != 2 {
		t.Fatalf("df/meminfo: %q", out)
	}
	if rootKiB, _ := strconv.Atoi(f[0]); rootKiB < 7<<20 {
		t.Fatalf("root filesystem %d KiB after growing the disk to 8G", rootKiB)
	}
	if memKiB, _ := strconv.Atoi(f[1]); memKiB < 270<<10 {
		t.Fatalf("MemTotal %d KiB after set --memory 320M", memKiB)
	}
	if out := mustBanger(t, h, "exec", "alpha", "--", "cat", "/root/note"); strings.TrimSpace(out) != "kept" {
		t.Fatalf("data lost growing the disk: %q", out)
	}
	// the guest grew its filesystem (the host only lengthened the file)
	if out := mustBanger(t, h, "logs", "alpha"); !strings.Contains(out, "grew the writable disk's filesystem") {
		t.Fatalf("the agent did not report growing the writable disk; console:\n%s", out)
	}
	// and the grown filesystem is clean
	mustBanger(t, h, "vm", "stop", "alpha", "--timeout", "30s")
	fsckCopy(t, filepath.Join(h, "vms", v.ID, "rw.ext4"))
	mustBanger(t, h, "vm", "start", "alpha")
	if out := mustBanger(t, h, "vm", "set", "alpha", "--cpus", "1"); !strings.Contains(out, "next start") {
		t.Fatalf("set on a running VM does not say when it applies: %q", out)
	}
	if _, errOut, code := banger(t, h, "vm", "delete", "alpha"); code != 1 || !strings.Contains(errOut, "--force") {
		t.Fatalf("delete running without --force: %d %s", code, errOut)
	}
	pid := vmmPID(t, h, v.ID)
	mustBanger(t, h, "vm", "delete", "alpha", "--force")
	if _, err := os.Stat(filepath.Join(h, "vms", v.ID)); !os.IsNotExist(err) {
		t.Fatalf("VM directory left after delete: %v", err)
	}
	testenv.WaitFor(t, 10*time.Second, "VMM gone after delete", func() bool { return syscall.Kill(pid, 0) != nil })
}

func TestVMMCrashAndDaemonRestart(t *testing.T) {
	h, d, _ := realHome(t)
	mustBanger(t, h, "vm", "create", "crashy", "--memory", "256M", "--disk", "256M")
	mustBanger(t, h, "vm", "create", "steady", "--memory", "256M", "--disk", "256M")
	crashy, steady := showVM(t, h, "crashy"), showVM(t, h, "steady")

	// kill -9 of a VMM: the VM becomes stopped with a reason, quickly
	pid := vmmPID(t, h, crashy.ID)
	killed := time.Now()
	syscall.Kill(pid, syscall.SIGKILL)
	testenv.WaitFor(t, 5*time.Second, "crashed VM to be marked stopped", func() bool {
		v := showVM(t, h, "crashy")
		return v.State == "stopped" && v.LastError != ""
	})
	t.Logf("VMM death noticed in %v: %q", time.Since(killed), showVM(t, h, "crashy").LastError)
	if _, err := os.Stat(filepath.Join(h, "vms", crashy.ID, "handles.json")); !os.IsNotExist(err) {
		t.Fatalf("handles.json left behind for a dead VM")
	}

	// kill -9 of bangerd: the VM keeps running, a new bangerd adopts it
	spid := vmmPID(t, h, steady.ID)
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
	if syscall.Kill(spid, 0) != nil {
		t.Fatal("VMM died with bangerd")
	}
	d2 := startUserDaemon(t, h, "BANGER_VMM=qemu")
	if v := showVM(t, h, "steady"); v.State != "running" {
		t.Fatalf("after bangerd restart: %+v\n%s", v, d2.logs.String())
	}
	if out := mustBanger(t, h, "exec", "steady", "--", "echo", "adopted"); strings.TrimSpace(out) != "adopted" {
		t.Fatalf("exec after adoption: %q", out)
	}
	// and it still notices the adopted VMM's death
	syscall.Kill(spid, syscall.SIGKILL)
	testenv.WaitFor(t, 5*time.Second, "adopted VM to be marked stopped", func() bool { return showVM(t, h, "steady").State == "stopped" })

	for _, n := range []string{"crashy", "steady"} {
		mustBanger(t, h, "vm", "delete", n)
	}
	entries, _ := os.ReadDir(filepath.Join(h, "vms"))
	if len(entries) != 0 {
		t.Fatalf("VM directories left: %v", entries)
	}
}

// fsckCopy checks a copy of the ext4 filesystem p: its journal replayed if
// it has one to replay (a stop leaves none: TestStopLeavesWritableDiskClean;
// a kill does), then e2fsck -fn must find nothing.
func fsckCopy(t *testing.T, p string) {
	t.Helper()
	if _, err := exec.LookPath("e2fsck"); err != nil {
		t.Logf("e2fsck not installed (e2fsprogs): the filesystem is not checked")
		return
	}
	c := filepath.Join(t.TempDir(), "copy.ext4")
	if out, err := exec.Command("cp", "--sparse=always", p, c).CombinedOutput(); err != nil {
		t.Fatalf("copy %s: %v\n%s", p, err, out)
	}
	// exit 1: the journal replay corrected the superblock's free counts
	if out, err := exec.Command("e2fsck", "-fy", c).CombinedOutput(); err != nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Fatalf("e2fsck -fy: %v\n%s", err, out)
		}
	}
	if out, err := exec.Command("e2fsck", "-fn", c).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn of the writable disk: %v\n%s", err, out)
	}
}

func diskUsage(p string) int64 {
	var st syscall.Stat_t
	if syscall.Stat(p, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}
