package qemu

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
)

func requireQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		t.Skipf("qemu-system-x86_64 not installed: %v", err)
	}
}

func TestStartFailureSaysWhy(t *testing.T) {
	requireQEMU(t)
	dir := shortDir(t)
	notKernel := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(notKernel, []byte("this is not a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := New(Options{Accel: AccelTCG})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := d.Start(ctx, vmm.MachineConfig{
		VMID: "fail1", Dir: filepath.Join(dir, "vm"), VCPUs: 1, MemoryMiB: 64, KernelPath: notKernel,
	})
	if err == nil || !strings.Contains(err.Error(), "qemu failed to start") || !strings.Contains(err.Error(), "kernel") {
		t.Fatalf("err = %v, want qemu's own reason", err)
	}
	t.Logf("error shown to the user: %v", err)
	if _, err := os.Stat(filepath.Join(dir, "vm", "qmp.sock")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("QMP socket left behind: %v", err)
	}
}

func TestStartRejectsLongSocketPath(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	k := filepath.Join(t.TempDir(), "k")
	os.WriteFile(k, []byte("x"), 0o644)
	d := New(Options{Accel: AccelTCG, Binary: os.Args[0]})
	d.binCache[os.Args[0]] = binaryInfo{version: "fake"}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := d.Start(ctx, vmm.MachineConfig{VMID: "x", Dir: dir, VCPUs: 1, MemoryMiB: 64, KernelPath: k})
	if err == nil || !strings.Contains(err.Error(), "longer than the 107") {
		t.Fatalf("err = %v", err)
	}
}

// shortDir returns a temporary directory with a short path (unix sockets).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "bq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}
