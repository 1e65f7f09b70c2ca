package qemu

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
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

// A real guest is paused, saved, resumed, and restored into a second QEMU:
// the restored guest keeps the source's memory (its counter keeps counting
// from where it was, no boot) and its agent channel answers.
func TestSnapshotSaveAndRestore(t *testing.T) {
	inst, cfg := boot(t, "snapshot", nil)
	if inst.Handles().Channel.Kind != vmm.ChannelSerial {
		t.Skip("the echo check uses the virtio-serial channel; this host has vhost-vsock")
	}
	waitConsole(t, inst, "agent port open", bootTimeout)
	waitTick(t, inst, 2)
	echoOverAgent(t, inst, "before the snapshot")

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	snap := inst.(vmm.Snapshotter)
	if _, err := snap.SaveState(ctx, t.TempDir()); err == nil || !strings.Contains(err.Error(), "pause it first") {
		t.Fatalf("SaveState of a running machine: %v", err)
	}
	began := time.Now()
	if err := snap.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := inst.State(ctx); err != nil || st != vmm.StatePaused {
		t.Fatalf("State after Pause = %q, %v", st, err)
	}
	atPause := lastTick(inst.Handles().ConsoleLog)
	stateDir := filepath.Join(shortDir(t), "s")
	if err := os.Mkdir(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	saved, err := snap.SaveState(ctx, stateDir)
	if err != nil {
		t.Fatalf("SaveState: %v", err)
	}
	t.Logf("pause + save took %v; state %v uses %d bytes for a %d MiB guest", time.Since(began).Round(time.Millisecond), saved.Files, saved.Bytes, cfg.MemoryMiB)
	if saved.Bytes <= 0 || saved.Bytes >= int64(cfg.MemoryMiB)<<20 {
		t.Errorf("saved state uses %d bytes; want more than 0 and less than the %d MiB of guest memory", saved.Bytes, cfg.MemoryMiB)
	}
	if _, err := os.Stat(filepath.Join(stateDir, migSockName)); !os.IsNotExist(err) {
		t.Errorf("migration socket left behind: %v", err)
	}

	// The source runs on.
	if err := snap.Resume(ctx); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	waitTick(t, inst, atPause+1)
	echoOverAgent(t, inst, "source after the snapshot")

	// A clone: another VM id and directory, the same machine shape.
	clone := cfg
	clone.VMID = cfg.VMID + "c"
	clone.Dir = filepath.Join(shortDir(t), "vm")
	began = time.Now()
	restored, err := testDriver().Restore(ctx, clone, stateDir)
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
	took := time.Since(began)
	t.Cleanup(func() {
		kctx, kcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer kcancel()
		restored.Kill(kctx)
	})
	if st, err := restored.State(ctx); err != nil || st != vmm.StateRunning {
		t.Fatalf("restored State = %q, %v", st, err)
	}
	echoOverAgent(t, restored, "clone after the restore")
	t.Logf("restore to running took %v; to an echo %v", took.Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
	n := waitTick(t, restored, atPause)
	b, _ := os.ReadFile(restored.Handles().ConsoleLog)
	if strings.Contains(string(b), readyMarker) {
		t.Errorf("the restored guest booted again instead of resuming:\n%s", tail(b, 1500))
	}
	if first := tickRe.FindStringSubmatch(string(b)); first != nil {
		if v, _ := strconv.Atoi(first[1]); v < atPause {
			t.Errorf("the clone's counter went back: first tick %d, paused at %d", v, atPause)
		}
	}
	t.Logf("source paused at tick %d; clone reached tick %d", atPause, n)
	// Both run at once.
	echoOverAgent(t, inst, "source while the clone runs")
	echoOverAgent(t, restored, "clone while the source runs")
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
