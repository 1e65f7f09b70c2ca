package qemu

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeStatfs makes every path a tmpfs with free bytes available, except the
// paths in notTmpfs.
func fakeStatfs(t *testing.T, free int64, notTmpfs ...string) {
	t.Helper()
	old := statfsFn
	t.Cleanup(func() { statfsFn = old })
	statfsFn = func(path string, st *unix.Statfs_t) error {
		if err := unix.Statfs(path, st); err != nil {
			return err
		}
		st.Type = tmpfsMagic
		for _, p := range notTmpfs {
			if path == p {
				st.Type = 0xEF53 // ext4
			}
		}
		st.Bsize = 4096
		st.Bavail = uint64(free / 4096)
		return nil
	}
}

// The driver keeps a guest's memory only in a directory that is on a
// tmpfs, is a real directory (not a link), is this user's and mode 0700,
// and has room; otherwise it says why and the guest gets anonymous memory.
// An attacker who made the directory first in a world-writable /dev/shm
// gets nothing: the directory is refused, never used.
func TestSharedMemoryRefusesUnusableDirs(t *testing.T) {
	const mem = 64 // MiB
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, parent string) string // returns the memory dir
		free  int64
		want  string // in the reason; "" = usable
	}{
		{"usable", func(t *testing.T, p string) string { return filepath.Join(p, "mem") }, 1 << 30, ""},
		{"not a tmpfs", func(t *testing.T, p string) string {
			fakeStatfs(t, 1<<30, p)
			return filepath.Join(p, "mem")
		}, -1, "not on a tmpfs"},
		{"too small", func(t *testing.T, p string) string { return filepath.Join(p, "mem") }, 32 << 20, "MiB free"},
		{"a link to a directory", func(t *testing.T, p string) string {
			target := filepath.Join(p, "target")
			os.Mkdir(target, 0o700)
			os.Symlink(target, filepath.Join(p, "mem"))
			return filepath.Join(p, "mem")
		}, 1 << 30, "not a directory"},
		{"mode 0755", func(t *testing.T, p string) string {
			d := filepath.Join(p, "mem")
			os.Mkdir(d, 0o700)
			os.Chmod(d, 0o755)
			return d
		}, 1 << 30, "has mode 755"},
		{"another user's", func(t *testing.T, p string) string {
			if os.Geteuid() != 0 {
				t.Skip("making a directory owned by another user needs root")
			}
			d := filepath.Join(p, "mem")
			os.Mkdir(d, 0o700)
			os.Chown(d, 65534, 65534)
			return d
		}, 1 << 30, "belongs to uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent := t.TempDir()
			if tc.free >= 0 {
				fakeStatfs(t, tc.free)
			}
			dir := tc.setup(t, parent)
			d := New(Options{MemoryDirs: []string{dir}})
			m := d.sharedMemory("vm1", mem)
			if tc.want == "" {
				if m.Kind != memShared || m.Path != filepath.Join(dir, "vm1"+memFileSuffix) {
					t.Fatalf("got %+v", m)
				}
				fi, err := os.Lstat(m.Path)
				if err != nil || fi.Mode().Perm() != 0o600 || fi.Size() != mem<<20 {
					t.Fatalf("memory file: %v %v", fi, err)
				}
				if use, _ := diskUse(m.Path); use != 0 {
					t.Errorf("a new memory file uses %d bytes; want all holes", use)
				}
				return
			}
			if m.Kind != memAnon || !strings.Contains(m.Why, tc.want) {
				t.Fatalf("got %+v, want anonymous memory because %q", m, tc.want)
			}
			if ents, _ := os.ReadDir(filepath.Join(parent, "target")); len(ents) > 0 {
				t.Fatal("a file was made through the link")
			}
		})
	}
}

func diskUse(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}

// The first usable directory wins; a file left by an earlier VMM of the
// same VM is replaced, and the room the running guests may still take is
// counted.
func TestSharedMemoryPicksAndCounts(t *testing.T) {
	parent := t.TempDir()
	fakeStatfs(t, 200<<20, parent+"/bad")
	bad, good := filepath.Join(parent, "bad", "mem"), filepath.Join(parent, "mem")
	os.Mkdir(filepath.Join(parent, "bad"), 0o700)
	d := New(Options{MemoryDirs: []string{bad, good}})
	m := d.sharedMemory("a", 64)
	if m.Kind != memShared || filepath.Dir(m.Path) != good {
		t.Fatalf("got %+v", m)
	}
	// Stale file of the same VM: replaced.
	if err := os.WriteFile(m.Path, []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	if m2 := d.sharedMemory("a", 64); m2.Kind != memShared {
		t.Fatalf("stale file not replaced: %+v", m2)
	}
	// a (64 MiB promised) + b (64) + c (100) > 200 MiB free.
	if m := d.sharedMemory("b", 64); m.Kind != memShared {
		t.Fatalf("b: %+v", m)
	}
	if m := d.sharedMemory("c", 100); m.Kind != memAnon || !strings.Contains(m.Why, "128 MiB the running guests may still fill") {
		t.Fatalf("c: %+v", m)
	}
	if _, err := os.Lstat(filepath.Join(good, "c"+memFileSuffix)); !os.IsNotExist(err) {
		t.Errorf("a refused memory file was made: %v", err)
	}
}

func TestSnapMeta(t *testing.T) {
	for _, tc := range []struct {
		name, content string
		want          string // memory, or an error substring
		ok            bool
	}{
		{"format 1: no file", "", "stream", true},
		{"file", `{"version":2,"memory":"file"}`, "file", true},
		{"stream", `{"version":2,"memory":"stream"}`, "stream", true},
		{"newer", `{"version":3,"memory":"file"}`, "upgrade banger", false},
		{"damaged", `{"version":`, "damaged", false},
		{"unknown memory", `{"version":2,"memory":"disk"}`, "damaged", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.content != "" {
				os.WriteFile(filepath.Join(dir, snapMetaName), []byte(tc.content), 0o600)
			}
			m, err := readSnapMeta(dir)
			if tc.ok {
				if err != nil || m.Memory != tc.want {
					t.Fatalf("got %+v, %v", m, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %+v, %v; want an error with %q", m, err, tc.want)
			}
		})
	}
	// Not through a link.
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "real"), []byte(`{"version":2,"memory":"file"}`), 0o600)
	os.Symlink(filepath.Join(dir, "real"), filepath.Join(dir, snapMetaName))
	if _, err := readSnapMeta(dir); err == nil {
		t.Error("read qemu.meta through a link")
	}
}

// The snapshot's memory file is opened without following links and must be
// exactly the guest's memory size.
func TestOpenSnapshotRAM(t *testing.T) {
	dir := t.TempDir()
	ram := filepath.Join(dir, snapRAMName)
	if _, err := openSnapshotRAM(dir, 16); err == nil {
		t.Fatal("opened a missing file")
	}
	other := filepath.Join(dir, "other")
	f, _ := os.Create(other)
	f.Truncate(16 << 20)
	f.Close()
	os.Symlink(other, ram)
	if _, err := openSnapshotRAM(dir, 16); err == nil {
		t.Fatal("opened the memory file through a link")
	}
	os.Remove(ram)
	os.Rename(other, ram)
	if _, err := openSnapshotRAM(dir, 32); err == nil || !strings.Contains(err.Error(), "32 MiB") {
		t.Fatalf("size mismatch: %v", err)
	}
	f, err := openSnapshotRAM(dir, 16)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
}
