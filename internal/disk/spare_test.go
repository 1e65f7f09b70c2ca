package disk

import (
	"context"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

const spareTestSize = 64 << 20

func settle(t *testing.T, m *Maker) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Settle(ctx); err != nil {
		t.Fatal(err)
	}
}

// diskID is a disk's filesystem UUID (read from its superblock) and inode.
func diskID(t *testing.T, p string) (uuid string, ino uint64) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sb := make([]byte, sbSize)
	if _, err := f.ReadAt(sb, sbOffset); err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	if sys.Nlink != 1 {
		t.Errorf("%s has %d links: it shares its inode", p, sys.Nlink)
	}
	return hex.EncodeToString(sb[sbUUID : sbUUID+16]), sys.Ino
}

func fsck(t *testing.T, p string) {
	t.Helper()
	if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", filepath.Base(p), err, out)
	}
}

// names lists Dir's spares and temporary files.
func spareFiles(t *testing.T, dir string) (spares, tmps []string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	for _, e := range ents {
		switch {
		case strings.HasSuffix(e.Name(), spareSuffix):
			spares = append(spares, e.Name())
		case strings.HasSuffix(e.Name(), ".tmp"):
			tmps = append(tmps, e.Name())
		}
	}
	return spares, tmps
}

func spareOf(t *testing.T, m *Maker, size int64) string {
	t.Helper()
	tpl, err := m.templateName(size)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(m.Dir, spareName(tpl))
}

// TestSpareRenamedIntoPlaceAndUnique: with spares, the second disk is the
// spare the first one's Make left (same inode: renamed, not copied), every
// disk and spare has its own UUID and inode, and the next spare is made.
func TestSpareRenamedIntoPlaceAndUnique(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw", Spares: 2}
	defer m.Close()
	ctx := context.Background()
	a := filepath.Join(dir, "a.ext4")
	if err := m.Make(ctx, a, spareTestSize); err != nil {
		t.Fatal(err)
	}
	settle(t, m)
	sp := spareOf(t, m, spareTestSize)
	fsck(t, sp)
	uA, iA := diskID(t, a)
	uS, iS := diskID(t, sp)
	b := filepath.Join(dir, "b.ext4")
	if err := m.Make(ctx, b, spareTestSize); err != nil {
		t.Fatal(err)
	}
	uB, iB := diskID(t, b)
	if iB != iS || uB != uS {
		t.Errorf("second disk is inode %d UUID %s, the spare was %d %s: the spare was not renamed into place", iB, uB, iS, uS)
	}
	settle(t, m)
	uS2, iS2 := diskID(t, sp)
	fsck(t, a)
	fsck(t, b)
	fsck(t, sp)
	ids := map[string]bool{uA: true, uB: true, uS2: true}
	inos := map[uint64]bool{iA: true, iB: true, iS2: true}
	if len(ids) != 3 || len(inos) != 3 {
		t.Errorf("disks a, b and the new spare: UUIDs %s %s %s, inodes %d %d %d: want all different", uA, uB, uS2, iA, iB, iS2)
	}
	if spares, tmps := spareFiles(t, m.Dir); len(spares) != 1 || len(tmps) != 0 {
		t.Errorf("template dir holds spares %v and temporary files %v, want one spare", spares, tmps)
	}

	// Without Spares, no spare is made (and none is taken).
	m0 := &Maker{Dir: filepath.Join(dir, "plain"), Label: "banger-rw"}
	if err := m0.Make(ctx, filepath.Join(dir, "c.ext4"), spareTestSize); err != nil {
		t.Fatal(err)
	}
	settle(t, m0)
	if spares, _ := spareFiles(t, m0.Dir); len(spares) != 0 {
		t.Errorf("a Maker without Spares made %v", spares)
	}
}

// TestSparesBounded: at most Spares spares, for the sizes made most
// recently; a spare of an older template of the same size is dropped.
func TestSparesBounded(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw", Spares: 2}
	defer m.Close()
	ctx := context.Background()
	for i, size := range []int64{64 << 20, 128 << 20, 256 << 20, 128 << 20} {
		if err := m.Make(ctx, filepath.Join(dir, "d"+string(rune('0'+i))), size); err != nil {
			t.Fatal(err)
		}
		settle(t, m)
	}
	spares, _ := spareFiles(t, m.Dir)
	want := []string{filepath.Base(spareOf(t, m, 128<<20)), filepath.Base(spareOf(t, m, 256<<20))}
	slices.Sort(spares)
	slices.Sort(want)
	if !slices.Equal(spares, want) {
		t.Errorf("spares %v, want those of the two sizes made last %v", spares, want)
	}
	// A new template for 256 MiB (another label stands for another mkfs):
	// the old one's spare goes.
	old := spareOf(t, m, 256<<20)
	m.Label = "other"
	if err := m.Make(ctx, filepath.Join(dir, "e"), 256<<20); err != nil {
		t.Fatal(err)
	}
	settle(t, m)
	if _, err := os.Lstat(old); err == nil {
		t.Error("the spare of the older 256 MiB template is still there")
	}
	if _, err := os.Lstat(spareOf(t, m, 256<<20)); err != nil {
		t.Errorf("no spare of the new template: %v", err)
	}
	if spares, _ := spareFiles(t, m.Dir); len(spares) != 2 {
		t.Errorf("spares %v, want 2", spares)
	}
}

// TestCreateDoesNotWaitForRefill: while a refill is held, Make of the same
// size copies and returns.
func TestCreateDoesNotWaitForRefill(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	hold, held := make(chan struct{}), make(chan struct{}, 1)
	m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw", Spares: 1}
	m.Fault = func(step string) {
		if step == "temp" {
			select {
			case held <- struct{}{}:
			default:
			}
			<-hold
		}
	}
	ctx := context.Background()
	if err := m.Make(ctx, filepath.Join(dir, "a"), spareTestSize); err != nil {
		t.Fatal(err)
	}
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("the refill never started")
	}
	done := make(chan error, 1)
	go func() { done <- m.Make(ctx, filepath.Join(dir, "b"), spareTestSize) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Make waited for the refill")
	}
	close(hold)
	settle(t, m)
	fsck(t, filepath.Join(dir, "b"))
	m.Close()
}

// TestCloseCancelsRefill: Close stops a refill in flight, which leaves
// neither a spare nor a temporary file, and no refill starts after it.
func TestCloseCancelsRefill(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	hold, held := make(chan struct{}), make(chan struct{}, 1)
	m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw", Spares: 1}
	m.Fault = func(step string) {
		if step == "template" {
			held <- struct{}{}
			<-hold
		}
	}
	ctx := context.Background()
	if err := m.Make(ctx, filepath.Join(dir, "a"), spareTestSize); err != nil {
		t.Fatal(err)
	}
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("the refill never started")
	}
	closed := make(chan error, 1)
	go func() { closed <- m.Close() }()
	// Close has cancelled (it waits on the refill now); let the refill go.
	deadline := time.Now().Add(30 * time.Second)
	for {
		m.sp.mu.Lock()
		c := m.sp.closed
		m.sp.mu.Unlock()
		if c {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Close did not mark the spares closed")
		}
		time.Sleep(time.Millisecond)
	}
	close(hold)
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return")
	}
	if spares, tmps := spareFiles(t, m.Dir); len(spares)+len(tmps) != 0 {
		t.Errorf("after Close: spares %v, temporary files %v", spares, tmps)
	}
	if err := m.Make(ctx, filepath.Join(dir, "b"), spareTestSize); err != nil {
		t.Fatal(err)
	}
	settle(t, m)
	if spares, _ := spareFiles(t, m.Dir); len(spares) != 0 {
		t.Errorf("a refill started after Close: %v", spares)
	}
}

// TestRefillCrashConverges: bangerd killed at each step of a refill (the
// template directory copied as it is at that step stands for what the
// crash leaves), then started again: Reclaim leaves no temporary file, at
// most one spare that is whole, and the next disks are valid and unique.
func TestRefillCrashConverges(t *testing.T) {
	needTools(t)
	if _, err := exec.LookPath("cp"); err != nil {
		t.Skip("no cp")
	}
	for _, step := range []string{"template", "temp", "written", "renamed"} {
		t.Run(step, func(t *testing.T) {
			dir := t.TempDir()
			crash := filepath.Join(dir, "crashed")
			m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw", Spares: 1}
			injected := false
			m.Fault = func(s string) {
				if s == step && !injected {
					injected = true
					if out, err := exec.Command("cp", "-a", "--sparse=always", m.Dir, crash).CombinedOutput(); err != nil {
						t.Errorf("snapshot at %s: %v\n%s", step, err, out)
					}
				}
			}
			ctx := context.Background()
			a := filepath.Join(dir, "a")
			if err := m.Make(ctx, a, spareTestSize); err != nil {
				t.Fatal(err)
			}
			settle(t, m)
			m.Close()
			if !injected {
				t.Fatalf("the refill never reached %s", step)
			}
			_, tmps := spareFiles(t, crash)
			t.Logf("crash at %s left temporary files %v", step, tmps)

			m2 := &Maker{Dir: crash, Label: "banger-rw", Spares: 1}
			defer m2.Close()
			if err := m2.Reclaim(ctx); err != nil {
				t.Fatal(err)
			}
			spares, tmps := spareFiles(t, crash)
			if len(tmps) != 0 || len(spares) > 1 {
				t.Fatalf("after Reclaim: spares %v, temporary files %v", spares, tmps)
			}
			for _, s := range spares {
				fsck(t, filepath.Join(crash, s))
			}
			uA, _ := diskID(t, a)
			seen := map[string]bool{uA: true}
			for _, n := range []string{"b", "c"} {
				p := filepath.Join(dir, n)
				if err := m2.Make(ctx, p, spareTestSize); err != nil {
					t.Fatal(err)
				}
				fsck(t, p)
				u, _ := diskID(t, p)
				if seen[u] {
					t.Errorf("disk %s repeats UUID %s", n, u)
				}
				seen[u] = true
				settle(t, m2)
			}
			if spares, tmps := spareFiles(t, crash); len(spares) != 1 || len(tmps) != 0 {
				t.Errorf("after two disks: spares %v, temporary files %v, want one spare", spares, tmps)
			}
		})
	}
}

// TestReclaimDropsInvalidSpares: at start, spares that are not whole, of
// another size or template, not regular files, or over the bound are
// removed without being followed, and Make never takes one.
func TestReclaimDropsInvalidSpares(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	tdir := filepath.Join(dir, "templates")
	ctx := context.Background()
	m := &Maker{Dir: tdir, Label: "banger-rw", Spares: 1}
	if err := m.Make(ctx, filepath.Join(dir, "a"), spareTestSize); err != nil {
		t.Fatal(err)
	}
	settle(t, m)
	m.Close()
	good := spareOf(t, m, spareTestSize)
	for _, tc := range []struct {
		name  string
		plant func(p string) error
	}{
		{"empty (power lost before its data)", func(p string) error { return os.WriteFile(p, nil, 0o600) }},
		{"right size, no superblock", func(p string) error { return os.Truncate(p, spareTestSize) }},
		{"wrong size", func(p string) error { return os.Truncate(p, spareTestSize/2) }},
		{"symlink", func(p string) error {
			target := filepath.Join(dir, "target")
			if err := os.WriteFile(target, []byte("keep"), 0o600); err != nil {
				return err
			}
			os.Remove(p)
			return os.Symlink(target, p)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, "planted")
			os.Remove(good)
			if tc.name != "symlink" {
				if err := os.WriteFile(good, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if err := tc.plant(good); err != nil {
				t.Fatal(err)
			}
			m2 := &Maker{Dir: tdir, Label: "banger-rw", Spares: 1}
			defer m2.Close()
			if err := m2.Reclaim(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Lstat(good); err == nil {
				t.Errorf("Reclaim kept the spare")
			}
			if b, _ := os.ReadFile(filepath.Join(dir, "target")); tc.name == "symlink" && string(b) != "keep" {
				t.Error("the symlink's target was changed")
			}
			// Planted after start: Make does not take it either (it checks
			// the type and size; only Reclaim reads the superblock).
			if tc.name == "right size, no superblock" {
				return
			}
			os.Remove(good)
			if tc.name != "symlink" {
				os.WriteFile(good, nil, 0o600)
			}
			if err := tc.plant(good); err != nil {
				t.Fatal(err)
			}
			if err := m2.Make(ctx, p, spareTestSize); err != nil {
				t.Fatal(err)
			}
			fsck(t, p)
			settle(t, m2)
			os.Remove(p)
		})
	}
	// Spares of another template, and any spare when spares are off.
	m3 := &Maker{Dir: tdir, Label: "other", Spares: 1}
	if err := m3.Reclaim(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(good); err == nil {
		t.Error("Reclaim kept the spare of another template")
	}
	m4 := &Maker{Dir: tdir, Label: "banger-rw"}
	if err := m4.Make(ctx, filepath.Join(dir, "x"), 128<<20); err != nil {
		t.Fatal(err)
	}
	m5 := &Maker{Dir: tdir, Label: "banger-rw", Spares: 1}
	if err := m5.Make(ctx, filepath.Join(dir, "y"), 128<<20); err != nil {
		t.Fatal(err)
	}
	settle(t, m5)
	m5.Close()
	if spares, _ := spareFiles(t, tdir); len(spares) != 1 {
		t.Fatalf("spares %v, want one", spares)
	}
	if err := m4.Reclaim(ctx); err != nil {
		t.Fatal(err)
	}
	if spares, _ := spareFiles(t, tdir); len(spares) != 0 {
		t.Errorf("spares off, Reclaim kept %v", spares)
	}
}

// TestSpareOnAnotherFilesystem: when the disk's directory is on another
// filesystem than the spare, Make copies (the rename fails) and the spare
// stays.
func TestSpareOnAnotherFilesystem(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	other, err := os.MkdirTemp("/dev/shm", "banger-disk-")
	if err != nil {
		t.Skipf("no /dev/shm for a second filesystem: %v", err)
	}
	defer os.RemoveAll(other)
	var a, b syscall.Stat_t
	if syscall.Stat(dir, &a) != nil || syscall.Stat(other, &b) != nil || a.Dev == b.Dev {
		t.Skip("/dev/shm is on the test directory's filesystem")
	}
	m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw", Spares: 1}
	defer m.Close()
	ctx := context.Background()
	if err := m.Make(ctx, filepath.Join(dir, "a"), spareTestSize); err != nil {
		t.Fatal(err)
	}
	settle(t, m)
	sp := spareOf(t, m, spareTestSize)
	uS, iS := diskID(t, sp)
	p := filepath.Join(other, "rw.ext4")
	if err := m.Make(ctx, p, spareTestSize); err != nil {
		t.Fatal(err)
	}
	settle(t, m)
	fsck(t, p)
	uP, _ := diskID(t, p)
	if u, i := diskID(t, sp); u != uS || i != iS || uP == uS {
		t.Errorf("spare %s/%d became %s/%d, disk on the other filesystem %s: want the spare untouched and a copy", uS, iS, u, i, uP)
	}
}
