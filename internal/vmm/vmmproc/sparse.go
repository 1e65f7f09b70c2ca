package vmmproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// CopySparse copies the regular file src to dst (created, must not exist),
// reading only the data regions (SEEK_DATA/SEEK_HOLE): holes stay holes, so a
// mostly empty writable disk costs only what the guest wrote. ctx is checked
// between regions.
func CopySparse(ctx context.Context, src, dst string) (int64, error) {
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
	if err := out.Sync(); err != nil {
		return copied, fmt.Errorf("copy disk: %w", err)
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
