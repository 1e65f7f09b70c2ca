package firecracker

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc/fakefctest"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

func vsockEcho(t *testing.T, inst vmm.Instance, msg string) {
	t.Helper()
	ch := inst.Handles().Channel
	conn, err := net2Dial(ch.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "CONNECT %d\n%s\n", ch.Port, msg)
	br := bufio.NewReader(conn)
	if ok, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("vsock answer %q, %v", ok, err)
	}
	if echo, err := br.ReadString('\n'); err != nil || echo != msg+"\n" {
		t.Fatalf("vsock echoed %q, %v", echo, err)
	}
}

// requestsOf lists the API requests one fake instance received.
func requestsOf(recs []fakefc.Record, id string) []fakefc.Record {
	var out []fakefc.Record
	for _, r := range recs {
		if r.ID == id {
			out = append(out, r)
		}
	}
	return out
}

// The whole snapshot sequence against the spec-checking fake, directly and
// under the jailer: pause, create, resume the source; load in a new process
// with the clone's tap and vsock socket, resume; the clone opens its own
// disks and keeps running when the source is gone.
func TestSnapshotSaveAndRestore(t *testing.T) {
	for _, jailed := range []bool{false, true} {
		t.Run(fmt.Sprintf("jailer=%v", jailed), func(t *testing.T) {
			fc := fakefctest.Setup(t)
			opts := Options{Binary: fc.Binary}
			if jailed {
				opts.Jailer = &JailerOptions{Binary: fc.Jailer, UID: os.Getuid(), GID: os.Getgid(), ChrootBaseDir: t.TempDir()}
			}
			d := New(opts)
			cfg := machine(t)
			cfg.VMID = "source-vm"
			cfg.Net = &vmm.NetInterface{Tap: "bgtapsrc", MAC: "06:00:ac:1e:00:05"}
			src := start(t, d, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			snap := src.(vmm.Snapshotter)
			if err := snap.Pause(ctx); err != nil {
				t.Fatal(err)
			}
			if st, err := src.State(ctx); err != nil || st != vmm.StatePaused {
				t.Fatalf("State after Pause = %q, %v", st, err)
			}
			stateDir := t.TempDir()
			saved, err := snap.SaveState(ctx, stateDir)
			if err != nil {
				t.Fatalf("SaveState: %v", err)
			}
			if !reflect.DeepEqual(saved.Files, []string{StateFileName, MemFileName}) || saved.Bytes <= 0 || saved.Bytes >= int64(cfg.MemoryMiB)<<20 {
				t.Errorf("saved state %+v: want both files, using less than the guest's %d MiB", saved, cfg.MemoryMiB)
			}
			// The writable disk, copied while paused.
			cloneDisk := filepath.Join(t.TempDir(), "rw.ext4")
			if _, err := vmmproc.CopySparse(ctx, cfg.Drives[1].Path, cloneDisk); err != nil {
				t.Fatal(err)
			}
			if err := snap.Resume(ctx); err != nil {
				t.Fatal(err)
			}
			if st, err := src.State(ctx); err != nil || st != vmm.StateRunning {
				t.Fatalf("State after Resume = %q, %v", st, err)
			}

			clone := cfg
			clone.VMID = "clone-vm"
			clone.Dir = t.TempDir()
			clone.Drives = append([]vmm.Drive(nil), cfg.Drives...)
			clone.Drives[1].Path = cloneDisk
			clone.Net = &vmm.NetInterface{Tap: "bgtapclone", MAC: "06:00:ac:1e:00:06"}
			restored, err := d.Restore(ctx, clone, stateDir)
			if err != nil {
				t.Fatalf("Restore: %v", err)
			}
			t.Cleanup(func() { killForCleanup(t, restored) })
			if st, err := restored.State(ctx); err != nil || st != vmm.StateRunning {
				t.Fatalf("restored State = %q, %v", st, err)
			}

			recs := fc.APIRequests(t)
			for _, r := range recs {
				if r.Verdict != fakefc.VerdictOK {
					t.Errorf("%s %s %s: verdict %s: %s", r.ID, r.Method, r.Path, r.Verdict, r.Fault)
				}
			}
			wantSrc := []string{"PATCH /vm", "GET /", "PUT /snapshot/create", "PATCH /vm", "GET /"}
			if got := fakefctest.Sequence(requestsOf(recs, "source-vm")); !reflect.DeepEqual(got[len(got)-len(wantSrc):], wantSrc) {
				t.Errorf("source requests end with %q, want %q", got, wantSrc)
			}
			cloneReqs := requestsOf(recs, "clone-vm")
			wantClone := []string{"PUT /logger", "PUT /metrics", "PUT /snapshot/load", "PATCH /vm", "GET /", "GET /"}
			if got := fakefctest.Sequence(cloneReqs); !reflect.DeepEqual(got, wantClone) {
				t.Errorf("clone requests %q, want %q", got, wantClone)
			}
			var load map[string]any
			for _, r := range cloneReqs {
				if r.Path == "/snapshot/load" {
					load = body(t, r)
				}
			}
			fcVsock, fcState, fcMem := filepath.Join(clone.Dir, VsockName), filepath.Join(stateDir, StateFileName), filepath.Join(stateDir, MemFileName)
			if jailed {
				fcVsock, fcState, fcMem = "/"+VsockName, "/"+StateFileName, "/"+MemFileName
			}
			wantLoad := map[string]any{
				"snapshot_path":     fcState,
				"mem_backend":       map[string]any{"backend_path": fcMem, "backend_type": "File"},
				"resume_vm":         false,
				"network_overrides": []any{map[string]any{"iface_id": "eth0", "host_dev_name": "bgtapclone"}},
				"vsock_override":    map[string]any{"uds_path": fcVsock},
			}
			if !reflect.DeepEqual(load, wantLoad) {
				t.Errorf("snapshot/load body\n got %v\nwant %v", load, wantLoad)
			}
			if !jailed {
				if target, _ := os.Readlink(filepath.Join(clone.Dir, "drive-rw")); target != cloneDisk {
					t.Errorf("the clone's rw drive links to %q, want its own copy %s", target, cloneDisk)
				}
			}
			vsockEcho(t, restored, "hello clone")
			vsockEcho(t, src, "hello source")

			// The source goes away; the clone runs on.
			killForCleanup(t, src)
			if st, err := restored.State(ctx); err != nil || st != vmm.StateRunning {
				t.Fatalf("clone State after the source died = %q, %v", st, err)
			}
			vsockEcho(t, restored, "still here")
		})
	}
}

// Wrong orders are refused with Firecracker's words: a snapshot of a running
// machine, and a restore from files that are not a snapshot (which also
// ends the new process, leaving nothing running).
func TestSnapshotWrongOrdersRefused(t *testing.T) {
	fc := fakefctest.Setup(t)
	fc.AllowViolations()
	d := New(Options{Binary: fc.Binary})
	cfg := machine(t)
	src := start(t, d, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stateDir := t.TempDir()
	_, err := src.(vmm.Snapshotter).SaveState(ctx, stateDir)
	if err == nil || !strings.Contains(err.Error(), "not paused") {
		t.Fatalf("SaveState of a running machine: %v", err)
	}
	if ents, _ := os.ReadDir(stateDir); len(ents) != 0 {
		t.Errorf("a refused snapshot left files: %v", ents)
	}

	bad := t.TempDir()
	for _, n := range []string{StateFileName, MemFileName} {
		os.WriteFile(filepath.Join(bad, n), []byte("garbage"), 0o600)
	}
	clone := cfg
	clone.VMID = "clone-of-garbage"
	clone.Dir = t.TempDir()
	_, err = d.Restore(ctx, clone, bad)
	if err == nil || !strings.Contains(err.Error(), "not a snapshot") {
		t.Fatalf("Restore from garbage: %v", err)
	}
	if pids := findProcesses("clone-of-garbage"); len(pids) > 0 {
		t.Fatalf("firecracker left running after a failed restore: %v", pids)
	}
	if _, err := d.Restore(ctx, clone, t.TempDir()); err == nil {
		t.Fatal("Restore from an empty directory succeeded")
	}
}
