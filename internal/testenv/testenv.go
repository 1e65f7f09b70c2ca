// Package testenv holds the shared fixtures of tests that boot real guests: a
// Debian cloud kernel (vmlinux + modules), the banger-agent binary, an initrd
// made of the two, and a tiny busybox root filesystem.
//
// Expensive artefacts are cached across test runs and processes in
// $BANGER_TEST_CACHE (default /var/tmp/banger-test-cache), guarded by file
// locks, and keyed by content so that a change of input gives a new artefact.
// Functions skip the test only when a capability is truly missing (no apt, no
// network mirror, no busybox-static, no qemu) and say what is missing; real
// failures fail the test.
//
// Only test code may import this package.
package testenv

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// CacheEnv names the environment variable that overrides the cache directory.
const CacheEnv = "BANGER_TEST_CACHE"

// DefaultCacheDir is the cache directory when CacheEnv is unset.
const DefaultCacheDir = "/var/tmp/banger-test-cache"

const (
	lockTimeout = 20 * time.Minute // another process may be downloading and importing a kernel
	pruneAfter  = 7 * 24 * time.Hour
)

// CacheDir returns (and creates) the persistent cache directory.
func CacheDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv(CacheEnv)
	if dir == "" {
		dir = DefaultCacheDir
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("create test cache %s (set %s to another directory): %v", dir, CacheEnv, err)
	}
	return dir
}

// withLock runs fn while holding an exclusive flock on <cache>/<name>.lock,
// waiting at most lockTimeout for other processes.
func withLock(t testing.TB, name string, fn func()) {
	t.Helper()
	p := filepath.Join(CacheDir(t), name+".lock")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatalf("open lock %s: %v", p, err)
	}
	defer f.Close()
	deadline := time.Now().Add(lockTimeout)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			t.Fatalf("lock %s: %v", p, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("lock %s: still held by another process after %v", p, lockTimeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer func() { _ = unix.Flock(int(f.Fd()), unix.LOCK_UN) }()
	fn()
}

// testCtx returns a context bounded by the test and by d.
func testCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// memo remembers the outcome of a once-per-process step: a value, a reason to
// skip, or a reason to fail.
type memo[T any] struct {
	mu   sync.Mutex
	done bool
	val  T
	skip string
	fail string
}

// get runs fn the first time (under the memo's lock), and replays its outcome
// on every later call. fn reports through the *step it is given.
func (m *memo[T]) get(t testing.TB, fn func(s *step) T) T {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.done {
		s := &step{t: t}
		func() {
			defer func() {
				if r := recover(); r != nil && r != errStepStopped {
					panic(r)
				}
			}()
			m.val = fn(s)
		}()
		m.skip, m.fail, m.done = s.skip, s.fail, true
	}
	switch {
	case m.fail != "":
		t.Fatal(m.fail)
	case m.skip != "":
		t.Skip(m.skip)
	}
	return m.val
}

var errStepStopped = errors.New("testenv step stopped")

// step lets a memoised function skip or fail in a way that is remembered.
type step struct {
	t          testing.TB
	skip, fail string
}

func (s *step) Skipf(format string, args ...any) {
	s.skip = fmt.Sprintf(format, args...)
	panic(errStepStopped)
}

func (s *step) Fatalf(format string, args ...any) {
	s.fail = fmt.Sprintf(format, args...)
	panic(errStepStopped)
}

// touch marks a cache entry as used now, so pruning keeps it.
func touch(p string) {
	now := time.Now()
	_ = os.Chtimes(p, now, now)
}

// prune removes entries of dir not used for pruneAfter, and stale temporary
// entries (".tmp-*", ".build-*") older than an hour.
func prune(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		info, err := e.Info()
		if err != nil {
			continue
		}
		age := time.Since(info.ModTime())
		tmp := strings.HasPrefix(e.Name(), ".tmp-") || strings.HasPrefix(e.Name(), ".build-")
		if (tmp && age > time.Hour) || (!tmp && age > pruneAfter) {
			_ = os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}

// FileSHA256 returns the hex sha256 of a file's content, failing t when it
// cannot be read.
func FileSHA256(t testing.TB, p string) string {
	t.Helper()
	h, err := hashFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// Median is the median of xs (the mean of the middle two for an even
// count; 0 for none). xs is not changed.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// hashFile returns the hex sha256 of a file's content.
func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// RequireQEMU skips the test unless qemu-system-x86_64 is installed, and
// returns its path.
func RequireQEMU(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skipf("qemu-system-x86_64 not installed (Debian package qemu-system-x86): %v", err)
	}
	return p
}

// lookTool finds a program in PATH or in the sbin directories.
func lookTool(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		cand := filepath.Join(dir, name)
		if st, serr := os.Stat(cand); serr == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return cand, nil
		}
	}
	return "", err
}

// WaitFor polls cond until it holds, failing the test after d (what names
// the awaited state in the failure).
func WaitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
