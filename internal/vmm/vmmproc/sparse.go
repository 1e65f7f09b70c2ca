package vmmproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"

	"golang.org/x/sys/unix"
)

// CopySparse copies the regular file src to dst (created, must not exist),
// reading only the data regions (SEEK_DATA/SEEK_HOLE): holes stay holes, so a
// mostly empty writable disk costs only what the guest wrote. ctx is checked
// between regions.
func CopySparse(ctx context.Context, src, dst string) (int64, error) {
	return copySparse(ctx, src, dst, false, true)
}

// CopySparseUnsynced is CopySparse without the final fsync: the caller
// syncs (SyncTree) when the copy must survive a crash, e.g. after a paused
// VM runs again.
func CopySparseUnsynced(ctx context.Context, src, dst string) (int64, error) {
	return copySparse(ctx, src, dst, false, false)
}

// CopySparseSkipZeros is CopySparseUnsynced that also leaves a hole for
// every zero-filled 4 KiB page of a data region, for a guest memory file: a
// guest touches (often zeroes) far more pages than it keeps data in. It
// returns the bytes written.
func CopySparseSkipZeros(ctx context.Context, src, dst string) (int64, error) {
	return copySparse(ctx, src, dst, true, false)
}

// SyncTree fsyncs every regular file under dir (not following links), then
// the directories, so that what was written there survives a crash.
func SyncTree(dir string) error {
	var dirs []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			dirs = append(dirs, p)
			return nil
		case !d.Type().IsRegular():
			return nil
		}
		return syncPath(p)
	})
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := syncPath(dirs[i]); err != nil {
			return fmt.Errorf("sync %s: %w", dirs[i], err)
		}
	}
	return nil
}

func syncPath(p string) error {
	f, err := os.OpenFile(p, os.O_RDONLY|noFollow, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func copySparse(ctx context.Context, src, dst string, skipZeros, sync bool) (int64, error) {
	in, err := os.OpenFile(src, os.O_RDONLY|noFollow, 0)
	if err != nil {
		return 0, fmt.Errorf("copy disk: %w", err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return 0, fmt.Errorf("copy disk: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return 0, fmt.Errorf("copy disk: %s is not a regular file", src)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|noFollow, 0o600)
	if err != nil {
		return 0, fmt.Errorf("copy disk: %w", err)
	}
	ok := false
	defer func() {
		out.Close()
		if !ok {
			os.Remove(dst)
		}
	}()
	size := fi.Size()
	var copied int64
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return copied, fmt.Errorf("copy disk: %w", err)
		}
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole after off
		}
		if err != nil {
			return copied, fmt.Errorf("copy disk: find data in %s: %w", src, err)
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return copied, fmt.Errorf("copy disk: find hole in %s: %w", src, err)
		}
		if skipZeros {
			n, err := copyNonZero(ctx, in, out, data, hole)
			copied += n
			if err != nil {
				return copied, fmt.Errorf("copy %s: %w", src, err)
			}
			off = hole
			continue
		}
		if _, err := in.Seek(data, io.SeekStart); err != nil {
			return copied, err
		}
		if _, err := out.Seek(data, io.SeekStart); err != nil {
			return copied, err
		}
		// *os.File to *os.File through a LimitedReader: copy_file_range.
		n, err := io.Copy(out, io.LimitReader(in, hole-data))
		copied += n
		if err != nil {
			return copied, fmt.Errorf("copy disk %s: %w", src, err)
		}
		if n != hole-data {
			return copied, fmt.Errorf("copy disk %s: file shrank while being copied", src)
		}
		off = hole
	}
	if err := out.Truncate(size); err != nil {
		return copied, fmt.Errorf("copy disk: %w", err)
	}
	if sync {
		if err := out.Sync(); err != nil {
			return copied, fmt.Errorf("copy disk: %w", err)
		}
	}
	ok = true
	return copied, nil
}

// DiskUse is the space the file at path takes on disk (its allocated
// blocks), which for a sparse file is less than its size.
func DiskUse(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}

const (
	zeroPage  = 4 << 10
	zeroChunk = 1 << 20
)

var zeros [zeroPage]byte

// mapChunk is how much of the source copyNonZero maps at a time.
const mapChunk = 32 << 20

// copyNonZero copies [from, to) of in to the same offsets of out, leaving
// out every zero-filled page. It reads the source through a read-only
// mapping (a paused guest's memory file: scanning it in place saves copying
// every page, most of them zeros, into a buffer first; 256 MiB took ~60 ms
// read and scanned), or with reads where the file cannot be mapped.
func copyNonZero(ctx context.Context, in, out *os.File, from, to int64) (int64, error) {
	if from%int64(os.Getpagesize()) == 0 {
		n, err := copyNonZeroMapped(ctx, in, out, from, to)
		if !errors.Is(err, errNoMap) {
			return n, err
		}
	}
	return copyNonZeroRead(ctx, in, out, from, to)
}

// errNoMap: the source could not be mapped (copyNonZero reads it instead).
var errNoMap = errors.New("cannot map the source")

// copyNonZeroMapped is copyNonZero through mappings of mapChunk bytes.
func copyNonZeroMapped(ctx context.Context, in, out *os.File, from, to int64) (int64, error) {
	var copied int64
	for pos := from; pos < to; {
		if err := ctx.Err(); err != nil {
			return copied, err
		}
		n := int(min(int64(mapChunk), to-pos))
		m, err := unix.Mmap(int(in.Fd()), pos, n, unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			if pos == from {
				return 0, errNoMap
			}
			return copied, fmt.Errorf("map the source: %w", err)
		}
		w, err := writeNonZeroMapped(out, m, pos)
		copied += w
		unix.Munmap(m)
		if err != nil {
			return copied, err
		}
		pos += int64(n)
	}
	return copied, nil
}

// writeNonZeroMapped is writeNonZero over a mapping of the source: a source
// cut shorter while mapped (the VMM truncating its memory file) faults on
// the next page read, which is an error here, not a crash.
func writeNonZeroMapped(out *os.File, m []byte, pos int64) (n int64, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(interface{ Addr() uintptr }); !ok {
				panic(r)
			}
			err = errors.New("the file shrank while being copied")
		}
	}()
	return writeNonZero(out, m, pos)
}

// writeNonZero writes the runs of non-zero pages of b (which is at offset
// pos of the source) to the same offsets of out.
func writeNonZero(out *os.File, b []byte, pos int64) (int64, error) {
	var copied int64
	run := -1 // start of the current run of non-zero pages
	flush := func(end int) error {
		if run < 0 {
			return nil
		}
		w, err := out.WriteAt(b[run:end], pos+int64(run))
		copied += int64(w)
		run = -1
		return err
	}
	for p := 0; p < len(b); p += zeroPage {
		end := min(p+zeroPage, len(b))
		if bytes.Equal(b[p:end], zeros[:end-p]) {
			if err := flush(p); err != nil {
				return copied, err
			}
		} else if run < 0 {
			run = p
		}
	}
	return copied, flush(len(b))
}

// copyNonZeroRead is copyNonZero with reads into a buffer.
func copyNonZeroRead(ctx context.Context, in, out *os.File, from, to int64) (int64, error) {
	buf := make([]byte, zeroChunk)
	var copied int64
	for pos := from; pos < to; {
		if err := ctx.Err(); err != nil {
			return copied, err
		}
		n := int(min(int64(len(buf)), to-pos))
		if _, err := in.ReadAt(buf[:n], pos); err != nil {
			if errors.Is(err, io.EOF) {
				return copied, errors.New("the file shrank while being copied")
			}
			return copied, err
		}
		w, err := writeNonZero(out, buf[:n], pos)
		copied += w
		if err != nil {
			return copied, err
		}
		pos += int64(n)
	}
	return copied, nil
}
