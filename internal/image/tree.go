// Package image turns container image layers (and directory trees described as
// tar streams) into ext4 root filesystem images that keep owners, modes,
// xattrs, device nodes, FIFOs, symlinks and hard links exactly, without root.
//
// Layers are applied in order to an in-memory tree (whiteouts and opaque
// whiteouts included); regular file contents, directories and symlinks are
// staged in a directory the caller owns. mkfs.ext4 -d copies the staging
// directory into a new filesystem and one debugfs batch then sets what an
// ordinary user cannot set on the host: owners, special mode bits, device
// nodes, FIFOs and xattrs.
package image

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Kinds of inodes (tar type flags).
const (
	kindReg     = tar.TypeReg
	kindDir     = tar.TypeDir
	kindSymlink = tar.TypeSymlink
	kindChar    = tar.TypeChar
	kindBlock   = tar.TypeBlock
	kindFifo    = tar.TypeFifo
)

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	maxSymlinkHops = 40
)

// inode is one file of the flattened tree; hard links share an inode.
type inode struct {
	kind         byte
	mode         int64 // permission bits plus setuid/setgid/sticky (07777)
	uid, gid     int
	mtime        time.Time
	link         string // symlink target
	major, minor int64
	xattrs       map[string]string
	size         int64
	children     map[string]*dirent // directories only
}

type dirent struct {
	ino   *inode
	layer int // the layer that made this name
}

// Tree is a flattened filesystem being built from layers. Regular file
// contents, directories and symlinks live under Staging; everything else is
// described in memory.
type Tree struct {
	staging string
	root    *inode
	layer   int

	// Stats
	Files, Dirs, Symlinks, Devices, Fifos, HardLinks int
	Bytes                                            int64
	Skipped                                          []string // (the first 100) entries that cannot be represented (sockets)

	// Limits bound what the layers may unpack to (set before ApplyLayer).
	Limits Limits
	// freeSpace reports free bytes on the disk holding a directory (a test
	// seam; nil = statfs).
	freeSpace                            func(dir string) (int64, error)
	maxMeta                              int64 // test seam; 0 = maxMetaBytes
	entries                              int
	streamBytes, contentBytes, metaBytes int64
}

// NewTree starts an empty tree whose staged contents go to dir (created, must
// not exist or be empty).
func NewTree(dir string) (*Tree, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create staging directory: %w", err)
	}
	return &Tree{
		staging: dir,
		root:    &inode{kind: kindDir, mode: 0o755, children: map[string]*dirent{}, mtime: time.Unix(0, 0)},
	}, nil
}

// ErrUnsafePath is returned for layer entries that would escape the root.
var ErrUnsafePath = errors.New("unsafe path in layer")

// cleanName turns a tar entry name into a clean relative path ("" = root).
// Every component is a name debugfs and ext4 can hold (checkName), and the
// path fits in PATH_MAX.
func cleanName(name string) (string, error) {
	if len(name) > 2*maxPathLen {
		return "", fmt.Errorf("%w: name %.64q… is %d bytes (at most %d)", ErrUnsafePath, name, len(name), maxPathLen)
	}
	if i := strings.IndexFunc(name, isControl); i >= 0 {
		return "", fmt.Errorf("%w: %q contains control byte %#x (not supported in names)", ErrUnsafePath, name, name[i])
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", fmt.Errorf("%w: %q has a .. component", ErrUnsafePath, name)
		}
	}
	p := path.Clean("/" + name)
	if p == "/" {
		return "", nil
	}
	if len(p) > maxPathLen {
		return "", fmt.Errorf("%w: path %.64q… is %d bytes (at most %d)", ErrUnsafePath, p, len(p), maxPathLen)
	}
	for _, c := range strings.Split(p[1:], "/") {
		if err := checkName(c); err != nil {
			return "", err
		}
	}
	return p[1:], nil
}

// lookupDir walks rel (already clean) to its parent directory, resolving
// symlinks inside the tree (never outside the root), creating missing
// directories when create is set. It returns the parent's real path (clean,
// relative), the parent inode and the final component.
func (t *Tree) lookupParent(rel string, create bool) (string, *inode, string, error) {
	dir, base := path.Split(rel)
	real, ino, err := t.resolveDir(strings.TrimSuffix(dir, "/"), create, 0)
	return real, ino, base, err
}

func (t *Tree) resolveDir(rel string, create bool, hops int) (string, *inode, error) {
	cur, curPath := t.root, ""
	if rel == "" {
		return "", cur, nil
	}
	parts := strings.Split(rel, "/")
	for i, c := range parts {
		if c == "" || c == "." {
			continue
		}
		de := cur.children[c]
		if de == nil {
			if !create {
				return "", nil, os.ErrNotExist
			}
			// Names reached through a symlink's target were not checked yet.
			if err := checkName(c); err != nil {
				return "", nil, err
			}
			if p := path.Join(curPath, c); len(p)+1 > maxPathLen {
				return "", nil, fmt.Errorf("%w: path /%.64s… is longer than %d bytes", ErrUnsafePath, p, maxPathLen)
			}
			if err := t.addEntry(); err != nil {
				return "", nil, err
			}
			if err := t.addMeta(len(c)); err != nil {
				return "", nil, err
			}
			n := &inode{kind: kindDir, mode: 0o755, children: map[string]*dirent{}, mtime: time.Unix(0, 0)}
			if err := os.Mkdir(t.stagePath(path.Join(curPath, c)), 0o700); err != nil {
				return "", nil, fmt.Errorf("stage directory: %w", err)
			}
			cur.children[c] = &dirent{ino: n, layer: t.layer}
			t.Dirs++
			de = cur.children[c]
		}
		switch de.ino.kind {
		case kindDir:
			cur, curPath = de.ino, path.Join(curPath, c)
		case kindSymlink:
			if hops >= maxSymlinkHops {
				return "", nil, fmt.Errorf("too many levels of symbolic links at /%s", path.Join(curPath, c))
			}
			target := de.ino.link
			if !path.IsAbs(target) {
				target = path.Join("/", curPath, target)
			}
			rest := strings.Join(parts[i+1:], "/")
			clean := path.Clean("/" + target + "/" + rest) // ".." cannot climb above "/"
			return t.resolveDir(strings.TrimPrefix(clean, "/"), create, hops+1)
		default:
			return "", nil, fmt.Errorf("/%s is not a directory", path.Join(curPath, c))
		}
	}
	return curPath, cur, nil
}

func (t *Tree) stagePath(rel string) string {
	return filepath.Join(t.staging, filepath.FromSlash(rel))
}

// remove drops a name (recursively) from the tree and the staging directory.
func (t *Tree) remove(parent *inode, parentPath, name string) error {
	if _, ok := parent.children[name]; !ok {
		return nil
	}
	delete(parent.children, name)
	p := t.stagePath(path.Join(parentPath, name))
	if err := os.RemoveAll(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove staged %s: %w", p, err)
	}
	return nil
}

// ApplyLayer applies one uncompressed layer tar stream on top of the tree.
func (t *Tree) ApplyLayer(r io.Reader) error {
	t.layer++
	tr := tar.NewReader(streamLimit{r: r, t: t})
	buf := make([]byte, 1<<20)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read layer %d: %w", t.layer, err)
		}
		if err := t.addEntry(); err != nil {
			return fmt.Errorf("layer %d: %w", t.layer, err)
		}
		if err := t.applyEntry(hdr, tr, buf); err != nil {
			return fmt.Errorf("layer %d: %s: %w", t.layer, displayName(hdr.Name), err)
		}
	}
}

// displayName is a layer name fit for an error message: quoted when it holds
// anything but printable text, and cut short.
func displayName(s string) string {
	q := strconv.Quote(s)
	if q[1:len(q)-1] == s {
		q = s
	}
	if len(q) > 100 {
		return q[:100] + "…"
	}
	return q
}

func (t *Tree) applyEntry(hdr *tar.Header, r io.Reader, buf []byte) error {
	rel, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	// What the tree keeps of this entry: its name, link target and xattrs.
	meta := len(path.Base(rel)) + len(hdr.Linkname)
	for k, v := range hdr.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			meta += len(k) + len(v)
		}
	}
	if err := t.addMeta(meta); err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader, tar.TypeXHeader, tar.TypeGNULongName, tar.TypeGNULongLink:
		return nil
	}
	if rel == "" {
		if hdr.Typeflag == tar.TypeDir {
			return setMeta(t.root, hdr)
		}
		return nil
	}
	parentPath, parent, base, err := t.lookupParent(rel, true)
	if err != nil {
		return err
	}
	// Whiteouts hide names of lower layers.
	if base == opaqueMarker {
		for name, de := range parent.children {
			if de.layer < t.layer {
				if err := t.remove(parent, parentPath, name); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if strings.HasPrefix(base, whiteoutPrefix) {
		victim := strings.TrimPrefix(base, whiteoutPrefix)
		if victim == "" || victim == "." || victim == ".." {
			return fmt.Errorf("%w: bad whiteout %q", ErrUnsafePath, hdr.Name)
		}
		return t.remove(parent, parentPath, victim)
	}
	full := path.Join(parentPath, base)
	if len(full)+1 > maxPathLen {
		return fmt.Errorf("%w: path /%.64s… is longer than %d bytes", ErrUnsafePath, full, maxPathLen)
	}
	sp := t.stagePath(full)
	old := parent.children[base]

	if hdr.Typeflag == tar.TypeLink {
		target, err := cleanName(hdr.Linkname)
		if err != nil || target == "" {
			return fmt.Errorf("%w: bad hard link target %q", ErrUnsafePath, hdr.Linkname)
		}
		tpPath, tp, tbase, err := t.lookupParent(target, false)
		if err != nil {
			return fmt.Errorf("hard link target %s: %w", hdr.Linkname, err)
		}
		tde := tp.children[tbase]
		if tde == nil {
			return fmt.Errorf("hard link target %s does not exist", hdr.Linkname)
		}
		if tde.ino.kind == kindDir {
			return fmt.Errorf("hard link to directory %s", hdr.Linkname)
		}
		if old != nil && old.ino == tde.ino {
			return nil
		}
		if err := t.remove(parent, parentPath, base); err != nil {
			return err
		}
		if k := tde.ino.kind; k == kindReg || k == kindSymlink {
			if err := os.Link(t.stagePath(path.Join(tpPath, tbase)), sp); err != nil {
				return fmt.Errorf("stage hard link: %w", err)
			}
		}
		parent.children[base] = &dirent{ino: tde.ino, layer: t.layer}
		t.HardLinks++
		return nil
	}

	if hdr.Typeflag == tar.TypeDir && old != nil && old.ino.kind == kindDir {
		if err := setMeta(old.ino, hdr); err != nil {
			return err
		}
		old.layer = t.layer
		return nil
	}
	if err := t.remove(parent, parentPath, base); err != nil {
		return err
	}
	n := &inode{}
	if err := setMeta(n, hdr); err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse: // the reader maps the old TypeRegA to TypeReg
		n.kind = kindReg
		n.size = hdr.Size
		if err := t.addContent(full, hdr.Size); err != nil {
			return err
		}
		if err := writeSparse(sp, r, buf); err != nil {
			return err
		}
		t.Files++
		t.Bytes += hdr.Size
	case tar.TypeDir:
		n.kind = kindDir
		n.children = map[string]*dirent{}
		if err := os.Mkdir(sp, 0o700); err != nil {
			return fmt.Errorf("stage directory: %w", err)
		}
		t.Dirs++
	case tar.TypeSymlink:
		n.kind = kindSymlink
		n.link = hdr.Linkname
		n.mode = 0o777 // Linux ignores a symlink's mode; every tool expects 0777
		if hdr.Linkname == "" || strings.ContainsAny(hdr.Linkname, "\x00") || len(hdr.Linkname) >= maxPathLen {
			return fmt.Errorf("bad symlink target %.64q (empty, NUL or %d bytes or more)", hdr.Linkname, maxPathLen)
		}
		if err := os.Symlink(hdr.Linkname, sp); err != nil {
			return fmt.Errorf("stage symlink: %w", err)
		}
		t.Symlinks++
	case tar.TypeChar, tar.TypeBlock:
		n.kind = hdr.Typeflag
		n.major, n.minor = hdr.Devmajor, hdr.Devminor
		// Linux majors have 12 bits; debugfs's mknod takes minors up to 65535.
		if n.major < 0 || n.minor < 0 || n.major > 0xfff || n.minor > 0xffff {
			return fmt.Errorf("device numbers %d:%d not supported (major at most 4095, minor at most 65535)", n.major, n.minor)
		}
		t.Devices++
	case tar.TypeFifo:
		n.kind = kindFifo
		t.Fifos++
	default:
		if len(t.Skipped) < 100 {
			t.Skipped = append(t.Skipped, "/"+full)
		}
		return nil
	}
	parent.children[base] = &dirent{ino: n, layer: t.layer}
	return nil
}

func setMeta(n *inode, hdr *tar.Header) error {
	if hdr.Uid < 0 || hdr.Gid < 0 || int64(hdr.Uid) > math.MaxUint32-1 || int64(hdr.Gid) > math.MaxUint32-1 {
		return fmt.Errorf("owner %d:%d out of range", hdr.Uid, hdr.Gid)
	}
	n.mode = hdr.Mode & 0o7777
	n.uid, n.gid = hdr.Uid, hdr.Gid
	n.mtime = hdr.ModTime
	n.xattrs = nil
	add := func(k, v string) {
		if n.xattrs == nil {
			n.xattrs = map[string]string{}
		}
		n.xattrs[k] = v
	}
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			add(name, v)
		}
	}
	//lint:ignore SA1019 older writers only fill Xattrs
	for k, v := range hdr.Xattrs { //nolint:staticcheck
		add(k, v)
	}
	total := 0
	for _, k := range sortedKeys(n.xattrs) {
		if err := checkXattr(k, n.xattrs[k]); err != nil {
			return err
		}
		total += len(k) + len(n.xattrs[k])
	}
	if total > maxXattrsPerInode {
		return fmt.Errorf("%d bytes of xattrs (at most %d)", total, maxXattrsPerInode)
	}
	return nil
}

// writeSparse writes r to a new file at p, leaving all-zero 4 KiB blocks as
// holes.
func writeSparse(p string, r io.Reader, buf []byte) error {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("stage file: %w", err)
	}
	var size int64
	holes := false
	for {
		n, rerr := io.ReadFull(r, buf)
		for off := 0; off < n; {
			end := min(off+4096, n)
			chunk := buf[off:end]
			if len(chunk) == 4096 && isZero(chunk) {
				holes = true
				off = end
				continue
			}
			// write the run of non-zero blocks at once
			runEnd := end
			for runEnd < n {
				e := min(runEnd+4096, n)
				if e-runEnd == 4096 && isZero(buf[runEnd:e]) {
					break
				}
				runEnd = e
			}
			if _, err := f.WriteAt(buf[off:runEnd], size+int64(off)); err != nil {
				f.Close()
				return fmt.Errorf("stage file: %w", err)
			}
			off = runEnd
		}
		size += int64(n)
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			f.Close()
			return rerr
		}
	}
	if holes {
		if err := f.Truncate(size); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// walk visits every name in the tree, parents before children, in sorted
// order; p is the absolute path in the image.
func (t *Tree) walk(fn func(p string, n *inode, parent string, name string) error) error {
	var rec func(dir string, d *inode) error
	rec = func(dir string, d *inode) error {
		names := make([]string, 0, len(d.children))
		for k := range d.children {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, name := range names {
			n := d.children[name].ino
			p := path.Join(dir, name)
			if err := fn(p, n, dir, name); err != nil {
				return err
			}
			if n.kind == kindDir {
				if err := rec(p, n); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := fn("/", t.root, "", ""); err != nil {
		return err
	}
	return rec("/", t.root)
}

// setStagedTimes gives staged files, symlinks and directories their mtimes
// (children first, so directory times stick) and makes everything readable
// for mkfs.
func (t *Tree) setStagedTimes() error {
	var rec func(dir string, d *inode) error
	rec = func(dir string, d *inode) error {
		for name, de := range d.children {
			n := de.ino
			p := path.Join(dir, name)
			if n.kind == kindDir {
				if err := rec(p, n); err != nil {
					return err
				}
			}
			if n.kind == kindDir || n.kind == kindReg || n.kind == kindSymlink {
				if err := stageTimes(t.stagePath(p), n.mtime); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := rec("", t.root); err != nil {
		return err
	}
	return stageTimes(t.staging, t.root.mtime)
}

func stageTimes(p string, mt time.Time) error {
	if mt.Before(time.Unix(0, 0)) || mt.After(time.Unix(1<<33, 0)) {
		mt = time.Unix(0, 0)
	}
	ts := unix.NsecToTimespec(mt.UnixNano())
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set staged time of %s: %w", p, err)
	}
	return nil
}
