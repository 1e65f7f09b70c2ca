package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Paths inside the initramfs.
const (
	newRoot   = "/newroot"
	imageDir  = "/banger/image" // image root, read-only
	rwDir     = "/banger/rw"    // writable disk
	upperName = "upper"
	workName  = "work"
)

type mountSpec struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	mode                   os.FileMode
}

// earlyMounts are the kernel filesystems init needs before anything else.
var earlyMounts = []mountSpec{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", 0o755},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5", 0o755},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", 0o755},
}

// movedMounts go into the new root before switching (submounts follow).
var movedMounts = []string{"/proc", "/sys", "/dev", "/run"}

func mountEarly() error {
	for _, m := range earlyMounts {
		if err := os.MkdirAll(m.target, m.mode); err != nil {
			return fmt.Errorf("create %s: %w", m.target, err)
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	// /dev/ptmx must reach this devpts instance.
	if fi, err := os.Lstat("/dev/ptmx"); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		_ = os.Remove("/dev/ptmx")
		_ = os.Symlink("pts/ptmx", "/dev/ptmx")
	}
	for _, l := range [][2]string{{"/proc/self/fd", "/dev/fd"}, {"/proc/self/fd/0", "/dev/stdin"}, {"/proc/self/fd/1", "/dev/stdout"}, {"/proc/self/fd/2", "/dev/stderr"}} {
		_ = os.Symlink(l[0], l[1])
	}
	return nil
}

// attachConsole makes fds 0, 1 and 2 the console: without /dev/console in
// the initramfs the kernel starts init with no open files.
func attachConsole() {
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	for i := 0; i < 3; i++ {
		_ = unix.Dup3(fd, i, 0)
	}
	if fd > 2 {
		unix.Close(fd)
	}
}

// mountRoot mounts the image root read-only, the writable disk, and the
// overlay of the two on newRoot. With rw nil the upper layer is a tmpfs:
// the guest runs, but nothing it writes survives a restart.
func mountRoot(root, rw *Disk, log *slog.Logger) error {
	for _, d := range []string{imageDir, rwDir, newRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	if err := unix.Mount(root.Path, imageDir, "ext4", unix.MS_RDONLY, ""); err != nil {
		// A journal that needs recovery cannot be replayed on a read-only
		// device; the image is never written, so skip it.
		if err2 := unix.Mount(root.Path, imageDir, "ext4", unix.MS_RDONLY, "noload"); err2 != nil {
			return fmt.Errorf("mount the image root %s read-only: %w", root.Path, err)
		}
		log.Warn("image root mounted without replaying its journal", "device", root.Path)
	}
	if rw != nil {
		if err := unix.Mount(rw.Path, rwDir, "ext4", unix.MS_NOATIME, rwMountOptions(rw)); err != nil {
			return fmt.Errorf("mount the writable disk %s: %w", rw.Path, err)
		}
		growRW(rw.Path, rwDir, log) // after `vm set --disk`
	} else {
		log.Warn("no writable disk (ext4 labelled banger-rw): changes will be lost at power off")
		if err := unix.Mount("tmpfs", rwDir, "tmpfs", 0, "mode=0755"); err != nil {
			return fmt.Errorf("mount a tmpfs for the root's upper layer: %w", err)
		}
	}
	upper := filepath.Join(rwDir, upperName)
	work := filepath.Join(rwDir, workName)
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s on the writable disk: %w", d, err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", imageDir, upper, work)
	if err := unix.Mount("overlay", newRoot, "overlay", 0, opts); err != nil {
		if errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("mount the root overlay: %w (overlayfs is missing: add the overlay module to the initrd)", err)
		}
		return fmt.Errorf("mount the root overlay (%s): %w", opts, err)
	}
	return nil
}

// openWritableRoot opens the writable disk's mount root (rwDir) O_PATH and
// close-on-exec, for the stop to remount it read-only after the switch to
// the new root has put it out of reach by path (see writableRoot).
func openWritableRoot(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return os.NewFile(uintptr(fd), dir), nil
}

// rwMountOptions are the ext4 options of the writable disk:
//   - noinit_itable: the disk is a sparse copy of a template made with
//     lazy_itable_init, so its unused inode tables are holes that read as
//     zeros already; the kernel's background zeroing of them would only cost
//     emulated CPU after every boot and fill the host's file.
//   - discard, when the device takes discards (QEMU's drive has
//     discard=unmap): blocks the guest frees become holes in the host's
//     sparse file at once, instead of only when the VM is deleted. Measured
//     (docs/BENCHMARKS.md): no cost on writes, about 25 ms more to delete
//     100 MiB.
func rwMountOptions(rw *Disk) string {
	if rw.Discard {
		return "noinit_itable,discard"
	}
	return "noinit_itable"
}

// moveKernelMounts moves /proc, /sys, /dev and /run into the new root.
func moveKernelMounts() error {
	for _, m := range movedMounts {
		target := filepath.Join(newRoot, m)
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("create %s in the new root: %w", m, err)
		}
		if err := unix.Mount(m, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s into the new root: %w", m, err)
		}
	}
	return nil
}

// switchRoot makes newRoot the root: the equivalent of busybox switch_root
// (which first frees the initramfs: see freeInitramfs).
func switchRoot() error {
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("chdir %s: %w", newRoot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move the new root onto /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot into the new root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir / in the new root: %w", err)
	}
	return nil
}

// freeInitramfs deletes the initramfs's files (they would hold guest memory
// forever), staying on the initramfs filesystem: mount points and what is
// below them are left alone. The running agent binary stays reachable as
// /proc/self/exe.
func freeInitramfs(log *slog.Logger) {
	var st unix.Statfs_t
	if err := unix.Statfs("/", &st); err != nil || (st.Type != unix.RAMFS_MAGIC && st.Type != unix.TMPFS_MAGIC) {
		return
	}
	var root unix.Stat_t
	if err := unix.Lstat("/", &root); err != nil {
		return
	}
	freed := removeSameDev("/", root.Dev)
	log.Debug("initramfs freed", "bytes", freed)
}

func removeSameDev(dir string, dev uint64) int64 {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var freed int64
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil || st.Dev != dev {
			continue
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			freed += removeSameDev(p, dev)
			_ = unix.Rmdir(p) // fails (rightly) for mount points' parents
			continue
		}
		if unix.Unlink(p) == nil {
			freed += st.Size
		}
	}
	return freed
}

// rndAddEntropy is RNDADDENTROPY, _IOW('R', 0x03, int[2]).
const rndAddEntropy = 0x40085203

// seedRNG credits seed to the kernel's entropy pool (struct rand_pool_info:
// entropy_count in bits, buf_size in bytes, then the bytes).
func seedRNG(seed []byte) error {
	if len(seed) == 0 {
		return nil
	}
	buf := make([]byte, 8+len(seed))
	binary.NativeEndian.PutUint32(buf[0:], uint32(len(seed)*8))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(seed)))
	copy(buf[8:], seed)
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndAddEntropy, uintptr(unsafe.Pointer(&buf[0])))
	runtime.KeepAlive(buf)
	if errno != 0 {
		return errno
	}
	return nil
}
