package disk

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Spare disks take the template copy off the create path.
//
// A spare is a finished disk of one template, named after it
// (ext4-<size>-<key>.spare) in Dir. A refill writes it under a temporary
// name (<spare>.<random>.tmp) with its own UUID and hash seed, syncs it, and
// renames it into place: the rename is its completion marker, so a spare
// that exists is whole. Make renames the spare of its template to the disk's
// path, which is O(1) on one filesystem (on another the rename fails and
// Make copies as before, leaving the spare), and then starts the next
// refill in the background; the create never waits for one.
//
// Bounds: one refill at a time per spare; at most Maker.Spares spares, for
// the sizes made most recently (a new size evicts the spare of the size
// least recently made, and a spare of an older template of the same size
// is dropped when the new one is made). Close cancels the refills and waits
// for them; Reclaim, at start, removes what an interrupted refill left (its
// temporary file) and every spare that is not valid now.

// spares is the Maker's state of its spare disks.
type spares struct {
	mu      sync.Mutex
	ctx     context.Context
	cancel  context.CancelFunc
	closed  bool
	running map[string]chan struct{} // refills in flight, by spare name; closed when done
	used    map[string]time.Time     // spares kept (made or in flight) → last Make of their size
}

const spareSuffix = ".spare"

// spareMaxAge: Reclaim drops the spares of sizes not made for this long.
const spareMaxAge = 7 * 24 * time.Hour

// closeWait bounds how long Close waits for the refills it cancelled.
const closeWait = 10 * time.Second

// spareName is the name of the spare of template tpl.
func spareName(tpl string) string { return strings.TrimSuffix(tpl, ".img") + spareSuffix }

// spareSize is the disk size a spare's name holds (ext4-<size>-<key>.spare).
func spareSize(name string) (int64, bool) {
	rest, ok := strings.CutPrefix(name, "ext4-")
	if !ok || !strings.HasSuffix(rest, spareSuffix) {
		return 0, false
	}
	n, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	size, err := strconv.ParseInt(n, 10, 64)
	return size, err == nil && size > 0
}

func (m *Maker) logger() *slog.Logger {
	if m.Logger != nil {
		return m.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// step marks a point of a refill for the fault-injection tests.
func (m *Maker) step(name string) {
	if m.Fault != nil {
		m.Fault(name)
	}
}

// takeSpare renames the spare of template tpl to dst when there is a valid
// one, and says whether it did.
func (m *Maker) takeSpare(tpl string, size int64, dst string) bool {
	p := filepath.Join(m.Dir, spareName(tpl))
	st, err := os.Lstat(p)
	if err != nil {
		return false
	}
	if !st.Mode().IsRegular() || st.Size() != size {
		os.Remove(p)
		return false
	}
	if err := os.Rename(p, dst); err != nil {
		// EXDEV (the disk's directory is on another filesystem) or dst's
		// directory is gone: the caller copies, and the spare stays.
		m.logger().Debug("writable disk spare not used", "spare", p, "error", err.Error())
		return false
	}
	return true
}

// refill notes that a disk of template tpl was just made and, unless one is
// there or on its way, starts writing its next spare in the background (tpl
// is the template in memory, or nil to load it). took says the spare was
// just taken, so there is none.
func (m *Maker) refill(tpl string, size int64, t *template, took bool) {
	s := &m.sp
	name := spareName(tpl)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	if s.ctx == nil {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.running = map[string]chan struct{}{}
	}
	if s.used == nil {
		s.used = map[string]time.Time{}
	}
	s.used[name] = time.Now()
	m.evictLocked(name, size)
	if s.running[name] != nil {
		return
	}
	if !took {
		if _, err := os.Lstat(filepath.Join(m.Dir, name)); err == nil {
			return
		}
	}
	done := make(chan struct{})
	s.running[name] = done
	ctx := s.ctx
	go func() {
		defer func() {
			s.mu.Lock()
			delete(s.running, name)
			s.mu.Unlock()
			close(done)
		}()
		if err := m.writeSpare(ctx, tpl, name, size, t); err != nil && ctx.Err() == nil {
			m.logger().Warn("writable disk spare not refilled: the next disk of this size is copied", "spare", name, "error", err.Error())
		}
	}()
}

// evictLocked drops the spares of other templates of size (an older mkfs)
// and then, beyond m.Spares, those least recently used; keep stays.
func (m *Maker) evictLocked(keep string, size int64) {
	s := &m.sp
	drop := func(name string) {
		delete(s.used, name)
		os.Remove(filepath.Join(m.Dir, name)) // a refill in flight sees it is no longer kept
	}
	for name := range s.used {
		if sz, _ := spareSize(name); sz == size && name != keep {
			drop(name)
		}
	}
	for len(s.used) > max(m.Spares, 1) {
		oldest := ""
		for name, at := range s.used {
			if name != keep && (oldest == "" || at.Before(s.used[oldest])) {
				oldest = name
			}
		}
		drop(oldest)
	}
}

// writeSpare writes the spare name of template tpl: a temporary file,
// synced, renamed into place if the spare is still wanted.
func (m *Maker) writeSpare(ctx context.Context, tpl, name string, size int64, t *template) error {
	if t == nil {
		var err error
		if t, err = m.template(ctx, tpl, size); err != nil {
			return err
		}
	}
	m.step("template")
	if err := ctx.Err(); err != nil {
		return err
	}
	f, err := os.CreateTemp(m.Dir, name+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	f.Close()
	defer os.Remove(tmp) // nothing once renamed
	m.step("temp")
	if err := t.write(tmp, rand.Reader, true); err != nil {
		return err
	}
	m.step("written")
	s := &m.sp
	s.mu.Lock()
	_, kept := s.used[name]
	if kept && !s.closed && ctx.Err() == nil {
		err = os.Rename(tmp, filepath.Join(m.Dir, name))
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	m.step("renamed")
	return nil
}

// Settle waits until no refill is running (benchmarks and tests; a create
// never waits for one).
func (m *Maker) Settle(ctx context.Context) error {
	s := &m.sp
	for {
		s.mu.Lock()
		var done chan struct{}
		for _, c := range s.running {
			done = c
			break
		}
		s.mu.Unlock()
		if done == nil {
			return nil
		}
		select {
		case <-done:
		case <-ctx.Done():
			return fmt.Errorf("writable disk spares still refilling: %w", ctx.Err())
		}
	}
}

// Close cancels the refills in flight, waits for them (bounded) and starts
// no more; Make still works, copying.
func (m *Maker) Close() error {
	s := &m.sp
	s.mu.Lock()
	s.closed = true
	if s.cancel != nil {
		s.cancel()
	}
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), closeWait)
	defer cancel()
	return m.Settle(ctx)
}

// Reclaim, at start (before any Make, with no other Maker on Dir), removes
// what interrupted work left in Dir (temporary files of template builds
// and refills) and every spare that is not valid now: of a template that is
// not the current one for its size, not a regular file of its size with an
// ext4 superblock, unused for spareMaxAge, or beyond m.Spares (the oldest
// go first). The spares that stay are those Make takes next.
func (m *Maker) Reclaim(ctx context.Context) error {
	ents, err := os.ReadDir(m.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("writable disk templates: %w", err)
	}
	type kept struct {
		name string
		at   time.Time
	}
	var keep []kept
	var errs []error
	remove := func(name string) {
		if err := os.Remove(filepath.Join(m.Dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, e := range ents {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		name := e.Name()
		switch {
		case strings.HasSuffix(name, ".tmp"):
			remove(name)
		case strings.HasSuffix(name, spareSuffix):
			at, ok := m.validSpare(name)
			if !ok {
				remove(name)
				continue
			}
			keep = append(keep, kept{name, at})
		}
	}
	slices.SortFunc(keep, func(a, b kept) int { return b.at.Compare(a.at) })
	for i := min(len(keep), m.Spares); i < len(keep); i++ {
		remove(keep[i].name)
	}
	keep = keep[:min(len(keep), m.Spares)]
	s := &m.sp
	s.mu.Lock()
	if s.used == nil {
		s.used = map[string]time.Time{}
	}
	for _, k := range keep {
		s.used[k.name] = k.at
	}
	s.mu.Unlock()
	return errors.Join(errs...)
}

// validSpare checks the spare name in Dir and returns its time (when it was
// made, just after the last disk of its size).
func (m *Maker) validSpare(name string) (time.Time, bool) {
	size, ok := spareSize(name)
	if !ok || m.Spares <= 0 {
		return time.Time{}, false
	}
	if tpl, err := m.templateName(size); err != nil || spareName(tpl) != name {
		return time.Time{}, false
	}
	f, err := os.OpenFile(filepath.Join(m.Dir, name), os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return time.Time{}, false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() || st.Size() != size || time.Since(st.ModTime()) > spareMaxAge {
		return time.Time{}, false
	}
	sb := make([]byte, sbSize)
	if _, err := f.ReadAt(sb, sbOffset); err != nil || binary.LittleEndian.Uint16(sb[sbMagic:]) != ext4Magic {
		return time.Time{}, false
	}
	return st.ModTime(), true
}
