package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func openTest(t *testing.T) *Store {
	t.Helper()
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "banger.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func seed(t *testing.T, s *Store) {
	ctx := context.Background()
	if err := s.CreateImage(ctx, &Image{ID: "img1", Name: "base", RootfsPath: "/x"}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKernel(ctx, &Kernel{ID: "k1", Name: "k", VmlinuxPath: "/v"}); err != nil {
		t.Fatal(err)
	}
	for _, v := range []VM{
		{ID: "aaaa11112222", Name: "web"},
		{ID: "aaab33334444", Name: "worker"},
		{ID: "bbbb55556666", Name: "aaaa-name"},
		{ID: "cccc77778888", Name: "db"},
	} {
		v.ImageID, v.KernelID, v.VCPUs, v.MemoryMiB, v.DiskMiB, v.State = "img1", "k1", 1, 256, 1024, StateStopped
		if err := s.CreateVM(ctx, &v); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMigrationsIdempotent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "banger.db")
	for i := 0; i < 2; i++ {
		s, err := Open(context.Background(), path)
		if err != nil {
			t.Fatal(err)
		}
		v, _ := s.SchemaVersion(context.Background())
		if v != 5 {
			t.Fatalf("schema version %d", v)
		}
		s.Close()
	}
}

func TestFindVM(t *testing.T) {
	s := openTest(t)
	seed(t, s)
	cases := []struct {
		ref, want string
		err       error
		msg       string
	}{
		{ref: "aaaa11112222", want: "web"},
		{ref: "web", want: "web"},
		{ref: "db", want: "db"},
		{ref: "wo", want: "worker"},
		{ref: "cccc", want: "db"},
		{ref: "aaab", want: "worker"},
		{ref: "aaaa", err: ErrAmbiguous, msg: `multiple VMs match "aaaa"`}, // id prefix of web + name prefix of aaaa-name
		{ref: "w", err: ErrAmbiguous, msg: `multiple VMs match "w"`},
		{ref: "zzz", err: ErrNotFound, msg: `vm "zzz" not found`},
		{ref: "", err: ErrInvalid, msg: "vm id or name is required"},
		{ref: "%", err: ErrNotFound, msg: `vm "%" not found`},
		{ref: "_", err: ErrNotFound},
		{ref: "WEB", err: ErrNotFound},
	}
	for _, tc := range cases {
		t.Run(tc.ref, func(t *testing.T) {
			v, err := s.FindVM(context.Background(), tc.ref)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				if tc.msg != "" && !strings.Contains(err.Error(), tc.msg) {
					t.Fatalf("message %q lacks %q", err, tc.msg)
				}
				return
			}
			if err != nil || v.Name != tc.want {
				t.Fatalf("got %v, %v; want %s", v, err, tc.want)
			}
			if v.Image != "base" || v.Kernel != "k" {
				t.Fatalf("joins not filled: %+v", v)
			}
		})
	}
}

func TestConflictsAndRestrict(t *testing.T) {
	s := openTest(t)
	seed(t, s)
	ctx := context.Background()
	err := s.CreateVM(ctx, &VM{ID: "dddd", Name: "web", ImageID: "img1", KernelID: "k1", State: StateStopped})
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("duplicate name: %v", err)
	}
	if err := s.DeleteImage(ctx, "img1"); !errors.Is(err, ErrConflict) {
		t.Fatalf("delete image in use: %v", err)
	}
	if err := s.CreateVM(ctx, &VM{ID: "eeee", Name: "x", ImageID: "nope", KernelID: "k1", State: StateStopped}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("dangling image: %v", err)
	}
	v, _ := s.FindVM(ctx, "web")
	v.State = StateRunning
	v.IP = "172.30.0.2"
	if err := s.UpdateVM(ctx, v); err != nil {
		t.Fatal(err)
	}
	w, _ := s.FindVM(ctx, "worker")
	w.IP = "172.30.0.2"
	if err := s.UpdateVM(ctx, w); !errors.Is(err, ErrConflict) {
		t.Fatalf("duplicate ip: %v", err)
	}
	got, _ := s.GetVM(ctx, v.ID)
	if got.State != StateRunning || !got.UpdatedAt.After(got.CreatedAt.Add(-time.Second)) {
		t.Fatalf("update not stored: %+v", got)
	}
	list, _ := s.ListVMs(ctx)
	if len(list) != 4 {
		t.Fatalf("list: %d", len(list))
	}
}

func TestLockSetSerialisesPerKey(t *testing.T) {
	var l LockSet
	var inA, maxA int32
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			u := l.Lock("a")
			n := atomic.AddInt32(&inA, 1)
			for {
				m := atomic.LoadInt32(&maxA)
				if n <= m || atomic.CompareAndSwapInt32(&maxA, m, n) {
					break
				}
			}
			atomic.AddInt32(&inA, -1)
			u()
		}()
		go func() { defer wg.Done(); u := l.Lock("b"); u(); u() }()
	}
	wg.Wait()
	if maxA != 1 {
		t.Fatalf("%d holders of one key at once", maxA)
	}
	if l.Len() != 0 {
		t.Fatalf("%d lock entries leaked", l.Len())
	}
	// different keys do not block each other
	ua := l.Lock("a")
	done := make(chan struct{})
	go func() { ub := l.Lock("b"); ub(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("lock on b blocked by a")
	}
	ua()
}

// A path with URI metacharacters opens that file, not a truncated name.
func TestOpenPathWithURICharacters(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	for _, name := range []string{"a#b", "a?b", "a%41b"} {
		d := filepath.Join(dir, name)
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		st, err := Open(ctx, filepath.Join(d, "banger.db"))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		st.Close()
		if _, err := os.Stat(filepath.Join(d, "banger.db")); err != nil {
			t.Fatalf("%s: database not at its path: %v", name, err)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 3 {
		t.Fatalf("files made beside the homes: %v", ents)
	}
}

// A snapshot keeps its image and kernel: neither can be deleted under it.
func TestSnapshotsPinTheirArtifacts(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, filepath.Join(t.TempDir(), "banger.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.CreateImage(ctx, &Image{ID: "img1", Name: "img", RootfsPath: "/r"}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKernel(ctx, &Kernel{ID: "k1", Name: "k", VmlinuxPath: "/v"}); err != nil {
		t.Fatal(err)
	}
	sn := &Snapshot{ID: "s1", Name: "snap", SourceVM: "vm", ImageID: "img1", KernelID: "k1", Driver: "qemu", VCPUs: 1, MemoryMiB: 256, DiskMiB: 1024, StateBytes: 5, DiskBytes: 7}
	if err := s.CreateSnapshot(ctx, sn); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateSnapshot(ctx, &Snapshot{ID: "s2", Name: "snap", ImageID: "img1", KernelID: "k1", Driver: "qemu"}); !errors.Is(err, ErrConflict) {
		t.Errorf("duplicate name: %v", err)
	}
	if err := s.CreateSnapshot(ctx, &Snapshot{ID: "s3", Name: "other", ImageID: "nope", KernelID: "k1", Driver: "qemu"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("unknown image: %v", err)
	}
	if err := s.DeleteImage(ctx, "img1"); !errors.Is(err, ErrConflict) {
		t.Errorf("image deleted from under a snapshot: %v", err)
	}
	if err := s.DeleteKernel(ctx, "k1"); !errors.Is(err, ErrConflict) {
		t.Errorf("kernel deleted from under a snapshot: %v", err)
	}
	if names, _ := s.SnapshotsUsing(ctx, "image_id", "img1"); len(names) != 1 || names[0] != "snap" {
		t.Errorf("SnapshotsUsing = %v", names)
	}
	got, err := s.FindSnapshot(ctx, "snap")
	if err != nil || got.Image != "img" || got.Kernel != "k" || got.StateBytes != 5 || got.DiskBytes != 7 || got.MemoryMiB != 256 {
		t.Fatalf("FindSnapshot = %+v, %v", got, err)
	}
	if l, _ := s.ListSnapshots(ctx); len(l) != 1 {
		t.Errorf("ListSnapshots = %v", l)
	}
	if err := s.DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteImage(ctx, "img1"); err != nil {
		t.Errorf("image still pinned after the snapshot went: %v", err)
	}
	if _, err := s.FindSnapshot(ctx, "snap"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted snapshot found: %v", err)
	}
}

// TestWorkspaceDest: recorded by SetWorkspaceDest, read back by every
// lookup, and not undone by an UpdateVM of a record read before it.
func TestWorkspaceDest(t *testing.T) {
	s := openTest(t)
	seed(t, s)
	ctx := context.Background()
	stale, err := s.GetVM(ctx, "aaaa11112222")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetWorkspaceDest(ctx, "aaaa11112222", "/root/ws"); err != nil {
		t.Fatal(err)
	}
	stale.State = StateRunning
	if err := s.UpdateVM(ctx, stale); err != nil {
		t.Fatal(err)
	}
	v, err := s.FindVM(ctx, "web")
	if err != nil || v.WorkspaceDest != "/root/ws" || v.State != StateRunning {
		t.Fatalf("after SetWorkspaceDest and a stale UpdateVM: %+v %v", v, err)
	}
	if err := s.SetWorkspaceDest(ctx, "nope", "/x"); err == nil {
		t.Fatal("SetWorkspaceDest of a missing VM succeeded")
	}
	js, err := s.ListVMsJSON(ctx, false)
	if err != nil || !strings.Contains(string(js), `"workspace_dest":"/root/ws"`) {
		t.Fatalf("vm.list JSON lacks workspace_dest: %s %v", js, err)
	}
}

// Migration 0005 lists every VM of a database that reaches it as possibly
// holding legacy files, and no VM made after; a VM leaves the list when its
// files are imported or it is deleted.
func TestLegacyFilesPending(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "banger.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	seed(t, s) // aaaa11112222 aaab33334444 bbbb55556666 cccc77778888
	if ids, err := s.LegacyFilesPending(ctx); err != nil || len(ids) != 0 {
		t.Fatalf("VMs made at schema 5 listed as holding legacy files: %q, %v", ids, err)
	}
	// the same database as a bangerd of schema 4 left it
	if _, err := s.db.ExecContext(ctx, `DROP TABLE legacy_files_pending; PRAGMA user_version = 4`); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if s, err = Open(ctx, path); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ids, err := s.LegacyFilesPending(ctx)
	if err != nil || strings.Join(ids, " ") != "aaaa11112222 aaab33334444 bbbb55556666 cccc77778888" {
		t.Fatalf("after the upgrade: %q, %v; want every VM", ids, err)
	}
	if err := s.LegacyFilesImported(ctx, "aaaa11112222"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVM(ctx, "cccc77778888"); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateVM(ctx, &VM{ID: "dddd99990000", Name: "new", ImageID: "img1", KernelID: "k1", VCPUs: 1, MemoryMiB: 256, DiskMiB: 1024, State: StateStopped}); err != nil {
		t.Fatal(err)
	}
	if ids, err := s.LegacyFilesPending(ctx); err != nil || strings.Join(ids, " ") != "aaab33334444 bbbb55556666" {
		t.Fatalf("after one import, one delete and one create: %q, %v", ids, err)
	}
}
