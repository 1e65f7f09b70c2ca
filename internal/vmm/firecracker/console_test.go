package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc/fakefctest"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

func consoleDiskUse(path string) int64 {
	var n int64
	for _, p := range []string{path, vmmproc.RotatedName(path)} {
		if fi, err := os.Stat(p); err == nil {
			n += fi.Size()
		}
	}
	return n
}

func waitConsole(t *testing.T, path, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !fakefctest.Contains(path, want) {
		if time.Now().After(deadline) {
			t.Fatalf("console log %s has no %q after %v (%d bytes on disk)", path, want, timeout, consoleDiskUse(path))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A guest that writes 50 MiB to its console leaves at most the cap on disk,
// and the console keeps being captured after a bangerd restart (Adopt).
func TestConsoleLogIsCapped(t *testing.T) {
	fc := fakefctest.Setup(t)
	t.Setenv(fakefc.EnvConsoleBytes, strconv.Itoa(50<<20))
	d := New(Options{Binary: fc.Binary})
	cfg := machine(t)
	inst := start(t, d, cfg)
	log := filepath.Join(cfg.Dir, ConsoleLogName)
	waitConsole(t, log, "fakefc: console spew done", 60*time.Second)
	if got, limit := consoleDiskUse(log), int64(vmmproc.ConsoleFiles*vmmproc.ConsoleFileMax); got > limit {
		t.Fatalf("console log uses %d bytes after 50 MiB of output; cap %d", got, limit)
	}

	// A new bangerd adopts the VMM and reads the same FIFO.
	d2 := New(Options{Binary: fc.Binary})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	adopted, err := d2.Adopt(ctx, inst.Handles())
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if err := adopted.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	waitConsole(t, log, "reboot: Power down", 10*time.Second)
	if _, err := adopted.Wait(ctx); err != nil {
		t.Fatal(err)
	}
}
