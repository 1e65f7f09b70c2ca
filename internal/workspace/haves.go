package workspace

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/bangerdev/banger/internal/agent/bulk"
)

// Bounds of what a pull tells the guest the host has: past them, the guest
// simply sends more.
const (
	maxHaveObjects = 1 << 20
	maxHaveFiles   = 1 << 20
)

// HostFile is a file of the host repository's index whose work-tree copy is
// clean: a guest file with the same size, mtime and executable bit is taken
// to be this blob (a pull's bulk.PackSame), by its host object id.
type HostFile struct {
	Mode string // 100644 or 100755
	OID  string
}

// Haves is what a pull tells the guest the host already has (bulk.OpPull's
// step 1), and the host's own record of the files among them.
type Haves struct {
	List  []bulk.PullHave
	Files map[string]HostFile // by slash path, as offered in List
}

// PullHaves lists what the host repository holding dir already has, for a
// pull to leave out: its loose objects and packs by name, and every clean
// regular file of its index (stage 0, and not modified in the work tree by
// git ls-files -m, which re-reads racily clean files) with the size, mtime and
// executable bit a push gave the guest's copy. Nothing here comes from the
// guest; the lists are bounded (past the bounds the guest sends more).
func PullHaves(ctx context.Context, dir string) (*Haves, error) {
	h, top, hl, err := objectHaves(ctx, dir)
	if err != nil {
		return nil, err
	}
	// the index's entries, then those whose work-tree file git says is
	// modified (stat or content) or deleted
	staged, err := git(ctx, top, nil, nil, "ls-files", "-s", "-z")
	if err != nil {
		return nil, err
	}
	modified, err := git(ctx, top, nil, nil, "ls-files", "-m", "-z")
	if err != nil {
		return nil, err
	}
	dirty := map[string]bool{}
	for _, p := range strings.Split(modified, "\x00") {
		dirty[p] = true
	}
	for _, l := range strings.Split(staged, "\x00") {
		// "<mode> <oid> <stage>\t<path>"
		meta, rel, ok := strings.Cut(l, "\t")
		f := strings.Fields(meta)
		if !ok || len(f) != 3 || f[2] != "0" || (f[0] != "100644" && f[0] != "100755") || !checkOID(f[1], hl) || dirty[rel] {
			continue
		}
		if len(h.Files) >= maxHaveFiles {
			break
		}
		fi, err := os.Lstat(filepath.Join(top, filepath.FromSlash(rel)))
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		h.Files[rel] = HostFile{Mode: f[0], OID: f[1]}
		h.List = append(h.List, bulk.PullHave{K: bulk.HaveFile, P: rel, S: fi.Size(), N: fi.ModTime().UnixNano(), X: f[0] == "100755"})
	}
	return h, nil
}

// ObjectHaves is PullHaves without files: what a status (which reads only
// the guest's .git) tells the guest the host has.
func ObjectHaves(ctx context.Context, dir string) (*Haves, error) {
	h, _, _, err := objectHaves(ctx, dir)
	return h, err
}

func objectHaves(ctx context.Context, dir string) (h *Haves, top string, hexLength int, err error) {
	if top, err = Toplevel(ctx, dir); err != nil {
		return nil, "", 0, err
	}
	format, objects, err := hostRepoFacts(ctx, top)
	if err != nil {
		return nil, "", 0, err
	}
	hl, _ := hexLen(format)
	return &Haves{Files: map[string]HostFile{}, List: haveObjects(objects, hl)}, top, hl, nil
}

// haveObjects names the loose objects and packs in the object directory
// objects (the host repository's own; its alternates are not listed).
func haveObjects(objects string, hexLen int) []bulk.PullHave {
	var list []bulk.PullHave
	ents, err := os.ReadDir(objects)
	if err != nil {
		return nil
	}
	for _, e := range ents {
		n := e.Name()
		switch {
		case n == "pack" && e.IsDir():
			packs, _ := os.ReadDir(filepath.Join(objects, "pack"))
			for _, p := range packs {
				base, ok := strings.CutSuffix(p.Name(), ".pack")
				if ok && strings.HasPrefix(base, "pack-") && len(list) < maxHaveObjects {
					list = append(list, bulk.PullHave{K: bulk.HavePack, P: base})
				}
			}
		case len(n) == 2 && isHex(n) && e.IsDir():
			loose, err := os.ReadDir(filepath.Join(objects, n))
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				continue
			}
			for _, o := range loose {
				if len(o.Name()) == hexLen-2 && isHex(o.Name()) && len(list) < maxHaveObjects {
					list = append(list, bulk.PullHave{K: bulk.HaveObject, P: n + o.Name()})
				}
			}
		}
	}
	return list
}
