package agent

import (
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func mkfsExt4(t *testing.T, p string, size string, extra ...string) {
	t.Helper()
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skipf("mkfs.ext4 not installed (Debian package e2fsprogs): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args := append([]string{"-q", "-F", "-m", "0"}, extra...)
	args = append(args, p)
	if size != "" {
		args = append(args, size)
	}
	if out, err := exec.CommandContext(ctx, mkfs, args...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
}

func superblock(t *testing.T, p string) []byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, extSuperblockOffset); err != nil {
		t.Fatal(err)
	}
	return sb
}

// TestExtGeometryMatchesMkfs reads block size and count as mkfs wrote them,
// with and without the 64bit feature and for several block sizes.
func TestExtGeometryMatchesMkfs(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name      string
		size      string
		args      []string
		bs, count uint64
	}{
		{"4k blocks", "64M", []string{"-b", "4096"}, 4096, 16384},
		{"1k blocks", "16M", []string{"-b", "1024"}, 1024, 16384},
		{"64bit", "64M", []string{"-b", "4096", "-O", "64bit"}, 4096, 16384},
		{"no 64bit", "64M", []string{"-b", "4096", "-O", "^64bit"}, 4096, 16384},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_"))
			mkfsExt4(t, p, tc.size, tc.args...)
			bs, n, err := extGeometry(superblock(t, p))
			if err != nil || bs != tc.bs || n != tc.count {
				t.Fatalf("extGeometry = %d, %d, %v; want %d, %d", bs, n, err, tc.bs, tc.count)
			}
		})
	}
}

func TestExtGeometryRefusesGarbage(t *testing.T) {
	sb := make([]byte, 1024)
	if _, _, err := extGeometry(sb); err == nil {
		t.Fatal("no magic accepted")
	}
	binary.LittleEndian.PutUint16(sb[extMagicOffset:], extMagic)
	binary.LittleEndian.PutUint32(sb[extLogBlockSize:], 40)
	if _, _, err := extGeometry(sb); err == nil {
		t.Fatal("block size 1 KiB << 40 accepted")
	}
	if _, _, err := extGeometry(sb[:100]); err == nil {
		t.Fatal("short superblock accepted")
	}
}

func TestGrowTarget(t *testing.T) {
	tests := []struct {
		dev, bs, blocks, max, want uint64
		grow                       bool
	}{
		{256 << 20, 4096, 65536, 1<<64 - 1, 65536, false},      // same size
		{512 << 20, 4096, 65536, 1<<64 - 1, 131072, true},      // vm set --disk 512M
		{512<<20 + 100, 4096, 65536, 1<<64 - 1, 131072, true},  // partial block ignored
		{128 << 20, 4096, 65536, 1<<64 - 1, 32768, false},      // smaller device: never shrink
		{256<<20 + 4095, 4096, 65536, 1<<64 - 1, 65536, false}, // less than a block more
		{1 << 20, 0, 1, 1<<64 - 1, 0, false},
		// without 64bit: up to 2^32-1 blocks, however large the device
		{32 << 40, 4096, 65536, 1<<32 - 1, 1<<32 - 1, true},      // 32 TiB device, 16 TiB filesystem
		{8 << 40, 1024, 262144, 1<<32 - 1, 1<<32 - 1, true},      // 1 KiB blocks: 4 TiB
		{32 << 40, 4096, 1<<32 - 1, 1<<32 - 1, 1<<32 - 1, false}, // already at the most
		{32 << 40, 4096, 65536, 1<<64 - 1, 8 << 30, true},        // 64bit: the whole device
	}
	for _, tc := range tests {
		got, grow := growTarget(tc.dev, tc.bs, tc.blocks, tc.max)
		if got != tc.want || grow != tc.grow {
			t.Errorf("growTarget(%d, %d, %d, %d) = %d, %v; want %d, %v", tc.dev, tc.bs, tc.blocks, tc.max, got, grow, tc.want, tc.grow)
		}
	}
}

// TestExtMaxBlocks: 2^32-1 blocks without the 64bit feature, as mkfs wrote
// it; no limit with it.
func TestExtMaxBlocks(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		feature string
		want    uint64
	}{{"^64bit", 1<<32 - 1}, {"64bit", 1<<64 - 1}} {
		p := filepath.Join(dir, tc.feature)
		mkfsExt4(t, p, "64M", "-b", "4096", "-O", tc.feature)
		if got := extMaxBlocks(superblock(t, p)); got != tc.want {
			t.Errorf("-O %s: extMaxBlocks = %d, want %d", tc.feature, got, tc.want)
		}
	}
}

// TestGrowFilesystemOnline grows a mounted ext4 filesystem made the way
// bangerd makes a writable disk, after the host only made its file longer:
// the path a guest takes at boot after `vm set --disk`. Needs root and
// loop devices (CI has both).
func TestGrowFilesystemOnline(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to attach a loop device and mount (runs in CI)")
	}
	if !hasCapSysResource(t) {
		t.Skip("needs CAP_SYS_RESOURCE for EXT4_IOC_RESIZE_FS, which this sandbox (and CI, on the same kind of machine) drops; e2e TestLifecycleRealGuest covers the same ioctl inside a real guest, whose PID 1 has it")
	}
	losetup, err := exec.LookPath("losetup")
	if err != nil {
		t.Skipf("losetup not installed: %v", err)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "rw.ext4")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	// the features internal/disk gives every writable disk
	mkfsExt4(t, img, "", "-L", "banger-rw", "-O", "metadata_csum_seed,^resize_inode,meta_bg,^64bit", "-G", "256",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard")
	// what the host does for vm set --disk: the file grows, nothing else
	if err := os.Truncate(img, 256<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("no loop device here: %v %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command(losetup, "-d", dev).Run() })
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, mnt, "ext4", unix.MS_NOATIME, ""); err != nil {
		t.Skipf("cannot mount ext4 here: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, 0) })
	if err := os.WriteFile(filepath.Join(mnt, "kept"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	var before unix.Statfs_t
	unix.Statfs(mnt, &before)

	old, now, err := growFilesystem(dev, mnt)
	if err != nil {
		t.Fatal(err)
	}
	if old != 64<<20 || now != 256<<20 {
		t.Fatalf("grew %d → %d bytes, want 64 MiB → 256 MiB", old, now)
	}
	var after unix.Statfs_t
	unix.Statfs(mnt, &after)
	if got := after.Blocks * uint64(after.Bsize); got < 240<<20 {
		t.Fatalf("statfs after growing: %d MiB (before %d MiB)", got>>20, before.Blocks*uint64(before.Bsize)>>20)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "kept")); err != nil || string(b) != "data" {
		t.Fatalf("data after growing: %q %v", b, err)
	}
	// a second boot finds nothing to do
	if old, now, err := growFilesystem(dev, mnt); err != nil || old != now {
		t.Fatalf("second grow: %d → %d, %v", old, now, err)
	}
}

// hasCapSysResource reports whether this process holds CAP_SYS_RESOURCE.
func hasCapSysResource(t *testing.T) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	return false
}
