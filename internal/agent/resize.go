package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The writable disk grows in the guest. `vm set --disk` only makes the
// disk file longer on the host (a truncate: the host never checks or edits
// a filesystem the guest wrote); at the next boot the agent sees a device
// bigger than its filesystem and grows the filesystem online with the
// kernel's ext4 resizer, the ioctl resize2fs itself uses on a mounted
// filesystem. No guest tools are needed.

// ext4IOCResizeFS is EXT4_IOC_RESIZE_FS, _IOW('f', 16, __u64): grow the
// mounted filesystem to the given number of blocks.
const ext4IOCResizeFS = 0x40086610

const (
	extBlocksCountLo   = 0x04
	extLogBlockSize    = 0x18
	extFeatureIncompat = 0x60
	extBlocksCountHi   = 0x150
	extIncompat64Bit   = 0x80
)

// extGeometry reads the block size and block count from an ext2/3/4
// superblock (the 1024 bytes at offset 1024 of the device).
func extGeometry(sb []byte) (blockSize, blocks uint64, err error) {
	if len(sb) < extBlocksCountHi+4 {
		return 0, 0, errors.New("superblock too short")
	}
	if binary.LittleEndian.Uint16(sb[extMagicOffset:]) != extMagic {
		return 0, 0, errors.New("not an ext2/3/4 filesystem")
	}
	lg := binary.LittleEndian.Uint32(sb[extLogBlockSize:])
	if lg > 6 { // 1 KiB << 6 = 64 KiB, ext4's largest block size
		return 0, 0, fmt.Errorf("implausible block size 1 KiB << %d", lg)
	}
	blockSize = 1024 << lg
	blocks = uint64(binary.LittleEndian.Uint32(sb[extBlocksCountLo:]))
	if binary.LittleEndian.Uint32(sb[extFeatureIncompat:])&extIncompat64Bit != 0 {
		blocks |= uint64(binary.LittleEndian.Uint32(sb[extBlocksCountHi:])) << 32
	}
	return blockSize, blocks, nil
}

// extMaxBlocks is the most blocks the filesystem of sb can hold: 2^32-1
// without the 64bit feature (bangerd makes disks under 16 TiB without it).
func extMaxBlocks(sb []byte) uint64 {
	if len(sb) > extFeatureIncompat+4 && binary.LittleEndian.Uint32(sb[extFeatureIncompat:])&extIncompat64Bit != 0 {
		return 1<<64 - 1
	}
	return 1<<32 - 1
}

// growTarget returns the block count a filesystem of blocks×blockSize
// should grow to on a device of devBytes, at most maxBlocks, and whether it
// should grow.
func growTarget(devBytes, blockSize, blocks, maxBlocks uint64) (uint64, bool) {
	if blockSize == 0 {
		return 0, false
	}
	want := min(devBytes/blockSize, maxBlocks)
	return want, want > blocks
}

// growFilesystem grows the ext4 filesystem of dev, mounted at mountPoint,
// to fill dev. It returns the old and new sizes in bytes (equal when there
// was nothing to do).
func growFilesystem(dev, mountPoint string) (oldBytes, newBytes uint64, err error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	// The mounted filesystem keeps its superblock in the device's page
	// cache, so this read sees the current block count.
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, extSuperblockOffset); err != nil && !errors.Is(err, io.EOF) {
		return 0, 0, fmt.Errorf("read the superblock of %s: %w", dev, err)
	}
	bs, blocks, err := extGeometry(sb)
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %w", dev, err)
	}
	devBytes, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	want, grow := growTarget(devBytes, bs, blocks, extMaxBlocks(sb))
	if !grow {
		return blocks * bs, blocks * bs, nil
	}
	mp, err := os.Open(mountPoint)
	if err != nil {
		return 0, 0, err
	}
	defer mp.Close()
	n := want
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, mp.Fd(), ext4IOCResizeFS, uintptr(unsafe.Pointer(&n))); e != 0 {
		return 0, 0, fmt.Errorf("grow the filesystem on %s from %d to %d blocks: %w", dev, blocks, want, e)
	}
	return blocks * bs, want * bs, nil
}

// growRW grows the mounted writable disk when its device grew; a failure
// is logged, not fatal (the guest runs with the old size).
func growRW(dev, mountPoint string, log *slog.Logger) {
	old, now, err := growFilesystem(dev, mountPoint)
	switch {
	case err != nil:
		log.Warn("could not grow the writable disk's filesystem; it keeps its old size", "device", dev, "error", err)
	case now > old:
		log.Info("grew the writable disk's filesystem", "device", dev, "from_mib", old>>20, "to_mib", now>>20)
	}
}
