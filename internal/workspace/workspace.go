// Package workspace copies a git repository from the host into a guest and
// brings the guest's work back as a branch of the host repository. All git
// work happens on the host (guests need no git); files move through FS, which
// is SFTP in a guest and the local filesystem in tests.
package workspace

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// FS is what a workspace needs of the guest side. Paths are slash paths.
type FS interface {
	Lstat(p string) (fs.FileInfo, error)
	ReadDir(p string) ([]fs.FileInfo, error)
	Readlink(p string) (string, error)
	Create(p string) (io.WriteCloser, error)
	Open(p string) (io.ReadCloser, error)
	// Mkdir makes a directory; an existing directory is not an error.
	Mkdir(p string) error
	Symlink(target, p string) error
	Remove(p string) error
	Chmod(p string, m fs.FileMode) error
	Chtimes(p string, mtime time.Time) error
}

// LocalFS is FS on this machine's filesystem.
type LocalFS struct{}

func (LocalFS) Lstat(p string) (fs.FileInfo, error) { return os.Lstat(p) }
func (LocalFS) ReadDir(p string) ([]fs.FileInfo, error) {
	ents, err := os.ReadDir(p)
	if err != nil {
		return nil, err
	}
	out := make([]fs.FileInfo, 0, len(ents))
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			return nil, err
		}
		out = append(out, fi)
	}
	return out, nil
}
func (LocalFS) Readlink(p string) (string, error) { return os.Readlink(p) }
func (LocalFS) Create(p string) (io.WriteCloser, error) {
	return os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
}
func (LocalFS) Open(p string) (io.ReadCloser, error) { return os.Open(p) }
func (LocalFS) Mkdir(p string) error {
	err := os.Mkdir(p, 0o755)
	if errors.Is(err, fs.ErrExist) {
		if fi, serr := os.Lstat(p); serr == nil && fi.IsDir() {
			return nil
		}
	}
	return err
}
func (LocalFS) Symlink(t, p string) error               { return os.Symlink(t, p) }
func (LocalFS) Remove(p string) error                   { return os.Remove(p) }
func (LocalFS) Chmod(p string, m fs.FileMode) error     { return os.Chmod(p, m) }
func (LocalFS) Chtimes(p string, mtime time.Time) error { return os.Chtimes(p, mtime, mtime) }

// Toplevel is the root of the git work tree holding dir.
func Toplevel(ctx context.Context, dir string) (string, error) {
	top, err := git(ctx, dir, nil, nil, "rev-parse", "--show-toplevel")
	if err != nil {
		return "", fmt.Errorf("%s is not inside a git work tree (a workspace is a git repository): %w", dir, err)
	}
	return top, nil
}

// Item is one entry of a push plan.
type Item struct {
	Rel   string // slash path relative to the repository root
	Mode  fs.FileMode
	Size  int64
	MTime time.Time
	Link  string // symlink target
}

// Plan is what a push uploads: directories first, then files and symlinks.
type Plan struct {
	Root  string // host work tree root
	Items []Item
	Bytes int64
	Files int
}

// PlanPush lists the repository holding dir: tracked files and untracked
// files that are not ignored (deleted tracked files are skipped), plus the
// whole .git directory.
func PlanPush(ctx context.Context, dir string) (*Plan, error) {
	top, err := Toplevel(ctx, dir)
	if err != nil {
		return nil, err
	}
	gd := filepath.Join(top, ".git")
	if fi, err := os.Lstat(gd); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("%s: .git is not a directory (git worktrees and submodules cannot be workspaces yet; use a full clone)", top)
	}
	// the user's own repository, no guest data: their global excludes apply
	out, err := runGit(ctx, gitOpts{Dir: top, UserConfig: true}, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
	if err != nil {
		return nil, err
	}
	p := &Plan{Root: top}
	dirs := map[string]bool{}
	seen := map[string]bool{}
	var files []Item
	for _, rel := range strings.Split(out, "\x00") {
		if rel == "" || seen[rel] {
			continue
		}
		seen[rel] = true
		fi, err := os.Lstat(filepath.Join(top, filepath.FromSlash(rel)))
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue // tracked but deleted
		case err != nil:
			return nil, fmt.Errorf("workspace file %s: %w", rel, err)
		}
		it := Item{Rel: rel, Mode: fi.Mode(), MTime: fi.ModTime()}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			if it.Link, err = os.Readlink(filepath.Join(top, filepath.FromSlash(rel))); err != nil {
				return nil, fmt.Errorf("workspace link %s: %w", rel, err)
			}
		case fi.Mode().IsRegular():
			it.Size = fi.Size()
		default:
			continue // submodule directories, sockets, fifos
		}
		for d := path.Dir(rel); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
		files = append(files, it)
	}
	// .git, everything in it
	dirs[".git"] = true
	err = filepath.WalkDir(gd, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(top, p)
		rel = filepath.ToSlash(rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			dirs[rel] = true
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			files = append(files, Item{Rel: rel, Mode: fi.Mode(), MTime: fi.ModTime(), Link: t})
		case fi.Mode().IsRegular():
			files = append(files, Item{Rel: rel, Mode: fi.Mode(), Size: fi.Size(), MTime: fi.ModTime()})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", gd, err)
	}
	ds := make([]string, 0, len(dirs))
	for d := range dirs {
		ds = append(ds, d)
	}
	sort.Strings(ds) // parents sort before their children
	for _, d := range ds {
		mode := fs.ModeDir | 0o755
		if fi, err := os.Stat(filepath.Join(top, filepath.FromSlash(d))); err == nil {
			mode = fi.Mode()
		}
		p.Items = append(p.Items, Item{Rel: d, Mode: mode})
	}
	for _, f := range files {
		p.Bytes += f.Size
		p.Files++
	}
	p.Items = append(p.Items, files...)
	return p, nil
}

// keptMode is the part of a mode a copy keeps.
func keptMode(m fs.FileMode) fs.FileMode {
	return m & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
}

// Workers is how many files move at once (SFTP round trips dominate).
const Workers = 16

// parallel runs fn on every item with Workers goroutines and returns the
// first error; after an error or ctx's end no new item starts.
func parallel[T any](ctx context.Context, items []T, fn func(T) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	next := make(chan T)
	var wg sync.WaitGroup
	for range min(Workers, len(items)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range next {
				if err := fn(it); err != nil {
					cancel(err)
				}
			}
		}()
	}
feed:
	for _, it := range items {
		select {
		case next <- it:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	return context.Cause(ctx)
}

// Upload carries out a plan into dest in the guest. Every file is written
// again (no delta), and files deleted on the host since a previous push stay
// in the guest. progress, when set, is told of bytes written (from several
// goroutines at once: Upload serialises the calls).
func Upload(ctx context.Context, p *Plan, guest FS, dest string, progress func(n int64)) error {
	if err := guest.Mkdir(dest); err != nil {
		return fmt.Errorf("make %s in the guest: %w", dest, err)
	}
	if progress != nil {
		var mu sync.Mutex
		inner := progress
		progress = func(n int64) { mu.Lock(); inner(n); mu.Unlock() }
	}
	var files []Item
	for _, it := range p.Items {
		if !it.Mode.IsDir() {
			files = append(files, it)
			continue
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("workspace push interrupted: %w", err)
		}
		dst := path.Join(dest, it.Rel)
		err := guest.Mkdir(dst)
		if err == nil {
			err = guest.Chmod(dst, keptMode(it.Mode)|0o700)
		}
		if err != nil {
			return fmt.Errorf("make the guest's directory %s: %w", dst, err)
		}
	}
	err := parallel(ctx, files, func(it Item) error {
		dst := path.Join(dest, it.Rel)
		var err error
		if it.Link != "" {
			guest.Remove(dst) // replace an older link or file
			err = guest.Symlink(it.Link, dst)
		} else {
			err = uploadFile(guest, filepath.Join(p.Root, filepath.FromSlash(it.Rel)), dst, it, progress)
		}
		if err != nil {
			return fmt.Errorf("copy %s to the guest's %s: %w", it.Rel, dst, err)
		}
		return nil
	})
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("workspace push interrupted: %w", ctx.Err())
	}
	return err
}

type countWriter struct {
	w  io.Writer
	fn func(int64)
}

func (c countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.fn(int64(n))
	return n, err
}

func uploadFile(guest FS, src, dst string, it Item, progress func(int64)) error {
	r, err := os.Open(src)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := guest.Create(dst)
	if err != nil {
		return err
	}
	var werr error
	if rf, ok := w.(io.ReaderFrom); ok && progress == nil {
		_, werr = rf.ReadFrom(r) // the sftp client's concurrent writes
	} else if progress != nil {
		_, werr = io.Copy(countWriter{w, progress}, r)
	} else {
		_, werr = io.Copy(w, r)
	}
	if cerr := w.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return werr
	}
	if inGitDir(it.Rel) {
		// git does not care about times in .git, and a plain file keeps the
		// SFTP server's 0644: save the round trips (most of a push's cost)
		if m := keptMode(it.Mode); m == 0o644 || m == 0o444 {
			return nil
		}
		return guest.Chmod(dst, keptMode(it.Mode))
	}
	if err := guest.Chmod(dst, keptMode(it.Mode)); err != nil {
		return err
	}
	return guest.Chtimes(dst, it.MTime)
}

func inGitDir(rel string) bool { return strings.HasPrefix(rel, ".git/") }

// Download copies the guest tree at src into the new local directory dst,
// keeping symlinks and the execute bits (devices, sockets and fifos are
// skipped). keep, when set, is asked about every entry (rel is its slash path
// under src) and a directory it refuses is not read. Names the guest lists
// are checked (no "", ".", "..", '/', NUL or duplicate) and files are written
// through a HostDir, so nothing the guest lists can write outside dst.
//
// The whole is bounded (MaxDownloadBytes, MaxDownloadEntries): a guest that
// lists endless entries or serves endless file bytes gets an error, not the
// host's disk.
func Download(ctx context.Context, guest FS, src, dst string, keep func(rel string, fi fs.FileInfo) bool) error {
	return download(ctx, guest, src, dst, keep, downloadLimits{MaxDownloadBytes, MaxDownloadEntries})
}

// Bounds on what one Download or one streamed pull (client.pullStream) takes
// from a guest: the only definition of both.
const (
	MaxDownloadBytes   = 16 << 30
	MaxDownloadEntries = 1 << 20
)

type downloadLimits struct {
	bytes   int64
	entries int
}

func download(ctx context.Context, guest FS, src, dst string, keep func(rel string, fi fs.FileInfo) bool, lim downloadLimits) error {
	fi, err := guest.Lstat(src)
	if err != nil {
		return fmt.Errorf("the guest's %s: %w (was the workspace pushed there? see --dest)", src, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("the guest's %s is not a directory", src)
	}
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	hd, err := OpenHostDir(dst)
	if err != nil {
		return err
	}
	defer hd.Close()
	type entry struct {
		guest, rel string
		mode       fs.FileMode
		size       int64
	}
	// list a level of directories at a time, in parallel
	var dirs, files []entry
	var mu sync.Mutex
	entries := 0
	level := []entry{{guest: src}}
	for len(level) > 0 {
		var next []entry
		err := parallel(ctx, level, func(d entry) error {
			ents, err := guest.ReadDir(d.guest)
			if err != nil {
				return fmt.Errorf("read the guest's %s: %w", d.guest, err)
			}
			seen := make(map[string]bool, len(ents))
			var mine []entry
			for _, e := range ents {
				n := e.Name()
				if !PlainName(n) || seen[n] {
					return fmt.Errorf("the guest's %s lists a bad name %q (empty, \".\", \"..\", with '/', or twice)", d.guest, n)
				}
				seen[n] = true
				en := entry{path.Join(d.guest, n), path.Join(d.rel, n), e.Mode(), e.Size()}
				if keep != nil && !keep(en.rel, e) {
					continue
				}
				mu.Lock()
				entries++
				over := entries > lim.entries
				mu.Unlock()
				if over {
					return fmt.Errorf("the guest's %s has more than %d entries: refusing to copy it", src, lim.entries)
				}
				switch {
				case e.IsDir():
					if err := hd.Mkdir(en.rel); err != nil {
						return err
					}
					mine = append(mine, en)
				case e.Mode()&fs.ModeSymlink != 0, e.Mode().IsRegular():
					mu.Lock()
					files = append(files, en)
					mu.Unlock()
				}
			}
			mu.Lock()
			dirs = append(dirs, mine...)
			next = append(next, mine...)
			mu.Unlock()
			return nil
		})
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("workspace download interrupted: %w", ctx.Err())
			}
			return err
		}
		level = next
	}
	budget := &byteBudget{}
	budget.left.Store(lim.bytes)
	err = parallel(ctx, files, func(e entry) error {
		if e.mode&fs.ModeSymlink != 0 {
			t, err := guest.Readlink(e.guest)
			if err != nil {
				return fmt.Errorf("read the guest's link %s: %w", e.guest, err)
			}
			return hd.Symlink(t, e.rel, false)
		}
		if err := downloadFile(guest, hd, e.guest, e.rel, e.mode, e.size, budget); err != nil {
			return fmt.Errorf("copy the guest's %s: %w", e.guest, err)
		}
		return nil
	})
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("workspace download interrupted: %w", ctx.Err())
		}
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := hd.SetDirMeta(dirs[i].rel, dirs[i].mode|0o700, time.Time{}); err != nil {
			return err
		}
	}
	return nil
}

func downloadFile(guest FS, hd *HostDir, src, rel string, mode fs.FileMode, size int64, budget *byteBudget) error {
	r, err := guest.Open(src)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := hd.Create(rel, true)
	if err != nil {
		return err
	}
	bw := budgetWriter{w, budget}
	if size < 64<<10 {
		// small: plain reads, without the sftp file's fstat before its
		// concurrent WriteTo
		_, err = io.CopyBuffer(bw, struct{ io.Reader }{r}, make([]byte, 32<<10))
	} else {
		_, err = io.Copy(bw, r) // the sftp file's concurrent WriteTo
	}
	if err == nil {
		err = SetFileMeta(w, mode, time.Time{})
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	return err
}

// byteBudget is what is left of a Download's byte bound, shared by the
// files copied in parallel.
type byteBudget struct{ left atomic.Int64 }

// budgetWriter writes to w while the budget lasts.
type budgetWriter struct {
	w io.Writer
	b *byteBudget
}

func (bw budgetWriter) Write(p []byte) (int, error) {
	if bw.b.left.Add(-int64(len(p))) < 0 {
		return 0, errors.New("the guest sent more bytes than a download accepts: refusing the rest")
	}
	return bw.w.Write(p)
}

// IndexBlobs maps the repository's tracked regular files (stage 0 of its
// index) to their blob ids, so that a push can tell which worktree file
// holds the content of which loose object. The caller still hashes what it
// reads before relying on it: the work tree may differ from the index.
func IndexBlobs(ctx context.Context, root string) (map[string]string, error) {
	out, err := runGit(ctx, gitOpts{Dir: root, UserConfig: true}, "ls-files", "-z", "--stage")
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	for _, rec := range strings.Split(out, "\x00") {
		// "<mode> <id> <stage>\t<path>"
		meta, rel, ok := strings.Cut(rec, "\t")
		f := strings.Fields(meta)
		if !ok || len(f) != 3 || f[2] != "0" || (f[0] != "100644" && f[0] != "100755") {
			continue
		}
		m[rel] = f[1]
	}
	return m, nil
}
