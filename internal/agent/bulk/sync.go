package bulk

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// OpSync is a workspace push in one stream (Open.Arg is the absolute
// destination directory in the guest):
//
//  1. agent → host: the manifest of the destination, FrameData frames of
//     JSON arrays of ManifestEntry, then FrameEOF.
//  2. host → agent: FrameRequest frames (Type SyncDelete, SyncDir, SyncFile,
//     SyncLink, Payload a SyncEntry), a SyncFile followed by exactly Size
//     bytes in FrameData frames; then a SyncDone request.
//  3. agent → host: FrameReply, OK with a SyncStats JSON payload, or not OK
//     with the error. The agent also answers not OK, and stops, at its first
//     failure.
//
// The host sends only what differs from the manifest (type, mode, size,
// mtime to the nanosecond, link target; a loose git object that exists is
// never sent again, its name is its content), and deletes what it pushed
// before (the agent remembers the paths it wrote for each destination) and
// no longer has. Everything is applied in Go: no guest tool is needed.
//
// Loose objects from file data (capability CapObjects, announced in the
// payload of the manifest's FrameEOF): a SyncFileObj request is a SyncFile
// (payload SyncObjEntry) whose data the agent also writes, as a loose git
// object of type blob, to SyncObjEntry.Object (zlib with stored blocks, no
// compression), so that the repository's .git/objects/xx/<id> for a file's
// content does not cross the channel a second time. After the data comes
// one SyncObjEnd request (payload ObjEnd): OK when the host found that what
// it sent hashes to the object's id (then the agent finishes the object
// with Adler), else the agent drops it and the host sends the loose object
// as a plain SyncFile later.
//
// One pack from file data (capability CapPack; the byte layout is
// packwrite.go's): the agent appends objects to one temporary pack under
// .git/objects/pack. A SyncFilePack request (payload SyncEntry) is a
// SyncFile whose data is also the content of the pack's next entry, a
// blob; a SyncPackObj request (payload PackObj) is an entry alone, its
// content in FrameData frames. Each entry's data is followed by a
// SyncObjEnd: OK, the agent ends the entry with Adler; not OK (what the
// host sent is not the object it meant), the agent cuts the entry off
// again. A SyncPackEnd request (payload PackEnd) then names the pack (its
// checksum, computed by the host, is also its trailer) and is followed by
// the pack's index, computed by the host, in FrameData frames; the agent
// writes the header's count and the trailer and renames the pack, then the
// index, to pack-<name>. The guest computes no hash. The manifest then
// lists the objects of the packs pushes wrote (entries of type "k", below),
// so that a re-push neither sends them again nor deletes the pack.
const (
	SyncDelete   = "delete"
	SyncDir      = "dir"
	SyncFile     = "file"
	SyncFileObj  = "fileobj"
	SyncObjEnd   = "objend"
	SyncFilePack = "filepack"
	SyncPackObj  = "packobj"
	SyncPackEnd  = "packend"
	SyncLink     = "link"
	SyncDone     = "done"
)

// Capabilities an agent announces: CapObjects, it understands SyncFileObj;
// CapPack, SyncFilePack, SyncPackObj and SyncPackEnd.
const (
	CapObjects = "objects"
	CapPack    = "pack"
)

// PackObj is a SyncPackObj request's payload.
type PackObj struct {
	Type uint32 // ObjBlob, ObjTree, ObjCommit or ObjTag
	Size uint64
}

// PackEnd is a SyncPackEnd request's payload.
type PackEnd struct {
	Count   uint32 // entries kept
	Name    string // the pack's checksum in hex: pack-<Name>.pack
	IdxSize uint64 // the index's bytes that follow
}

// SyncObjEntry is a SyncFileObj request's payload.
type SyncObjEntry struct {
	Rel      string
	Mode     uint32
	MTime    uint64
	Size     uint64
	Object   string // slash path of the loose object below the destination
	ObjMode  uint32
	ObjMTime uint64 // the host's; not set in the guest (git ignores it)
}

// ObjEnd is a SyncObjEnd request's payload.
type ObjEnd struct {
	OK    bool
	Adler uint32 // Adler-32 of "blob <size>\x00" and the data
}

// ManifestEntry is one path under the destination, as the agent sees it.
type ManifestEntry struct {
	P string `json:"p"`           // slash path relative to the destination
	T string `json:"t"`           // "d", "f", "l", "o" (other), or "k": an object in a pack a push wrote (P its loose path, L the pack's base name)
	M uint32 `json:"m,omitempty"` // fs.FileMode permission, setuid, setgid and sticky bits
	S int64  `json:"s,omitempty"` // size of a file
	N int64  `json:"n,omitempty"` // mtime, ns since the epoch
	L string `json:"l,omitempty"` // symlink target
	W bool   `json:"w,omitempty"` // written by an earlier push
}

// SyncEntry is a SyncDelete, SyncDir, SyncFile or SyncLink request's payload.
type SyncEntry struct {
	Rel    string
	Mode   uint32 // fs.FileMode bits as in ManifestEntry.M
	MTime  uint64 // ns since the epoch as int64 bits (files and links)
	Size   uint64 // SyncFile: the data that follows
	Target string // SyncLink
}

// SyncStats is what a sync did.
type SyncStats struct {
	Objects int   `json:"objects,omitempty"` // git objects written from file data (loose, or entries of a pack)
	Packs   int   `json:"packs,omitempty"`   // packs written (CapPack)
	Packed  int   `json:"packed,omitempty"`  // objects in them
	Files   int   `json:"files"`
	Bytes   int64 `json:"bytes"`
	Links   int   `json:"links"`
	Dirs    int   `json:"dirs"`
	Deleted int   `json:"deleted"`
}

// Limits of a manifest, on both ends.
const (
	MaxManifestEntries = 1 << 20
	MaxManifestBytes   = 256 << 20
)

// manifestBytes is MaxManifestBytes (a variable for tests).
var manifestBytes = MaxManifestBytes

// HeaderSize is the size of a frame's header (type byte, length).
const HeaderSize = 5

// PutHeader writes the header of a frame of type typ with n payload bytes
// into b[:HeaderSize], so that a sender can read the payload into
// b[HeaderSize:] and write the frame with one Write.
func PutHeader(b []byte, typ byte, n int) {
	b[0] = typ
	binary.BigEndian.PutUint32(b[1:HeaderSize], uint32(n))
}

// KeptMode is the part of a mode a push keeps.
func KeptMode(m fs.FileMode) uint32 {
	return uint32(m & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky))
}

// CleanRel checks that rel is a plain relative slash path below a
// directory: not empty, not absolute, already clean, no "." or ".."
// component, no NUL.
func CleanRel(rel string) error {
	if rel == "" || rel == "." || strings.HasPrefix(rel, "/") || path.Clean(rel) != rel ||
		strings.ContainsRune(rel, 0) || rel == ".." || strings.HasPrefix(rel, "../") {
		return fmt.Errorf("bad relative path %q", rel)
	}
	return nil
}

// Syncer applies a sync in the guest (the agent's side of OpSync).
type Syncer struct {
	Dest     string // absolute destination directory
	StateDir string // where the list of pushed paths per destination is kept

	known map[string]bool // directories under Dest checked to be real directories
	state map[string]bool // paths written by pushes
	dirty bool            // state changed since it was loaded
	stats SyncStats
	umask uint32 // this process's, read once
	buf   []byte // the frame buffer, reused
	segs  [][]byte
	pack  *packWriter
	r     io.Reader // the stream
	// packBuffered writes the pack with a pwritev per frame, without
	// O_DIRECT (as when the filesystem refuses it; for tests and A/B runs)
	packBuffered bool
}

func (s *Syncer) setState(rel string) {
	if !s.state[rel] {
		s.state[rel] = true
		s.dirty = true
	}
}

func (s *Syncer) stateFile() string {
	h := sha256.Sum256([]byte(s.Dest))
	return filepath.Join(s.StateDir, hex.EncodeToString(h[:12])+".pushed")
}

func (s *Syncer) loadState() {
	s.state = map[string]bool{}
	b, err := os.ReadFile(s.stateFile())
	if err != nil {
		return
	}
	for _, l := range strings.Split(string(b), "\n") {
		if CleanRel(l) == nil {
			s.state[l] = true
		}
	}
}

func (s *Syncer) saveState() error {
	if !s.dirty {
		return nil
	}
	if err := os.MkdirAll(s.StateDir, 0o700); err != nil {
		return err
	}
	list := make([]string, 0, len(s.state))
	for p := range s.state {
		list = append(list, p)
	}
	slices.Sort(list)
	tmp := s.stateFile() + ".tmp"
	if err := os.WriteFile(tmp, []byte(strings.Join(list, "\n")), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, s.stateFile())
}

// Serve runs the agent's side of OpSync on c (after Open); r reads c.
func (s *Syncer) Serve(c io.Writer, r io.Reader) error {
	err := s.serve(c, r)
	if err != nil {
		// Keep reading what the host still sends, so that it reaches the
		// answer (the stream's end stops this).
		go func() { _, _ = io.Copy(io.Discard, r) }()
		_ = WriteFrame(c, FrameReply, ssh.Marshal(&Reply{OK: false, Payload: []byte(err.Error())}))
		return err
	}
	js, _ := json.Marshal(s.stats)
	return WriteFrame(c, FrameReply, ssh.Marshal(&Reply{OK: true, Payload: js}))
}

func (s *Syncer) serve(c io.Writer, r io.Reader) error {
	if !filepath.IsAbs(s.Dest) || filepath.Clean(s.Dest) != s.Dest || s.Dest == "/" {
		return fmt.Errorf("bad destination %q: want a clean absolute path below /", s.Dest)
	}
	if err := os.MkdirAll(s.Dest, 0o755); err != nil {
		return err
	}
	if fi, err := os.Lstat(s.Dest); err != nil || !fi.IsDir() {
		return fmt.Errorf("destination %s is not a directory", s.Dest)
	}
	s.known = map[string]bool{"": true}
	s.umask = processUmask()
	s.r = r
	s.loadState()
	defer s.abortPack()
	if err := s.sendManifest(c); err != nil {
		return err
	}
	for {
		typ, p, err := ReadFrame(r, s.buf)
		s.buf = p
		if err != nil {
			return fmt.Errorf("read the push: %w", err)
		}
		if typ != FrameRequest {
			return fmt.Errorf("unexpected frame type %d in a push", typ)
		}
		var req Request
		if err := ssh.Unmarshal(p, &req); err != nil {
			return err
		}
		switch req.Type {
		case SyncDone:
			if s.pack != nil {
				return errors.New("the push ended inside a pack")
			}
			return s.saveState()
		case SyncFilePack:
			var e SyncEntry
			if err := ssh.Unmarshal(req.Payload, &e); err != nil {
				return err
			}
			if err := s.filePack(e, r); err != nil {
				return fmt.Errorf("%s %s: %w", req.Type, e.Rel, err)
			}
			continue
		case SyncPackObj:
			var o PackObj
			if err := ssh.Unmarshal(req.Payload, &o); err != nil {
				return err
			}
			if err := s.packObj(o, r); err != nil {
				return fmt.Errorf("%s: %w", req.Type, err)
			}
			continue
		case SyncPackEnd:
			var pe PackEnd
			if err := ssh.Unmarshal(req.Payload, &pe); err != nil {
				return err
			}
			if err := s.packEnd(pe); err != nil {
				return fmt.Errorf("%s: %w", req.Type, err)
			}
			continue
		}
		if req.Type == SyncFileObj {
			var o SyncObjEntry
			if err := ssh.Unmarshal(req.Payload, &o); err != nil {
				return err
			}
			if err := s.fileObj(o, r); err != nil {
				return fmt.Errorf("%s %s: %w", req.Type, o.Rel, err)
			}
			continue
		}
		var e SyncEntry
		if err := ssh.Unmarshal(req.Payload, &e); err != nil {
			return err
		}
		if err := s.apply(req.Type, e, r); err != nil {
			return fmt.Errorf("%s %s: %w", req.Type, e.Rel, err)
		}
	}
}

// sendManifest lists the objects in packs earlier pushes wrote, then walks
// Dest without following links (so that a file at an object's loose path
// comes last and wins).
func (s *Syncer) sendManifest(c io.Writer) error {
	var batch []ManifestEntry
	size, n := 0, 0
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		js, err := json.Marshal(batch)
		if err != nil {
			return err
		}
		batch, size = batch[:0], 0
		return WriteFrame(c, FrameData, js)
	}
	for packed := s.packedEntries(); len(packed) > 0; {
		k := min(len(packed), 2048) // well within a frame
		batch = packed[:k]
		if err := flush(); err != nil {
			return err
		}
		packed = packed[k:]
	}
	batch = nil
	err := filepath.WalkDir(s.Dest, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // vanished or unreadable: not in the manifest
		}
		if p == s.Dest {
			return nil
		}
		if n++; n > MaxManifestEntries {
			return fmt.Errorf("more than %d entries under %s", MaxManifestEntries, s.Dest)
		}
		rel := filepath.ToSlash(p[len(s.Dest)+1:])
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		e := ManifestEntry{P: rel, M: KeptMode(fi.Mode()), W: s.state[rel]}
		switch {
		case fi.IsDir():
			e.T = "d"
		case fi.Mode().IsRegular():
			e.T, e.S, e.N = "f", fi.Size(), fi.ModTime().UnixNano()
		case fi.Mode()&fs.ModeSymlink != 0:
			e.T, e.N = "l", fi.ModTime().UnixNano()
			e.L, _ = os.Readlink(p)
		default:
			e.T = "o"
		}
		batch = append(batch, e)
		if size += len(rel) + len(e.L) + 64; size > 512<<10 {
			return flush()
		}
		return nil
	})

	if err != nil {
		return err
	}
	if err := flush(); err != nil {
		return err
	}
	return WriteFrame(c, FrameEOF, []byte(CapObjects+" "+CapPack))
}

// path returns rel's path below Dest after checking rel and that every
// directory above it is a real directory (made when missing), so that no
// link in the guest's tree leads a write or a delete out of Dest.
func (s *Syncer) path(rel string) (string, error) {
	if err := CleanRel(rel); err != nil {
		return "", err
	}
	dir := path.Dir(rel)
	if dir == "." {
		dir = ""
	}
	if !s.known[dir] {
		var walked string
		for _, part := range strings.Split(dir, "/") {
			walked = path.Join(walked, part)
			if s.known[walked] {
				continue
			}
			p := filepath.Join(s.Dest, filepath.FromSlash(walked))
			fi, err := os.Lstat(p)
			if errors.Is(err, fs.ErrNotExist) {
				if err := os.Mkdir(p, 0o755); err != nil {
					return "", err
				}
			} else if err != nil {
				return "", err
			} else if !fi.IsDir() {
				return "", fmt.Errorf("%s is not a directory in the guest", walked)
			}
			s.known[walked] = true
		}
	}
	return filepath.Join(s.Dest, filepath.FromSlash(rel)), nil
}

func setMTime(p string, ns int64) error {
	ts := []unix.Timespec{unix.NsecToTimespec(ns), unix.NsecToTimespec(ns)}
	return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
}

func (s *Syncer) apply(kind string, e SyncEntry, r io.Reader) error {
	p, err := s.path(e.Rel)
	if err != nil {
		return err
	}
	if kind == SyncFile {
		// The common case, a new file, costs no lookup of its own: the
		// exclusive create finds out (each syscall is dear under TCG).
		if err := s.writeFile(p, e, r, nil); err != nil {
			return err
		}
		s.stats.Files++
		s.stats.Bytes += int64(e.Size)
		s.setState(e.Rel)
		return nil
	}
	if kind == SyncDir {
		// Likewise a new directory: made with its mode, chmod only when
		// the umask took bits or setuid, setgid or sticky is asked for.
		perm := uint32(fs.FileMode(e.Mode) & fs.ModePerm)
		err := unix.Mkdir(p, perm)
		if err == nil {
			s.known[e.Rel] = true
			s.stats.Dirs++
			s.setState(e.Rel)
			if perm&^s.umask != perm || modeExtra(e.Mode) != 0 {
				return os.Chmod(p, fs.FileMode(e.Mode)&fs.ModePerm|modeExtra(e.Mode))
			}
			return nil
		}
		if !errors.Is(err, unix.EEXIST) {
			return &fs.PathError{Op: "mkdir", Path: p, Err: err}
		}
	}
	fi, lerr := os.Lstat(p)
	exists := lerr == nil
	switch kind {
	case SyncDelete:
		if exists {
			if err := os.RemoveAll(p); err != nil {
				return err
			}
		}
		if s.state[e.Rel] {
			delete(s.state, e.Rel)
			s.dirty = true
		}
		s.forget(e.Rel)
		s.stats.Deleted++
		return nil
	case SyncDir:
		if exists && !fi.IsDir() {
			if err := os.RemoveAll(p); err != nil {
				return err
			}
			exists = false
		}
		if !exists {
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
		}
		s.known[e.Rel] = true
		s.stats.Dirs++
		s.setState(e.Rel)
		return os.Chmod(p, fs.FileMode(e.Mode)&fs.ModePerm|modeExtra(e.Mode))
	case SyncLink:
		if exists {
			if err := os.RemoveAll(p); err != nil {
				return err
			}
		}
		s.forget(e.Rel)
		if err := os.Symlink(e.Target, p); err != nil {
			return err
		}
		s.stats.Links++
		s.setState(e.Rel)
		return setMTime(p, int64(e.MTime))
	}
	return fmt.Errorf("unknown push entry %q", kind)
}

// forget drops rel and what was below it from the checked directories.
func (s *Syncer) forget(rel string) {
	for k := range s.known {
		if k == rel || strings.HasPrefix(k, rel+"/") {
			delete(s.known, k)
		}
	}
}

func modeExtra(m uint32) fs.FileMode {
	return fs.FileMode(m) & (fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
}

// writeFile writes Size bytes from the data frames into p. A new file is
// created in place (O_EXCL, no link followed); one that exists is written
// to a temporary file next to it and renamed over it (so a running binary
// is replaced, not rewritten); anything else in its place is removed
// first. Each data frame is written straight from the frame buffer, and
// mode and mtime are set on the descriptor: under TCG every copy and every
// path lookup shows.
func (s *Syncer) writeFile(p string, e SyncEntry, r io.Reader, obj dataSink) error {
	perm := uint32(fs.FileMode(e.Mode) & fs.ModePerm)
	// Created with its final permissions when the umask keeps them and no
	// setuid, setgid or sticky bit is asked for; otherwise 0600, then
	// fchmod.
	createPerm, chmod := perm, perm&^s.umask != perm || modeExtra(e.Mode) != 0
	if chmod {
		createPerm = 0o600
	}
	const flags = unix.O_WRONLY | unix.O_CREAT | unix.O_EXCL | unix.O_NOFOLLOW | unix.O_CLOEXEC
	tmp := p
	fd, err := unix.Open(p, flags, createPerm)
	if errors.Is(err, unix.EEXIST) {
		fi, lerr := os.Lstat(p)
		if lerr != nil {
			return lerr
		}
		if !fi.Mode().IsRegular() {
			if err := os.RemoveAll(p); err != nil {
				return err
			}
			s.forget(e.Rel)
			fd, err = unix.Open(p, flags, createPerm)
		} else {
			for range 100 {
				tmp = filepath.Join(filepath.Dir(p), ".banger-push-"+randName())
				if fd, err = unix.Open(tmp, flags, createPerm); !errors.Is(err, unix.EEXIST) {
					break
				}
			}
		}
	}
	if err != nil {
		return &fs.PathError{Op: "create", Path: p, Err: err}
	}
	ok := false
	defer func() {
		if fd >= 0 {
			unix.Close(fd)
		}
		if !ok {
			os.Remove(tmp)
		}
	}()
	left := e.Size
	if w, ok := obj.(*packWriter); ok && w.out != nil {
		// the data read straight into the pack's buffers, and written
		// to the file from there
		for left > 0 {
			typ, n, err := readHeader(r)
			if err != nil {
				return err
			}
			if typ != FrameData || uint64(n) > left {
				return fmt.Errorf("file data: frame type %d of %d bytes with %d left", typ, n, left)
			}
			if s.segs, err = w.readInto(r, n, s.segs[:0]); err != nil {
				return err
			}
			if err := writevAll(fd, s.segs); err != nil {
				return &fs.PathError{Op: "write", Path: p, Err: err}
			}
			w.out.handoff()
			left -= uint64(n)
		}
	}
	for left > 0 {
		typ, d, err := ReadFrame(r, s.buf)
		s.buf = d
		if err != nil {
			return err
		}
		if typ != FrameData || uint64(len(d)) > left {
			return fmt.Errorf("file data: frame type %d of %d bytes with %d left", typ, len(d), left)
		}
		if obj != nil {
			if err := obj.write(d); err != nil {
				return err
			}
		}
		if err := writeAll(fd, d, p); err != nil {
			return err
		}
		left -= uint64(len(d))
	}
	if chmod {
		if err := unix.Fchmod(fd, uint32(fileModeBits(e.Mode))); err != nil {
			return &fs.PathError{Op: "chmod", Path: p, Err: err}
		}
	}
	if err := futimens(fd, int64(e.MTime)); err != nil {
		return &fs.PathError{Op: "utimens", Path: p, Err: err}
	}
	err = unix.Close(fd)
	fd = -1
	if err != nil {
		return &fs.PathError{Op: "close", Path: p, Err: err}
	}
	if tmp != p {
		if err := os.Rename(tmp, p); err != nil {
			return err
		}
	}
	ok = true
	return nil
}

// fileObj applies a SyncFileObj: the file, and from the same data the loose
// object the host named, finished or dropped as the SyncObjEnd after the
// data says.
func (s *Syncer) fileObj(o SyncObjEntry, r io.Reader) error {
	e := SyncEntry{Rel: o.Rel, Mode: o.Mode, MTime: o.MTime, Size: o.Size}
	p, err := s.path(e.Rel)
	if err != nil {
		return err
	}
	if !looseObjectPath(o.Object) {
		return fmt.Errorf("bad loose object path %q", o.Object)
	}
	op, err := s.path(o.Object)
	if err != nil {
		return err
	}
	ow, err := s.newObjWriter(op, o.Size, fs.FileMode(o.ObjMode))
	if err != nil {
		return err
	}
	defer ow.abort()
	if err := s.writeFile(p, e, r, ow); err != nil {
		return err
	}
	s.stats.Files++
	s.stats.Bytes += int64(e.Size)
	s.setState(e.Rel)
	typ, d, err := ReadFrame(r, s.buf)
	s.buf = d
	if err != nil {
		return err
	}
	var req Request
	var end ObjEnd
	if typ != FrameRequest || ssh.Unmarshal(d, &req) != nil || req.Type != SyncObjEnd || ssh.Unmarshal(req.Payload, &end) != nil {
		return errors.New("no end of the object after its data")
	}
	if !end.OK {
		return nil // the host sends the object itself
	}
	if err := ow.finish(end.Adler); err != nil {
		return fmt.Errorf("object %s: %w", o.Object, err)
	}
	s.stats.Objects++
	s.setState(o.Object)
	return nil
}

// looseObjectPath reports whether rel names a loose object of a repository
// at the destination's root: .git/objects/xx/<hex>, SHA-1 or SHA-256.
func looseObjectPath(rel string) bool {
	rest, ok := strings.CutPrefix(rel, ".git/objects/")
	if !ok || (len(rest) != 41 && len(rest) != 65) || rest[2] != '/' {
		return false
	}
	for i, c := range []byte(rest) {
		if i != 2 && !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// dataSink also receives a file's data (objWriter, packWriter).
type dataSink interface{ write([]byte) error }

// objWriter writes a loose blob object as a zlib stream of stored
// (uncompressed) deflate blocks: 0x78 0x01, then blocks of at most 65535
// bytes (a 5-byte header each), then the Adler-32 of the inflated bytes
// ("blob <size>\x00" and the data), which the host computes. Each data frame
// costs one writev: headers and data go out of the frame buffer as they are.
type objWriter struct {
	fd         int
	tmp, final string // written at tmp, which is final unless final existed
	perm       uint32
	chmod      bool     // perm is set after the data
	total      uint64   // inflated bytes not yet written
	block      uint64   // bytes left in the current stored block
	pending    [][]byte // written with the next data
	hdrs       []byte
	iov        [][]byte
}

func (s *Syncer) newObjWriter(final string, size uint64, mode fs.FileMode) (*objWriter, error) {
	// Written at its name (the host found it missing), with its mode when
	// the umask keeps it; at a temporary name, renamed, if it is there.
	perm := uint32(mode & fs.ModePerm)
	createPerm := perm
	if perm&^s.umask != perm {
		createPerm = 0o600
	}
	const flags = unix.O_WRONLY | unix.O_CREAT | unix.O_EXCL | unix.O_NOFOLLOW | unix.O_CLOEXEC
	tmp := final
	fd, err := unix.Open(tmp, flags, createPerm)
	if errors.Is(err, unix.EEXIST) {
		tmp = filepath.Join(filepath.Dir(final), ".banger-obj-"+randName())
		fd, err = unix.Open(tmp, flags, createPerm)
	}
	if err != nil {
		return nil, &fs.PathError{Op: "create", Path: tmp, Err: err}
	}
	head := []byte("blob " + strconv.FormatUint(size, 10) + "\x00")
	o := &objWriter{fd: fd, tmp: tmp, final: final, perm: perm, chmod: createPerm != perm, total: uint64(len(head)) + size,
		hdrs: make([]byte, 0, 5*(MaxFrame/maxStored+4))}
	o.pending = [][]byte{{0x78, 0x01}}
	o.iov = o.add(o.pending, head)
	o.pending = o.iov
	return o, nil
}

// add appends d to iov, with a block header wherever a block starts.
func (o *objWriter) add(iov [][]byte, d []byte) [][]byte {
	for len(d) > 0 {
		if o.block == 0 {
			n := min(o.total, maxStored)
			var final byte
			if o.total <= maxStored {
				final = 1
			}
			at := len(o.hdrs)
			o.hdrs = append(o.hdrs, final, byte(n), byte(n>>8), ^byte(n), ^byte(n>>8))
			iov = append(iov, o.hdrs[at:at+5])
			o.block = n
		}
		k := min(uint64(len(d)), o.block)
		iov = append(iov, d[:k])
		d = d[k:]
		o.block -= k
		o.total -= k
	}
	return iov
}

func (o *objWriter) write(d []byte) error {
	iov := o.add(o.pending, d)
	o.pending = nil
	err := writevAll(o.fd, iov)
	o.hdrs = o.hdrs[:0]
	o.iov = iov[:0]
	return err
}

func (o *objWriter) finish(adler uint32) error {
	if o.total != 0 {
		return errors.New("short object")
	}
	iov := append(o.pending, []byte{byte(adler >> 24), byte(adler >> 16), byte(adler >> 8), byte(adler)})
	o.pending = nil
	if err := writevAll(o.fd, iov); err != nil {
		return err
	}
	if o.chmod {
		if err := unix.Fchmod(o.fd, o.perm); err != nil {
			return err
		}
	}
	// No mtime: git reads none from a loose object (it prunes only
	// unreachable ones by age), and a push compares objects by name.
	err := unix.Close(o.fd)
	o.fd = -1
	if err != nil {
		return err
	}
	if o.tmp != o.final {
		if err := os.Rename(o.tmp, o.final); err != nil {
			return err
		}
	}
	o.tmp = ""
	return nil
}

// abort drops an object that was not finished.
func (o *objWriter) abort() {
	if o.fd >= 0 {
		unix.Close(o.fd)
		o.fd = -1
	}
	if o.tmp != "" {
		os.Remove(o.tmp)
		o.tmp = ""
	}
}

// writevAll writes every byte of iov.
func writevAll(fd int, iov [][]byte) error {
	for len(iov) > 0 {
		n, err := unix.Writev(fd, iov)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		iov = skipIov(iov, n)
	}
	return nil
}

// writeAll writes all of d to fd (the file at path, for errors).
func writeAll(fd int, d []byte, path string) error {
	for len(d) > 0 {
		n, err := unix.Write(fd, d)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return &fs.PathError{Op: "write", Path: path, Err: err}
		}
		d = d[n:]
	}
	return nil
}

// skipIov drops the first n bytes of iov (what a writev wrote) and the
// empty buffers they leave at its head.
func skipIov(iov [][]byte, n int) [][]byte {
	for n > 0 && len(iov) > 0 {
		if n >= len(iov[0]) {
			n -= len(iov[0])
			iov = iov[1:]
		} else {
			iov[0] = iov[0][n:]
			n = 0
		}
	}
	for len(iov) > 0 && len(iov[0]) == 0 {
		iov = iov[1:]
	}
	return iov
}

// fileModeBits turns the fs.FileMode bits of a SyncEntry into chmod(2)'s.
func fileModeBits(m uint32) uint32 {
	fm := fs.FileMode(m)
	b := uint32(fm & fs.ModePerm)
	if fm&fs.ModeSetuid != 0 {
		b |= unix.S_ISUID
	}
	if fm&fs.ModeSetgid != 0 {
		b |= unix.S_ISGID
	}
	if fm&fs.ModeSticky != 0 {
		b |= unix.S_ISVTX
	}
	return b
}

// futimens sets fd's access and modification times to ns (utimensat(2)
// with a NULL path: no lookup).
func futimens(fd int, ns int64) error {
	ts := [2]unix.Timespec{unix.NsecToTimespec(ns), unix.NsecToTimespec(ns)}
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(&ts[0])), 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

func randName() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// processUmask reads this process's umask from /proc/self/status (setting
// it to read it would race with every other goroutine creating files);
// 0o077, the strictest, when it cannot be read, so that modes are then
// always set with fchmod.
func processUmask() uint32 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0o077
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Umask:"); ok {
			if m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32); err == nil {
				return uint32(m)
			}
		}
	}
	return 0o077
}

// ReadManifest reads the agent's manifest (host side), bounded by
// MaxManifestEntries and MaxManifestBytes. Entries with bad paths are
// dropped: they can match nothing the host sends.
func ReadManifest(r io.Reader) (map[string]ManifestEntry, error) {
	m, _, err := ReadManifestCaps(r)
	return m, err
}

// ReadManifestCaps is ReadManifest that also returns the capabilities the
// agent announced (CapObjects).
func ReadManifestCaps(r io.Reader) (map[string]ManifestEntry, map[string]bool, error) {
	m := map[string]ManifestEntry{}
	packed, walked := 0, 0
	eof, err := readBatches(r, "the guest's manifest", manifestBytes,
		fmt.Errorf("the guest's manifest exceeds %d bytes", manifestBytes),
		func(p []byte) error {
			var rep Reply
			if ssh.Unmarshal(p, &rep) == nil && !rep.OK {
				return fmt.Errorf("the guest refused the push: %s", truncate(string(rep.Payload), 512))
			}
			return errors.New("the guest ended the push early")
		},
		func(batch []ManifestEntry) error {
			for _, e := range batch {
				if CleanRel(e.P) != nil {
					continue
				}
				if e.T == "k" {
					// an object in a pack a push wrote: only a loose
					// object's path and a pack's base name, never one
					// to delete
					if _, ok := PackBaseName(e.L); !ok || !looseObjectPath(e.P) {
						continue
					}
					e = ManifestEntry{P: e.P, T: "k", L: e.L}
					// bounded apart from the walk's entries, as the
					// agent bounds them (maxPackedReport)
					if packed++; packed > maxPackedReport {
						return fmt.Errorf("the guest's manifest lists more than %d packed objects", maxPackedReport)
					}
				} else if walked++; walked > MaxManifestEntries {
					return fmt.Errorf("the guest's manifest has more than %d entries", MaxManifestEntries)
				}
				m[e.P] = e
			}
			return nil
		})
	if err != nil {
		return nil, nil, err
	}
	caps := map[string]bool{}
	for _, c := range strings.Fields(string(eof)) {
		caps[c] = true
	}
	return m, caps, nil
}

// readBatches reads FrameData frames, each a JSON array of T, until
// FrameEOF, whose payload it returns: the manifest's and the haves' shared
// reader. Each batch goes to each; past maxBytes of frames in all it
// returns tooBig. what names the stream in errors. A FrameReply goes to
// reply (whose error is returned), or is unexpected when reply is nil.
func readBatches[T any](r io.Reader, what string, maxBytes int, tooBig error, reply func([]byte) error, each func([]T) error) ([]byte, error) {
	total := 0
	var buf []byte
	for {
		typ, p, err := ReadFrame(r, buf)
		buf = p
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", what, err)
		}
		switch {
		case typ == FrameEOF:
			return p, nil
		case typ == FrameReply && reply != nil:
			return nil, reply(p)
		case typ == FrameData:
		default:
			return nil, fmt.Errorf("unexpected frame type %d in %s", typ, what)
		}
		if total += len(p); total > maxBytes {
			return nil, tooBig
		}
		var batch []T
		if err := json.Unmarshal(p, &batch); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		if err := each(batch); err != nil {
			return nil, err
		}
	}
}

// ReadSyncReply reads the agent's final answer (host side).
func ReadSyncReply(r io.Reader) (SyncStats, error) {
	var st SyncStats
	typ, p, err := ReadFrame(r, nil)
	if err != nil {
		return st, fmt.Errorf("read the guest's answer: %w", err)
	}
	var rep Reply
	if typ != FrameReply || ssh.Unmarshal(p, &rep) != nil {
		return st, fmt.Errorf("unexpected frame type %d as the guest's answer", typ)
	}
	if !rep.OK {
		return st, fmt.Errorf("the guest failed the push: %s", truncate(string(rep.Payload), 512))
	}
	if err := json.Unmarshal(rep.Payload, &st); err != nil {
		return st, fmt.Errorf("the guest's answer: %w", err)
	}
	return st, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
