package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/pkg/sftp"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/termsafe"
	"github.com/bangerdev/banger/internal/workspace"
)

// cpArg is one side of banger cp: a local path, or VM:path in a guest.
type cpArg struct {
	VM   string // "" for the host
	Path string
}

func (c cpArg) String() string {
	if c.VM == "" {
		return c.Path
	}
	return c.VM + ":" + c.Path
}

// parseCpArg reads "VM:path" as a guest path when the part before the first
// ':' is non-empty and has no '/'; anything else is a local path (write
// ./a:b for a local file with a colon).
func parseCpArg(s string) cpArg {
	if i := strings.IndexByte(s, ':'); i > 0 && !strings.ContainsRune(s[:i], '/') {
		p := s[i+1:]
		if p == "" {
			p = "." // the guest user's home
		}
		return cpArg{VM: s[:i], Path: p}
	}
	return cpArg{Path: s}
}

func (a *App) cpCommand() *cobra.Command {
	var recursive, quiet bool
	cmd := &cobra.Command{
		Use:   "cp [-r] SRC DST",
		Short: "Copy files between this host and a VM (VM:path names a guest path)",
		Long: "Copy files and directories between this host and a VM, keeping modes and\n" +
			"modification times (one file in one stream; directories over SFTP). One of\n" +
			"SRC and DST is VM:path (a relative path is relative to the guest user's\n" +
			"home). When DST is an existing directory, SRC is copied into it.",
		Example: "  banger cp ./build.tar alpha:/tmp/\n  banger cp -r alpha:/var/log ./logs",
		Args:    exactArgs(2, "[-r] SRC DST"),
		RunE: func(cmd *cobra.Command, args []string) error {
			src, dst := parseCpArg(args[0]), parseCpArg(args[1])
			switch {
			case src.VM != "" && dst.VM != "":
				return usagef("copy between two VMs is not supported: copy through the host")
			case src.VM == "" && dst.VM == "":
				return usagef("neither %q nor %q names a VM path (VM:path)", args[0], args[1])
			}
			vm := src.VM + dst.VM
			return a.cp(cmd.Context(), vm, src, dst, cpOptions{Recursive: recursive, Progress: !quiet && a.stdoutIsTerminal()})
		},
	}
	cmd.Flags().BoolVarP(&recursive, "recursive", "r", false, "copy directories")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress bar")
	return cmd
}

func (a *App) stdoutIsTerminal() bool {
	f, ok := a.Stdout.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

type cpOptions struct {
	Recursive bool
	Progress  bool
}

// cpItem is one step of a copy plan.
type cpItem struct {
	Src, Dst string
	// Root is the destination directory the copy writes in (DST, or its
	// parent when DST names the copy itself) and Rel is Dst below it, made
	// only of plain names: the host side writes by (Root, Rel) without
	// following links.
	Root, Rel string
	Mode      fs.FileMode
	Size      int64
	MTime     time.Time
	Link      string // symlink target, for symlinks
}

func (a *App) cp(ctx context.Context, vm string, src, dst cpArg, opts cpOptions) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	// One regular file: one bulk stream, no SFTP session.
	if done, err := a.cpOne(fileStreams{c: c, ctx: ctx, vm: vm}, src, dst, opts); done {
		return ctxOr(ctx, err)
	}
	// SFTP over the bulk path (SSH when the VM has none).
	sc, closeFS, err := c.SFTP(ctx, vm)
	if err != nil {
		return err
	}
	defer closeFS()
	run := func(argv []string) error { return c.Run(ctx, vm, argv) }
	guest := sftpFS{c: sc, run: run, files: bulkFiles{c: c, ctx: ctx, vm: vm}}
	var from cpSource = osFS{}
	var to cpDest = guest
	if src.VM != "" {
		from, to = guest, osFS{}
	}
	plan, err := planCopy(from, to, src, dst, opts.Recursive)
	if err != nil {
		return ctxOr(ctx, err)
	}
	var total int64
	for _, it := range plan {
		total += it.Size
	}
	bar := a.progressBar(opts, total, src)
	if err := runCopy(from, to, plan, bar, src, dst); err != nil {
		return ctxOr(ctx, err)
	}
	if bar != nil {
		bar.Finish()
	}
	return nil
}

// progressBar is cp's progress bar for total bytes (nil without Progress).
func (a *App) progressBar(opts cpOptions, total int64, src cpArg) *progressbar.ProgressBar {
	if !opts.Progress {
		return nil
	}
	return progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(a.Stdout),
		progressbar.OptionSetDescription(path.Base(filepath.ToSlash(src.Path))),
		progressbar.OptionShowBytes(true),
		progressbar.OptionShowTotalBytes(true),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionFullWidth(),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(a.Stdout) }),
	)
}

// oneFileStreams copies one regular file in one bulk stream, with its mode
// and time (client.PutGuestFile, client.GetGuestFile); an error
// client.IsFallback accepts means "use SFTP".
type oneFileStreams interface {
	put(dest, base string, mode fs.FileMode, mtime time.Time, r io.Reader) (string, error)
	get(p string) (io.ReadCloser, bulk.FileMeta, error)
}

type fileStreams struct {
	c   *client.Client
	ctx context.Context
	vm  string
}

func (f fileStreams) put(dest, base string, mode fs.FileMode, mtime time.Time, r io.Reader) (string, error) {
	return f.c.PutGuestFile(f.ctx, f.vm, dest, base, mode, mtime, r)
}

func (f fileStreams) get(p string) (io.ReadCloser, bulk.FileMeta, error) {
	r, m, err := f.c.GetGuestFile(f.ctx, f.vm, p)
	if r == nil {
		return nil, m, err // not a typed nil
	}
	return r, m, err
}

// cpOne copies a source that is one regular file in one bulk stream: the
// agent resolves the guest side's path as cp would (into an existing
// directory, else as the destination) and sets or reports the mode and
// time, so no SFTP session starts and nothing waits for a Stat, Chmod or
// Chtimes. done is false when the SFTP path must do it: the source is not
// one regular file (a directory, -r, errors), the agent is older (no such
// operation) or refused before changing anything (SFTP then says why, in
// the words it always has).
func (a *App) cpOne(fsx oneFileStreams, src, dst cpArg, opts cpOptions) (done bool, err error) {
	if strings.HasSuffix(src.Path, "/") {
		return false, nil
	}
	if src.VM == "" {
		fi, err := os.Stat(src.Path)
		if err != nil || !fi.Mode().IsRegular() {
			return false, nil
		}
		f, err := os.Open(src.Path)
		if err != nil {
			return false, nil
		}
		defer f.Close()
		bar := a.progressBar(opts, fi.Size(), src)
		var r io.Reader = f
		if bar != nil {
			r = io.TeeReader(f, bar)
		}
		target, err := fsx.put(dst.Path, filepath.Base(src.Path), keptMode(fi.Mode()), fi.ModTime(), r)
		if client.IsFallback(err) {
			return false, nil
		}
		if err != nil {
			if target == "" {
				target = dst.Path
			}
			return true, fmt.Errorf("copy %s to %s:%s: %w", src, dst.VM, termsafe.Line(target), explainFSErr(err))
		}
		if bar != nil {
			bar.Finish()
		}
		return true, nil
	}
	r, m, err := fsx.get(src.Path)
	if client.IsFallback(err) {
		return false, nil
	}
	if err != nil {
		return true, err // it names VM:path
	}
	if r == nil {
		return false, nil // a directory or another kind of file
	}
	defer r.Close()
	from := &oneFile{path: src.Path, meta: m, r: r}
	plan, err := planCopy(from, osFS{}, src, dst, opts.Recursive)
	if err != nil {
		return true, err
	}
	bar := a.progressBar(opts, int64(m.Size), src)
	if err := runCopy(from, osFS{}, plan, bar, src, dst); err != nil {
		return true, err
	}
	if bar != nil {
		bar.Finish()
	}
	return true, nil
}

// oneFile is a cpSource of one regular file in a guest, as OpGetFile's
// reply describes it (checked by bulk.CheckFileMeta); Open yields its
// stream.
type oneFile struct {
	path string
	meta bulk.FileMeta
	r    io.ReadCloser
}

func (o *oneFile) Stat(p string) (fs.FileInfo, error)  { return o.info(p) }
func (o *oneFile) Lstat(p string) (fs.FileInfo, error) { return o.info(p) }
func (o *oneFile) info(p string) (fs.FileInfo, error) {
	if p != o.path {
		return nil, &fs.PathError{Op: "stat", Path: p, Err: fs.ErrNotExist}
	}
	return metaInfo{name: path.Base(p), m: o.meta}, nil
}
func (o *oneFile) ReadDir(p string) ([]fs.FileInfo, error) {
	return nil, &fs.PathError{Op: "readdir", Path: p, Err: errors.New("not a directory")}
}
func (o *oneFile) Readlink(p string) (string, error) {
	return "", &fs.PathError{Op: "readlink", Path: p, Err: errors.New("not a link")}
}
func (*oneFile) Join(e ...string) string { return path.Join(e...) }
func (*oneFile) Base(p string) string    { return path.Base(p) }
func (o *oneFile) Open(p string) (io.ReadCloser, error) {
	if p != o.path || o.r == nil {
		return nil, &fs.PathError{Op: "open", Path: p, Err: fs.ErrNotExist}
	}
	r := o.r
	o.r = nil
	return r, nil // copyOne closes it (and cpOne again: closing twice is harmless)
}

// metaInfo is a bulk.FileMeta as an fs.FileInfo.
type metaInfo struct {
	name string
	m    bulk.FileMeta
}

func (i metaInfo) Name() string       { return i.name }
func (i metaInfo) Size() int64        { return int64(i.m.Size) }
func (i metaInfo) Mode() fs.FileMode  { return i.m.FileMode() }
func (i metaInfo) ModTime() time.Time { return i.m.ModTime() }
func (i metaInfo) IsDir() bool        { return false }
func (i metaInfo) Sys() any           { return nil }

func ctxOr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("copy interrupted: %w", ctx.Err())
	}
	return err
}

// cpSource is what a copy needs of the side it reads.
type cpSource interface {
	Stat(p string) (fs.FileInfo, error)
	Lstat(p string) (fs.FileInfo, error)
	ReadDir(p string) ([]fs.FileInfo, error)
	Readlink(p string) (string, error)
	Join(elem ...string) string
	Base(p string) string
	Open(p string) (io.ReadCloser, error)
}

// cpDest is what a copy needs of the side it writes.
type cpDest interface {
	Stat(p string) (fs.FileInfo, error)
	Join(elem ...string) string
	Base(p string) string
	Dir(p string) string
	PutDir(it cpItem) error                    // an existing directory is fine
	PutLink(it cpItem) error                   // replaces a file or link
	PutFile(it cpItem) (io.WriteCloser, error) // creates or truncates
	SetMeta(it cpItem, w io.WriteCloser) error // mode and time; w is the open file, nil for a directory
}

// osFS is this host's filesystem. As a destination it receives names that
// came from a guest, so it writes through workspace.HostDir: each path is
// walked below the item's Root with O_NOFOLLOW, an existing link is never
// followed, and modes (without setuid, setgid or sticky) and times are set
// on descriptors.
type osFS struct{ workspace.LocalFS }

func (osFS) Stat(p string) (fs.FileInfo, error) { return os.Stat(p) }
func (osFS) Join(e ...string) string            { return filepath.Join(e...) }
func (osFS) Base(p string) string               { return filepath.Base(p) }
func (osFS) Dir(p string) string                { return filepath.Dir(p) }

func (osFS) in(it cpItem, fn func(*workspace.HostDir) error) error {
	hd, err := workspace.OpenHostDir(it.Root)
	if err != nil {
		return err
	}
	defer hd.Close()
	return fn(hd)
}
func (o osFS) PutDir(it cpItem) error {
	return o.in(it, func(hd *workspace.HostDir) error { return hd.Mkdir(it.Rel) })
}
func (o osFS) PutLink(it cpItem) error {
	return o.in(it, func(hd *workspace.HostDir) error { return hd.Symlink(it.Link, it.Rel, true) })
}
func (o osFS) PutFile(it cpItem) (io.WriteCloser, error) {
	var f *os.File
	err := o.in(it, func(hd *workspace.HostDir) (err error) { f, err = hd.Create(it.Rel, false); return err })
	return f, err
}
func (o osFS) SetMeta(it cpItem, w io.WriteCloser) error {
	if f, ok := w.(*os.File); ok {
		return workspace.SetFileMeta(f, it.Mode, it.MTime)
	}
	return o.in(it, func(hd *workspace.HostDir) error { return hd.SetDirMeta(it.Rel, it.Mode, it.MTime) })
}

type sftpFS struct {
	c   *sftp.Client
	run func(argv []string) error // runs a command in the guest
	// files carries the contents of files of bulkMin bytes or more in one
	// stream each (nil: SFTP only)
	files guestFiles
}

// guestFiles opens a guest file's contents over the bulk path (see
// client.CreateGuestFile); an error client.IsUnsupported accepts means
// "use SFTP".
type guestFiles interface {
	create(p string) (io.WriteCloser, error)
	open(p string) (io.ReadCloser, error)
}

// bulkMin is the size from which a file's contents travel in a bulk stream
// of their own rather than as SFTP requests: below it, SFTP's few round
// trips cost less than opening a stream.
const bulkMin = 256 << 10

type bulkFiles struct {
	c   *client.Client
	ctx context.Context
	vm  string
}

func (b bulkFiles) create(p string) (io.WriteCloser, error) {
	return b.c.CreateGuestFile(b.ctx, b.vm, p)
}
func (b bulkFiles) open(p string) (io.ReadCloser, error) { return b.c.OpenGuestFile(b.ctx, b.vm, p) }

// openItem opens a file to copy: over the bulk path when it is large and
// the guest can.
func openItem(from cpSource, it cpItem) (io.ReadCloser, error) {
	if s, ok := from.(sftpFS); ok && s.files != nil && it.Size >= bulkMin {
		r, err := s.files.open(it.Src)
		if err == nil || !client.IsUnsupported(err) {
			return r, err
		}
	}
	return from.Open(it.Src)
}

func (s sftpFS) Stat(p string) (fs.FileInfo, error)      { return s.c.Stat(p) }
func (s sftpFS) Lstat(p string) (fs.FileInfo, error)     { return s.c.Lstat(p) }
func (s sftpFS) ReadDir(p string) ([]fs.FileInfo, error) { return s.c.ReadDir(p) }
func (s sftpFS) Readlink(p string) (string, error)       { return s.c.ReadLink(p) }
func (sftpFS) Join(e ...string) string                   { return path.Join(e...) }
func (sftpFS) Base(p string) string                      { return path.Base(p) }
func (sftpFS) Dir(p string) string                       { return path.Dir(p) }
func (s sftpFS) Create(p string) (io.WriteCloser, error) {
	return s.c.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC)
}
func (s sftpFS) Open(p string) (io.ReadCloser, error) { return s.c.Open(p) }
func (s sftpFS) Mkdir(p string) error {
	err := s.c.Mkdir(p)
	if err != nil {
		if fi, serr := s.c.Stat(p); serr == nil && fi.IsDir() {
			return nil
		}
	}
	return err
}
func (s sftpFS) PutDir(it cpItem) error { return s.Mkdir(it.Dst) }
func (s sftpFS) PutLink(it cpItem) error {
	s.Remove(it.Dst)
	return s.Symlink(it.Link, it.Dst)
}
func (s sftpFS) PutFile(it cpItem) (io.WriteCloser, error) {
	if s.files != nil && it.Size >= bulkMin {
		w, err := s.files.create(it.Dst)
		if err == nil || !client.IsUnsupported(err) {
			return w, err
		}
	}
	return s.Create(it.Dst)
}
func (s sftpFS) SetMeta(it cpItem, w io.WriteCloser) error {
	// a bulk stream's contents must be in the file before its time is set
	if f, ok := w.(interface{ Finish() error }); ok {
		if err := f.Finish(); err != nil {
			return err
		}
	}
	if err := s.Chmod(it.Dst, keptMode(it.Mode)); err != nil {
		return err
	}
	return s.Chtimes(it.Dst, it.MTime)
}

// Symlink makes a symlink in the guest. The agent's SFTP server turns a
// relative target into an absolute one, which would break links inside a
// copied tree, so relative targets are made with ln in the guest.
func (s sftpFS) Symlink(t, p string) error {
	if path.IsAbs(t) || s.run == nil {
		return s.c.Symlink(t, p)
	}
	abs, err := s.c.RealPath(p)
	if err != nil {
		return err
	}
	if err := s.run([]string{"ln", "-sfn", "--", t, abs}); err != nil {
		return fmt.Errorf("ln -s in the guest: %w", err)
	}
	return nil
}
func (s sftpFS) Remove(p string) error               { return s.c.Remove(p) }
func (s sftpFS) Chmod(p string, m fs.FileMode) error { return s.c.Chmod(p, m) }
func (s sftpFS) Chtimes(p string, mtime time.Time) error {
	return s.c.Chtimes(p, mtime, mtime)
}

// keptMode is the part of a mode a copy keeps.
func keptMode(m fs.FileMode) fs.FileMode {
	return m & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
}

// planCopy lists what to copy, like cp -r/scp -r: into DST when DST is an
// existing directory, else as DST. Every name read from the source side is
// checked (not empty, ".", ".." or with '/', and not listed twice in one
// directory): a guest's listing cannot name a path outside the copy.
func planCopy(from cpSource, to cpDest, src, dst cpArg, recursive bool) ([]cpItem, error) {
	fi, err := from.Stat(src.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", src, explainFSErr(err))
	}
	target := to.Join(dst.Path)
	tfi, terr := to.Stat(dst.Path)
	switch {
	case terr == nil && tfi.IsDir():
		if from.Base(src.Path) == ".." {
			return nil, fmt.Errorf("cannot copy %s into %s: name the directory, not its \"..\"", src, dst)
		}
		target = to.Join(dst.Path, from.Base(src.Path))
	case terr == nil && fi.IsDir():
		return nil, fmt.Errorf("%s exists and is not a directory", dst)
	case terr != nil && !errors.Is(terr, fs.ErrNotExist):
		return nil, fmt.Errorf("%s: %w", dst, explainFSErr(terr))
	case terr != nil && !fi.IsDir() && strings.HasSuffix(dst.Path, "/"):
		return nil, fmt.Errorf("%s: no such directory", dst)
	}
	root, top := to.Dir(target), to.Base(target)
	if !workspace.PlainName(top) {
		// DST itself (".", "/"): only a directory copied into an existing one
		if tfi, err := to.Stat(target); err != nil || !tfi.IsDir() || !fi.IsDir() {
			return nil, fmt.Errorf("cannot copy %s to %s: name the file or directory to create", src, target)
		}
		root, top = target, ""
	}
	if !fi.IsDir() {
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%s is not a regular file", src)
		}
		return []cpItem{{Src: src.Path, Dst: target, Root: root, Rel: top, Mode: fi.Mode(), Size: fi.Size(), MTime: fi.ModTime()}}, nil
	}
	if !recursive {
		return nil, fmt.Errorf("%s is a directory (use cp -r)", src)
	}
	var plan []cpItem
	var walk func(s, d, rel string, fi fs.FileInfo) error
	walk = func(s, d, rel string, fi fs.FileInfo) error {
		it := cpItem{Src: s, Dst: d, Root: root, Rel: rel, Mode: fi.Mode(), MTime: fi.ModTime()}
		switch {
		case fi.IsDir():
			plan = append(plan, it)
			ents, err := from.ReadDir(s)
			if err != nil {
				return fmt.Errorf("read directory %s: %w", s, explainFSErr(err))
			}
			seen := make(map[string]bool, len(ents))
			for _, e := range ents {
				n := e.Name()
				if !workspace.PlainName(n) || seen[n] {
					return fmt.Errorf("directory %s lists a bad name %q (empty, \".\", \"..\", with '/', or twice): refusing to copy it", s, n)
				}
				seen[n] = true
				if err := walk(from.Join(s, n), to.Join(d, n), path.Join(rel, n), e); err != nil {
					return err
				}
			}
			// the directory's mode and time are set after its contents
			it.Mode |= fs.ModeIrregular
			plan = append(plan, it)
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := from.Readlink(s)
			if err != nil {
				return fmt.Errorf("read link %s: %w", s, explainFSErr(err))
			}
			it.Link = t
			plan = append(plan, it)
		case fi.Mode().IsRegular():
			it.Size = fi.Size()
			plan = append(plan, it)
		default:
			// devices, sockets, fifos: skipped like scp does
		}
		return nil
	}
	return plan, walk(src.Path, target, top, fi)
}

// runCopy carries out a plan.
func runCopy(from cpSource, to cpDest, plan []cpItem, bar *progressbar.ProgressBar, src, dst cpArg) error {
	where := func(p string, side cpArg) string {
		if side.VM == "" {
			return p
		}
		return side.VM + ":" + p
	}
	for _, it := range plan {
		var err error
		switch {
		case it.Rel == "": // DST itself, an existing directory: left as it is
		case it.Mode&fs.ModeIrregular != 0 && it.Mode.IsDir(): // directory done
			err = to.SetMeta(it, nil)
		case it.Mode.IsDir():
			err = to.PutDir(it)
		case it.Link != "":
			err = to.PutLink(it)
		default:
			err = copyOne(from, to, it, bar)
		}
		if err != nil {
			return fmt.Errorf("copy %s to %s: %w", where(it.Src, src), where(it.Dst, dst), explainFSErr(err))
		}
	}
	return nil
}

// copyOne copies a regular file and sets its mode and time.
func copyOne(from cpSource, to cpDest, it cpItem, bar *progressbar.ProgressBar) error {
	r, err := openItem(from, it)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := to.PutFile(it)
	if err != nil {
		return err
	}
	var werr error
	_, remote := r.(*sftp.File)
	if _, ok := r.(*client.GuestFileReader); ok {
		remote = true
	}
	switch {
	case bar == nil:
		werr = transfer(w, r)
	case remote:
		// keep the remote file's WriteTo; count through the writer
		werr = transfer(io.MultiWriter(w, bar), r)
	default:
		werr = transfer(w, io.TeeReader(r, bar))
	}
	if werr == nil {
		werr = to.SetMeta(it, w)
	}
	if cerr := w.Close(); werr == nil {
		werr = cerr
	}
	return werr
}

// transfer uses the sftp fast paths: concurrent writes to a remote file,
// concurrent reads from one.
func transfer(w io.Writer, r io.Reader) error {
	if rf, ok := w.(*sftp.File); ok {
		_, err := rf.ReadFromWithConcurrency(r, 0)
		return err
	}
	if rf, ok := r.(*sftp.File); ok {
		_, err := rf.WriteTo(w)
		return err
	}
	_, err := io.Copy(w, r)
	return err
}

// explainFSErr turns the usual failures into plain words: the callers name
// the path, so "stat /x: no such file or directory" or the wire's bare
// "file does not exist" would only repeat it. The error is still wrapped
// (errors.Is sees fs.ErrNotExist).
func explainFSErr(err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return &plainFSErr{"no such file or directory", err}
	case errors.Is(err, fs.ErrPermission):
		return &plainFSErr{"permission denied", err}
	}
	return err
}

// plainFSErr is an error said in plain words, wrapping the original.
type plainFSErr struct {
	msg string
	err error
}

func (e *plainFSErr) Error() string { return e.msg }
func (e *plainFSErr) Unwrap() error { return e.err }
