package fakefc

import (
	"os"
	"path/filepath"
	"testing"
)

// The snapshot order rules of snapshot-support.md: create only while
// paused (and only after boot), load only on a fresh process (nothing but
// the logger and metrics configured), once; a failed load ends the process.
func TestSnapshotOrderRules(t *testing.T) {
	f := newFixture(t, "")
	state, mem := filepath.Join(f.dir, "vmstate"), filepath.Join(f.dir, "mem")
	create := map[string]any{"snapshot_path": state, "mem_file_path": mem, "snapshot_type": "Full"}
	f.refused("PUT", "/snapshot/create", create, "before starting")
	f.refused("PATCH", "/vm", map[string]any{"state": "Paused"}, "before starting")
	f.configure()
	f.ok("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": filepath.Join(f.dir, "v.sock")})
	f.refused("PUT", "/snapshot/load", map[string]any{"snapshot_path": state, "mem_backend": map[string]any{"backend_path": mem, "backend_type": "File"}}, "not allowed after configuring")
	f.ok("PUT", "/actions", map[string]any{"action_type": "InstanceStart"})
	f.refused("PUT", "/snapshot/create", create, "not paused")
	f.ok("PATCH", "/vm", map[string]any{"state": "Paused"})
	f.ok("PUT", "/snapshot/create", create)
	if fi, err := os.Stat(mem); err != nil || fi.Size() != 256<<20 {
		t.Fatalf("memory file: %v, %v", fi, err)
	}
	f.ok("PATCH", "/vm", map[string]any{"state": "Resumed"})
	f.refused("PUT", "/snapshot/load", map[string]any{"snapshot_path": state, "mem_file_path": mem}, "pre-boot only")

	// A fresh process: logger and metrics may come first, then one load.
	g := newFixture(t, "")
	g.ok("PUT", "/logger", map[string]any{"log_path": g.files["fc.log"], "level": "Info"})
	g.refused("PUT", "/snapshot/load", map[string]any{"snapshot_path": state, "mem_file_path": mem, "mem_backend": map[string]any{"backend_path": mem, "backend_type": "File"}}, "mutually exclusive")
	load := map[string]any{
		"snapshot_path":     state,
		"mem_backend":       map[string]any{"backend_path": mem, "backend_type": "File"},
		"vsock_override":    map[string]any{"uds_path": filepath.Join(g.dir, "v.sock")},
		"network_overrides": []any{},
	}
	g.ok("PUT", "/snapshot/load", load)
	g.refused("PUT", "/snapshot/load", load, "pre-boot only")
	g.refused("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 128}, "after starting")
	g.ok("PATCH", "/vm", map[string]any{"state": "Resumed"})

	// A load that fails ends the process, as Firecracker does.
	h := newFixture(t, "")
	h.refused("PUT", "/snapshot/load", map[string]any{"snapshot_path": h.files["rootfs"], "mem_file_path": mem}, "not a snapshot")
	if code := <-h.srv.Exit(); code != 1 {
		t.Fatalf("exit code after a failed load = %d, want 1", code)
	}
}
