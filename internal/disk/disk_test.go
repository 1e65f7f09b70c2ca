package disk

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func needTools(t *testing.T) {
	t.Helper()
	for _, b := range []string{"mkfs.ext4", "e2fsck", "dumpe2fs"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s not installed (e2fsprogs): %v", b, err)
		}
	}
}

// dumpe2fs -h as a map of "Field name" -> value.
func superblock(t *testing.T, p string) map[string]string {
	t.Helper()
	out, err := exec.Command("dumpe2fs", "-h", p).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs %s: %v\n%s", p, err, out)
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			m[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return m
}

func TestMakeValidExt4OfRequestedSize(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw"}
	uuids := map[string]bool{}
	for _, tc := range []struct {
		name string
		size int64
	}{
		{"64MiB", 64 << 20},
		{"4GiB", 4 << 30},
		{"64GiB", 64 << 30},
		{"64GiB again, from the cached template", 64 << 30},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, strconv.Itoa(len(uuids))+".ext4")
			if err := m.Make(context.Background(), p, tc.size); err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() != tc.size {
				t.Fatalf("file is %d bytes, want %d", st.Size(), tc.size)
			}
			// 64 GiB: about 200 KiB (the superblock at each of its 12
			// backup groups, 12 descriptor blocks, bitmaps, root directory)
			if used := st.Sys().(*syscall.Stat_t).Blocks * 512; used > 1<<20 {
				t.Errorf("disk uses %d bytes on the host: not sparse, or its template has more metadata than meta_bg should leave", used)
			}
			if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
				t.Fatalf("e2fsck -fn: %v\n%s", err, out)
			}
			sb := superblock(t, p)
			features := " " + sb["Filesystem features"] + " "
			for _, f := range []string{"meta_bg", "metadata_csum", "metadata_csum_seed", "flex_bg", "sparse_super", "has_journal", "extent"} {
				if !strings.Contains(features, " "+f+" ") {
					t.Errorf("features %q lack %s", features, f)
				}
			}
			for _, f := range []string{"resize_inode", "64bit"} {
				if strings.Contains(features, " "+f+" ") {
					t.Errorf("features %q have %s (more metadata to copy into every disk)", features, f)
				}
			}
			if sb["Filesystem volume name"] != "banger-rw" {
				t.Errorf("label %q, want banger-rw", sb["Filesystem volume name"])
			}
			bc, _ := strconv.ParseInt(sb["Block count"], 10, 64)
			bsz, _ := strconv.ParseInt(sb["Block size"], 10, 64)
			if bc*bsz != tc.size {
				t.Errorf("filesystem is %d×%d = %d bytes, want %d", bc, bsz, bc*bsz, tc.size)
			}
			u := sb["Filesystem UUID"]
			if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(u) {
				t.Errorf("UUID %q is not a random (v4) UUID", u)
			}
			if uuids[u] {
				t.Errorf("UUID %s repeats: every disk needs its own", u)
			}
			uuids[u] = true
		})
	}
	// One template per size, none left half-made.
	ents, err := os.ReadDir(m.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 3 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("template dir holds %v, want one template per size (3)", names)
	}
}

func TestMakeMountsInTheKernel(t *testing.T) {
	needTools(t)
	if os.Geteuid() != 0 {
		t.Skip("mounting a loop device needs root (CI runs as root)")
	}
	if _, err := exec.LookPath("mount"); err != nil {
		t.Skip("no mount")
	}
	dir := t.TempDir()
	m := &Maker{Dir: dir, Label: "banger-rw"}
	// 1 KiB blocks under 512 MiB, 4 KiB above; 64 GiB spans 4 meta groups
	for _, size := range []int64{256 << 20, 64 << 30} {
		p := filepath.Join(dir, strconv.FormatInt(size>>20, 10)+"M.ext4")
		if err := m.Make(context.Background(), p, size); err != nil {
			t.Fatal(err)
		}
		mnt := t.TempDir()
		if out, err := exec.Command("mount", "-o", "loop", p, mnt).CombinedOutput(); err != nil {
			if bytes.Contains(out, []byte("loop")) {
				t.Skipf("no loop devices here: %s", out)
			}
			t.Fatalf("the kernel refuses the %d MiB disk: %v\n%s", size>>20, err, out)
		}
		defer exec.Command("umount", mnt).Run()
		var sfs syscall.Statfs_t
		if err := syscall.Statfs(mnt, &sfs); err != nil {
			t.Fatal(err)
		}
		if got := int64(sfs.Blocks) * sfs.Bsize; got < size*9/10 {
			t.Errorf("the kernel sees %d bytes of a %d-byte disk", got, size)
		}
		if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Fatalf("umount: %v\n%s", err, out)
		}
		if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck after the kernel wrote: %v\n%s", err, out)
		}
	}
}

// TestMakeGrows: a disk grows across meta groups (16 GiB of 4 KiB blocks,
// 256 MiB of 1 KiB blocks) and stays clean. The guest grows it online
// (EXT4_IOC_RESIZE_FS, e2e TestLifecycleRealGuest); resize2fs here checks
// the same layout offline, which needs no CAP_SYS_RESOURCE.
func TestMakeGrows(t *testing.T) {
	needTools(t)
	if _, err := exec.LookPath("resize2fs"); err != nil {
		t.Skipf("resize2fs not installed (e2fsprogs): %v", err)
	}
	dir := t.TempDir()
	m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw"}
	for _, tc := range []struct{ from, to int64 }{
		{1 << 30, 40 << 30},
		{256 << 20, 2 << 30},
	} {
		p := filepath.Join(dir, strconv.FormatInt(tc.from>>20, 10)+"M.ext4")
		if err := m.Make(context.Background(), p, tc.from); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, tc.to); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("resize2fs", p).CombinedOutput(); err != nil {
			t.Fatalf("resize2fs %d → %d MiB: %v\n%s", tc.from>>20, tc.to>>20, err, out)
		}
		if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck after growing %d → %d MiB: %v\n%s", tc.from>>20, tc.to>>20, err, out)
		}
		sb := superblock(t, p)
		bc, _ := strconv.ParseInt(sb["Block count"], 10, 64)
		bsz, _ := strconv.ParseInt(sb["Block size"], 10, 64)
		if bc*bsz != tc.to {
			t.Errorf("grown to %d bytes, want %d", bc*bsz, tc.to)
		}
	}
}

// TestTemplateKeyFollowsOptions: templates made with other mkfs options
// are never reused (the options are part of the template's name).
func TestTemplateKeyFollowsOptions(t *testing.T) {
	needTools(t)
	a, b := &Maker{Label: "banger-rw"}, &Maker{Label: "other"}
	na, err := a.templateName(4 << 30)
	if err != nil {
		t.Fatal(err)
	}
	nb, _ := b.templateName(4 << 30)
	n64, _ := a.templateName(64 << 30)
	if na == nb || na == n64 {
		t.Errorf("template names %q (label banger-rw), %q (label other), %q (64 GiB): want three", na, nb, n64)
	}
	if !slices.Contains(a.mkfsArgs(4<<30, ""), "metadata_csum_seed,^resize_inode,meta_bg,^64bit") ||
		!slices.Contains(a.mkfsArgs(max32BitSize, ""), "metadata_csum_seed,^resize_inode,meta_bg") {
		t.Errorf("features: %q under 16 TiB, %q at 16 TiB", a.mkfsArgs(4<<30, ""), a.mkfsArgs(max32BitSize, ""))
	}
}

func TestMakeRefusesTinyAndBadTemplateDir(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	m := &Maker{Dir: dir, Label: "banger-rw"}
	if err := m.Make(context.Background(), filepath.Join(dir, "a"), 1<<20); err == nil {
		t.Error("a 1 MiB disk was made")
	}
	// A symlink planted where the template goes is not followed.
	name, err := m.templateName(64 << 20)
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "elsewhere")
	if err := os.WriteFile(target, make([]byte, 10), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "b")
	if err := m.Make(context.Background(), p, 64<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(target); len(b) != 10 {
		t.Error("the symlink's target was written")
	}
}

func TestPatchSuperblock(t *testing.T) {
	sb := make([]byte, sbSize)
	if err := patchSuperblock(sb, bytes.NewReader(make([]byte, 32))); err == nil {
		t.Error("a superblock without the ext4 magic was patched")
	}
	sb[sbMagic], sb[sbMagic+1] = 0x53, 0xEF
	sb[sbFeatureROCompat+1] = roCompatMetadataCsum >> 8
	if err := patchSuperblock(sb, bytes.NewReader(make([]byte, 32))); err == nil {
		t.Error("metadata_csum without csum_seed was patched (its metadata checksums would break)")
	}
}

// go test -run xxx -bench Make ./internal/disk
func BenchmarkMake(b *testing.B) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		b.Skip("no mkfs.ext4")
	}
	for _, spares := range []int{0, 1} {
		for _, size := range []int64{4 << 30, 64 << 30} {
			name := strconv.FormatInt(size>>30, 10) + "GiB/copy"
			if spares > 0 {
				name = strconv.FormatInt(size>>30, 10) + "GiB/spare"
			}
			b.Run(name, func(b *testing.B) {
				dir := b.TempDir()
				m := &Maker{Dir: dir, Label: "banger-rw", Spares: spares}
				defer m.Close()
				p := filepath.Join(dir, "rw.ext4")
				if err := m.Make(context.Background(), p, size); err != nil {
					b.Fatal(err)
				}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					b.StopTimer() // the refill runs between creates, untimed
					if err := m.Settle(context.Background()); err != nil {
						b.Fatal(err)
					}
					os.Remove(p)
					b.StartTimer()
					if err := m.Make(context.Background(), p, size); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// TestDiskIsTheTemplateWithItsOwnIDs: a disk holds exactly the template's
// data, at the same offsets, but for the UUID, hash seed and checksum of
// its superblock.
func TestDiskIsTheTemplateWithItsOwnIDs(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	m := &Maker{Dir: filepath.Join(dir, "templates"), Label: "banger-rw"}
	p := filepath.Join(dir, "rw.ext4")
	if err := m.Make(context.Background(), p, 4<<30); err != nil {
		t.Fatal(err)
	}
	name, err := m.templateName(4 << 30)
	if err != nil {
		t.Fatal(err)
	}
	regions := func(p string) map[int64][]byte {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		r := map[int64][]byte{}
		if err := forEachData(f, func(off, n int64) error {
			b := make([]byte, n)
			_, err := f.ReadAt(b, off)
			r[off] = b
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return r
	}
	tpl, disk := regions(filepath.Join(m.Dir, name)), regions(p)
	if len(tpl) != len(disk) || len(tpl) < 2 {
		t.Fatalf("template has %d data regions, the disk %d", len(tpl), len(disk))
	}
	changed := 0
	for off, want := range tpl {
		got := disk[off]
		if len(got) != len(want) {
			t.Fatalf("region at %d: %d bytes in the disk, %d in the template", off, len(got), len(want))
		}
		for i := range want {
			if got[i] == want[i] {
				continue
			}
			at := off + int64(i) - sbOffset
			if !(at >= sbUUID && at < sbUUID+16 || at >= sbHashSeed && at < sbHashSeed+16 || at >= sbChecksum && at < sbChecksum+4) {
				t.Fatalf("byte %d differs from the template", off+int64(i))
			}
			changed++
		}
	}
	if changed < 16 {
		t.Errorf("only %d superblock bytes differ from the template: the disk did not get its own UUID", changed)
	}
}

// TestTemplateKeyFollowsMkfs: a changed mkfs binary makes a new template
// name once mkfsRecheck has passed (its identity is cached until then).
func TestTemplateKeyFollowsMkfs(t *testing.T) {
	needTools(t)
	orig, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(orig)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "mkfs.ext4")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	m := &Maker{Label: "banger-rw", Mkfs: bin}
	n1, err := m.templateName(4 << 30)
	if err != nil {
		t.Fatal(err)
	}
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(bin, later, later); err != nil {
		t.Fatal(err)
	}
	if n2, _ := m.templateName(4 << 30); n2 != n1 {
		t.Errorf("within mkfsRecheck the name changed: %s → %s", n1, n2)
	}
	m.mu.Lock()
	m.idAt = time.Time{} // mkfsRecheck has passed
	m.mu.Unlock()
	if n3, _ := m.templateName(4 << 30); n3 == n1 {
		t.Errorf("a changed mkfs binary keeps the template name %s", n1)
	}
}
