package qemu

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// echoOverAgent sends msg over the serial agent channel and expects it back.
func echoOverAgent(t *testing.T, inst vmm.Instance, msg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", inst.Handles().Channel.Path)
	if err != nil {
		t.Fatalf("dial agent socket: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := c.Write([]byte(msg + "\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != msg+"\n" {
		b, _ := os.ReadFile(inst.Handles().ConsoleLog)
		t.Fatalf("echo of %q over the agent channel = %q, %v; console tail:\n%s", msg, line, err, tail(b, 1500))
	}
}

var tickRe = regexp.MustCompile(`tick (\d+)`)

// lastTick is the highest counter value on the console, 0 when none.
func lastTick(path string) int {
	b, _ := os.ReadFile(path)
	n := 0
	for _, m := range tickRe.FindAllStringSubmatch(string(b), -1) {
		if v, _ := strconv.Atoi(m[1]); v > n {
			n = v
		}
	}
	return n
}

func waitTick(t *testing.T, inst vmm.Instance, above int) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if n := lastTick(inst.Handles().ConsoleLog); n > above {
			return n
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(inst.Handles().ConsoleLog)
			t.Fatalf("the guest's counter did not pass %d; console tail:\n%s", above, tail(b, 1500))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// memTmpfs says whether the test driver's memory directory can be used:
// /dev/shm is a tmpfs with room for the test guests (a container's is often
// 64 MiB).
func memTmpfs(t *testing.T) bool {
	t.Helper()
	var st unix.Statfs_t
	return unix.Statfs("/dev/shm", &st) == nil && st.Type == tmpfsMagic && int64(st.Bavail)*int64(st.Bsize) >= 2<<30
}

var fallbackMemo struct {
	once sync.Once
	d    *Driver
	dir  string
}

// fallbackDriver is a driver whose only memory directory is unusable (a
// link to a directory, which a driver must not follow), so its guests get
// anonymous memory and their snapshots stream all of it.
func fallbackDriver(t *testing.T) *Driver {
	fallbackMemo.once.Do(func() {
		base := "/dev/shm" // a tmpfs: the link, not the filesystem, is what is refused
		if _, err := os.Stat(base); err != nil {
			base = ""
		}
		target, err := os.MkdirTemp(base, "bq-memtarget")
		if err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(target, "link") // a link to the directory it is in
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		fallbackMemo.dir = target
		fallbackMemo.d = New(Options{Accel: os.Getenv("BANGER_TEST_QEMU_ACCEL"), MemoryDirs: []string{link}})
	})
	return fallbackMemo.d
}

// qemuArgs is the command line of an instance's QEMU.
func qemuArgs(t *testing.T, inst vmm.Instance) string {
	t.Helper()
	a, err := system.ProcessCmdline(inst.Handles().PID)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(a, " ")
}

func killInst(t *testing.T, inst vmm.Instance) {
	t.Helper()
	kctx, kcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer kcancel()
	if err := inst.Kill(kctx); err != nil {
		t.Errorf("kill: %v", err)
	}
}

// saveSnapshot pauses inst, saves its state into a new directory and
// resumes it; it returns the directory and the tick it paused at.
func saveSnapshot(t *testing.T, inst vmm.Instance) (string, vmm.SavedState, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	snap := inst.(vmm.Snapshotter)
	began := time.Now()
	if err := snap.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	atPause := lastTick(inst.Handles().ConsoleLog)
	dir := filepath.Join(shortDir(t), "s")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	saved, err := snap.SaveState(ctx, dir)
	if err != nil {
		t.Fatalf("SaveState: %v", err)
	}
	t.Logf("pause + save took %v; state %v uses %d bytes", time.Since(began).Round(time.Millisecond), saved.Files, saved.Bytes)
	if err := snap.Resume(ctx); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	return dir, saved, atPause
}

// restoreClone restores the state in dir as a new VM shaped like cfg and
// checks it resumed (no boot, the counter went on from atPause) and answers.
func restoreClone(t *testing.T, d *Driver, cfg vmm.MachineConfig, dir string, atPause int, suffix string) (vmm.Instance, vmm.MachineConfig) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	clone := cfg
	clone.VMID = cfg.VMID + suffix
	clone.Dir = filepath.Join(shortDir(t), "vm")
	began := time.Now()
	restored, err := d.Restore(ctx, clone, dir)
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
	took := time.Since(began)
	t.Cleanup(func() { killInst(t, restored) })
	if st, err := restored.State(ctx); err != nil || st != vmm.StateRunning {
		t.Fatalf("restored State = %q, %v", st, err)
	}
	echoOverAgent(t, restored, "clone "+suffix+" after the restore")
	t.Logf("restore to running took %v; to an echo %v", took.Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
	waitTick(t, restored, atPause)
	b, _ := os.ReadFile(restored.Handles().ConsoleLog)
	if strings.Contains(string(b), readyMarker) {
		t.Errorf("the restored guest booted again instead of resuming:\n%s", tail(b, 1500))
	}
	if first := tickRe.FindStringSubmatch(string(b)); first != nil {
		if v, _ := strconv.Atoi(first[1]); v < atPause {
			t.Errorf("the clone's counter went back: first tick %d, paused at %d", v, atPause)
		}
	}
	return restored, clone
}

// A real guest is paused, saved, resumed, and restored into a second QEMU:
// the restored guest keeps the source's memory (its counter keeps counting
// from where it was, no boot) and its agent channel answers. Once with the
// guest's memory in a tmpfs file (the stream holds only the devices, the
// memory is a sparse file the clone maps privately and never writes), once
// with anonymous memory because the memory directory is unusable (the whole
// memory in the stream), restored as a format 1 snapshot (no qemu.meta).
func TestSnapshotSaveAndRestore(t *testing.T) {
	for _, tc := range []struct {
		name     string
		driver   func(*testing.T) *Driver
		fileMode bool
	}{
		{"memory file", func(*testing.T) *Driver { return testDriver() }, true},
		{"anonymous memory fallback", fallbackDriver, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.fileMode && !memTmpfs(t) {
				t.Skip("/dev/shm is not a tmpfs with 2 GiB free here: guests get anonymous memory")
			}
			d := tc.driver(t)
			inst, cfg := bootWith(t, d, "snapshot", nil)
			if inst.Handles().Channel.Kind != vmm.ChannelSerial {
				t.Skip("the echo check uses the virtio-serial channel; this host has vhost-vsock")
			}
			memFile := inst.Handles().MemFile
			args := qemuArgs(t, inst)
			if tc.fileMode {
				if memFile != filepath.Join(testMemDir, cfg.VMID+memFileSuffix) || !strings.Contains(args, "share=on") {
					t.Fatalf("memory file %q; qemu args: %s", memFile, args)
				}
				if fi, err := os.Lstat(memFile); err != nil || fi.Mode().Perm() != 0o600 {
					t.Fatalf("memory file: %v %v", fi, err)
				}
				if fi, err := os.Lstat(testMemDir); err != nil || fi.Mode().Perm() != 0o700 {
					t.Fatalf("memory directory: %v %v", fi, err)
				}
			} else if memFile != "" || strings.Contains(args, "memory-backend") {
				t.Fatalf("fallback guest has memory file %q; qemu args: %s", memFile, args)
			}
			if ents, _ := os.ReadDir(fallbackMemo.dir); !tc.fileMode && len(ents) != 1 {
				t.Fatalf("the driver followed the link to %s: %v", fallbackMemo.dir, ents)
			}
			waitConsole(t, inst, "agent port open", bootTimeout)
			waitTick(t, inst, 2)
			echoOverAgent(t, inst, "before the snapshot")

			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if _, err := inst.(vmm.Snapshotter).SaveState(ctx, t.TempDir()); err == nil || !strings.Contains(err.Error(), "pause it first") {
				t.Fatalf("SaveState of a running machine: %v", err)
			}
			stateDir, saved, atPause := saveSnapshot(t, inst)
			if saved.Bytes <= 0 || saved.Bytes >= int64(cfg.MemoryMiB)<<20 {
				t.Errorf("saved state uses %d bytes; want more than 0 and less than the %d MiB of guest memory", saved.Bytes, cfg.MemoryMiB)
			}
			if _, err := os.Stat(filepath.Join(stateDir, migSockName)); !os.IsNotExist(err) {
				t.Errorf("migration socket left behind: %v", err)
			}
			stream, _ := os.Stat(filepath.Join(stateDir, stateFileName))
			ramPath := filepath.Join(stateDir, snapRAMName)
			var ramHash string
			if tc.fileMode {
				// Device state only: the memory is in qemu.ram, sparse.
				if stream.Size() > 4<<20 {
					t.Errorf("the stream is %d bytes; with the memory in a file it should hold only device state", stream.Size())
				}
				fi, err := os.Stat(ramPath)
				if err != nil || fi.Size() != int64(cfg.MemoryMiB)<<20 {
					t.Fatalf("qemu.ram: %v %v", fi, err)
				}
				if use, _ := vmmproc.DiskUse(ramPath); use <= 0 || use >= fi.Size()/2 {
					t.Errorf("qemu.ram uses %d bytes of its %d: not sparse", use, fi.Size())
				}
				ramHash = testenv.FileSHA256(t, ramPath)
			} else {
				if stream.Size() < 4<<20 {
					t.Errorf("the stream is %d bytes; without a memory file it should hold the memory", stream.Size())
				}
				if _, err := os.Stat(ramPath); !os.IsNotExist(err) {
					t.Errorf("qemu.ram in a fallback snapshot: %v", err)
				}
				// What a snapshot taken before format 2 looks like.
				if err := os.Remove(filepath.Join(stateDir, snapMetaName)); err != nil {
					t.Fatal(err)
				}
			}

			// The source runs on.
			waitTick(t, inst, atPause+1)
			echoOverAgent(t, inst, "source after the snapshot")

			restored, _ := restoreClone(t, d, cfg, stateDir, atPause, "c")
			if tc.fileMode {
				if a := qemuArgs(t, restored); !strings.Contains(a, "mem-path=/dev/fd/3,share=off") || restored.Handles().MemFile != "" {
					t.Errorf("the clone's memory is not a private mapping of the snapshot: %s", a)
				}
			}
			// Both run at once.
			echoOverAgent(t, inst, "source while the clone runs")
			echoOverAgent(t, restored, "clone while the source runs")
			if tc.fileMode {
				// The clone wrote to its memory (its counter ran on): none
				// of it reached the snapshot.
				if got := testenv.FileSHA256(t, ramPath); got != ramHash {
					t.Error("the snapshot's memory file changed while a clone ran from it")
				}
				killInst(t, inst)
				if _, err := os.Lstat(memFile); !os.IsNotExist(err) {
					t.Errorf("the memory file outlived its QEMU: %v", err)
				}
			}
		})
	}
}

// Fork of a fork: a clone mapping a snapshot's memory privately has no
// memory file of its own, so its snapshot streams the whole memory; a VM
// restored from that gets a memory file again, and its snapshot is a
// memory-file one. The clone keeps running after its snapshot's files are
// removed (the mapping outlives the name).
func TestSnapshotOfAClone(t *testing.T) {
	if !memTmpfs(t) {
		t.Skip("/dev/shm is not a tmpfs with 2 GiB free here: guests get anonymous memory")
	}
	d := testDriver()
	src, cfg := bootWith(t, d, "snapshot", nil)
	if src.Handles().Channel.Kind != vmm.ChannelSerial {
		t.Skip("the echo check uses the virtio-serial channel; this host has vhost-vsock")
	}
	waitConsole(t, src, "agent port open", bootTimeout)
	waitTick(t, src, 2)
	s1, _, at1 := saveSnapshot(t, src)
	a, acfg := restoreClone(t, d, cfg, s1, at1, "a")
	if err := os.RemoveAll(s1); err != nil {
		t.Fatal(err)
	}
	s2, saved2, at2 := saveSnapshot(t, a)
	if slices.Contains(saved2.Files, snapRAMName) {
		t.Fatalf("the snapshot of a clone has a memory file: %v", saved2.Files)
	}
	if m, err := readSnapMeta(s2); err != nil || m.Memory != "stream" {
		t.Fatalf("meta of the clone's snapshot: %+v %v", m, err)
	}
	echoOverAgent(t, a, "clone a after its snapshot's files are gone")
	b, bcfg := restoreClone(t, d, acfg, s2, at2, "b")
	if b.Handles().MemFile == "" {
		t.Fatal("a VM restored from a streamed snapshot has no memory file")
	}
	s3, saved3, at3 := saveSnapshot(t, b)
	if !slices.Contains(saved3.Files, snapRAMName) {
		t.Fatalf("the snapshot of b has no memory file: %v", saved3.Files)
	}
	c, _ := restoreClone(t, d, bcfg, s3, at3, "c")
	echoOverAgent(t, a, "a at the end")
	echoOverAgent(t, c, "c at the end")
}

// A damaged state file fails the restore and leaves nothing running.
func TestRestoreRefusesGarbage(t *testing.T) {
	vmlinux, initrd := testKernel(t)
	stateDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(stateDir, stateFileName), []byte("not a migration stream"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := vmm.MachineConfig{
		VMID: fmt.Sprintf("g%x", time.Now().UnixNano()), Dir: filepath.Join(shortDir(t), "vm"),
		VCPUs: 1, MemoryMiB: 256, KernelPath: vmlinux, InitrdPath: initrd, GuestPort: 1024,
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := testDriver().Restore(ctx, cfg, stateDir)
	if err == nil {
		t.Fatal("restored from garbage")
	}
	t.Logf("error: %v", err)
	if pids := qemuFor(cfg.VMID); len(pids) > 0 {
		t.Fatalf("qemu left running: %v", pids)
	}
}

// qemuFor lists live processes whose command line names the VM id.
func qemuFor(vmID string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		args, err := system.ProcessCmdline(pid)
		if err == nil && strings.Contains(strings.Join(args, " "), namePrefix+vmID+",") {
			pids = append(pids, pid)
		}
	}
	return pids
}
