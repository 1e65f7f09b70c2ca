package bulk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// banger cp of one regular file in one stream, with its mode and time and
// the "into an existing directory" rule: no SFTP session (whose start costs
// a fork and exec in the guest) and no Stat, Chmod or Chtimes round trips.
// The capability is the operation itself: an older agent closes a stream
// whose operation it does not know, the host reads ErrUnsupported and takes
// the SFTP path.
//
// OpPutFile (Open.Arg is the destination, absolute or relative to the
// user's home, as for OpPut; a trailing '/' says it must be a directory):
// the host follows the Open with a FrameRequest of type PutFileRequest
// (payload PutFile) and, when PutFile.Inline, at once with the contents
// (FrameData frames, then FrameEOF), all in one write. The agent resolves
// the target as cp does: Base inside the destination when that is an
// existing directory (links followed, as SFTP follows them), else the
// destination itself; it opens it (created 0644 or truncated; anything but
// a regular file is refused) and answers a FrameReply: OK with the target's
// path as payload, or not OK with the error (after reading an inline file
// to its FrameEOF, so that nothing the host sent is cut off). Without
// Inline the host sends the contents after that OK. Once the FrameEOF is
// in, the agent sets Mode and MTime on the descriptor and answers a last
// FrameReply (OK with the path, or not OK with the error).
//
// OpGetFile (Open.Arg as for OpGet): the agent answers a FrameReply, OK with
// a FileMeta payload, or not OK with the error. For a regular file (Type
// "f") exactly FileMeta.Size bytes follow, as for OpGet; for anything else
// (a directory "d", another kind "o") nothing follows and the host takes
// the SFTP path, which knows -r, links and the errors. The host checks
// every field (CheckFileMeta) and the bytes against Size (Getter).
const (
	OpPutFile = "putfile"
	OpGetFile = "getfile"
)

// PutFileRequest is the type of OpPutFile's FrameRequest.
const PutFileRequest = "file"

// PutFile is OpPutFile's request.
type PutFile struct {
	Base   string // the name to write inside an existing directory
	Mode   uint32 // KeptMode bits
	MTime  uint64 // ns since the epoch
	Inline bool   // the contents follow at once, without waiting for the open's reply
}

// FileMeta is OpGetFile's first reply.
type FileMeta struct {
	Type  string // "f" regular file, "d" directory, "o" anything else
	Size  uint64 // a regular file's
	Mode  uint32 // KeptMode bits
	MTime uint64 // ns since the epoch
}

// MaxInline bounds an inline OpPutFile's contents (what an agent reads to
// discard after refusing it).
const MaxInline = 256 << 10

// keptBits are the mode bits a FileMeta or PutFile may carry.
const keptBits = uint32(fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)

// MaxMTime is the latest time a file's mtime may name: the last one a
// time.Time built from its nanoseconds can hold (year 2262).
const MaxMTime = uint64(math.MaxInt64)

// CheckFileMeta validates what an agent said of a file: a known type, no
// mode bits beyond permissions, setuid, setgid and sticky, and a time
// time.Unix(0, ns) can hold.
func CheckFileMeta(m FileMeta) error {
	switch {
	case m.Type != "f" && m.Type != "d" && m.Type != "o":
		return fmt.Errorf("bulk get: the guest named an unknown file type %.16q", m.Type)
	case m.Mode&^keptBits != 0:
		return fmt.Errorf("bulk get: the guest sent mode bits %#o beyond the permissions", m.Mode&^keptBits)
	case m.MTime > MaxMTime:
		return fmt.Errorf("bulk get: the guest sent a modification time out of range (%d ns)", m.MTime)
	case m.Type != "f" && m.Size != 0:
		return errors.New("bulk get: the guest sent a size for something that is not a regular file")
	}
	return nil
}

// FileMode is m's mode as an fs.FileMode (permission, setuid, setgid and
// sticky bits).
func (m FileMeta) FileMode() fs.FileMode { return fs.FileMode(m.Mode & keptBits) }

// ModTime is m's modification time.
func (m FileMeta) ModTime() time.Time { return time.Unix(0, int64(min(m.MTime, MaxMTime))) }

// MTimeOf is t as a FileMeta or PutFile MTime; ok is false when it is out
// of range (before the epoch).
func MTimeOf(t time.Time) (uint64, bool) {
	ns := t.UnixNano()
	if ns < 0 || t.Year() > 2262 {
		return 0, false
	}
	return uint64(ns), true
}

// replyErr sends a not-OK reply with err's message.
func replyErr(c io.Writer, err error) {
	_ = WriteFrame(c, FrameReply, ssh.Marshal(&Reply{Payload: []byte(err.Error())}))
}

// ReadPutFile reads OpPutFile's request, the frame after the Open.
func ReadPutFile(r io.Reader) (PutFile, error) {
	var req PutFile
	typ, p, err := ReadFrame(r, nil)
	if err != nil {
		return req, fmt.Errorf("read the file request: %w", err)
	}
	var rq Request
	if typ != FrameRequest {
		return req, fmt.Errorf("frame type %d where the file request was due", typ)
	}
	if err := ssh.Unmarshal(p, &rq); err != nil || rq.Type != PutFileRequest {
		return req, fmt.Errorf("bad file request (%v)", err)
	}
	if err := ssh.Unmarshal(rq.Payload, &req); err != nil {
		return req, fmt.Errorf("bad file request: %w", err)
	}
	return req, nil
}

// RefusePutFile answers OpPutFile's Open with err; when the request said
// its contents were inline, it first reads them to their FrameEOF (at most
// MaxInline bytes of data), so the host's write is never cut off.
func RefusePutFile(c io.Writer, r io.Reader, req PutFile, err error) error {
	replyErr(c, err)
	if req.Inline {
		_ = discardInline(r)
	}
	return err
}

// discardInline reads data frames up to FrameEOF, at most MaxInline bytes.
func discardInline(r io.Reader) error {
	var buf []byte
	n := 0
	for {
		typ, p, err := ReadFrame(r, buf)
		if err != nil {
			return err
		}
		buf = p[:cap(p)]
		switch typ {
		case FrameEOF:
			return nil
		case FrameData:
			if n += len(p); n > MaxInline {
				return errors.New("inline contents beyond MaxInline")
			}
		default:
			return fmt.Errorf("unexpected frame type %d", typ)
		}
	}
}

// PutFileTarget is the file an OpPutFile for dest (resolved, cleaned)
// writes: Base inside dest when dest is a directory (links followed),
// else dest. mustBeDir is set when the host's path ended in '/'.
func PutFileTarget(dest, base string, mustBeDir bool) (string, error) {
	if base != "" && (base == "." || base == ".." || strings.ContainsAny(base, "/\x00")) {
		return "", fmt.Errorf("bad file name %q", base)
	}
	fi, err := os.Stat(dest)
	switch {
	case err == nil && fi.IsDir():
		if base == "" {
			return "", fmt.Errorf("%s is a directory", dest)
		}
		return filepath.Join(dest, base), nil
	case err == nil && mustBeDir:
		return "", fmt.Errorf("%s: not a directory", dest)
	case err == nil:
		return dest, nil
	case errors.Is(err, fs.ErrNotExist) && mustBeDir:
		return "", fmt.Errorf("%s: no such directory", dest)
	case errors.Is(err, fs.ErrNotExist):
		return dest, nil
	}
	return "", err
}

// openRegular opens p for writing, created with mode 0644 or truncated;
// anything but a regular file (a fifo that would block, a device) is
// refused before it is changed.
func openRegular(p string) (*os.File, error) {
	fd, err := unix.Open(p, unix.O_WRONLY|unix.O_CREAT|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: p, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		if err == nil {
			err = errors.New("not a regular file")
		}
		return nil, &fs.PathError{Op: "open", Path: p, Err: err}
	}
	if err := unix.Ftruncate(fd, 0); err != nil {
		unix.Close(fd)
		return nil, &fs.PathError{Op: "truncate", Path: p, Err: err}
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), p), nil
}

// ServePutFile runs the agent's side of OpPutFile after its request (see
// ReadPutFile) for the destination dest (resolved and cleaned; mustBeDir
// when the host's path ended in '/'). With dev, contents that are not
// inline come through the spool (see SpoolSuffix).
func ServePutFile(c io.Writer, r io.Reader, req PutFile, dest string, mustBeDir bool, dev SpoolDev) error {
	if req.Mode&^keptBits != 0 || req.MTime > MaxMTime {
		return RefusePutFile(c, r, req, errors.New("bad file request: mode or time out of range"))
	}
	target, err := PutFileTarget(dest, req.Base, mustBeDir)
	if err != nil {
		return RefusePutFile(c, r, req, err)
	}
	f, err := openRegular(target)
	if err != nil {
		return RefusePutFile(c, r, req, err)
	}
	if err := WriteFrame(c, FrameReply, ssh.Marshal(&Reply{OK: true, Payload: []byte(target)})); err != nil {
		f.Close()
		return err
	}
	if req.Inline {
		// a small file: O_DIRECT's buffers would cost more than they save
		err = receiveBuffered(f, io.LimitReader(r, MaxInline+64<<10))
	} else {
		err = receiveData(c, r, osFile{f}, dev)
	}
	if err == nil {
		err = setMeta(f, req.Mode, req.MTime)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	reply := Reply{OK: err == nil, Payload: []byte(target)}
	if err != nil {
		reply.Payload = []byte(err.Error())
	}
	if werr := WriteFrame(c, FrameReply, ssh.Marshal(&reply)); err == nil {
		err = werr
	}
	return err
}

// setMeta sets an open file's mode (KeptMode bits) and times.
func setMeta(f *os.File, mode uint32, mtime uint64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if serr = unix.Fchmod(int(fd), fileModeBits(mode)); serr != nil {
			serr = &fs.PathError{Op: "chmod", Path: f.Name(), Err: serr}
			return
		}
		if serr = futimens(int(fd), int64(mtime)); serr != nil {
			serr = &fs.PathError{Op: "utimens", Path: f.Name(), Err: serr}
		}
	}); err != nil {
		return err
	}
	return serr
}

// smallGet is the size below which OpGetFile reads a file buffered: O_DIRECT's
// buffers would cost more than they save.
const smallGet = 256 << 10

// ServeGetFile runs the agent's side of OpGetFile on c (r reads c) for the
// file at path (already resolved); with dev, a regular file's contents go
// through the spool.
func ServeGetFile(c io.Writer, r io.Reader, path string, dev SpoolDev) error {
	// O_NONBLOCK: a fifo is reported, not waited on (it means nothing to
	// a regular file)
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		replyErr(c, err)
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		replyErr(c, err)
		return err
	}
	m := FileMeta{Type: "o", Mode: KeptMode(fi.Mode())}
	m.MTime, _ = MTimeOf(fi.ModTime())
	switch {
	case fi.Mode().IsRegular():
		m.Type, m.Size = "f", uint64(fi.Size())
	case fi.IsDir():
		m.Type = "d"
	}
	if err := WriteFrame(c, FrameReply, ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&m)})); err != nil || m.Type != "f" {
		return err
	}
	return sendData(c, r, f, fi.Size(), path, fi.Size() >= smallGet, dev)
}

// StartGetFile reads the agent's answer to OpGetFile's Open and checks it
// (CheckFileMeta). For a regular file it returns a Getter that yields
// exactly meta.Size bytes; for anything else a nil Getter.
func StartGetFile(r io.Reader) (*Getter, FileMeta, error) {
	rep, err := readReply(r)
	if err != nil {
		return nil, FileMeta{}, err
	}
	if !rep.OK {
		return nil, FileMeta{}, fmt.Errorf("%w: %w", ErrOpenRefused, remoteErr(rep))
	}
	var m FileMeta
	if err := ssh.Unmarshal(rep.Payload, &m); err != nil {
		return nil, FileMeta{}, fmt.Errorf("bulk get: bad file info: %w", err)
	}
	if err := CheckFileMeta(m); err != nil {
		return nil, FileMeta{}, err
	}
	if m.Type != "f" {
		return nil, m, nil
	}
	return &Getter{Info: FileInfo{Size: m.Size, Mode: m.Mode}, r: r, left: m.Size}, m, nil
}

// PutFiler is the host's side of OpPutFile after its Open and request.
type PutFiler struct {
	*Putter
	// Target is the file the agent writes, from its reply.
	Target string
}

// StartPutFile reads the agent's answer to OpPutFile's Open: the target's
// path, or the refusal. A refusal wraps ErrOpenRefused: the agent changed
// nothing. inline says the contents and their FrameEOF were sent with the
// request (Finish then only waits for the verdict).
func StartPutFile(c io.ReadWriter, inline bool) (*PutFiler, error) {
	rep, err := readReply(c)
	if err != nil {
		return nil, err
	}
	if !rep.OK {
		return nil, fmt.Errorf("%w: %w", ErrOpenRefused, remoteErr(rep))
	}
	if len(rep.Payload) > 4096 {
		return nil, errors.New("bulk put: the guest's reply names a path beyond 4096 bytes")
	}
	return &PutFiler{Putter: &Putter{c: c, sent: inline}, Target: string(rep.Payload)}, nil
}

// ErrOpenRefused means the agent refused an OpPutFile or OpGetFile before
// it changed or sent anything (the destination's directory is missing, the
// source does not exist, ...): the host may take the SFTP path, which says
// why in cp's words.
var ErrOpenRefused = errors.New("the guest agent refused to open the file")

// PutFileHost runs the host's side of OpPutFile on c, whose Open has been
// sent: it sends the request for base, mode and mtime and, when r holds
// at most MaxInline bytes, the contents with it in one write (without
// waiting for the agent: one round trip in all), else the contents after
// the agent's first answer. It returns the path the agent wrote (the
// guest's words). An error wrapping ErrUnsupported (an older agent, a
// time before 1970) or ErrOpenRefused means nothing was changed.
func PutFileHost(c io.ReadWriter, base string, mode fs.FileMode, mtime time.Time, r io.Reader) (string, error) {
	mt, ok := MTimeOf(mtime)
	if !ok {
		return "", fmt.Errorf("%w: a modification time before 1970", ErrUnsupported)
	}
	head := make([]byte, MaxInline+1)
	n, err := io.ReadFull(r, head)
	inline := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
	if err != nil && !inline {
		return "", err
	}
	head = head[:n]
	var b Batch
	b.Request(PutFileRequest, ssh.Marshal(&PutFile{Base: base, Mode: KeptMode(mode), MTime: mt, Inline: inline}))
	if inline {
		b.Data(head)
		b.EOF()
	}
	first, err := b.Bytes()
	if err != nil {
		return "", err
	}
	// a write the agent cut off (an older agent closes the stream at once)
	// is explained by its answer, read next
	_, _ = c.Write(first)
	p, err := StartPutFile(c, inline)
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		// an older agent closed the stream on what it did not read: a
		// unix socket closed with unread data resets its peer
		err = fmt.Errorf("%w (%w)", ErrUnsupported, err)
	}
	if err != nil {
		return "", err
	}
	if !inline {
		if _, err := p.ReadFrom(io.MultiReader(bytes.NewReader(head), r)); err != nil {
			return p.Target, err
		}
	}
	return p.Target, p.Finish()
}
