// Package disk makes the per-VM writable ext4 disks in constant time.
//
// A disk is a copy of a template: an ext4 filesystem of the same size made
// once by mkfs.ext4 and cached (keyed by size and by the mkfs binary and its
// configuration), with every all-zero block punched out. Creating a disk
// copies only the template's data regions (SEEK_DATA/SEEK_HOLE and
// copy_file_range), which hold a few hundred KiB of metadata whatever the
// size, then gives the copy its own filesystem UUID and directory hash seed
// in the superblock. The result is exactly what mkfs.ext4 would have made.
package disk

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Maker makes writable ext4 disks from cached templates.
type Maker struct {
	// Dir holds the templates; it is made (0700) when missing.
	Dir string
	// Label is the filesystem label of every disk.
	Label string
	// Mkfs is the mkfs.ext4 to run; "mkfs.ext4" from PATH when empty.
	Mkfs string

	mu    sync.Mutex
	slots map[string]*sync.Mutex // one template build at a time per key
}

// MaxTemplateData bounds the data a template may hold. mkfs.ext4 writes a
// few MiB at most; more means the filesystem under Dir cannot report holes,
// and copying would cost as much as the disk is large.
const MaxTemplateData = 64 << 20

// mkfsArgs are the options of every template:
//   - metadata_csum_seed keeps the metadata checksums independent of the
//     UUID, so each copy gets its own UUID by rewriting only the superblock;
//   - no resize_inode: its reserved descriptor blocks (up to 4 MiB of
//     pointers, more the larger the disk) would be copied into every disk.
//     Growing past the descriptor blocks the filesystem has converts it to
//     meta_bg online (the kernel's EXT4_IOC_RESIZE_FS does that itself);
//   - flex groups of 256 (32 GiB) instead of 16 (2 GiB): mkfs writes a block
//     bitmap per flex group, so fewer of them keep the copy small.
func (m *Maker) mkfsArgs(path string) []string {
	return []string{"-q", "-F", "-L", m.Label, "-m", "0", "-O", "metadata_csum_seed,^resize_inode", "-G", "256",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", path}
}

// Make creates path as a sparse ext4 filesystem of size bytes labelled
// m.Label. path is written through a temporary file and renamed into place.
func (m *Maker) Make(ctx context.Context, path string, size int64) error {
	if size < 4<<20 {
		return fmt.Errorf("writable disk of %d bytes is too small (the least is 4 MiB)", size)
	}
	tpl, err := m.template(ctx, size)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := copySparse(tpl, tmp, size); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("copy the writable disk template: %w", err)
	}
	if err := personalise(tmp); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writable disk: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// templateName names the template of size for the current mkfs: a change
// of the binary or of /etc/mke2fs.conf makes a new template.
func (m *Maker) templateName(size int64) (string, error) {
	bin := m.Mkfs
	if bin == "" {
		bin = "mkfs.ext4"
	}
	p, err := exec.LookPath(bin)
	if err != nil {
		return "", fmt.Errorf("format writable disk: %w (is e2fsprogs installed?)", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%q\x00", p, m.mkfsArgs(""))
	for _, f := range []string{p, "/etc/mke2fs.conf"} {
		if st, err := os.Stat(f); err == nil {
			fmt.Fprintf(h, "%s %d %d\x00", f, st.Size(), st.ModTime().UnixNano())
		}
	}
	return fmt.Sprintf("ext4-%d-%s.img", size, hex.EncodeToString(h.Sum(nil))[:16]), nil
}

func (m *Maker) slot(key string) *sync.Mutex {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.slots == nil {
		m.slots = map[string]*sync.Mutex{}
	}
	s := m.slots[key]
	if s == nil {
		s = &sync.Mutex{}
		m.slots[key] = s
	}
	return s
}

// template returns the path of the template of size, making it if needed.
func (m *Maker) template(ctx context.Context, size int64) (string, error) {
	name, err := m.templateName(size)
	if err != nil {
		return "", err
	}
	p := filepath.Join(m.Dir, name)
	if st, err := os.Lstat(p); err == nil && st.Mode().IsRegular() && st.Size() == size {
		return p, nil
	}
	s := m.slot(name)
	s.Lock()
	defer s.Unlock()
	if st, err := os.Lstat(p); err == nil && st.Mode().IsRegular() && st.Size() == size {
		return p, nil
	}
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(m.Dir, name+".*.tmp")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	err = tmp.Truncate(size)
	tmp.Close()
	if err != nil {
		return "", fmt.Errorf("size writable disk template: %w", err)
	}
	bin := m.Mkfs
	if bin == "" {
		bin = "mkfs.ext4"
	}
	if out, err := exec.CommandContext(ctx, bin, m.mkfsArgs(tmp.Name())...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("format writable disk: %v: %s (is e2fsprogs installed?)", err, out)
	}
	if err := digHoles(tmp.Name()); err != nil {
		return "", fmt.Errorf("writable disk template: %w", err)
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		return "", err
	}
	return p, nil
}

// digHoles punches out every all-zero 4 KiB block of the file's data
// regions, so copies only carry what mkfs actually wrote.
func digHoles(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	const bs = 4096
	buf := make([]byte, 1<<20)
	zero := make([]byte, bs)
	return forEachData(f, func(off, n int64) error {
		for n > 0 {
			chunk := min(n, int64(len(buf)))
			if _, err := f.ReadAt(buf[:chunk], off); err != nil {
				return err
			}
			for i := int64(0); i < chunk; i += bs {
				end := min(i+bs, chunk)
				if string(buf[i:end]) == string(zero[:end-i]) {
					if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off+i, end-i); err != nil {
						return fmt.Errorf("punch hole: %w", err)
					}
				}
			}
			off += chunk
			n -= chunk
		}
		return nil
	})
}

// forEachData calls fn for each data region of f, in order.
func forEachData(f *os.File, fn func(off, n int64) error) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole: %w", err)
		}
		if err := fn(data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// copySparse copies the data regions of src into a new file dst of size
// bytes; everything else stays a hole.
func copySparse(src, dst string, size int64) error {
	in, err := os.OpenFile(src, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(size); err != nil {
		return err
	}
	var total int64
	err = forEachData(in, func(off, n int64) error {
		if total += n; total > MaxTemplateData {
			return fmt.Errorf("template %s holds more than %d MiB of data (does its filesystem support SEEK_HOLE?)", src, MaxTemplateData>>20)
		}
		return copyRange(in, out, off, n)
	})
	if err != nil {
		return err
	}
	return out.Close()
}

// copyRange copies n bytes at off from in to the same offset of out, in
// the kernel when it can.
func copyRange(in, out *os.File, off, n int64) error {
	roff, woff := off, off
	for n > 0 {
		c, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(n), 0)
		if err != nil || c == 0 {
			// Other filesystems or old kernels: copy through user space.
			_, err := io.Copy(io.NewOffsetWriter(out, woff), io.NewSectionReader(in, roff, n))
			return err
		}
		n -= int64(c)
	}
	return nil
}

// ext4 superblock fields (offsets into the 1024-byte superblock at byte 1024).
const (
	sbOffset          = 1024
	sbSize            = 1024
	sbMagic           = 0x38
	sbFeatureIncompat = 0x60
	sbFeatureROCompat = 0x64
	sbUUID            = 0x68
	sbHashSeed        = 0xEC
	sbChecksum        = 0x3FC

	ext4Magic            = 0xEF53
	incompatCsumSeed     = 0x2000
	roCompatMetadataCsum = 0x400
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// personalise gives the filesystem in path a fresh UUID and directory hash
// seed, and re-checksums its superblock. It needs metadata_csum_seed when
// metadata_csum is on (the template has it), so no other block changes.
func personalise(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	sb := make([]byte, sbSize)
	if _, err := f.ReadAt(sb, sbOffset); err != nil {
		return fmt.Errorf("read the superblock: %w", err)
	}
	if err := patchSuperblock(sb, rand.Reader); err != nil {
		return err
	}
	if _, err := f.WriteAt(sb, sbOffset); err != nil {
		return fmt.Errorf("write the superblock: %w", err)
	}
	return f.Close()
}

// patchSuperblock sets a random UUID and hash seed in sb and updates its
// checksum.
func patchSuperblock(sb []byte, rnd io.Reader) error {
	if len(sb) != sbSize || binary.LittleEndian.Uint16(sb[sbMagic:]) != ext4Magic {
		return errors.New("not an ext4 superblock")
	}
	incompat := binary.LittleEndian.Uint32(sb[sbFeatureIncompat:])
	csum := binary.LittleEndian.Uint32(sb[sbFeatureROCompat:])&roCompatMetadataCsum != 0
	if csum && incompat&incompatCsumSeed == 0 {
		return errors.New("template has metadata_csum without metadata_csum_seed: its UUID cannot change")
	}
	var r [32]byte
	if _, err := io.ReadFull(rnd, r[:]); err != nil {
		return err
	}
	r[6] = r[6]&0x0f | 0x40 // version 4
	r[8] = r[8]&0x3f | 0x80 // RFC 4122 variant
	copy(sb[sbUUID:sbUUID+16], r[:16])
	copy(sb[sbHashSeed:sbHashSeed+16], r[16:])
	if csum {
		binary.LittleEndian.PutUint32(sb[sbChecksum:], ^crc32.Update(0, castagnoli, sb[:sbChecksum]))
	}
	return nil
}
