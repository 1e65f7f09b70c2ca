package workspace

import (
	"bufio"
	"bytes"
	"compress/zlib"
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

	"github.com/bangerdev/banger/internal/agent/bulk"
)

// A guest's .git is data. importGuestGit never hands it to git: it reads the
// few things a repository's history is made of (objects, refs, HEAD,
// shallow) from a downloaded copy, checks every path and every byte it
// uses, and writes them into a repository the host made itself. The guest's
// config, config.worktree, commondir, gitdir, hooks, info/ (attributes,
// alternates, grafts, exclude), worktrees/ and everything else are never
// read, so nothing in them can configure host git.

// Bounds on what a guest's .git may hold.
const (
	maxRefFile     = 4 << 10  // a loose ref or HEAD
	maxPackedRefs  = 64 << 20 // packed-refs
	maxShallow     = 16 << 20 // shallow
	maxRefs        = 1 << 20  // refs, loose and packed
	maxRefDepth    = 64       // directory levels under refs/
	maxLooseHeader = 32       // bytes of a loose object's header inflated to check it
	// looseCheckBytes is how much of a file check sees: a zlib stream with
	// dynamic Huffman codes (a tree of a large directory) carries up to
	// ~300 bytes of code tables before its first inflated byte.
	looseCheckBytes = 1024
)

// guestRepo is a guest repository imported into a repository the host made.
type guestRepo struct {
	GitDir string // the host-made bare repository
	Head   string // the commit HEAD resolves to; "" when HEAD's branch has no commit
	Branch string // the ref HEAD points at (refs/heads/...); "" when detached
	Refs   int    // refs imported
}

// hexLen is the length of an object id in hex for a git object format.
func hexLen(objectFormat string) (int, error) {
	switch objectFormat {
	case "sha1":
		return 40, nil
	case "sha256":
		return 64, nil
	}
	return 0, fmt.Errorf("unknown git object format %q", objectFormat)
}

// guestGitKeep is the Download filter for a guest's .git: only what
// importGuestGit reads is fetched from the guest.
func guestGitKeep(rel string, _ fs.FileInfo) bool { return bulk.GitKeep(rel) }

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return s != ""
}

// importGuestGit makes a new bare repository at into (which must not exist)
// with the given object format, and copies into it, from the downloaded guest
// .git at guestGitDir: loose objects (objects/xx/<hex>), packs
// (objects/pack/pack-<hex>.pack with its .idx), refs (loose and packed;
// refs/replace/ is left out), HEAD and shallow. A symlink or any file that is
// not regular or a directory on those paths is refused, and so is a HEAD,
// packed-refs or shallow that does not parse. Refs with invalid names or
// contents are skipped, as git skips them. Everything else in guestGitDir is
// never opened. borrow, when set, is a host object directory (the host
// repository's own) the new repository may read objects from, as git's
// alternates: a host clone made with --reference or --shared pushes a .git
// without the objects it borrows. With move, guestGitDir is a private host
// copy this process owns, and each object file, once checked exactly as a
// copied one is, is renamed into the new repository instead of copied.
func importGuestGit(ctx context.Context, guestGitDir, into, objectFormat, borrow string, move bool) (*guestRepo, error) {
	hl, err := hexLen(objectFormat)
	if err != nil {
		return nil, err
	}
	src, err := os.OpenRoot(guestGitDir)
	if err != nil {
		return nil, fmt.Errorf("open the downloaded .git: %w", err)
	}
	defer src.Close()
	if _, err := git(ctx, filepath.Dir(into), nil, nil, "init", "-q", "--bare", "--template=", "--object-format="+objectFormat, into); err != nil {
		return nil, err
	}
	im := &importer{src: src, srcDir: guestGitDir, into: into, hexLen: hl, move: move}
	if err := im.objects(); err != nil {
		return nil, err
	}
	refs, err := im.refs()
	if err != nil {
		return nil, err
	}
	r := &guestRepo{GitDir: into, Refs: len(refs)}
	if r.Head, r.Branch, err = im.head(refs); err != nil {
		return nil, err
	}
	if err := im.shallow(); err != nil {
		return nil, err
	}
	if borrow != "" {
		if !filepath.IsAbs(borrow) || strings.ContainsAny(borrow, "\n\r") {
			return nil, fmt.Errorf("cannot borrow objects from %q: not an absolute path on one line", borrow)
		}
		if err := os.MkdirAll(filepath.Join(into, "objects", "info"), 0o755); err != nil {
			return nil, err
		}
		if err := writeNew(filepath.Join(into, "objects", "info", "alternates"), []byte(borrow+"\n")); err != nil {
			return nil, err
		}
	}
	if err := writeNew(filepath.Join(into, "packed-refs"), packedRefs(refs)); err != nil {
		return nil, err
	}
	head := r.Head
	if r.Branch != "" {
		head = "ref: " + r.Branch
	}
	if err := os.WriteFile(filepath.Join(into, "HEAD"), []byte(head+"\n"), 0o644); err != nil {
		return nil, err
	}
	if r.Head != "" {
		if _, err := git(ctx, into, []string{"GIT_DIR=" + into}, nil, "rev-parse", "--verify", "-q", r.Head+"^{commit}"); err != nil {
			return nil, fmt.Errorf("the guest's HEAD %s is not a commit in its repository (is the guest's .git damaged?)", r.Head)
		}
	}
	return r, nil
}

type importer struct {
	src    *os.Root
	srcDir string // the path src was opened at
	into   string
	hexLen int
	move   bool // rename checked object files instead of copying them
}

func refused(rel, why string) error {
	return fmt.Errorf("the guest's .git/%s %s: refusing to import it (guest-written git data is never followed)", rel, why)
}

// entries lists directory rel of the guest's .git; a symlink or special
// file in it is refused. A missing directory is empty.
func (im *importer) entries(rel string) ([]fs.DirEntry, error) {
	fi, err := im.src.Lstat(rel)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, refused(rel, "is not a directory")
	}
	f, err := im.src.Open(rel)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ents, err := f.ReadDir(-1)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		if t := e.Type(); t&fs.ModeSymlink != 0 || t&^fs.ModeDir != 0 {
			return nil, refused(path.Join(rel, e.Name()), "is a symbolic link or a special file")
		}
	}
	return ents, nil
}

// open opens regular file rel of the guest's .git; ok is false when it does
// not exist.
func (im *importer) open(rel string) (f *os.File, ok bool, err error) {
	fi, err := im.src.Lstat(rel)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	if !fi.Mode().IsRegular() {
		return nil, false, refused(rel, "is a symbolic link or not a regular file")
	}
	f, err = im.src.Open(rel)
	if err != nil {
		return nil, false, err
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, false, refused(rel, "is not a regular file")
	}
	return f, true, nil
}

// read reads small regular file rel whole, refusing one larger than max.
func (im *importer) read(rel string, max int64) ([]byte, bool, error) {
	f, ok, err := im.open(rel)
	if !ok || err != nil {
		return nil, ok, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, true, err
	}
	if int64(len(b)) > max {
		return nil, true, refused(rel, fmt.Sprintf("is larger than %d bytes", max))
	}
	return b, true, nil
}

// objects copies loose objects and packs.
func (im *importer) objects() error {
	ents, err := im.entries("objects")
	if err != nil {
		return err
	}
	for _, e := range ents {
		n := e.Name()
		switch {
		case n == "pack" && e.IsDir():
			if err := im.packs(); err != nil {
				return err
			}
		case len(n) == 2 && isHex(n) && e.IsDir():
			if err := im.looseDir(n); err != nil {
				return err
			}
		}
		// objects/info (alternates, packs, commit graphs) and anything
		// else: never read
	}
	return nil
}

func (im *importer) looseDir(d string) error {
	rel := "objects/" + d
	ents, err := im.entries(rel)
	if err != nil {
		return err
	}
	made := false
	for _, e := range ents {
		n := e.Name()
		if len(n) != im.hexLen-2 || !isHex(n) || e.IsDir() {
			continue // temporary files git leaves behind
		}
		if !made {
			if err := os.Mkdir(filepath.Join(im.into, "objects", d), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			made = true
		}
		if err := im.copyFile(rel+"/"+n, checkLoose); err != nil {
			return err
		}
	}
	return nil
}

func (im *importer) packs() error {
	ents, err := im.entries("objects/pack")
	if err != nil {
		return err
	}
	have := map[string]bool{}
	for _, e := range ents {
		have[e.Name()] = !e.IsDir()
	}
	var names []string
	for n := range have {
		base, ok := strings.CutSuffix(n, ".pack")
		if !ok || !have[n] {
			continue
		}
		id, ok := strings.CutPrefix(base, "pack-")
		if !ok || len(id) != im.hexLen || !isHex(id) || !have[base+".idx"] {
			continue // not a pack git would use
		}
		names = append(names, base)
	}
	sort.Strings(names)
	for _, base := range names {
		// the index first: git uses a pack only when both are there
		if err := im.copyFile("objects/pack/"+base+".idx", checkIdx); err != nil {
			return err
		}
		if err := im.copyFile("objects/pack/"+base+".pack", checkPack); err != nil {
			return err
		}
	}
	return nil
}

// copyFile copies regular file rel into the same path of the new repository
// (a new file), after check accepts its first bytes.
func (im *importer) copyFile(rel string, check func([]byte) error) error {
	f, ok, err := im.open(rel)
	if err != nil {
		return err
	}
	if !ok {
		return refused(rel, "vanished")
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 64<<10)
	head, _ := br.Peek(looseCheckBytes)
	if err := check(head); err != nil {
		return refused(rel, err.Error())
	}
	if im.move {
		// the checked file itself (its descriptor is f): read-only, then
		// moved; every directory on rel was listed by entries, which
		// refuses links, and nothing else writes this private copy
		if err := f.Chmod(0o444); err != nil {
			return err
		}
		dst := filepath.Join(im.into, filepath.FromSlash(rel))
		if _, err := os.Lstat(dst); !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%s already exists in the imported repository", rel)
		}
		return os.Rename(filepath.Join(im.srcDir, filepath.FromSlash(rel)), dst)
	}
	w, err := os.OpenFile(filepath.Join(im.into, filepath.FromSlash(rel)), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return err
	}
	_, err = io.Copy(w, br)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	return err
}

// checkLoose: a zlib stream whose inflated start is "<type> <size>\0".
func checkLoose(b []byte) error {
	zr, err := zlib.NewReader(bytes.NewReader(b))
	if err != nil {
		return errors.New("is not a git object (no zlib stream)")
	}
	hdr := make([]byte, maxLooseHeader)
	n, _ := io.ReadFull(zr, hdr)
	hdr = hdr[:n]
	i := bytes.IndexByte(hdr, 0)
	if i < 0 {
		return errors.New("is not a git object (no header)")
	}
	typ, size, ok := strings.Cut(string(hdr[:i]), " ")
	switch typ {
	case "commit", "tree", "blob", "tag":
	default:
		ok = false
	}
	if !ok || size == "" || strings.Trim(size, "0123456789") != "" || len(size) > 1 && size[0] == '0' {
		return errors.New("is not a git object (bad header)")
	}
	return nil
}

// checkPack: "PACK", version 2 or 3.
func checkPack(b []byte) error {
	if len(b) < 12 || string(b[:4]) != "PACK" || b[4] != 0 || b[5] != 0 || b[6] != 0 || (b[7] != 2 && b[7] != 3) {
		return errors.New("is not a git pack (version 2 or 3)")
	}
	return nil
}

// checkIdx: a version 2 pack index.
func checkIdx(b []byte) error {
	if len(b) < 8 || string(b[:4]) != "\xfftOc" || string(b[4:8]) != "\x00\x00\x00\x02" {
		return errors.New("is not a git pack index (version 2)")
	}
	return nil
}

// refs reads loose refs under refs/ and packed-refs; a loose ref wins over
// a packed one of the same name.
func (im *importer) refs() (map[string]string, error) {
	refs := map[string]string{}
	b, ok, err := im.read("packed-refs", maxPackedRefs)
	if err != nil {
		return nil, err
	}
	if ok {
		if err := im.parsePackedRefs(b, refs); err != nil {
			return nil, err
		}
	}
	var walk func(rel string, depth int) error
	walk = func(rel string, depth int) error {
		if depth > maxRefDepth {
			return refused(rel, "is nested too deep")
		}
		ents, err := im.entries(rel)
		if err != nil {
			return err
		}
		for _, e := range ents {
			p := rel + "/" + e.Name()
			if e.IsDir() {
				if err := walk(p, depth+1); err != nil {
					return err
				}
				continue
			}
			if !im.wantRef(p) {
				continue // git ignores such names (and *.lock leftovers)
			}
			b, _, err := im.read(p, maxRefFile)
			if err != nil {
				return err
			}
			oid, ok := strings.CutSuffix(string(b), "\n")
			if !ok || !checkOID(oid, im.hexLen) {
				continue // a symbolic or broken ref: git skips broken ones
			}
			if len(refs) >= maxRefs {
				return refused("refs", fmt.Sprintf("holds more than %d refs", maxRefs))
			}
			refs[p] = oid
		}
		return nil
	}
	return refs, walk("refs", 0)
}

// wantRef: a valid ref name that replaces no object.
func (im *importer) wantRef(name string) bool {
	return strings.HasPrefix(name, "refs/") && !strings.HasPrefix(name, "refs/replace/") && CheckRefName(name)
}

func (im *importer) parsePackedRefs(b []byte, refs map[string]string) error {
	if len(b) > 0 && b[len(b)-1] != '\n' {
		return refused("packed-refs", "does not end with a newline")
	}
	for i, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		switch {
		case len(b) == 0:
		case i == 0 && strings.HasPrefix(line, "# pack-refs with:"):
		case strings.HasPrefix(line, "^"):
			if !checkOID(line[1:], im.hexLen) {
				return refused("packed-refs", fmt.Sprintf("line %d is not a peeled object id", i+1))
			}
		default:
			oid, name, ok := strings.Cut(line, " ")
			if !ok || !checkOID(oid, im.hexLen) {
				return refused("packed-refs", fmt.Sprintf("line %d is not \"<object id> <ref>\"", i+1))
			}
			if !im.wantRef(name) {
				continue
			}
			if len(refs) >= maxRefs {
				return refused("packed-refs", fmt.Sprintf("holds more than %d refs", maxRefs))
			}
			refs[name] = oid
		}
	}
	return nil
}

// head reads HEAD: "ref: refs/..." or a commit id.
func (im *importer) head(refs map[string]string) (head, branch string, err error) {
	b, ok, err := im.read("HEAD", maxRefFile)
	if err != nil {
		return "", "", err
	}
	if !ok {
		return "", "", refused("HEAD", "is missing")
	}
	s, _ := strings.CutSuffix(string(b), "\n")
	if target, sym := strings.CutPrefix(s, "ref: "); sym {
		if !strings.HasPrefix(target, "refs/") || !CheckRefName(target) || strings.HasPrefix(target, "refs/replace/") {
			return "", "", refused("HEAD", fmt.Sprintf("points at %q, which is no valid ref name", target))
		}
		return refs[target], target, nil
	}
	if !checkOID(s, im.hexLen) {
		return "", "", refused("HEAD", "is neither \"ref: <ref>\" nor an object id")
	}
	return s, "", nil
}

// shallow copies the list of shallow commits, checked line by line.
func (im *importer) shallow() error {
	b, ok, err := im.read("shallow", maxShallow)
	if err != nil || !ok {
		return err
	}
	if len(b) > 0 && b[len(b)-1] != '\n' {
		return refused("shallow", "does not end with a newline")
	}
	for i, l := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		if len(b) > 0 && !checkOID(l, im.hexLen) {
			return refused("shallow", fmt.Sprintf("line %d is not an object id", i+1))
		}
	}
	return writeNew(filepath.Join(im.into, "shallow"), b)
}

func packedRefs(refs map[string]string) []byte {
	names := make([]string, 0, len(refs))
	for n := range refs {
		names = append(names, n)
	}
	sort.Strings(names)
	var b bytes.Buffer
	for _, n := range names {
		b.WriteString(refs[n] + " " + n + "\n")
	}
	return b.Bytes()
}

func writeNew(p string, b []byte) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
