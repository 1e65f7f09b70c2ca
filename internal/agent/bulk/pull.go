package bulk

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/ssh"
)

// OpPull is a workspace pull in one stream (Open.Arg is the absolute
// workspace directory in the guest):
//
//  1. host → agent: what the host already has, FrameData frames of JSON
//     arrays of PullHave, then FrameEOF.
//  2. agent → host, one way: for each entry, parents first, a
//     FrameRequest (Type PackDir, PackFile, PackLink or PackSame, Payload a
//     SyncEntry), a PackFile followed by exactly Size bytes in FrameData
//     frames; then FrameEOF, or a FrameReply (not OK, with the error) on a
//     failure.
//
// The agent leaves out what the host already has or never reads: a regular
// file that matches a HaveFile exactly (size, mtime to the nanosecond,
// owner-executable bit) is a PackSame with its name and no data; a loose
// object or a pack the host named is not sent; of the top .git only what
// GitKeep accepts is sent; and any other entry named .git (any case) is
// left out whole. Everything the agent sends stays hostile to the host: a
// PackSame may only name a file the host offered, and the host uses its own
// object id for it, never one from the guest.
//
// With Open.N set to PullGitOnly (workspace status), the agent sends only
// the top .git, as above.
const OpPull = "pull"

// PullGitOnly is Open.N of an OpPull that sends only the top .git.
const PullGitOnly = 1

// PackSame: a regular file that matches the host's HaveFile of that name
// (SyncEntry.Rel only).
const PackSame = "s"

// PullHave kinds.
const (
	HaveObject = "o" // P: a loose object's id in hex
	HavePack   = "p" // P: a pack's base name, pack-<hex>
	HaveFile   = "f" // P: a workspace file's slash path; S, N, X: its size, mtime and executable bit
)

// PullHave is one thing the host already has.
type PullHave struct {
	K string `json:"k"`
	P string `json:"p"`
	S int64  `json:"s,omitempty"`
	N int64  `json:"n,omitempty"`
	X bool   `json:"x,omitempty"`
}

// Bounds of the host's haves, on both ends.
const (
	MaxPullHaves     = 1 << 21
	MaxPullHaveBytes = 256 << 20
	pullHaveBatch    = 4096
)

// WriteHaves sends haves (host side of step 1).
func WriteHaves(w io.Writer, haves []PullHave) error {
	for len(haves) > 0 {
		n := min(len(haves), pullHaveBatch)
		b, err := json.Marshal(haves[:n])
		if err != nil {
			return err
		}
		if len(b) > MaxFrame {
			// names too long for one frame at this batch size: halve it
			if n == 1 {
				return fmt.Errorf("have %q does not fit a frame", haves[0].P)
			}
			if err := WriteHaves(w, haves[:n/2]); err != nil {
				return err
			}
			haves = haves[n/2:]
			continue
		}
		if err := WriteFrame(w, FrameData, b); err != nil {
			return err
		}
		haves = haves[n:]
	}
	return WriteFrame(w, FrameEOF, nil)
}

// pullHaves is what the agent keeps of the host's haves.
type pullHaves struct {
	gitOnly bool // PullGitOnly: nothing outside the top .git
	objects map[string]bool
	packs   map[string]bool
	files   map[string]PullHave
	dir     string          // the workspace
	covered map[string]bool // packs whose every object the host has, by base name
}

// readHaves reads the host's haves (agent side of step 1), bounded.
func readHaves(r io.Reader) (*pullHaves, error) {
	h := &pullHaves{objects: map[string]bool{}, packs: map[string]bool{}, files: map[string]PullHave{}}
	count := 0
	_, err := readBatches(r, "the host's haves", MaxPullHaveBytes,
		fmt.Errorf("the host's haves exceed %d bytes", MaxPullHaveBytes), nil,
		func(batch []PullHave) error {
			if count += len(batch); count > MaxPullHaves {
				return fmt.Errorf("the host sent more than %d haves", MaxPullHaves)
			}
			for _, e := range batch {
				switch e.K {
				case HaveObject:
					h.objects[e.P] = true
				case HavePack:
					h.packs[e.P] = true
				case HaveFile:
					h.files[e.P] = e
				}
			}
			return nil
		})
	if err != nil {
		return nil, err
	}
	return h, nil
}

// GitKeep says whether a pull sends rel, a slash path inside the top .git:
// only what the host's import reads (objects, refs, HEAD, packed-refs,
// shallow). The host never reads anything else, whatever arrives.
func GitKeep(rel string) bool {
	top, rest, nested := strings.Cut(rel, "/")
	switch top {
	case "HEAD", "packed-refs", "shallow":
		return !nested
	case "refs":
		return true
	case "objects":
		if !nested {
			return true
		}
		d, name, deeper := strings.Cut(rest, "/")
		if d == "pack" {
			return !deeper || strings.HasPrefix(name, "pack-") && (strings.HasSuffix(name, ".pack") || strings.HasSuffix(name, ".idx"))
		}
		return len(d) == 2 && isHexName(d)
	}
	return false
}

func isHexName(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return s != ""
}

// ServePull runs the agent's side of OpPull: w is the stream, r reads it.
// Its frames are buffered: the small ones (directories, PackSame) go out
// in few writes.
func ServePull(w io.Writer, r io.Reader, dir string, flags uint64) error {
	bw := bufio.NewWriterSize(w, 256<<10)
	err := servePull(bw, r, dir, flags)
	if err != nil {
		_ = WriteFrame(bw, FrameReply, ssh.Marshal(&Reply{OK: false, Payload: []byte(err.Error())}))
	}
	if ferr := bw.Flush(); err == nil {
		err = ferr
	}
	return err
}

// skipGit says what a pull leaves out of rel (a slash path below the
// workspace) before it is even opened: skip the entry, and skip a
// directory's contents with it.
func (h *pullHaves) skipGit(rel string) bool {
	gitRel, inGit := strings.CutPrefix(rel, ".git/")
	if !inGit && h.gitOnly {
		return rel != ".git"
	}
	if !inGit {
		// any entry named .git other than the top one (the host would
		// remove it: git must never open a guest's nested repository)
		if rel == ".git" {
			return false
		}
		for _, c := range strings.Split(rel, "/") {
			if strings.EqualFold(c, ".git") {
				return true
			}
		}
		return false
	}
	if !GitKeep(gitRel) {
		return true
	}
	if d, name, ok := strings.Cut(strings.TrimPrefix(gitRel, "objects/"), "/"); ok && strings.HasPrefix(gitRel, "objects/") {
		if d == "pack" {
			base, _ := strings.CutSuffix(name, ".pack")
			base, _ = strings.CutSuffix(base, ".idx")
			return h.packs[base] || h.hostHasAll(base)
		}
		return h.objects[d+name]
	}
	return false
}

func servePull(w io.Writer, r io.Reader, dir string, flags uint64) error {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir {
		return fmt.Errorf("bad directory %q: want a clean absolute path", dir)
	}
	h, err := readHaves(r)
	if err != nil {
		return err
	}
	h.gitOnly = flags&PullGitOnly != 0
	h.dir = dir
	if fi, err := os.Lstat(dir); err != nil || !fi.IsDir() {
		return fmt.Errorf("%s is not a directory in the guest", dir)
	}
	var frame []byte
	send := func(kind string, e SyncEntry) error {
		var err error
		frame, err = appendWrite(w, frame, FrameRequest, ssh.Marshal(&Request{Type: kind, Payload: ssh.Marshal(&e)}))
		return err
	}
	buf := make([]byte, 256<<10)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == dir {
			return nil
		}
		rel := filepath.ToSlash(p[len(dir)+1:])
		if h.skipGit(rel) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		e := SyncEntry{Rel: rel, Mode: KeptMode(fi.Mode()), MTime: uint64(fi.ModTime().UnixNano())}
		switch {
		case fi.IsDir():
			return send(PackDir, e)
		case fi.Mode()&fs.ModeSymlink != 0:
			if e.Target, err = os.Readlink(p); err != nil {
				return err
			}
			return send(PackLink, e)
		case fi.Mode().IsRegular():
			if hf, ok := h.files[rel]; ok && hf.S == fi.Size() && hf.N == fi.ModTime().UnixNano() && hf.X == (fi.Mode()&0o100 != 0) {
				return send(PackSame, SyncEntry{Rel: rel})
			}
			return sendFile(w, send, p, e, fi.Size(), buf)
		}
		return nil // devices, sockets, fifos
	})
	if err != nil {
		return err
	}
	return WriteFrame(w, FrameEOF, nil)
}

// sendFile sends regular file p as a PackFile of exactly size bytes.
func sendFile(w io.Writer, send func(string, SyncEntry) error, p string, e SyncEntry, size int64, buf []byte) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	e.Size = uint64(size)
	if err := send(PackFile, e); err != nil {
		return err
	}
	left := size
	for left > 0 {
		n, err := f.Read(buf[:min(int64(len(buf)), left)])
		if n > 0 {
			if werr := WriteFrame(w, FrameData, buf[:n]); werr != nil {
				return werr
			}
			left -= int64(n)
		}
		if errors.Is(err, io.EOF) && left > 0 {
			return fmt.Errorf("%s shrank while it was sent", e.Rel)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	return nil
}

// hostHasAll says whether the host has, as loose objects, every object of
// the pack base (by its index): then the pack need not go. This is what a
// push's pack (CapPack) holds, which the host has loose. A pack whose
// index cannot be read is sent.
func (h *pullHaves) hostHasAll(base string) bool {
	if v, ok := h.covered[base]; ok {
		return v
	}
	if h.covered == nil {
		h.covered = map[string]bool{}
	}
	hx, ok := PackBaseName(base)
	if !ok || len(h.objects) == 0 {
		return false
	}
	ids, err := packIDs(filepath.Join(h.dir, ".git", "objects", "pack", base+".idx"), len(hx))
	all := err == nil && len(ids) > 0
	for _, id := range ids {
		if !h.objects[id] {
			all = false
			break
		}
	}
	h.covered[base] = all
	return all
}
