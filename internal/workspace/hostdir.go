package workspace

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// HostDir is a directory on this host that receives files whose names came
// from a guest. Every operation names its target by a slash path relative to
// the directory whose components are plain names (see PlainName), walks to it
// one openat at a time with O_NOFOLLOW, and so never follows a symbolic link
// below the directory nor leaves it. Modes and times are set on descriptors.
type HostDir struct {
	fd   int
	path string
}

// OpenHostDir opens the directory at path (a path the host user chose, so
// links in it are followed).
func OpenHostDir(path string) (*HostDir, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return &HostDir{fd: fd, path: path}, nil
}

// Close releases the directory.
func (d *HostDir) Close() error { return unix.Close(d.fd) }

// PlainName reports whether a name from a guest can be one path component on
// the host: not empty, not "." or "..", no '/' and no NUL.
func PlainName(n string) bool {
	return n != "" && n != "." && n != ".." && !strings.ContainsAny(n, "/\x00")
}

// parent opens the directory holding rel and returns it with rel's last
// component. The caller closes the returned descriptor when it is not d.fd.
func (d *HostDir) parent(rel string) (int, string, error) {
	parts := strings.Split(rel, "/")
	for _, p := range parts {
		if !PlainName(p) {
			return -1, "", fmt.Errorf("%q is not a plain relative path", rel)
		}
	}
	fd := d.fd
	for _, p := range parts[:len(parts)-1] {
		nfd, err := unix.Openat(fd, p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if fd != d.fd {
			unix.Close(fd)
		}
		if err != nil {
			if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
				err = fmt.Errorf("%w (not a directory, or a symbolic link, which is never followed)", err)
			}
			return -1, "", &fs.PathError{Op: "open", Path: d.join(rel), Err: err}
		}
		fd = nfd
	}
	return fd, parts[len(parts)-1], nil
}

func (d *HostDir) join(rel string) string { return d.path + "/" + rel }

func (d *HostDir) release(fd int) {
	if fd != d.fd {
		unix.Close(fd)
	}
}

// Mkdir makes directory rel (mode 0700 until SetDirMeta). An existing
// directory is not an error; an existing link or file is.
func (d *HostDir) Mkdir(rel string) error {
	fd, name, err := d.parent(rel)
	if err != nil {
		return err
	}
	defer d.release(fd)
	err = unix.Mkdirat(fd, name, 0o700)
	if errors.Is(err, unix.EEXIST) {
		var st unix.Stat_t
		if serr := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); serr == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return nil
		}
		return &fs.PathError{Op: "mkdir", Path: d.join(rel), Err: errors.New("exists and is not a directory (a symbolic link is never followed)")}
	}
	if err != nil {
		return &fs.PathError{Op: "mkdir", Path: d.join(rel), Err: err}
	}
	return nil
}

// Create opens regular file rel for writing, made with mode 0600: with excl
// a new file only, else an existing regular file is truncated. A link or any
// other kind of file at rel is refused.
func (d *HostDir) Create(rel string, excl bool) (*os.File, error) {
	fd, name, err := d.parent(rel)
	if err != nil {
		return nil, err
	}
	defer d.release(fd)
	flags := unix.O_WRONLY | unix.O_CREAT | unix.O_NOFOLLOW | unix.O_CLOEXEC | unix.O_NONBLOCK
	if excl {
		flags |= unix.O_EXCL
	}
	nfd, err := unix.Openat(fd, name, flags, 0o600)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			err = fmt.Errorf("%w (a symbolic link is never followed)", err)
		}
		return nil, &fs.PathError{Op: "create", Path: d.join(rel), Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(nfd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(nfd)
		if err == nil {
			err = errors.New("exists and is not a regular file")
		}
		return nil, &fs.PathError{Op: "create", Path: d.join(rel), Err: err}
	}
	if !excl {
		if err := unix.Ftruncate(nfd, 0); err != nil {
			unix.Close(nfd)
			return nil, &fs.PathError{Op: "truncate", Path: d.join(rel), Err: err}
		}
	}
	if err := unix.SetNonblock(nfd, false); err != nil {
		unix.Close(nfd)
		return nil, err
	}
	return os.NewFile(uintptr(nfd), d.join(rel)), nil
}

// Symlink makes a link at rel to target (any text: the link is never
// followed here). With replace, a file or link already at rel is removed
// first.
func (d *HostDir) Symlink(target, rel string, replace bool) error {
	fd, name, err := d.parent(rel)
	if err != nil {
		return err
	}
	defer d.release(fd)
	if replace {
		if err := unix.Unlinkat(fd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return &fs.PathError{Op: "remove", Path: d.join(rel), Err: err}
		}
	}
	if err := unix.Symlinkat(target, fd, name); err != nil {
		return &fs.PathError{Op: "symlink", Path: d.join(rel), Err: err}
	}
	return nil
}

// SetDirMeta sets directory rel's permission bits and times through a
// descriptor opened without following links.
func (d *HostDir) SetDirMeta(rel string, mode fs.FileMode, mtime time.Time) error {
	fd, name, err := d.parent(rel)
	if err != nil {
		return err
	}
	defer d.release(fd)
	dfd, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: d.join(rel), Err: err}
	}
	defer unix.Close(dfd)
	if err := unix.Fchmod(dfd, uint32(mode.Perm())); err != nil {
		return &fs.PathError{Op: "chmod", Path: d.join(rel), Err: err}
	}
	if mtime.IsZero() {
		return nil
	}
	if err := futimens(dfd, mtime); err != nil {
		return &fs.PathError{Op: "chtimes", Path: d.join(rel), Err: err}
	}
	return nil
}

// SetFileMeta sets an open file's permission bits (never setuid, setgid or
// sticky) and, unless mtime is zero, its access and modification times.
func SetFileMeta(f *os.File, mode fs.FileMode, mtime time.Time) error {
	if err := f.Chmod(mode.Perm()); err != nil {
		return err
	}
	if mtime.IsZero() {
		return nil
	}
	sc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var terr error
	if err := sc.Control(func(fd uintptr) { terr = futimens(int(fd), mtime) }); err != nil {
		return err
	}
	if terr != nil {
		return &fs.PathError{Op: "chtimes", Path: f.Name(), Err: terr}
	}
	return nil
}

// futimens is utimensat(fd, NULL, times, 0): the times of the file fd is.
func futimens(fd int, t time.Time) error {
	ts := [2]unix.Timespec{unix.NsecToTimespec(t.UnixNano()), unix.NsecToTimespec(t.UnixNano())}
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(&ts[0])), 0, 0, 0)
	if e != 0 {
		return syscall.Errno(e)
	}
	return nil
}
