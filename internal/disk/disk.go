// Package disk makes the per-VM writable ext4 disks in a time that hardly
// grows with their size.
//
// A disk is a copy of a template: an ext4 filesystem of the same size made
// once by mkfs.ext4 and cached (keyed by size and by the mkfs binary, its
// options and its configuration), with every all-zero block punched out.
// The template's data regions (a few hundred KiB of metadata) are read once
// into memory; creating a disk writes them into a new sparse file, one
// pwrite per region, with a fresh filesystem UUID and directory hash seed in
// its superblock. The result is exactly what mkfs.ext4 would have made.
//
// With Spares set, the copy leaves the create path: one finished disk per
// template waits in the template directory (spare.go), Make renames it into
// place and writes the next one in the background.
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
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

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
	// Spares is the most spare disks kept ready, one per template (so per
	// size), for the sizes made most recently; 0 keeps none, and every Make
	// copies its template.
	Spares int
	// Logger receives the failures of background refills; nil discards them.
	Logger *slog.Logger

	mu     sync.Mutex
	slots  map[string]*sync.Mutex // one template build at a time per key
	loaded map[string]*template   // templates read into memory, by name
	cached int64                  // bytes held by loaded
	// mkfsID's answer for the binary idBin, found at idAt
	idPath, idStats, idBin string
	idAt                   time.Time

	// Fault, when set, is called at each step of a background refill
	// (template, temp, written, renamed): the fault-injection tests stop
	// there.
	Fault func(step string)

	sp spares
}

// template is a template's data regions, in file order; everything else of
// its size bytes is a hole.
type template struct {
	size    int64
	regions []region
}

type region struct {
	off  int64
	data []byte
}

// maxCached bounds the template data held in memory (a 64 GiB template
// holds about 200 KiB); past it the cache starts over.
const maxCached = 8 << 20

// MaxTemplateData bounds the data a template may hold. mkfs.ext4 writes a
// few MiB at most; more means the filesystem under Dir cannot report holes,
// and copying would cost as much as the disk is large.
const MaxTemplateData = 64 << 20

// max32BitSize is the largest disk made without the 64bit feature: 2^32
// blocks of 4 KiB.
const max32BitSize = 16 << 40

// mkfsArgs are the options of the template of size bytes. What a disk copy
// costs is the pages it writes and the regions they form, and ext4 writes a
// superblock copy at every sparse_super backup group (12 at 64 GiB, 7 at
// 4 GiB) whatever the options; these keep everything else small:
//   - metadata_csum_seed keeps the metadata checksums independent of the
//     UUID, so each copy gets its own UUID by rewriting only the superblock;
//   - no resize_inode: its reserved descriptor blocks (up to 4 MiB of
//     pointers, more the larger the disk) would be copied into every disk;
//   - meta_bg: each block of group descriptors is kept in the first, second
//     and last group of the 128 groups it describes (16 GiB at 4 KiB blocks),
//     instead of the whole table beside every backup superblock: at 64 GiB
//     12 descriptor blocks instead of 52, at 1 TiB 192 instead of 1216. The
//     kernel grows a meta_bg filesystem online (EXT4_IOC_RESIZE_FS);
//   - no 64bit below 16 TiB: 32-byte descriptors, half the blocks of the
//     64-byte ones. Such a filesystem holds at most 2^32 blocks (16 TiB at
//     4 KiB, 4 TiB at the 1 KiB blocks mkfs picks under 512 MiB), and the
//     agent grows it no further than that;
//   - flex groups of 256 (32 GiB) instead of 16 (2 GiB): mkfs writes a block
//     bitmap per flex group, so fewer of them keep the copy small.
func (m *Maker) mkfsArgs(size int64, path string) []string {
	features := "metadata_csum_seed,^resize_inode,meta_bg"
	if size < max32BitSize {
		features += ",^64bit"
	}
	return []string{"-q", "-F", "-L", m.Label, "-m", "0", "-O", features, "-G", "256",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", path}
}

// Make creates path as a sparse ext4 filesystem of size bytes labelled
// m.Label, with its own UUID. It renames the spare of its template into
// place when there is one (Spares > 0; path on the filesystem of Dir), else
// writes a copy of the template through a temporary file renamed into
// place; with Spares it then starts the next spare's refill and returns
// without waiting for it.
func (m *Maker) Make(ctx context.Context, path string, size int64) error {
	if size < 4<<20 {
		return fmt.Errorf("writable disk of %d bytes is too small (the least is 4 MiB)", size)
	}
	name, err := m.templateName(size)
	if err != nil {
		return err
	}
	if m.Spares > 0 && m.takeSpare(name, size, path) {
		m.refill(name, size, nil, true)
		return nil
	}
	tpl, err := m.template(ctx, name, size)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := tpl.write(tmp, rand.Reader, false); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writable disk: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	if m.Spares > 0 {
		m.refill(name, size, tpl, false)
	}
	return nil
}

// templateName names the template of size for the current mkfs: a change
// of the binary or of /etc/mke2fs.conf makes a new template (seen within
// mkfsRecheck: the binary's identity is looked up at most that often).
func (m *Maker) templateName(size int64) (string, error) {
	bin := m.Mkfs
	if bin == "" {
		bin = "mkfs.ext4"
	}
	p, stats, err := m.mkfsID(bin)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%q\x00%s", p, m.mkfsArgs(size, ""), stats)
	return fmt.Sprintf("ext4-%d-%s.img", size, hex.EncodeToString(h.Sum(nil))[:16]), nil
}

// mkfsRecheck is how long mkfsID trusts what it found.
const mkfsRecheck = time.Second

// mkfsID is the path of bin and the size and time of it and of
// /etc/mke2fs.conf; a PATH lookup and two stats cost about half a create
// from a spare, so they are redone at most every mkfsRecheck.
func (m *Maker) mkfsID(bin string) (path, stats string, err error) {
	now := time.Now()
	m.mu.Lock()
	if m.idBin == bin && now.Sub(m.idAt) < mkfsRecheck {
		path, stats = m.idPath, m.idStats
		m.mu.Unlock()
		return path, stats, nil
	}
	m.mu.Unlock()
	path, err = exec.LookPath(bin)
	if err != nil {
		return "", "", fmt.Errorf("format writable disk: %w (is e2fsprogs installed?)", err)
	}
	for _, f := range []string{path, "/etc/mke2fs.conf"} {
		if st, err := os.Stat(f); err == nil {
			stats += fmt.Sprintf("%s %d %d\x00", f, st.Size(), st.ModTime().UnixNano())
		}
	}
	m.mu.Lock()
	m.idPath, m.idStats, m.idBin, m.idAt = path, stats, bin, now
	m.mu.Unlock()
	return path, stats, nil
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

// template returns the template name of size, read into memory, making it
// first if needed.
func (m *Maker) template(ctx context.Context, name string, size int64) (*template, error) {
	m.mu.Lock()
	t := m.loaded[name]
	m.mu.Unlock()
	if t != nil {
		return t, nil
	}
	s := m.slot(name)
	s.Lock()
	defer s.Unlock()
	m.mu.Lock()
	t = m.loaded[name]
	m.mu.Unlock()
	if t != nil {
		return t, nil
	}
	p := filepath.Join(m.Dir, name)
	if st, err := os.Lstat(p); err != nil || !st.Mode().IsRegular() || st.Size() != size {
		if err := m.build(ctx, p, name, size); err != nil {
			return nil, err
		}
	}
	t, err := load(p, size)
	if err != nil {
		return nil, fmt.Errorf("writable disk template: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.loaded == nil || m.cached+t.bytes() > maxCached {
		m.loaded, m.cached = map[string]*template{}, 0
	}
	m.loaded[name] = t
	m.cached += t.bytes()
	return t, nil
}

// build makes the template p of size with mkfs.ext4, punches out its zero
// blocks and renames it into place.
func (m *Maker) build(ctx context.Context, p, name string, size int64) error {
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(m.Dir, name+".*.tmp")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	err = tmp.Truncate(size)
	tmp.Close()
	if err != nil {
		return fmt.Errorf("size writable disk template: %w", err)
	}
	bin := m.Mkfs
	if bin == "" {
		bin = "mkfs.ext4"
	}
	if out, err := exec.CommandContext(ctx, bin, m.mkfsArgs(size, tmp.Name())...).CombinedOutput(); err != nil {
		return fmt.Errorf("format writable disk: %v: %s (is e2fsprogs installed?)", err, out)
	}
	if err := digHoles(tmp.Name()); err != nil {
		return fmt.Errorf("writable disk template: %w", err)
	}
	return os.Rename(tmp.Name(), p)
}

// load reads the data regions of the template p, which must be size bytes
// and start with an ext4 superblock.
func load(p string, size int64) (*template, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() != size {
		return nil, fmt.Errorf("%s is not a %d-byte file", p, size)
	}
	t := &template{size: size}
	var total int64
	err = forEachData(f, func(off, n int64) error {
		if total += n; total > MaxTemplateData {
			return fmt.Errorf("%s holds more than %d MiB of data (does its filesystem support SEEK_HOLE?)", p, MaxTemplateData>>20)
		}
		b := make([]byte, n)
		if _, err := f.ReadAt(b, off); err != nil {
			return err
		}
		t.regions = append(t.regions, region{off, b})
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(t.regions) == 0 || t.regions[0].off != 0 || len(t.regions[0].data) < sbOffset+sbSize {
		return nil, fmt.Errorf("%s does not start with a superblock", p)
	}
	return t, nil
}

func (t *template) bytes() int64 {
	var n int64
	for _, r := range t.regions {
		n += int64(len(r.data))
	}
	return n
}

// write creates dst as a sparse copy of t with its own UUID and hash seed
// (from rnd): the file is sized first, then each data region is written at
// its offset, the first with the new superblock. durable syncs the file
// before it is closed.
func (t *template) write(dst string, rnd io.Reader, durable bool) error {
	first := append([]byte(nil), t.regions[0].data...)
	if err := patchSuperblock(first[sbOffset:sbOffset+sbSize], rnd); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(t.size); err != nil {
		return err
	}
	for i, r := range t.regions {
		b := r.data
		if i == 0 {
			b = first
		}
		if _, err := out.WriteAt(b, r.off); err != nil {
			return err
		}
	}
	if durable {
		if err := out.Sync(); err != nil {
			return err
		}
	}
	return out.Close()
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
