package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path"
	"path/filepath"
	"time"

	"github.com/pkg/sftp"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/guestfs"
)

// MaxReadFile bounds ReadFile when its max is 0.
const MaxReadFile = 64 << 20

// GuestFS is an SFTP session to a running VM with what workspace copies
// need; Close ends it.
type GuestFS struct {
	guestfs.SFTP
	close func()
}

// Close ends the SFTP session and its connection.
func (g *GuestFS) Close() error {
	g.close()
	return nil
}

// OpenFS opens SFTP to a running VM as root, over the bulk path when the
// VM has one (else SSH). Cancelling ctx closes it.
func (c *Client) OpenFS(ctx context.Context, vm string) (*GuestFS, error) {
	sc, closeFn, err := c.bulkSFTP(ctx, vm)
	if err == nil {
		return &GuestFS{SFTP: guestfs.SFTP{C: sc, Run: func(argv []string) error { return c.Run(ctx, vm, argv) }}, close: closeFn}, nil
	}
	if !noBulk(err) {
		return nil, err
	}
	cl, err := c.SSH(ctx, vm, "")
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { cl.Close() })
	sc, err = sftp.NewClient(cl, sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(64))
	if err != nil {
		stop()
		cl.Close()
		return nil, fmt.Errorf("start sftp in %s: %w", vm, err)
	}
	return &GuestFS{SFTP: guestfs.SFTP{C: sc, SSH: cl}, close: func() { sc.Close(); stop(); cl.Close() }}, nil
}

// ReadFile, WriteFile, Upload and Download take one bulk stream each
// (bulk.OpGetFile, OpPutFile, or OpPut for WriteFile's mode 0): no SFTP
// session, whose start forks and execs a child of the agent, and no Stat
// or Chmod round trips. They take SFTP (OpenFS) as before when the stream
// cannot do it with SFTP's meaning (streamable), when the VM or its agent
// has no such stream, and when the agent refused before changing anything
// (a missing file or directory...: SFTP then says why in the words these
// methods always used). See IsFallback.

// streamable reports whether the agent's one-file streams resolve p as
// SFTP does. They clean the path lexically (relative to root's home, else
// /, as SFTP): for a clean path that is what the kernel resolves, but a
// ".." after a symlink, or a trailing "/" or "/." after a regular file, is
// not, so such a path stays on SFTP.
func streamable(p string) bool {
	return p != "" && path.Clean(p) == p
}

// ReadFile reads a regular file in a running VM, refusing one larger than
// max bytes (0: MaxReadFile).
func (c *Client) ReadFile(ctx context.Context, vm, path string, max int64) ([]byte, error) {
	if max <= 0 {
		max = MaxReadFile
	}
	if streamable(path) {
		b, err := c.readFileStream(ctx, vm, path, max)
		if !IsFallback(err) {
			return b, err
		}
	}
	return c.readFileSFTP(ctx, vm, path, max)
}

// readFileStream is ReadFile over OpGetFile. The size the agent announces
// is checked before anything is read, and the read is bounded by max
// whatever the agent sends (bulk.Getter fails on more than it announced).
func (c *Client) readFileStream(ctx context.Context, vm, path string, max int64) ([]byte, error) {
	r, m, err := c.GetGuestFile(ctx, vm, path)
	if err != nil {
		return nil, err // it names vm:path
	}
	if r == nil {
		return nil, notRegular(vm, path)
	}
	defer r.Close()
	if m.Size > uint64(max) { // uint64: a size beyond int64 is not negative
		return nil, tooLarge(vm, path, max)
	}
	var buf bytes.Buffer
	buf.Grow(int(min(m.Size, 1<<20))) // the rest as it comes, not as announced
	if _, err := buf.ReadFrom(io.LimitReader(r, pastMax(max))); err != nil {
		return nil, fmt.Errorf("read %s:%s: %w", vm, path, err)
	}
	if int64(buf.Len()) > max {
		return nil, tooLarge(vm, path, max)
	}
	return buf.Bytes(), nil
}

func (c *Client) readFileSFTP(ctx context.Context, vm, path string, max int64) ([]byte, error) {
	g, err := c.OpenFS(ctx, vm)
	if err != nil {
		return nil, err
	}
	defer g.Close()
	f, err := g.C.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%s:%s: %w", vm, path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s:%s: %w", vm, path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, notRegular(vm, path)
	}
	b, err := io.ReadAll(io.LimitReader(f, pastMax(max)))
	if err != nil {
		return nil, fmt.Errorf("read %s:%s: %w", vm, path, err)
	}
	if int64(len(b)) > max {
		return nil, tooLarge(vm, path, max)
	}
	return b, nil
}

// pastMax is max+1, the bytes to read to tell a file over max (max itself
// when that would overflow: math.MaxInt64 + 1 is negative, and a
// LimitReader of that reads nothing).
func pastMax(max int64) int64 {
	if max == math.MaxInt64 {
		return max
	}
	return max + 1
}

func notRegular(vm, path string) error {
	return &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("%s:%s is not a regular file", vm, path)}
}

func tooLarge(vm, path string, max int64) error {
	return &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("%s:%s is larger than %d bytes", vm, path, max)}
}

// WriteFile writes data to path in a running VM, as root: created, or
// truncated. A mode other than 0 sets the file's permission bits (Perm);
// with 0 a new file gets 0644 (less the agent's umask) and an existing one
// keeps its mode.
func (c *Client) WriteFile(ctx context.Context, vm, path string, data []byte, mode os.FileMode) error {
	if streamable(path) {
		err := c.writeStream(ctx, vm, path, mode, bytes.NewReader(data))
		if !IsFallback(err) {
			return err
		}
	}
	g, err := c.OpenFS(ctx, vm)
	if err != nil {
		return err
	}
	defer g.Close()
	return writeGuest(g, vm, path, mode, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// writeStream writes what r yields to path in one bulk stream, with
// WriteFile's meaning of mode: OpPutFile sets mode's permission bits on
// the descriptor (and the time, to now, as a write would); for mode 0,
// OpPut opens the file as SFTP does (0644 or truncated, the mode kept).
// An error for which IsFallback is true means nothing was changed and r
// may have been read in part.
func (c *Client) writeStream(ctx context.Context, vm, path string, mode os.FileMode, r io.Reader) error {
	if mode != 0 {
		if _, err := c.PutGuestFile(ctx, vm, path, "", mode.Perm(), time.Now(), r); err != nil {
			return fmt.Errorf("write %s:%s: %w", vm, path, err)
		}
		return nil
	}
	w, err := c.CreateGuestFile(ctx, vm, path)
	if errors.Is(err, bulk.ErrRemote) {
		// the agent could not open it and changed nothing: SFTP says why
		return fmt.Errorf("%w: %w", bulk.ErrOpenRefused, err)
	}
	if err != nil {
		return err // it names vm:path
	}
	_, err = w.ReadFrom(r)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s:%s: %w", vm, path, err)
	}
	return nil
}

func writeGuest(g *GuestFS, vm, path string, mode os.FileMode, fill func(io.Writer) error) error {
	f, err := g.C.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC)
	if err != nil {
		return fmt.Errorf("%s:%s: %w", vm, path, err)
	}
	if err := fill(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s:%s: %w", vm, path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s:%s: %w", vm, path, err)
	}
	if mode != 0 {
		if err := g.C.Chmod(path, mode.Perm()); err != nil {
			return fmt.Errorf("chmod %s:%s: %w", vm, path, err)
		}
	}
	return nil
}

// Upload copies the regular file local to path in a running VM, keeping its
// permission bits.
func (c *Client) Upload(ctx context.Context, vm, local, path string) error {
	in, err := os.Open(local)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return &Error{Code: CodeInvalidArgument, Message: local + " is not a regular file"}
	}
	if streamable(path) {
		err := c.writeStream(ctx, vm, path, fi.Mode(), in)
		if !IsFallback(err) {
			return err
		}
		if _, err := in.Seek(0, io.SeekStart); err != nil {
			return err
		}
	}
	g, err := c.OpenFS(ctx, vm)
	if err != nil {
		return err
	}
	defer g.Close()
	return writeGuest(g, vm, path, fi.Mode(), func(w io.Writer) error {
		_, err := io.Copy(w, in)
		return err
	})
}

// Download copies the regular file path in a running VM to local. It never
// follows a symlink at local and replaces local only once the copy is
// complete.
func (c *Client) Download(ctx context.Context, vm, path, local string) error {
	if streamable(path) {
		r, m, err := c.GetGuestFile(ctx, vm, path)
		if !IsFallback(err) {
			if err != nil {
				return err // it names vm:path
			}
			if r == nil {
				return notRegular(vm, path)
			}
			defer r.Close()
			return saveLocal(r, m.FileMode(), vm, path, local)
		}
	}
	g, err := c.OpenFS(ctx, vm)
	if err != nil {
		return err
	}
	defer g.Close()
	f, err := g.C.Open(path)
	if err != nil {
		return fmt.Errorf("%s:%s: %w", vm, path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("%s:%s: %w", vm, path, err)
	}
	if !fi.Mode().IsRegular() {
		return notRegular(vm, path)
	}
	return saveLocal(f, fi.Mode(), vm, path, local)
}

// saveLocal writes what r yields to local through a temporary file beside
// it, renamed over local once complete, with mode's permission bits less
// group and other write. A symlink (or anything else but a regular file)
// at local is refused, never followed.
func saveLocal(r io.Reader, mode fs.FileMode, vm, path, local string) error {
	if lfi, err := os.Lstat(local); err == nil && !lfi.Mode().IsRegular() {
		return &Error{Code: CodeInvalidArgument, Message: local + " exists and is not a regular file"}
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(local), "."+filepath.Base(local)+".banger-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, r); err != nil {
		tmp.Close()
		return fmt.Errorf("read %s:%s: %w", vm, path, err)
	}
	if err := tmp.Chmod(mode.Perm() &^ 0o022); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), local)
}
