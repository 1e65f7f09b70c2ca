// Package guestfs is the guest side of file transfers: a workspace.FS over
// SFTP to the guest agent, and the quoting of argv for the guest's shell.
package guestfs

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// SFTP is a workspace.FS on a guest. Run, else SSH (both optional), is used
// to make relative symlinks, which the agent's SFTP server would turn
// absolute.
type SFTP struct {
	C   *sftp.Client
	SSH *ssh.Client
	// Run runs argv in the guest; its error says what failed.
	Run func(argv []string) error
}

func (s SFTP) Stat(p string) (fs.FileInfo, error)      { return s.C.Stat(p) }
func (s SFTP) Lstat(p string) (fs.FileInfo, error)     { return s.C.Lstat(p) }
func (s SFTP) ReadDir(p string) ([]fs.FileInfo, error) { return s.C.ReadDir(p) }
func (s SFTP) Readlink(p string) (string, error)       { return s.C.ReadLink(p) }
func (SFTP) Join(e ...string) string                   { return path.Join(e...) }
func (SFTP) Base(p string) string                      { return path.Base(p) }
func (s SFTP) Create(p string) (io.WriteCloser, error) {
	return s.C.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC)
}
func (s SFTP) Open(p string) (io.ReadCloser, error) { return s.C.Open(p) }

// Mkdir makes a directory; an existing directory is not an error.
func (s SFTP) Mkdir(p string) error {
	err := s.C.Mkdir(p)
	if err != nil {
		if fi, serr := s.C.Stat(p); serr == nil && fi.IsDir() {
			return nil
		}
	}
	return err
}

// Symlink makes a symlink in the guest; relative targets are made with ln.
func (s SFTP) Symlink(t, p string) error {
	if path.IsAbs(t) || s.SSH == nil && s.Run == nil {
		return s.C.Symlink(t, p)
	}
	abs, err := s.C.RealPath(p)
	if err != nil {
		return err
	}
	if s.Run != nil {
		return s.Run([]string{"ln", "-sfn", "--", t, abs})
	}
	sess, err := s.SSH.NewSession()
	if err != nil {
		return fmt.Errorf("open a session: %w", err)
	}
	defer sess.Close()
	var stderr strings.Builder
	sess.Stderr = &LimitWriter{W: &stderr, N: maxStderr}
	if err := sess.Run(ShellJoin([]string{"ln", "-sfn", "--", t, abs})); err != nil {
		return fmt.Errorf("ln -s in the guest: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// maxStderr bounds what of a guest command's stderr an error quotes.
const maxStderr = 4 << 10

// LimitWriter keeps the first N bytes written to W and discards the rest,
// reporting every write as whole (for a guest's stderr that an error quotes).
type LimitWriter struct {
	W io.Writer
	N int
}

func (l *LimitWriter) Write(p []byte) (int, error) {
	if l.N > 0 {
		k := min(len(p), l.N)
		l.N -= k
		_, _ = l.W.Write(p[:k])
	}
	return len(p), nil
}

func (s SFTP) Remove(p string) error               { return s.C.Remove(p) }
func (s SFTP) Chmod(p string, m fs.FileMode) error { return s.C.Chmod(p, m) }
func (s SFTP) Chtimes(p string, mtime time.Time) error {
	return s.C.Chtimes(p, mtime, mtime)
}

// ShellJoin quotes argv for the guest's /bin/sh so that it runs exactly argv.
func ShellJoin(argv []string) string {
	parts := make([]string, len(argv))
	for i, a := range argv {
		parts[i] = ShellQuote(a)
	}
	return strings.Join(parts, " ")
}

// ShellQuote quotes one word for /bin/sh: as it is when it holds only
// characters the shell leaves alone, else in single quotes.
func ShellQuote(a string) string {
	if a != "" && strings.IndexFunc(a, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,@+%", r))
	}) < 0 {
		return a
	}
	return "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
}
