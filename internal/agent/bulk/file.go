package bulk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
)

// One regular file's contents in one stream, for banger cp: no per-request
// round trips (SFTP asks and waits for every 32 KiB), no copy through a
// child process's pipes.
//
// OpPut writes a file in the guest (Open.Arg is its path, absolute or
// relative to the user's home): the agent opens it (created 0644 or
// truncated, as SFTP does) and answers a FrameReply (not OK with the error,
// then closes); after an OK the host sends the contents in FrameData
// frames and a FrameEOF, and the agent answers a last FrameReply once the
// file is written and closed (OK, or not OK with the error). The agent
// writes it with O_DIRECT where it can (see receiveDirect).
//
// OpGet reads a regular file in the guest (Open.Arg as for OpPut): the
// agent answers a FrameReply (OK with a FileInfo payload, or not OK with
// the error), then sends exactly FileInfo.Size bytes in FrameData frames
// and a FrameEOF; when it cannot (a read error, a file that shrank) it
// sends a FrameReply (not OK, with the error) instead. The host checks
// every frame's type and that the bytes add up to Size exactly. The agent
// reads it with O_DIRECT where it can, in frames of up to MaxFrame bytes
// (see sendDirect).
const (
	OpPut = "put"
	OpGet = "get"
)

// FileInfo is OpGet's first reply.
type FileInfo struct {
	Size uint64
	Mode uint32 // permission bits
}

// ServePut runs the agent's side of OpPut on c for the file at path
// (already resolved); r reads c. With dev, the contents come through the
// spool (see SpoolSuffix).
func ServePut(c io.Writer, r io.Reader, path string, dev SpoolDev) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		_ = WriteFrame(c, FrameReply, ssh.Marshal(&Reply{Payload: []byte(err.Error())}))
		return err
	}
	if err := WriteFrame(c, FrameReply, ssh.Marshal(&Reply{OK: true})); err != nil {
		f.Close()
		return err
	}
	err = receiveData(c, r, osFile{f}, dev)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	reply := Reply{OK: err == nil}
	if err != nil {
		reply.Payload = []byte(err.Error())
	}
	if werr := WriteFrame(c, FrameReply, ssh.Marshal(&reply)); err == nil {
		err = werr
	}
	return err
}

// receiveBuffered writes the FrameData frames r yields to f until FrameEOF
// (without O_DIRECT: see receiveDirect).
func receiveBuffered(f io.Writer, r io.Reader) error {
	buf := make([]byte, chunk)
	for {
		typ, p, err := ReadFrame(r, buf)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("receive the file: %w", err)
		}
		buf = p[:cap(p)]
		switch typ {
		case FrameData:
			if _, err := f.Write(p); err != nil {
				return err
			}
		case FrameEOF:
			return nil
		default:
			return fmt.Errorf("receive the file: unexpected frame type %d", typ)
		}
	}
}

// ServeGet runs the agent's side of OpGet on c (r reads c) for the file at
// path (already resolved); with dev, the contents go through the spool.
func ServeGet(c io.Writer, r io.Reader, path string, dev SpoolDev) error {
	fail := func(err error) error {
		_ = WriteFrame(c, FrameReply, ssh.Marshal(&Reply{Payload: []byte(err.Error())}))
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return fail(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fail(err)
	}
	if !fi.Mode().IsRegular() {
		return fail(fmt.Errorf("%s is not a regular file", path))
	}
	size := fi.Size()
	info := FileInfo{Size: uint64(size), Mode: uint32(fi.Mode().Perm())}
	if err := WriteFrame(c, FrameReply, ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&info)})); err != nil {
		return err
	}
	return sendData(c, r, f, size, path, true, dev)
}

// sendFileData sends size bytes of f in FrameData frames and a FrameEOF (with
// O_DIRECT when direct and f takes it), or a not-OK FrameReply when it
// cannot.
func sendFileData(c io.Writer, f *os.File, size int64, path string, direct bool) error {
	fail := func(err error) error {
		_ = WriteFrame(c, FrameReply, ssh.Marshal(&Reply{Payload: []byte(err.Error())}))
		return err
	}
	if direct && (osFile{f}).SetDirect(true) == nil {
		return sendDirect(c, osFile{f}, size, path)
	}
	// One buffer holds the header and a chunk: one Write per frame.
	buf := make([]byte, 5+min(int64(chunk), size))
	for left := size; left > 0; {
		k, err := io.ReadFull(f, buf[5:5+min(int64(chunk), left)])
		if k > 0 {
			buf[0] = FrameData
			putLen(buf[1:5], k)
			if _, werr := c.Write(buf[:5+k]); werr != nil {
				return werr
			}
			left -= int64(k)
		}
		if err != nil && left > 0 {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				err = fmt.Errorf("%s shrank while it was read (%d of %d bytes)", path, size-left, size)
			}
			return fail(err)
		}
	}
	return WriteFrame(c, FrameEOF, nil)
}

func putLen(b []byte, n int) {
	b[0], b[1], b[2], b[3] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
}

// ErrRemote is a failure the agent reported (wrapped with its message).
var ErrRemote = errors.New("the guest agent reported an error")

// Unsupported starts the message of a refusal that means "use another
// way" (OpPut and OpGet for a user other than the agent's own).
const Unsupported = "unsupported: "

// readReply reads the FrameReply that must come next on r.
func readReply(r io.Reader) (Reply, error) {
	typ, p, err := ReadFrame(r, nil)
	if errors.Is(err, io.EOF) {
		// an older agent closes a stream whose operation it does not know
		return Reply{}, fmt.Errorf("%w (the stream closed)", ErrUnsupported)
	}
	if err != nil {
		return Reply{}, err
	}
	if typ != FrameReply {
		return Reply{}, fmt.Errorf("bulk: frame type %d where a reply was due", typ)
	}
	var rep Reply
	if err := ssh.Unmarshal(p, &rep); err != nil {
		return Reply{}, fmt.Errorf("bulk reply: %w", err)
	}
	return rep, nil
}

// remoteErr turns a not-OK reply into an error (its message bounded).
func remoteErr(rep Reply) error {
	msg := rep.Payload
	if len(msg) > 512 {
		msg = msg[:512]
	}
	if strings.HasPrefix(string(msg), Unsupported) {
		return fmt.Errorf("%w: %q", ErrUnsupported, msg)
	}
	return fmt.Errorf("%w: %q", ErrRemote, msg)
}

// Putter is the host's side of OpPut, after Open: StartPut waits for the
// agent to open the file, then Write (or ReadFrom) sends its contents and
// Finish ends the file and waits for the agent's verdict.
type Putter struct {
	c    io.ReadWriter
	wbuf []byte
	done bool
	sent bool // the FrameEOF went with the contents (an inline OpPutFile)
	err  error
}

// StartPut waits for the agent's answer to OpPut's Open.
func StartPut(c io.ReadWriter) (*Putter, error) {
	rep, err := readReply(c)
	if err != nil {
		return nil, err
	}
	if !rep.OK {
		return nil, remoteErr(rep)
	}
	return &Putter{c: c}, nil
}

// Write sends p in frames of up to a chunk.
func (p *Putter) Write(b []byte) (int, error) {
	n := 0
	for len(b) > 0 {
		k := min(len(b), chunk)
		var err error
		if p.wbuf, err = appendWrite(p.c, p.wbuf, FrameData, b[:k]); err != nil {
			return n, p.peerErr(err)
		}
		n += k
		b = b[k:]
	}
	return n, nil
}

// ReadFrom sends what r yields, reading straight into the frame buffer:
// one Write per chunk.
func (p *Putter) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, 5+chunk)
	var n int64
	for {
		k, err := io.ReadFull(r, buf[5:])
		if k > 0 {
			buf[0] = FrameData
			putLen(buf[1:5], k)
			if _, werr := p.c.Write(buf[:5+k]); werr != nil {
				return n, p.peerErr(werr)
			}
			n += int64(k)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// peerErr is the agent's reason when a write failed because the agent
// gave up (it answers before it closes: no space left, say), else err.
func (p *Putter) peerErr(err error) error {
	if d, ok := p.c.(interface{ SetReadDeadline(time.Time) error }); !ok || d.SetReadDeadline(time.Now().Add(peerErrWait)) != nil {
		return err
	}
	if rep, rerr := readReply(p.c); rerr == nil && !rep.OK {
		return remoteErr(rep)
	}
	return err
}

// peerErrWait bounds peerErr's wait for the agent's reason.
const peerErrWait = 2 * time.Second

// Finish ends the file and returns the agent's verdict (once; later calls
// return the same).
func (p *Putter) Finish() error {
	if p.done {
		return p.err
	}
	p.done = true
	if !p.sent {
		if p.err = WriteFrame(p.c, FrameEOF, nil); p.err != nil {
			return p.err
		}
	}
	rep, err := readReply(p.c)
	switch {
	case err != nil:
		p.err = err
	case !rep.OK:
		p.err = remoteErr(rep)
	}
	return p.err
}

// Getter is the host's side of OpGet, after Open: it yields exactly the
// Size the agent announced, and fails on anything else (a frame of another
// type, more or fewer bytes), so a hostile guest can make the host write
// no more than it announced.
type Getter struct {
	Info FileInfo
	r    io.Reader
	left uint64
	cur  []byte // unread part of the current frame
	buf  []byte
	err  error
}

// StartGet reads the agent's answer to OpGet's Open.
func StartGet(r io.Reader) (*Getter, error) {
	rep, err := readReply(r)
	if err != nil {
		return nil, err
	}
	if !rep.OK {
		return nil, remoteErr(rep)
	}
	var info FileInfo
	if err := ssh.Unmarshal(rep.Payload, &info); err != nil {
		return nil, fmt.Errorf("bulk get: bad file info: %w", err)
	}
	return &Getter{Info: info, r: r, left: info.Size}, nil
}

// next reads the next frame into g.cur; io.EOF once the file is complete.
func (g *Getter) next() error {
	if g.err != nil {
		return g.err
	}
	typ, p, err := ReadFrame(g.r, g.buf)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		g.err = fmt.Errorf("bulk get: %w (%d bytes missing)", err, g.left)
		return g.err
	}
	g.buf = p[:cap(p)]
	switch typ {
	case FrameData:
		if len(p) == 0 {
			// An agent never sends one; a guest that did could keep the
			// host reading frames forever without coming nearer the end.
			g.err = errors.New("bulk get: the guest sent an empty data frame")
			return g.err
		}
		if uint64(len(p)) > g.left {
			g.err = fmt.Errorf("bulk get: the guest sent more than the %d bytes it announced", g.Info.Size)
			return g.err
		}
		g.left -= uint64(len(p))
		g.cur = p
		return nil
	case FrameEOF:
		if g.left != 0 {
			g.err = fmt.Errorf("bulk get: the guest sent %d of the %d bytes it announced", g.Info.Size-g.left, g.Info.Size)
			return g.err
		}
		g.err = io.EOF
		return io.EOF
	case FrameReply:
		var rep Reply
		if err := ssh.Unmarshal(p, &rep); err != nil || rep.OK {
			g.err = fmt.Errorf("bulk get: unexpected reply")
		} else {
			g.err = remoteErr(rep)
		}
		return g.err
	default:
		g.err = fmt.Errorf("bulk get: unexpected frame type %d", typ)
		return g.err
	}
}

// Read reads the file's contents.
func (g *Getter) Read(b []byte) (int, error) {
	for len(g.cur) == 0 {
		if err := g.next(); err != nil {
			return 0, err
		}
	}
	n := copy(b, g.cur)
	g.cur = g.cur[n:]
	return n, nil
}

// WriteTo writes the file's contents to w, a frame per Write.
func (g *Getter) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for {
		if len(g.cur) == 0 {
			if err := g.next(); err != nil {
				if errors.Is(err, io.EOF) {
					return n, nil
				}
				return n, err
			}
		}
		k, err := w.Write(g.cur)
		n += int64(k)
		g.cur = g.cur[k:]
		if err != nil {
			return n, err
		}
	}
}
