// Package paths resolves where banger keeps its files: everything under
// BANGER_HOME when set, else the XDG base directories.
package paths

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// Layout is the set of directories banger uses for one user.
type Layout struct {
	ConfigDir string // config.json
	DataDir   string // banger.db, images, kernels, vms, logs
	RunDir    string // sockets, lock file
}

// Resolve returns the layout for home (BANGER_HOME or --home) if non-empty,
// else from the XDG environment.
func Resolve(home string) (Layout, error) {
	if home == "" {
		home = os.Getenv("BANGER_HOME")
	}
	if home != "" {
		abs, err := filepath.Abs(home)
		if err != nil {
			return Layout{}, fmt.Errorf("resolve BANGER_HOME %q: %w", home, err)
		}
		return Layout{ConfigDir: abs, DataDir: abs, RunDir: filepath.Join(abs, "run")}, nil
	}
	userHome, err := os.UserHomeDir()
	if err != nil {
		return Layout{}, fmt.Errorf("cannot find your home directory (set BANGER_HOME): %w", err)
	}
	cfg := os.Getenv("XDG_CONFIG_HOME")
	if cfg == "" {
		cfg = filepath.Join(userHome, ".config")
	}
	data := os.Getenv("XDG_DATA_HOME")
	if data == "" {
		data = filepath.Join(userHome, ".local", "share")
	}
	l := Layout{ConfigDir: filepath.Join(cfg, "banger"), DataDir: filepath.Join(data, "banger")}
	if rt := os.Getenv("XDG_RUNTIME_DIR"); rt != "" {
		l.RunDir = filepath.Join(rt, "banger")
	} else {
		l.RunDir = filepath.Join(l.DataDir, "run")
	}
	return l, nil
}

// Dirs returns every directory banger keeps for this user. Each is private
// to the user: mode 0700.
func (l Layout) Dirs() []string {
	return []string{l.ConfigDir, l.DataDir, l.RunDir, l.VMsDir(), l.ImagesDir(), l.KernelsDir(), l.CacheDir(),
		l.SSHDir(), l.LogsDir(), l.FailedLogsDir(), l.SnapshotsDir()}
}

// DirMode is the mode of every banger directory.
const DirMode os.FileMode = 0o700

// Ensure creates the directories and gives each mode 0700 explicitly: the
// mode MkdirAll is given is filtered by the process umask, and a directory
// without its search bit breaks every later create.
func (l Layout) Ensure() error {
	_, err := l.Repair()
	return err
}

// Repair is Ensure that also returns the directories whose mode it had to fix.
func (l Layout) Repair() (fixed []string, err error) {
	for _, d := range l.Dirs() {
		if err := os.MkdirAll(d, DirMode); err != nil {
			return fixed, fmt.Errorf("create %s: %w", d, err)
		}
		fi, err := os.Stat(d)
		if err != nil {
			return fixed, err
		}
		if !fi.IsDir() {
			return fixed, fmt.Errorf("%s is not a directory; move it away", d)
		}
		if fi.Mode().Perm() != DirMode {
			if err := os.Chmod(d, DirMode); err != nil {
				return fixed, fmt.Errorf("%s has mode %v, want %v: %w; hint: chmod 700 %s", d, fi.Mode().Perm(), DirMode, err, d)
			}
			fixed = append(fixed, fmt.Sprintf("%s (was %v)", d, fi.Mode().Perm()))
		}
	}
	return fixed, nil
}

// CheckModes reports, without changing anything, each directory that exists
// with a mode other than 0700, with the command that fixes it.
func (l Layout) CheckModes() []string {
	var out []string
	for _, d := range l.Dirs() {
		fi, err := os.Stat(d)
		if err != nil || !fi.IsDir() {
			continue
		}
		if fi.Mode().Perm() != DirMode {
			out = append(out, fmt.Sprintf("%s has mode %v, want %v (fix: chmod 700 %s)", d, fi.Mode().Perm(), DirMode, d))
		}
	}
	return out
}

func (l Layout) Socket() string     { return filepath.Join(l.RunDir, "bangerd.sock") }
func (l Layout) LockFile() string   { return filepath.Join(l.RunDir, "bangerd.lock") }
func (l Layout) DB() string         { return filepath.Join(l.DataDir, "banger.db") }
func (l Layout) ConfigFile() string { return filepath.Join(l.ConfigDir, "config.json") }
func (l Layout) DaemonLog() string  { return filepath.Join(l.DataDir, "bangerd.log") }
func (l Layout) VMsDir() string     { return filepath.Join(l.DataDir, "vms") }
func (l Layout) ImagesDir() string  { return filepath.Join(l.DataDir, "images") }
func (l Layout) KernelsDir() string { return filepath.Join(l.DataDir, "kernels") }
func (l Layout) CacheDir() string   { return filepath.Join(l.DataDir, "cache") }
func (l Layout) SSHDir() string     { return filepath.Join(l.DataDir, "ssh") }
func (l Layout) UserKey() string    { return filepath.Join(l.SSHDir(), "id_ed25519") }
func (l Layout) LogsDir() string    { return filepath.Join(l.DataDir, "logs") }

// FailedLogsDir keeps the console logs of failed creates (the last 20).
func (l Layout) FailedLogsDir() string { return filepath.Join(l.LogsDir(), "failed") }

// SnapshotsDir holds one directory per snapshot (saved state + disk copy).
func (l Layout) SnapshotsDir() string { return filepath.Join(l.DataDir, "snapshots") }

// MemoryDirs are the places, in order of preference, where a VMM may keep a
// running guest's memory as a file (QEMU's memory-backend-file), so that a
// snapshot can copy it instead of streaming it: RunDir/mem (private to the
// user; used only when RunDir is on a tmpfs, as $XDG_RUNTIME_DIR is), then
// /dev/shm/banger-<uid>-<hash of DataDir> (one per banger home, so that
// bangerd's start-up reclaim never touches another home's files). Neither
// exists until a driver makes it; a driver uses a directory only when it is
// on a tmpfs, owned by the user and mode 0700, and falls back to anonymous
// memory otherwise.
func (l Layout) MemoryDirs() []string { return l.MemoryDirsOf(os.Geteuid()) }

// MemoryDirsOf is MemoryDirs for a bangerd running as uid (a test cleaning
// up after a bangerd it ran as another user).
func (l Layout) MemoryDirsOf(uid int) []string {
	h := sha256.Sum256([]byte(l.DataDir))
	return []string{
		filepath.Join(l.RunDir, "mem"),
		filepath.Join("/dev/shm", "banger-"+strconv.Itoa(uid)+"-"+hex.EncodeToString(h[:4])),
	}
}

// VMDir is the directory of one VM.
func (l Layout) VMDir(id string) string { return filepath.Join(l.VMsDir(), id) }

// ErrSocketPathTooLong is returned when a unix socket path exceeds the kernel's limit.
var ErrSocketPathTooLong = errors.New("unix socket path too long")

// MaxSocketPath is the longest unix socket path Linux accepts:
// sizeof(sockaddr_un.sun_path) minus the terminating NUL. Every socket
// length check in banger uses it.
const MaxSocketPath = 107

// CheckSocketPath verifies p fits in sockaddr_un (MaxSocketPath bytes plus NUL).
func CheckSocketPath(p string) error {
	if len(p) > MaxSocketPath {
		return fmt.Errorf("%w: %s is %d bytes, the limit is %d (use a shorter BANGER_HOME)", ErrSocketPathTooLong, p, len(p), MaxSocketPath)
	}
	return nil
}
