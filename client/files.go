package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/pkg/sftp"

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

// ReadFile reads a regular file in a running VM, refusing one larger than
// max bytes (0: MaxReadFile).
func (c *Client) ReadFile(ctx context.Context, vm, path string, max int64) ([]byte, error) {
	if max <= 0 {
		max = MaxReadFile
	}
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
		return nil, &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("%s:%s is not a regular file", vm, path)}
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("read %s:%s: %w", vm, path, err)
	}
	if int64(len(b)) > max {
		return nil, &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("%s:%s is larger than %d bytes", vm, path, max)}
	}
	return b, nil
}

// WriteFile writes data to path in a running VM (created with mode, or
// truncated), as root.
func (c *Client) WriteFile(ctx context.Context, vm, path string, data []byte, mode os.FileMode) error {
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
		return &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("%s:%s is not a regular file", vm, path)}
	}
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
	if _, err := io.Copy(tmp, f); err != nil {
		tmp.Close()
		return fmt.Errorf("read %s:%s: %w", vm, path, err)
	}
	if err := tmp.Chmod(fi.Mode().Perm() &^ 0o022); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), local)
}
