// Package bulk is banger's unencrypted data path between bangerd and the
// guest agent, next to SSH on the same channel (one yamux stream on
// virtio-serial, one connection on vsock).
//
// The channel is private to the VM's owner where it is a 0600 unix socket in
// a 0700 directory, but any local user can connect to an AF_VSOCK port, so
// every bulk stream starts with the per-VM key from the boot configuration:
//
//	host → agent: Magic (12 bytes) + key (KeySize bytes)
//	agent → host: Accepted or Refused (4 bytes); on Refused it closes.
//
// The agent tells a bulk stream from an SSH one by its first byte (an SSH
// client starts with "SSH-"). After the hello the stream carries frames
// (type byte, big-endian uint32 length, payload of at most MaxFrame bytes):
// the host opens the stream with one FrameOpen (an Open message), then each
// side sends what the operation defines. OpSession mirrors an SSH "session"
// channel (requests, stdin, stdout, stderr, exit status) without encryption;
// OpZero and OpSink measure the raw channel.
//
// Everything the guest sends is hostile to the host: frames are bounded and
// the host decides every path it writes.
package bulk

import (
	"bufio"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/memcopy"
)

// Magic starts every bulk stream. Its first byte can never start an SSH
// identification line.
const Magic = "BANGERBULK1\n"

// KeySize is the size of the per-VM bulk key.
const KeySize = 32

// The agent's answer to the hello.
const (
	Accepted = "BOK1"
	Refused  = "BNO1"
)

// MaxFrame bounds a frame's payload in both directions.
const MaxFrame = 1 << 20

// chunk is the size of the data frames a Chan writes.
const chunk = 256 << 10

// Frame types.
const (
	FrameOpen    byte = 1 // Open (host → agent, first frame)
	FrameData    byte = 2 // stdin (host → agent) or stdout (agent → host)
	FrameStderr  byte = 3 // agent → host
	FrameEOF     byte = 4 // no more FrameData from the sender
	FrameRequest byte = 5 // Request
	FrameReply   byte = 6 // Reply to a Request that wanted one
	FrameClose   byte = 7 // the sender is done with the stream
)

// Operations.
const (
	OpSession = "session" // an SSH-like session: requests, then data
	OpZero    = "zero"    // the agent writes N zero bytes, unframed, then closes
	OpSink    = "sink"    // the agent reads N unframed bytes (or until EOF), then writes their count (8 bytes)
	OpSync    = "sync"    // a workspace push: see sync.go
)

// Open is FrameOpen's payload (SSH wire encoding).
type Open struct {
	Op   string
	User string
	N    uint64
	Arg  string // OpSync: the destination directory in the guest
}

// Request is FrameRequest's payload: an SSH channel request.
type Request struct {
	Type      string
	WantReply bool
	Payload   []byte
}

// Reply is FrameReply's payload.
type Reply struct {
	OK      bool
	Payload []byte
}

// NewKey returns a fresh random bulk key.
func NewKey() ([]byte, error) {
	k := make([]byte, KeySize)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("random bulk key: %w", err)
	}
	return k, nil
}

// ErrRefused means the agent refused the bulk key.
var ErrRefused = errors.New("the guest agent refused the bulk stream's key")

// ErrUnsupported means the agent does not serve bulk streams (an older agent
// answered as an SSH server).
var ErrUnsupported = errors.New("the guest agent does not serve bulk streams")

// Hello runs the host side of the hello on c. A deadline on c bounds it.
func Hello(c io.ReadWriter, key []byte) error {
	if err := WriteHello(c, key); err != nil {
		return err
	}
	return ReadAnswer(c)
}

// WriteHello sends the host's half of the hello (Hello without waiting for
// the answer; see AfterHello).
func WriteHello(w io.Writer, key []byte) error {
	if len(key) != KeySize {
		return fmt.Errorf("bulk key has %d bytes, want %d", len(key), KeySize)
	}
	msg := make([]byte, 0, len(Magic)+KeySize)
	msg = append(append(msg, Magic...), key...)
	if _, err := w.Write(msg); err != nil {
		return fmt.Errorf("bulk hello: %w", err)
	}
	return nil
}

// ReadAnswer reads the agent's answer to the hello: nil when it accepted
// the key, ErrRefused or ErrUnsupported (wrapped) when not.
func ReadAnswer(c io.Reader) error {
	var ans [4]byte
	if _, err := io.ReadFull(c, ans[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w (the stream closed)", ErrRefused)
		}
		return fmt.Errorf("bulk hello: %w", err)
	}
	switch string(ans[:]) {
	case Accepted:
		return nil
	case Refused:
		return ErrRefused
	}
	if string(ans[:]) == "SSH-" {
		return ErrUnsupported
	}
	return fmt.Errorf("bulk hello: unexpected answer %q", ans[:])
}

// PeekConn is a connection whose first bytes have been peeked. R yields
// every byte: what the peek buffered, then straight from Conn, in reads
// of at most SplitReads bytes.
type PeekConn struct {
	net.Conn
	R io.Reader
}

// Whole returns a reader of the same bytes as R whose reads are not split:
// for a consumer that only counts what it reads (the raw channel's sink).
func (p *PeekConn) Whole() io.Reader {
	if d, ok := p.R.(*drained); ok {
		return &drained{br: d.br, c: d.c}
	}
	return p.R
}

// SplitReads bounds one read of a stream in the agent (0: no bound): a
// read gets its bytes from yamux's buffer in one copy, kept under the size
// at which an unaligned copy is slow (see package memcopy; with these
// reads a 100 MiB cp into the guest took 28% less of its vCPU,
// docs/BENCHMARKS.md).
var SplitReads = memcopy.Chunk

// drained reads what br holds, then straight from c. br serves only the
// peek: read through it, every frame's header would pull up to its size of
// the payload after it into its buffer, and that part of the payload would
// be copied once more on its way to the frame's buffer. Under emulation a
// stream's copies are what its guest CPU goes to. split bounds each read
// from c (SplitReads).
type drained struct {
	br    *bufio.Reader
	c     io.Reader
	split int
}

func (d *drained) Read(p []byte) (int, error) {
	if n := d.br.Buffered(); n > 0 {
		return d.br.Read(p[:min(len(p), n)])
	}
	if d.split > 0 && len(p) > d.split {
		p = p[:d.split]
	}
	return d.c.Read(p)
}

func (p *PeekConn) Read(b []byte) (int, error) { return p.R.Read(b) }

// CloseWrite half-closes the connection when the underlying one can.
func (p *PeekConn) CloseWrite() error {
	if cw, ok := p.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Classify looks at c's first byte (waiting at most wait): it reports
// whether c is a bulk stream and returns a connection that still yields
// every byte. A client that sends nothing within wait is taken for SSH (an
// SSH client that waits for the server's identification first).
func Classify(c net.Conn, wait time.Duration) (bool, net.Conn) {
	br := bufio.NewReaderSize(c, 64<<10)
	_ = c.SetReadDeadline(time.Now().Add(wait))
	b, err := br.Peek(1)
	_ = c.SetReadDeadline(time.Time{})
	pc := &PeekConn{Conn: c, R: &drained{br: br, c: c, split: SplitReads}}
	if err != nil || len(b) == 0 {
		return false, pc
	}
	return b[0] == Magic[0], pc
}

// Accept runs the agent side of the hello on a stream Classify called bulk.
// It compares the key in constant time; a stream without the right key (or
// an agent without a key) is refused and closed.
func Accept(c net.Conn, key []byte, wait time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(wait))
	defer c.SetDeadline(time.Time{})
	buf := make([]byte, len(Magic)+KeySize)
	if _, err := io.ReadFull(c, buf); err != nil {
		c.Close()
		return fmt.Errorf("bulk hello: %w", err)
	}
	okMagic := string(buf[:len(Magic)]) == Magic
	okKey := len(key) == KeySize && subtle.ConstantTimeCompare(buf[len(Magic):], key) == 1
	if !okMagic || !okKey {
		_, _ = c.Write([]byte(Refused))
		c.Close()
		if !okMagic {
			return errors.New("bulk hello: bad magic")
		}
		return errors.New("bulk hello: wrong or missing key")
	}
	if _, err := c.Write([]byte(Accepted)); err != nil {
		c.Close()
		return fmt.Errorf("bulk hello: %w", err)
	}
	return nil
}

// WriteFrame writes one frame in a single write.
func WriteFrame(w io.Writer, typ byte, payload []byte) error {
	_, err := appendWrite(w, nil, typ, payload)
	return err
}

// appendWrite writes one frame with one Write, assembling it in buf (grown
// as needed and returned for reuse).
func appendWrite(w io.Writer, buf []byte, typ byte, payload []byte) ([]byte, error) {
	if len(payload) > MaxFrame {
		return buf, fmt.Errorf("bulk frame of %d bytes exceeds %d", len(payload), MaxFrame)
	}
	buf = append(buf[:0], typ, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(buf[1:5], uint32(len(payload)))
	buf = memcopy.Append(buf, payload) // after the 5-byte header: see package memcopy
	_, err := w.Write(buf)
	return buf, err
}

// ReadFrame reads one frame into buf (grown as needed, never beyond
// MaxFrame) and returns its type and payload (valid until the next call).
func ReadFrame(r io.Reader, buf []byte) (byte, []byte, error) {
	typ, n, err := readHeader(r)
	if err != nil {
		return 0, buf[:0], err
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if err := readPayload(r, buf); err != nil {
		return 0, buf[:0], err
	}
	return typ, buf, nil
}

// readHeader reads a frame's header: its type and payload length (checked
// against MaxFrame).
func readHeader(r io.Reader) (byte, int, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, 0, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > MaxFrame {
		return 0, 0, fmt.Errorf("bulk frame of %d bytes exceeds %d", n, MaxFrame)
	}
	return hdr[0], int(n), nil
}

func readPayload(r io.Reader, p []byte) error {
	if _, err := io.ReadFull(r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

// ReadOpen reads the stream's first frame, which must be FrameOpen.
func ReadOpen(r io.Reader) (Open, error) {
	typ, p, err := ReadFrame(r, nil)
	if err != nil {
		return Open{}, err
	}
	var o Open
	if typ != FrameOpen {
		return o, fmt.Errorf("bulk stream starts with frame type %d, not open", typ)
	}
	if err := ssh.Unmarshal(p, &o); err != nil {
		return o, fmt.Errorf("bulk open: %w", err)
	}
	return o, nil
}

// WriteOpen writes the stream's first frame.
func WriteOpen(w io.Writer, o Open) error {
	return WriteFrame(w, FrameOpen, ssh.Marshal(&o))
}

// queue is a bounded queue of the payloads of data frames: the reader
// keeps each frame's buffer (no copy) and WriteTo hands it to the consumer
// whole, so a frame's bytes are copied once between the stream and, say,
// a command's stdin pipe. push blocks while it holds max bytes.
type queue struct {
	mu   sync.Mutex
	cond *sync.Cond
	bufs [][]byte // payloads, oldest first; bufs[0] may be partly read
	size int      // bytes in bufs
	max  int
	eof  bool  // no more writes; reads drain then see io.EOF
	err  error // closed: reads and writes fail with it
}

func newQueue(max int) *queue {
	q := &queue{max: max}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// bufPool holds chunk-sized frame buffers.
var bufPool = sync.Pool{New: func() any { b := make([]byte, chunk); return &b }}

// getBuf returns a buffer of n bytes, from the pool when n fits a chunk.
func getBuf(n int) []byte {
	if n > chunk {
		return make([]byte, n)
	}
	return (*bufPool.Get().(*[]byte))[:n]
}

// putBuf gives back a buffer getBuf returned (others are left to the GC).
func putBuf(b []byte) {
	if cap(b) != chunk {
		return
	}
	b = b[:chunk]
	bufPool.Put(&b)
}

// push queues p, which the queue now owns (a getBuf buffer).
func (q *queue) push(p []byte) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.err == nil && !q.eof && q.size >= q.max {
		q.cond.Wait()
	}
	if q.err != nil {
		putBuf(p)
		return q.err
	}
	if q.eof {
		putBuf(p)
		return errors.New("bulk: data after EOF")
	}
	if len(p) == 0 {
		putBuf(p)
		return nil
	}
	q.bufs = append(q.bufs, p)
	q.size += len(p)
	q.cond.Broadcast()
	return nil
}

// write queues a copy of p.
func (q *queue) write(p []byte) error {
	b := getBuf(len(p))
	copy(b, p)
	return q.push(b)
}

// wait waits for data, EOF or failure; with q.mu held.
func (q *queue) wait() {
	for q.size == 0 && !q.eof && q.err == nil {
		q.cond.Wait()
	}
}

func (q *queue) Read(p []byte) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.wait()
	if q.size > 0 {
		n := 0
		for n < len(p) && len(q.bufs) > 0 {
			k := copy(p[n:], q.bufs[0])
			n += k
			q.consume(k)
		}
		q.cond.Broadcast()
		return n, nil
	}
	if q.err != nil {
		return 0, q.err
	}
	return 0, io.EOF
}

// consume drops k bytes from the head buffer; with q.mu held.
func (q *queue) consume(k int) {
	q.size -= k
	if k < len(q.bufs[0]) {
		q.bufs[0] = q.bufs[0][k:]
		return
	}
	putBuf(q.bufs[0][:0:cap(q.bufs[0])])
	q.bufs[0] = nil
	q.bufs = q.bufs[1:]
	if len(q.bufs) == 0 {
		q.bufs = nil
	}
}

// WriteTo writes the queued frames to w as they come, each in one Write,
// until EOF. It is what io.Copy uses, so a command's stdin gets whole
// frames, not 32 KiB pieces of copies.
func (q *queue) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for {
		q.mu.Lock()
		q.wait()
		if q.size == 0 {
			err := q.err
			q.mu.Unlock()
			return n, err // nil at EOF
		}
		b := q.bufs[0]
		q.mu.Unlock()
		// Only this goroutine consumes: b stays at the head meanwhile.
		k, err := w.Write(b)
		n += int64(k)
		q.mu.Lock()
		if len(q.bufs) > 0 && len(b) > 0 && &q.bufs[0][0] == &b[0] {
			q.consume(k)
		}
		q.cond.Broadcast()
		q.mu.Unlock()
		if err != nil {
			return n, err
		}
		if k < len(b) {
			return n, io.ErrShortWrite
		}
	}
}

func (q *queue) closeWrite() {
	q.mu.Lock()
	q.eof = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

func (q *queue) fail(err error) {
	q.mu.Lock()
	if q.err == nil {
		q.err = err
	}
	// What was queued stays readable; push now fails.
	q.cond.Broadcast()
	q.mu.Unlock()
}

// closeWait bounds how long Close waits to say goodbye to the peer.
const closeWait = time.Second

// queueSize bounds what a Chan buffers of each incoming data stream.
const queueSize = 4 << 20

// Chan is one session over a bulk stream, usable from either end. On the
// agent it satisfies ssh.Channel. Incoming data (and, on the host, stderr)
// is buffered up to queueSize; beyond that the reader stops reading the
// stream, so requests behind unread data wait too.
type Chan struct {
	conn    net.Conn
	r       io.Reader
	wmu     sync.Mutex
	in      *queue
	errIn   *queue
	reqs    chan Request
	reply   chan Reply
	done    chan struct{}
	closing chan struct{} // closed by Close
	closed  sync.Once
	sentEOF bool
	wbuf    []byte
	// dev: the session's spool form (NewSpoolChan); readLoop alone uses
	// dev, nextSlot and dbuf.
	dev      SpoolDev
	nextSlot int
	dbuf     []byte
}

// NewChan starts serving frames on conn (after the hello and Open).
func NewChan(conn net.Conn) *Chan { return newChan(conn, nil) }

// NewSpoolChan is NewChan for a session's spool form (see SpoolOp): the
// peer's FrameSpool frames announce data in slots of dev, which the Chan
// reads, acknowledges and yields as it yields FrameData.
func NewSpoolChan(conn net.Conn, dev SpoolDev) *Chan { return newChan(conn, dev) }

func newChan(conn net.Conn, dev SpoolDev) *Chan {
	c := &Chan{
		dev:     dev,
		conn:    conn,
		in:      newQueue(queueSize),
		errIn:   newQueue(queueSize),
		reqs:    make(chan Request, 16),
		reply:   make(chan Reply, 1),
		done:    make(chan struct{}),
		closing: make(chan struct{}),
	}
	if pc, ok := conn.(*PeekConn); ok {
		// The agent's streams: read what the peek buffered, then
		// straight from the stream. A 256 KiB buffer per stream would cost
		// the emulated guest its zeroing and page faults on every exec,
		// and a copy of each frame's first bytes.
		c.r = pc.R
	} else {
		c.r = bufio.NewReaderSize(conn, 256<<10)
	}
	go c.readLoop()
	return c
}

func (c *Chan) readLoop() {
	defer close(c.reqs)
	defer close(c.done)
	defer func() {
		if c.dbuf != nil {
			putDirectBuf(c.dbuf)
		}
	}()
	var buf []byte
	var err error
	for {
		var typ byte
		var n int
		typ, n, err = readHeader(c.r)
		if err != nil {
			break
		}
		var p []byte
		if typ == FrameSpool && c.dev != nil {
			var sf [8]byte
			if n != len(sf) {
				err = fmt.Errorf("bulk: spool frame of %d bytes, want 8", n)
				break
			}
			if err = readPayload(c.r, sf[:]); err != nil {
				break
			}
			if err = c.readSlot(sf[:]); err != nil {
				break
			}
			continue
		}
		if typ == FrameData || typ == FrameStderr {
			// read into a buffer the queue keeps: no copy
			p = getBuf(n)
			if err = readPayload(c.r, p); err != nil {
				putBuf(p)
				break
			}
			if typ == FrameData {
				err = c.in.push(p)
			} else {
				err = c.errIn.push(p)
			}
			if err != nil {
				break
			}
			continue
		}
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		p = buf[:n]
		if err = readPayload(c.r, p); err != nil {
			break
		}
		switch typ {
		case FrameEOF:
			c.in.closeWrite()
		case FrameRequest:
			var r Request
			if err = ssh.Unmarshal(p, &r); err == nil {
				r.Payload = append([]byte(nil), r.Payload...)
				// the peer may send requests nobody reads: Close
				// must still end this loop
				select {
				case c.reqs <- r:
				case <-c.closing:
					err = net.ErrClosed
				}
			}
		case FrameReply:
			var r Reply
			if err = ssh.Unmarshal(p, &r); err == nil {
				r.Payload = append([]byte(nil), r.Payload...)
				select {
				case c.reply <- r:
				default:
					err = errors.New("bulk: unexpected reply")
				}
			}
		case FrameClose:
			err = io.EOF
		default:
			err = fmt.Errorf("bulk: unknown frame type %d", typ)
		}
		if err != nil {
			break
		}
	}
	if errors.Is(err, io.EOF) {
		c.in.closeWrite()
		c.errIn.closeWrite()
		return
	}
	c.in.fail(err)
	c.errIn.fail(err)
}

// readSlot queues the data of the slot that p (a FrameSpool's payload)
// announces, in buffers of a chunk, and acknowledges the slot.
func (c *Chan) readSlot(p []byte) error {
	slot, n, err := parseSpoolFrame(p)
	if err == nil && slot != c.nextSlot {
		err = fmt.Errorf("spool slot %d where %d was due", slot, c.nextSlot)
	}
	if err != nil {
		return fmt.Errorf("bulk: %w", err)
	}
	c.nextSlot = (c.nextSlot + 1) % SpoolSlots
	var bufs, iov [SpoolSlot / chunk][]byte
	k, aligned := 0, true
	for off := 0; off < n; off += chunk {
		b := getBuf(min(chunk, n-off))
		bufs[k], iov[k] = b, b[:alignUp(len(b))]
		aligned = aligned && pageAligned(b)
		k++
	}
	if vd, ok := c.dev.(VectorDev); ok && aligned {
		// the whole slot in one request
		err = vd.ReadvAt(iov[:k], SlotOffset(slot))
		if err != nil {
			err = fmt.Errorf("read the spool: %w", err)
		}
	} else {
		for i := range k {
			if err = c.readSpool(iov[i], SlotOffset(slot)+int64(i*chunk)); err != nil {
				break
			}
		}
	}
	if err != nil {
		for _, b := range bufs[:k] {
			putBuf(b)
		}
		return err
	}
	for i, b := range bufs[:k] {
		if err := c.in.push(b); err != nil {
			for _, b := range bufs[i+1 : k] {
				putBuf(b)
			}
			return err
		}
	}
	return c.send(FrameSpoolAck, ackFrame(slot))
}

// VectorDev is a SpoolDev that reads into several page-aligned buffers in
// one call (the agent's device: one request for a slot, not one a buffer).
type VectorDev interface {
	ReadvAt(bufs [][]byte, off int64) error
}

// ReadvFull fills bufs from f at off with preadv, as many times as it
// takes; every buffer's length is a multiple of a page (O_DIRECT).
func ReadvFull(f *os.File, bufs [][]byte, off int64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	for len(bufs) > 0 {
		var n int
		var rerr error
		if err := rc.Control(func(fd uintptr) {
			for {
				n, rerr = unix.Preadv(int(fd), bufs, off)
				if !errors.Is(rerr, unix.EINTR) {
					return
				}
			}
		}); err != nil {
			return err
		}
		switch {
		case rerr != nil:
			return rerr
		case n == 0:
			return io.ErrUnexpectedEOF
		case n%spoolAlign != 0:
			return fmt.Errorf("a read of %d bytes, not a multiple of %d", n, spoolAlign)
		}
		off += int64(n)
		for n > 0 {
			if n >= len(bufs[0]) {
				n -= len(bufs[0])
				bufs = bufs[1:]
				continue
			}
			bufs[0] = bufs[0][n:]
			n = 0
		}
	}
	return nil
}

func pageAligned(b []byte) bool {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b)))%spoolAlign == 0
}

// readSpool reads b (a multiple of a page) from the spool device at off
// (a page's multiple): straight into b when b starts on a page, as the
// pool's chunk buffers do, else through a page-aligned buffer.
func (c *Chan) readSpool(b []byte, off int64) error {
	if pageAligned(b) {
		if _, err := c.dev.ReadAt(b, off); err != nil {
			return fmt.Errorf("read the spool: %w", err)
		}
		return nil
	}
	if c.dbuf == nil {
		d, err := getDirectBuf()
		if err != nil {
			return err
		}
		c.dbuf = d
	}
	d := c.dbuf[:len(b)]
	if _, err := c.dev.ReadAt(d, off); err != nil {
		return fmt.Errorf("read the spool: %w", err)
	}
	memcopy.Copy(b, d)
	return nil
}

func (c *Chan) send(typ byte, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	var err error
	c.wbuf, err = appendWrite(c.conn, c.wbuf, typ, p)
	return err
}

// Requests returns the peer's requests; it is closed when the stream ends.
func (c *Chan) Requests() <-chan Request { return c.reqs }

// Done is closed when the peer's frames have ended.
func (c *Chan) Done() <-chan struct{} { return c.done }

// Read reads the peer's data (stdin on the agent, stdout on the host).
func (c *Chan) Read(p []byte) (int, error) { return c.in.Read(p) }

// WriteTo writes the peer's data to w until EOF, a frame per Write (what
// io.Copy uses). Like Read, it is for one reader at a time.
func (c *Chan) WriteTo(w io.Writer) (int64, error) { return c.in.WriteTo(w) }

// ReadStderr reads the agent's stderr (host side).
func (c *Chan) ReadStderr(p []byte) (int, error) { return c.errIn.Read(p) }

// Write sends data.
func (c *Chan) Write(p []byte) (int, error) { return c.write(FrameData, p) }

func (c *Chan) write(typ byte, p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), chunk)
		if err := c.send(typ, p[:k]); err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// ReadFrom sends what r yields as data, in frames of up to 256 KiB.
func (c *Chan) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, chunk)
	var n int64
	for {
		k, err := r.Read(buf)
		if k > 0 {
			if werr := c.send(FrameData, buf[:k]); werr != nil {
				return n, werr
			}
			n += int64(k)
		}
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// CloseWrite says no more data will follow.
func (c *Chan) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.sentEOF {
		return nil
	}
	c.sentEOF = true
	var err error
	c.wbuf, err = appendWrite(c.conn, c.wbuf, FrameEOF, nil)
	return err
}

// Close ends the stream.
func (c *Chan) Close() error {
	c.closed.Do(func() {
		close(c.closing)
		// a write the peer never reads holds the write lock: the
		// deadline ends it, and bounds this goodbye
		_ = c.conn.SetWriteDeadline(time.Now().Add(closeWait))
		_ = c.send(FrameClose, nil)
		c.conn.Close()
		c.in.fail(net.ErrClosed)
		c.errIn.fail(net.ErrClosed)
	})
	return nil
}

// SendRequest sends a request and, when wantReply, waits for its reply.
func (c *Chan) SendRequest(name string, wantReply bool, payload []byte) (bool, error) {
	if err := c.send(FrameRequest, ssh.Marshal(&Request{Type: name, WantReply: wantReply, Payload: payload})); err != nil {
		return false, err
	}
	if !wantReply {
		return false, nil
	}
	select {
	case r := <-c.reply:
		return r.OK, nil
	case <-c.done:
		return false, io.EOF
	case <-c.closing:
		return false, net.ErrClosed
	}
}

// SendReply answers a request that wanted a reply.
func (c *Chan) SendReply(ok bool, payload []byte) error {
	return c.send(FrameReply, ssh.Marshal(&Reply{OK: ok, Payload: payload}))
}

// Stderr writes stderr frames (agent side).
func (c *Chan) Stderr() io.ReadWriter { return stderrRW{c} }

type stderrRW struct{ c *Chan }

func (s stderrRW) Write(p []byte) (int, error) { return s.c.write(FrameStderr, p) }
func (s stderrRW) Read(p []byte) (int, error)  { return s.c.errIn.Read(p) }

var _ ssh.Channel = (*Chan)(nil)
