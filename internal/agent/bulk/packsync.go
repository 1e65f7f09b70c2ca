package bulk

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// The agent's side of CapPack (see OpSync): one temporary pack per push,
// written with one pwritev per data frame, straight from the frame buffer.

const packDir = ".git/objects/pack"

// maxPackedReport bounds the objects of pushed packs a manifest lists, on
// both ends (a variable for tests).
var maxPackedReport = MaxManifestEntries / 2

type packWriter struct {
	fd      int
	tmp     string // absolute path of the temporary pack
	off     int64  // where the next byte goes
	start   int64  // the current entry's offset
	n       uint32 // entries kept
	e       PackEntry
	pending [][]byte // written with the next data
	inEntry bool
	out     *packOut // O_DIRECT through aligned buffers; nil: pwritev per frame
}

// pack returns the push's pack, created at its first entry.
func (s *Syncer) packW() (*packWriter, error) {
	if s.pack != nil {
		return s.pack, nil
	}
	tmp, err := s.path(packDir + "/tmp_pack_banger_" + randName())
	if err != nil {
		return nil, err
	}
	// What a push that died left (pushes to one destination never run at
	// once: bangerd holds the VM's workspace lock).
	for _, pat := range []string{"tmp_pack_banger_*", "tmp_idx_banger_*"} {
		old, _ := filepath.Glob(filepath.Join(filepath.Dir(tmp), pat))
		for _, o := range old {
			os.Remove(o)
		}
	}
	// read and write: a cut-off entry's block is read back (packOut)
	const flags = unix.O_RDWR | unix.O_CREAT | unix.O_EXCL | unix.O_NOFOLLOW | unix.O_CLOEXEC
	fd, err := unix.Open(tmp, flags, 0o444)
	if err != nil {
		return nil, &fs.PathError{Op: "create", Path: tmp, Err: err}
	}
	s.pack = &packWriter{fd: fd, tmp: tmp}
	if !s.packBuffered {
		s.pack.out = newPackOut(fd, tmp)
	}
	// the count is written at the end, when known
	s.pack.pending = [][]byte{PackHeader(0)}
	return s.pack, nil
}

func (w *packWriter) begin(typ byte, size uint64) {
	w.start = w.off
	if len(w.pending) > 0 {
		w.start += int64(len(w.pending[0])) // the header, not yet written
	}
	w.e.Reset()
	w.pending = w.e.Begin(w.pending, typ, size)
	w.inEntry = true
}

func (w *packWriter) flush(iov [][]byte) error {
	if w.out != nil {
		for _, b := range iov {
			w.off += int64(len(b))
		}
		return w.out.append(iov)
	}
	for len(iov) > 0 {
		n, err := unix.Pwritev(w.fd, iov, w.off)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return &fs.PathError{Op: "write", Path: w.tmp, Err: err}
		}
		w.off += int64(n)
		iov = skipIov(iov, n)
	}
	return nil
}

// write lays out and writes the entry's next content bytes.
func (w *packWriter) write(d []byte) error {
	iov := w.e.Data(w.pending, d)
	w.pending = nil
	err := w.flush(iov)
	w.e.Reset()
	return err
}

// readInto reads the entry's next n content bytes from r straight into
// the pack's aligned buffers (w.out must be set), laying out the stored
// blocks' headers between them, and appends to segs the slices the bytes
// landed in: the caller writes those to the work tree file, then calls
// w.out.handoff (until then no buffer goes to the writer, so the slices
// stay as read). A file's data is so copied once in the agent, from the
// stream into the pack's buffer, not a second time from the frame buffer.
func (w *packWriter) readInto(r io.Reader, n int, segs [][]byte) ([][]byte, error) {
	for n > 0 {
		iov, k := w.e.Next(w.pending, n)
		w.pending = nil
		if k == 0 {
			return segs, errors.New("pack entry: more data than its announced size")
		}
		for _, b := range iov {
			w.off += int64(len(b))
		}
		err := w.out.put(iov)
		w.e.Reset()
		if err != nil {
			return segs, err
		}
		for k > 0 {
			b, err := w.out.room(k)
			if err != nil {
				return segs, err
			}
			if _, err := io.ReadFull(r, b); err != nil {
				return segs, err
			}
			w.out.commit(len(b))
			w.off += int64(len(b))
			segs = append(segs, b)
			k -= len(b)
			n -= len(b)
		}
	}
	return segs, nil
}

// end reads the entry's SyncObjEnd and keeps or cuts off the entry.
func (s *Syncer) endEntry(w *packWriter, r io.Reader) (bool, error) {
	typ, d, err := ReadFrame(r, s.buf)
	s.buf = d
	if err != nil {
		return false, err
	}
	var req Request
	var end ObjEnd
	if typ != FrameRequest || ssh.Unmarshal(d, &req) != nil || req.Type != SyncObjEnd || ssh.Unmarshal(req.Payload, &end) != nil {
		return false, errors.New("no end of the pack entry after its data")
	}
	w.inEntry = false
	if !end.OK {
		// what the host sent was not its object: cut it off again (the
		// pack's header, written with the first entry, stays)
		if err := w.flush(w.pending); err != nil {
			return false, err
		}
		w.pending = nil
		if w.out != nil {
			if err := w.out.truncate(w.start); err != nil {
				return false, err
			}
		} else if err := unix.Ftruncate(w.fd, w.start); err != nil {
			return false, &fs.PathError{Op: "truncate", Path: w.tmp, Err: err}
		}
		w.off = w.start
		return false, nil
	}
	iov, err := w.e.End(w.pending, end.Adler)
	w.pending = nil
	if err != nil {
		return false, err
	}
	if err := w.flush(iov); err != nil {
		return false, err
	}
	w.e.Reset()
	w.n++
	return true, nil
}

// filePack applies a SyncFilePack: the file, and its data as a blob entry.
func (s *Syncer) filePack(e SyncEntry, r io.Reader) error {
	p, err := s.path(e.Rel)
	if err != nil {
		return err
	}
	w, err := s.packW()
	if err != nil {
		return err
	}
	w.begin(ObjBlob, e.Size)
	if err := s.writeFile(p, e, r, w); err != nil {
		return err
	}
	s.stats.Files++
	s.stats.Bytes += int64(e.Size)
	s.setState(e.Rel)
	if e.Size == 0 {
		if err := w.flush(w.pending); err != nil {
			return err
		}
		w.pending = nil
	}
	kept, err := s.endEntry(w, r)
	if kept {
		s.stats.Objects++
	}
	return err
}

// packObj applies a SyncPackObj: an entry alone.
func (s *Syncer) packObj(o PackObj, r io.Reader) error {
	if o.Type < ObjCommit || o.Type > ObjTag {
		return fmt.Errorf("pack entry of type %d", o.Type)
	}
	w, err := s.packW()
	if err != nil {
		return err
	}
	w.begin(byte(o.Type), o.Size)
	if err := s.readData(o.Size, w.write); err != nil {
		return err
	}
	if o.Size == 0 {
		if err := w.flush(w.pending); err != nil {
			return err
		}
		w.pending = nil
	}
	_, err = s.endEntry(w, r)
	return err
}

// readData reads exactly size bytes of FrameData frames, each to fn.
func (s *Syncer) readData(size uint64, fn func([]byte) error) error {
	for left := size; left > 0; {
		typ, d, err := ReadFrame(s.r, s.buf)
		s.buf = d
		if err != nil {
			return err
		}
		if typ != FrameData || uint64(len(d)) > left || len(d) == 0 {
			return fmt.Errorf("data: frame type %d of %d bytes with %d left", typ, len(d), left)
		}
		if err := fn(d); err != nil {
			return err
		}
		left -= uint64(len(d))
	}
	return nil
}

// packEnd finishes the pack: the header's count, the trailer (the name the
// host computed), then the index the host sent; pack first, index last, so
// git never sees an index without its pack.
func (s *Syncer) packEnd(pe PackEnd) error {
	w := s.pack
	if w == nil || w.inEntry {
		return errors.New("the end of a pack that was not begun")
	}
	if pe.Count != w.n {
		return fmt.Errorf("the host counts %d objects in the pack, the agent wrote %d", pe.Count, w.n)
	}
	hx, ok := PackBaseName("pack-" + pe.Name)
	if !ok {
		return fmt.Errorf("bad pack name %q", pe.Name)
	}
	if pe.IdxSize > maxIndexBytes || pe.IdxSize < 8+1024 {
		return fmt.Errorf("pack index of %d bytes", pe.IdxSize)
	}
	sum, _ := hex.DecodeString(hx)
	if err := w.flush(append(w.pending, sum)); err != nil {
		return err
	}
	w.pending = nil
	if w.out != nil {
		if err := w.out.finish(PackHeader(w.n)); err != nil {
			return err
		}
	} else if _, err := unix.Pwrite(w.fd, PackHeader(w.n), 0); err != nil {
		return &fs.PathError{Op: "write", Path: w.tmp, Err: err}
	}
	err := unix.Close(w.fd)
	w.fd = -1
	if err != nil {
		return &fs.PathError{Op: "close", Path: w.tmp, Err: err}
	}
	base := packDir + "/pack-" + hx
	final, err := s.path(base + ".pack")
	if err != nil {
		return err
	}
	if err := os.Rename(w.tmp, final); err != nil {
		return err
	}
	w.tmp = ""
	s.setState(base + ".pack")
	// the index, at a temporary name, renamed over any old one
	tmp := filepath.Join(filepath.Dir(final), "tmp_idx_banger_"+randName())
	const flags = unix.O_WRONLY | unix.O_CREAT | unix.O_EXCL | unix.O_NOFOLLOW | unix.O_CLOEXEC
	fd, err := unix.Open(tmp, flags, 0o444)
	if err != nil {
		return &fs.PathError{Op: "create", Path: tmp, Err: err}
	}
	ok = false
	defer func() {
		if fd >= 0 {
			unix.Close(fd)
		}
		if !ok {
			// no index: no pack either (git would not read it)
			os.Remove(tmp)
			os.Remove(final)
			delete(s.state, base+".pack")
		}
	}()
	err = s.readData(pe.IdxSize, func(d []byte) error { return writeAll(fd, d, tmp) })
	if err != nil {
		return err
	}
	err = unix.Close(fd)
	fd = -1
	if err != nil {
		return &fs.PathError{Op: "close", Path: tmp, Err: err}
	}
	if err := os.Rename(tmp, strings.TrimSuffix(final, ".pack")+".idx"); err != nil {
		return err
	}
	ok = true
	s.setState(base + ".idx")
	s.stats.Packs++
	s.stats.Packed += int(w.n)
	s.pack = nil
	return nil
}

// abortPack removes a pack that was not finished.
func (s *Syncer) abortPack() {
	if w := s.pack; w != nil {
		if w.out != nil {
			w.out.release()
		}
		if w.fd >= 0 {
			unix.Close(w.fd)
		}
		if w.tmp != "" {
			os.Remove(w.tmp)
		}
		s.pack = nil
	}
}

// packedEntries lists the objects of the packs earlier pushes wrote under
// Dest (manifest entries of type "k"), bounded by maxPackedReport.
func (s *Syncer) packedEntries() []ManifestEntry {
	var out []ManifestEntry
	for rel := range s.state {
		dir, name := path.Split(rel)
		base, isIdx := strings.CutSuffix(name, ".idx")
		hx, ok := PackBaseName(base)
		if dir != packDir+"/" || !isIdx || !ok {
			continue
		}
		ids, err := packIDs(filepath.Join(s.Dest, filepath.FromSlash(rel)), len(hx))
		if err != nil || len(out)+len(ids) > maxPackedReport {
			continue
		}
		if _, err := os.Lstat(filepath.Join(s.Dest, filepath.FromSlash(packDir+"/"+base+".pack"))); err != nil {
			continue
		}
		for _, id := range ids {
			out = append(out, ManifestEntry{P: ".git/objects/" + id[:2] + "/" + id[2:], T: "k", L: base})
		}
	}
	return out
}
