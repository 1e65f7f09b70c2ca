package image

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Default limits on what one image's layers may unpack to.
const (
	// DefaultMaxBytes bounds the uncompressed bytes of all layers together.
	DefaultMaxBytes int64 = 64 << 30
	// DefaultMaxEntries bounds the files, directories and other entries of
	// all layers together (about 300 bytes of bangerd's memory each). Large
	// real images hold a few hundred thousand.
	DefaultMaxEntries = 1_000_000
	// maxMetaBytes bounds what the tree keeps in memory besides inodes:
	// names, symlink targets and xattrs.
	maxMetaBytes = 256 << 20
	// spaceReserve is left free on the disk holding the work directory.
	spaceReserve = 128 << 20
)

// ErrLimit is returned when layers exceed a configured limit; the caller adds
// where to raise it.
var ErrLimit = errors.New("image exceeds a limit")

// ErrNoSpace is returned before the disk holding the work directory would fill.
var ErrNoSpace = errors.New("not enough free disk space")

// Limits bound what the layers of one image may unpack to; zero fields take
// the defaults.
type Limits struct {
	// MaxBytes bounds the uncompressed tar streams of all layers together,
	// and separately the sizes of all regular files in them (sparse files
	// count their full size).
	MaxBytes int64
	// MaxEntries bounds tar entries plus the directories they imply.
	MaxEntries int
}

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	return l
}

// freeBytes reports the bytes an unprivileged user may still write on the
// filesystem holding dir.
func freeBytes(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// addEntry counts one more entry against the limit.
func (t *Tree) addEntry() error {
	t.entries++
	if t.entries > t.limits().MaxEntries {
		return fmt.Errorf("%w: the layers hold more than %d entries (files, directories, links…)", ErrLimit, t.limits().MaxEntries)
	}
	return nil
}

// addMeta counts bytes the tree keeps in memory.
func (t *Tree) addMeta(n int) error {
	t.metaBytes += int64(n)
	limit := t.maxMeta
	if limit <= 0 {
		limit = maxMetaBytes
	}
	if t.metaBytes > limit {
		return fmt.Errorf("%w: the layers' names, symlink targets and xattrs exceed %s", ErrLimit, humanBytes(limit))
	}
	return nil
}

// addContent counts a regular file's size before it is staged, and checks
// that the disk can take it.
func (t *Tree) addContent(name string, size int64) error {
	if size < 0 {
		return fmt.Errorf("negative size %d", size)
	}
	t.contentBytes += size
	if max := t.limits().MaxBytes; t.contentBytes > max {
		return fmt.Errorf("%w: the layers' files add up to more than %s", ErrLimit, humanBytes(max))
	}
	if size == 0 {
		return nil
	}
	return t.checkSpace(size, "unpack /"+name)
}

// checkSpace fails with ErrNoSpace unless need bytes fit on the disk of the
// staging directory with spaceReserve to spare.
func (t *Tree) checkSpace(need int64, what string) error {
	free := t.freeSpace
	if free == nil {
		free = freeBytes
	}
	return checkFree(free, t.staging, need, what)
}

// checkFree fails with ErrNoSpace unless need bytes fit on the disk holding
// dir (or its nearest existing parent) with spaceReserve to spare.
func checkFree(free func(string) (int64, error), dir string, need int64, what string) error {
	for {
		if _, err := os.Stat(dir); err == nil || filepath.Dir(dir) == dir {
			break
		}
		dir = filepath.Dir(dir)
	}
	avail, err := free(dir)
	if err != nil {
		return fmt.Errorf("check free space in %s: %w", dir, err)
	}
	if need+spaceReserve > avail {
		return fmt.Errorf("%w: %s needs %s, and the disk holding %s has %s free (%s kept in reserve); free some space, or move banger's data directory",
			ErrNoSpace, what, humanBytes(need), dir, humanBytes(avail), humanBytes(spaceReserve))
	}
	return nil
}

func (t *Tree) limits() Limits { return t.Limits.withDefaults() }

// streamLimit counts the uncompressed bytes of every layer's tar stream.
type streamLimit struct {
	r io.Reader
	t *Tree
}

func (s streamLimit) Read(p []byte) (int, error) {
	max := s.t.limits().MaxBytes
	if s.t.streamBytes > max {
		return 0, fmt.Errorf("%w: the layers unpack to more than %s", ErrLimit, humanBytes(max))
	}
	// Read at most one byte past the limit, so that the next read fails.
	if room := max + 1 - s.t.streamBytes; int64(len(p)) > room {
		p = p[:room]
	}
	n, err := s.r.Read(p)
	s.t.streamBytes += int64(n)
	return n, err
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d bytes", n)
}
