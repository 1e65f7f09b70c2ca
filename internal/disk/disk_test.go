package disk

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
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
			if used := st.Sys().(*syscall.Stat_t).Blocks * 512; used > 16<<20 {
				t.Errorf("disk uses %d bytes on the host: not sparse", used)
			}
			if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
				t.Fatalf("e2fsck -fn: %v\n%s", err, out)
			}
			sb := superblock(t, p)
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
	p := filepath.Join(dir, "rw.ext4")
	if err := m.Make(context.Background(), p, 256<<20); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop", p, mnt).CombinedOutput(); err != nil {
		if bytes.Contains(out, []byte("loop")) {
			t.Skipf("no loop devices here: %s", out)
		}
		t.Fatalf("the kernel refuses the disk: %v\n%s", err, out)
	}
	defer exec.Command("umount", mnt).Run()
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
	for _, size := range []int64{4 << 30, 64 << 30} {
		b.Run(strconv.FormatInt(size>>30, 10)+"GiB", func(b *testing.B) {
			dir := b.TempDir()
			m := &Maker{Dir: dir, Label: "banger-rw"}
			p := filepath.Join(dir, "rw.ext4")
			if err := m.Make(context.Background(), p, size); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				os.Remove(p)
				if err := m.Make(context.Background(), p, size); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
