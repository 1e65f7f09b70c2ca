package bulk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/memcopy"
)

// The spool: one file's contents, or a workspace push's stream, between
// bangerd and the agent through a block device instead of the channel.
//
// Under TCG the channel (virtio-serial) is bound by QEMU's main loop, which
// moves 4 KiB per turn into the guest, and by the guest's copies of every
// byte; a virtio-blk device moves a request of a MiB at a time on QEMU's
// I/O threads, straight between the host file and guest memory, and the
// guest reads or writes it with O_DIRECT: no copy on the guest's (emulated)
// CPU at all (the guest copies 100 MiB from one O_DIRECT file to another in
// ~80 ms here, against ~280 ms for the raw channel to carry it).
//
// Every VM has a spool device: a file bangerd makes in the VM's directory
// (SpoolSize bytes, sparse, SpoolMagic at offset 0) and attaches as a
// virtio-blk drive. Past SpoolHeader it is SpoolSlots slots of SpoolSlot
// bytes. bangerd carries one transfer at a time through it (others use
// the channel), and punches the slots out of the host file after each.
// A push's stream form (SpoolStream, SpoolReader) is described there.
//
// A one-file operation (OpPut, OpGet, OpPutFile without inline contents,
// OpGetFile) whose Op carries SpoolSuffix runs as the plain one, except
// that its contents travel in slots:
//
//   - host → agent: bangerd writes up to SpoolSlot bytes of the file into
//     the next slot of the host file and sends FrameSpool (slot, length)
//     where the plain operation sends FrameData; the agent reads the slot
//     from the device (O_DIRECT), writes it to the file and answers
//     FrameSpoolAck (the slot), after which the slot may be used again.
//   - agent → host: the agent writes the next slot on the device and sends
//     FrameSpool; bangerd reads the slot from the host file, passes the
//     bytes on to its client as FrameData and answers FrameSpoolAck; the
//     agent writes a slot again only after its ack, and waits for every
//     ack before the operation ends.
//
// Slots go round in order (0, 1, …, SpoolSlots-1, 0, …) in each direction,
// and each side checks that every FrameSpool and ack is the one due. The
// agent runs one spool operation at a time, and answers a second (or one
// with no spool device) with a not-OK reply starting with Unsupported,
// before it does anything else: bangerd then opens a plain stream.
//
// bangerd's client never sees the spool: it speaks the plain operation,
// and bangerd relays (RelaySpool). What the guest says is hostile: bangerd
// accepts only the slot due next and a length within a slot, and reads
// nothing of the host file but that slot; the client checks the sizes as
// it does for a plain stream.
const SpoolSuffix = ".spool"

// A session's spool form (OpSession with SpoolSuffix: `banger exec -i`
// with a file or a pipe on stdin) carries the host's larger data frames,
// the command's stdin, in slots and everything else on frames as they
// were: bangerd fills a slot from data frames of sessionSpoolMin bytes or
// more while more are at hand, and sends the slot when it is full, when
// another frame comes (which follows it, in order) or when the client has
// nothing more at hand; a smaller data frame (what a person types) goes on
// the channel at once. The agent's frames, the command's output, stay on
// the channel. A session has no answer of its own before the host's
// requests, so the agent first answers the spool form with an OK
// FrameReply (SpoolAccept), which bangerd takes and does not pass on.

// SpoolOp splits an operation into the plain one and whether it carries
// SpoolSuffix, for the operations that have a spool form.
func SpoolOp(op string) (string, bool) {
	base, ok := strings.CutSuffix(op, SpoolSuffix)
	if !ok {
		return op, false
	}
	switch base {
	case OpPut, OpGet, OpPutFile, OpGetFile, OpSync, OpSession:
		return base, true
	}
	return op, false
}

// SpoolStream says whether op's spool form carries the whole stream from
// the host after the Open in slots (a workspace push: its requests and
// data interleave, a frame per file, and go in slots together), rather than
// its data frames alone (the one-file operations, whose data the agent
// reads from the device straight into its write buffers).
func SpoolStream(op string) bool { return op == OpSync }

// SpoolAccept is the agent's first frame on a session's spool form: the
// spool is taken (bangerd does not pass it on).
func SpoolAccept(c io.Writer) error {
	return WriteFrame(c, FrameReply, ssh.Marshal(&Reply{OK: true}))
}

// sessionSpoolMin is the smallest data frame of a session that goes in a
// slot: below it (a line typed, a small script piped in) a frame on the
// channel costs less than a slot's round trip.
const sessionSpoolMin = 64 << 10

// SpoolReader is the agent's side of a stream spool (SpoolStream): each
// FrameSpool that r carries announces a slot holding the stream's next
// bytes; the reader reads the slot from dev, acknowledges it on c at once
// (the bytes are in its buffer) and yields them.
type SpoolReader struct {
	r    io.Reader
	c    io.Writer
	dev  SpoolDev
	buf  []byte // a mapped, page-aligned buffer of SpoolSlot bytes
	cur  []byte
	next int
	hdr  [8]byte
	err  error
}

// NewSpoolReader reads the stream that r announces in slots of dev; Close
// gives its buffer back.
func NewSpoolReader(r io.Reader, c io.Writer, dev SpoolDev) (*SpoolReader, error) {
	buf, err := getDirectBuf()
	if err != nil {
		return nil, err
	}
	return &SpoolReader{r: r, c: c, dev: dev, buf: buf}, nil
}

func (s *SpoolReader) Read(p []byte) (int, error) {
	for len(s.cur) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		s.err = s.fill()
	}
	n := memcopy.Copy(p, s.cur)
	s.cur = s.cur[n:]
	return n, nil
}

// fill reads the next slot into the buffer.
func (s *SpoolReader) fill() error {
	typ, p, err := ReadFrame(s.r, s.hdr[:0])
	if err != nil {
		return err // io.EOF: the stream ended between slots
	}
	if typ != FrameSpool {
		return fmt.Errorf("spool stream: unexpected frame type %d", typ)
	}
	slot, n, err := parseSpoolFrame(p)
	if err == nil && slot != s.next {
		err = fmt.Errorf("spool slot %d where %d was due", slot, s.next)
	}
	if err != nil {
		return fmt.Errorf("spool stream: %w", err)
	}
	s.next = (s.next + 1) % SpoolSlots
	if _, err := s.dev.ReadAt(s.buf[:alignUp(n)], SlotOffset(slot)); err != nil {
		return fmt.Errorf("read the spool: %w", err)
	}
	if err := WriteFrame(s.c, FrameSpoolAck, ackFrame(slot)); err != nil {
		return err
	}
	s.cur = s.buf[:n]
	return nil
}

// Close gives the reader's buffer back.
func (s *SpoolReader) Close() {
	if s.buf != nil {
		putDirectBuf(s.buf)
		s.buf, s.cur = nil, nil
		if s.err == nil {
			s.err = net.ErrClosed
		}
	}
}

// Spool frame types.
const (
	FrameSpool    byte = 8 // slot uint32, length uint32: a slot holds data
	FrameSpoolAck byte = 9 // slot uint32: the slot is free again
)

// The spool device's layout.
const (
	// SpoolMagic starts the device (the agent finds it by it).
	SpoolMagic = "BANGERSPOOL1\n"
	// SpoolHeader is where the first slot starts.
	SpoolHeader = 1 << 20
	// SpoolSlot is one slot's size: one of the agent's O_DIRECT buffers.
	SpoolSlot = directBuf
	// SpoolSlots is how many slots are in flight at most.
	SpoolSlots = 8
	// SpoolSize is the device's size.
	SpoolSize = SpoolHeader + SpoolSlots*SpoolSlot
)

// spoolMin is the smallest file the agent sends through the spool: below
// it, a frame or two on the channel costs less than a slot's round trip.
// (The host sends through the spool only what is not inline: more than
// MaxInline.)
const spoolMin = 256 << 10

// spoolAlign is the alignment of every device read and write: a page,
// which covers the logical block sizes a virtio-blk device has.
const spoolAlign = directAlign

// SlotOffset is where slot i starts on the device and in the host file.
func SlotOffset(i int) int64 { return SpoolHeader + int64(i)*SpoolSlot }

// SpoolDev is the spool device as the agent uses it (an *os.File opened
// with O_DIRECT): every offset, length and buffer it is given is aligned
// to a page.
type SpoolDev interface {
	io.ReaderAt
	io.WriterAt
}

// spoolLock is held by the agent for a spool operation: one at a time.
var spoolLock sync.Mutex

// AcquireSpool takes the agent's spool for one operation; the release
// func gives it back. An error (a second one at once) is the answer to
// send (it starts with Unsupported).
func AcquireSpool() (func(), error) {
	if !spoolLock.TryLock() {
		return nil, errors.New(Unsupported + "the spool is busy")
	}
	return spoolLock.Unlock, nil
}

func spoolFrame(slot, n int) []byte {
	var b [8]byte
	binary.BigEndian.PutUint32(b[0:4], uint32(slot))
	binary.BigEndian.PutUint32(b[4:8], uint32(n))
	return b[:]
}

func parseSpoolFrame(p []byte) (slot, n int, err error) {
	if len(p) != 8 {
		return 0, 0, fmt.Errorf("spool frame of %d bytes, want 8", len(p))
	}
	s, l := binary.BigEndian.Uint32(p[0:4]), binary.BigEndian.Uint32(p[4:8])
	if s >= SpoolSlots {
		return 0, 0, fmt.Errorf("spool slot %d out of range", s)
	}
	if l == 0 || l > SpoolSlot {
		return 0, 0, fmt.Errorf("spool frame of %d bytes (1 to %d)", l, SpoolSlot)
	}
	return int(s), int(l), nil
}

func ackFrame(slot int) []byte {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(slot))
	return b[:]
}

func parseAck(p []byte) (int, error) {
	if len(p) != 4 {
		return 0, fmt.Errorf("spool ack of %d bytes, want 4", len(p))
	}
	s := binary.BigEndian.Uint32(p)
	if s >= SpoolSlots {
		return 0, fmt.Errorf("spool ack of slot %d out of range", s)
	}
	return int(s), nil
}

func alignUp(n int) int { return (n + spoolAlign - 1) &^ (spoolAlign - 1) }

// refuse answers a not-OK FrameReply with err.
func refuse(c io.Writer, err error) error {
	_ = WriteFrame(c, FrameReply, ssh.Marshal(&Reply{Payload: []byte(err.Error())}))
	return err
}

// receiveData writes the file's contents that r carries to f until
// FrameEOF: FrameData frames, or with dev, FrameSpool slots.
func receiveData(c io.Writer, r io.Reader, f dioFile, dev SpoolDev) error {
	if dev != nil {
		return receiveSpool(c, r, f, dev)
	}
	return receiveDirect(f, r)
}

// receiveSpool writes the slots r announces to f until FrameEOF.
func receiveSpool(c io.Writer, r io.Reader, f dioFile, dev SpoolDev) error {
	buf, err := getDirectBuf()
	if err != nil {
		return err
	}
	defer putDirectBuf(buf)
	w := &directWriter{f: f, direct: f.SetDirect(true) == nil}
	var hdr [8]byte
	next := 0
	for {
		typ, p, err := ReadFrame(r, hdr[:0])
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("receive the file: %w", err)
		}
		switch typ {
		case FrameSpool:
			slot, n, err := parseSpoolFrame(p)
			if err != nil {
				return fmt.Errorf("receive the file: %w", err)
			}
			if slot != next {
				return fmt.Errorf("receive the file: spool slot %d where %d was due", slot, next)
			}
			next = (next + 1) % SpoolSlots
			b := buf[:alignUp(n)]
			if _, err := dev.ReadAt(b, SlotOffset(slot)); err != nil {
				return fmt.Errorf("read the spool: %w", err)
			}
			if err := w.write(b[:n]); err != nil {
				return err
			}
			if err := WriteFrame(c, FrameSpoolAck, ackFrame(slot)); err != nil {
				return err
			}
		case FrameEOF:
			return nil
		default:
			return fmt.Errorf("receive the file: unexpected frame type %d", typ)
		}
	}
}

// sendData sends size bytes of f (whose path names it in errors): in
// FrameSpool slots with dev when there are spoolMin or more, else in
// FrameData frames (O_DIRECT when direct); then FrameEOF, or a not-OK
// FrameReply when it cannot.
func sendData(c io.Writer, r io.Reader, f *os.File, size int64, path string, direct bool, dev SpoolDev) error {
	if dev != nil && size >= spoolMin {
		return sendSpool(c, r, osFile{f}, size, path, dev)
	}
	return sendFileData(c, f, size, path, direct)
}

// sendSpool writes size bytes of f into the slots in order, announcing
// each, and reuses a slot only once the host has acknowledged it. Before
// it returns, every slot it announced has been acknowledged (or the stream
// failed), so the next transfer cannot overwrite one the host still reads.
func sendSpool(c io.Writer, r io.Reader, f dioReader, size int64, path string, dev SpoolDev) error {
	buf, err := getDirectBuf()
	if err != nil {
		return err
	}
	defer putDirectBuf(buf)
	// acks yields the acknowledged slots in order; it closes (with ackErr
	// set) when the stream ends or the host breaks the order.
	acks := make(chan int, SpoolSlots)
	var ackErr error
	go func() {
		defer close(acks)
		var p [8]byte
		want := 0
		for {
			typ, b, err := ReadFrame(r, p[:0])
			if err == nil && typ != FrameSpoolAck {
				err = fmt.Errorf("unexpected frame type %d", typ)
			}
			var slot int
			if err == nil {
				slot, err = parseAck(b)
			}
			if err == nil && slot != want {
				err = fmt.Errorf("ack of spool slot %d where %d was due", slot, want)
			}
			if err != nil {
				ackErr = err
				return
			}
			want = (want + 1) % SpoolSlots
			acks <- slot
		}
	}()
	outstanding := 0
	waitAck := func() error {
		if _, ok := <-acks; !ok {
			return fmt.Errorf("send the file: %w", ackErr)
		}
		outstanding--
		return nil
	}
	rd := &directReader{f: f, direct: f.SetDirect(true) == nil}
	slot := 0
	for off := int64(0); off < size; {
		if outstanding == SpoolSlots {
			if err := waitAck(); err != nil {
				return err
			}
		}
		want := int(min(int64(SpoolSlot), size-off))
		n, err := rd.read(buf[:alignUp(want)], size-off)
		if err == nil && n < want {
			err = fmt.Errorf("%s shrank while it was read (%d of %d bytes)", path, off+int64(n), size)
		}
		if err != nil {
			return refuse(c, err)
		}
		if _, err := dev.WriteAt(buf[:alignUp(n)], SlotOffset(slot)); err != nil {
			return refuse(c, fmt.Errorf("write the spool: %w", err))
		}
		if err := WriteFrame(c, FrameSpool, spoolFrame(slot, n)); err != nil {
			return err
		}
		outstanding++
		slot = (slot + 1) % SpoolSlots
		off += int64(n)
	}
	if err := WriteFrame(c, FrameEOF, nil); err != nil {
		return err
	}
	for outstanding > 0 {
		if err := waitAck(); err != nil {
			return err
		}
	}
	return nil
}

// SpoolFile is the host's spool file as bangerd uses it.
type SpoolFile interface {
	io.ReaderAt
	io.WriterAt
}

// ErrSpoolRefused is a spool operation the agent would not run (no spool
// device, busy, an agent without spool streams): nothing was sent to the
// client, and the agent stream is spent, so the caller opens a new one and
// sends the client's frames on it as they were.
var ErrSpoolRefused = errors.New("the agent refused the spool")

// StartSpool reads what bangerd's client sends first on a vm.bulk stream
// that may take the spool: the Open and, for OpPutFile, its request. It
// returns the raw frames read (to send on as they are when the spool is
// not taken), the Open, and whether the operation has a spool form worth
// taking (an inline OpPutFile has not: its contents are already here).
func StartSpool(client io.Reader) (frames []byte, o Open, ok bool, err error) {
	typ, p, err := ReadFrame(client, nil)
	if err != nil {
		return nil, o, false, err
	}
	var b Batch // the frames as read, to send on as they are
	b.frame(typ, p)
	if typ != FrameOpen || ssh.Unmarshal(p, &o) != nil {
		return b.buf, o, false, nil
	}
	switch o.Op {
	case OpPut, OpGet, OpGetFile, OpSync, OpSession:
		return b.buf, o, true, nil
	case OpPutFile:
		typ, p, err := ReadFrame(client, nil)
		if err != nil {
			return nil, o, false, err
		}
		b.frame(typ, p)
		var rq Request
		var req PutFile
		if typ != FrameRequest || ssh.Unmarshal(p, &rq) != nil || rq.Type != PutFileRequest || ssh.Unmarshal(rq.Payload, &req) != nil {
			return b.buf, o, false, nil
		}
		return b.buf, o, !req.Inline, nil
	}
	return b.buf, o, false, nil
}

// RelaySpool runs a one-file operation of bangerd's client through the
// spool: frames are what StartSpool read (o its Open), sent to the agent
// with the Op's spool form; then it relays both ways until the agent ends
// its stream, turning the client's FrameData into slots of spool and the
// agent's slots into FrameData. When the client goes first, it closes
// agent (and waits for that side to end). On ErrSpoolRefused nothing was
// sent to the client.
func RelaySpool(client, agent io.ReadWriteCloser, spool SpoolFile, frames []byte, o Open) error {
	// the Open again, with the spool form of its Op
	typ, p, err := ReadFrame(bytes.NewReader(frames), nil)
	if err != nil || typ != FrameOpen {
		return fmt.Errorf("%w: no open frame", ErrSpoolRefused)
	}
	rest := frames[5+len(p):]
	stream := SpoolStream(o.Op)
	session := o.Op == OpSession
	o.Op += SpoolSuffix
	var b Batch
	b.Open(o)
	first := b.buf
	if !stream {
		first = append(first, rest...)
	}
	if _, err := agent.Write(first); err != nil {
		return err
	}
	// The agent's first frame: a refusal of the spool form, or the
	// operation's first answer (passed on).
	typ, p, err = ReadFrame(agent, nil)
	switch {
	case errors.Is(err, io.EOF):
		// an older agent closes a stream whose operation it does not know
		return fmt.Errorf("%w: the stream closed", ErrSpoolRefused)
	case err != nil:
		return err
	case typ == FrameReply:
		var rep Reply
		if ssh.Unmarshal(p, &rep) == nil && !rep.OK && strings.HasPrefix(string(rep.Payload), Unsupported) {
			return fmt.Errorf("%w: %v", ErrSpoolRefused, remoteErr(rep))
		}
		if session {
			if ssh.Unmarshal(p, &rep) != nil || !rep.OK {
				return errors.New("the agent: a session's spool form answered with a failure")
			}
			// SpoolAccept: the agent's, not the client's
			return relaySlots(client, agent, spool, func(toAgent func(byte, []byte) error, free, stop chan struct{}) error {
				return relayUpSession(client, spool, toAgent, free, stop)
			})
		}
	}
	if session {
		return fmt.Errorf("the agent: a session's spool form answered with frame type %d", typ)
	}
	if err := WriteFrame(client, typ, p); err != nil {
		return err
	}
	if stream {
		return relaySlots(client, agent, spool, func(toAgent func(byte, []byte) error, free, stop chan struct{}) error {
			return relayUpStream(client, rest, spool, toAgent, free, stop)
		})
	}
	return relaySlots(client, agent, spool, func(toAgent func(byte, []byte) error, free, stop chan struct{}) error {
		return relayUp(client, spool, toAgent, free, stop)
	})
}

// relaySlots is RelaySpool once the agent has answered: it returns when
// the agent's stream ends (nil: it closed after its last frame) or either
// side failed.
func relaySlots(client, agent io.ReadWriteCloser, spool SpoolFile, up func(toAgent func(byte, []byte) error, free, stop chan struct{}) error) error {
	var amu sync.Mutex // writes to the agent, from both directions
	toAgent := func(typ byte, p []byte) error {
		amu.Lock()
		defer amu.Unlock()
		return WriteFrame(agent, typ, p)
	}
	// free holds a token per slot of the host → agent direction in use;
	// an ack takes one out.
	free := make(chan struct{}, SpoolSlots)
	upErr := make(chan error, 1)
	downErr := make(chan error, 1)
	stop := make(chan struct{})
	go func() { upErr <- up(toAgent, free, stop) }()
	go func() { downErr <- relayDown(client, agent, spool, toAgent, free) }()
	select {
	case err := <-downErr:
		close(stop)
		return err
	case err := <-upErr:
		// The client is gone: it closes once it has the operation's last
		// frame (then the agent's side ends by itself at once), or it
		// failed. Give the agent's side a moment, then end it.
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			t := time.NewTimer(closeWait)
			defer t.Stop()
			select {
			case derr := <-downErr:
				close(stop)
				return derr
			case <-t.C:
				err = errors.New("the client went away mid-operation")
			}
		}
		agent.Close()
		<-downErr
		close(stop)
		return err
	}
}

// relayUp carries the client's frames to the agent, FrameData as slots.
func relayUp(client io.Reader, spool SpoolFile, toAgent func(byte, []byte) error, free chan struct{}, stop chan struct{}) error {
	w := &slotSender{spool: spool, toAgent: toAgent, free: free, stop: stop, buf: make([]byte, SpoolSlot)}
	var fb []byte
	for {
		typ, n, err := readHeader(client)
		if err != nil {
			return err
		}
		if typ != FrameData {
			if cap(fb) < n {
				fb = make([]byte, max(n, 4096))
			}
			p := fb[:n]
			if err := readPayload(client, p); err != nil {
				return err
			}
			if err := w.flush(); err != nil {
				return err
			}
			if err := toAgent(typ, p); err != nil {
				return err
			}
			continue
		}
		for n > 0 {
			k := min(n, SpoolSlot-w.fill)
			if err := readPayload(client, w.buf[w.fill:w.fill+k]); err != nil {
				return err
			}
			w.fill += k
			n -= k
			if w.fill == SpoolSlot {
				if err := w.flush(); err != nil {
					return err
				}
			}
		}
	}
}

// slotSender fills the host → agent slots in order.
type slotSender struct {
	spool   SpoolFile
	toAgent func(byte, []byte) error
	free    chan struct{}
	stop    chan struct{}
	buf     []byte
	fill    int
	slot    int
}

// flush sends the slot being filled, once the agent has acknowledged
// that slot's last use.
func (w *slotSender) flush() error {
	if w.fill == 0 {
		return nil
	}
	select {
	case w.free <- struct{}{}:
	case <-w.stop:
		return errors.New("the agent's stream ended")
	}
	if _, err := w.spool.WriteAt(w.buf[:w.fill], SlotOffset(w.slot)); err != nil {
		return fmt.Errorf("write the spool: %w", err)
	}
	if err := w.toAgent(FrameSpool, spoolFrame(w.slot, w.fill)); err != nil {
		return err
	}
	w.slot = (w.slot + 1) % SpoolSlots
	w.fill = 0
	return nil
}

// write adds b to the slots, sending each as it fills.
func (w *slotSender) write(b []byte) error {
	for len(b) > 0 {
		k := copy(w.buf[w.fill:], b)
		w.fill += k
		b = b[k:]
		if w.fill == len(w.buf) {
			if err := w.flush(); err != nil {
				return err
			}
		}
	}
	return nil
}

// aheadItem is what readAhead's reader yields: bytes or a frame (typ, p),
// and the read's error.
type aheadItem struct {
	typ byte
	p   []byte
	err error
}

// readAhead calls read on a goroutine of its own, up to eight items ahead
// of the relay, each into a buffer of a chunk (read may grow it), until
// read fails or stop is closed. next yields the items in order; when none
// is at hand it calls idle first (the relay sends the slot it holds, so a
// protocol that sends a little and waits for the answer is never held up).
// done gives an item's buffer back once the relay is through with it.
func readAhead(stop chan struct{}, read func(b []byte) aheadItem) (next func(idle func() error) (aheadItem, error), done func(b []byte)) {
	const depth = 8
	full := make(chan aheadItem, depth)
	empty := make(chan []byte, depth)
	for range depth {
		empty <- make([]byte, 0, chunk)
	}
	go func() {
		for {
			var b []byte
			select {
			case b = <-empty:
			case <-stop:
				return
			}
			it := read(b)
			select {
			case full <- it:
			case <-stop:
				return
			}
			if it.err != nil {
				return
			}
		}
	}()
	next = func(idle func() error) (aheadItem, error) {
		select {
		case it := <-full:
			return it, nil
		default:
		}
		if err := idle(); err != nil {
			return aheadItem{}, err
		}
		select {
		case it := <-full:
			return it, nil
		case <-stop:
			return aheadItem{}, errors.New("the agent's stream ended")
		}
	}
	done = func(b []byte) {
		if cap(b) != chunk {
			b = make([]byte, 0, chunk) // one read grew: keep the ring's size
		}
		empty <- b[:0]
	}
	return next, done
}

// relayUpStream carries all the client's bytes to the agent in slots
// (SpoolStream), first those StartSpool read after the Open. A slot goes
// when it is full or when the client has nothing more at hand.
func relayUpStream(client io.Reader, first []byte, spool SpoolFile, toAgent func(byte, []byte) error, free, stop chan struct{}) error {
	next, done := readAhead(stop, func(b []byte) aheadItem {
		n, err := client.Read(b[:cap(b)])
		return aheadItem{p: b[:n], err: err}
	})
	w := &slotSender{spool: spool, toAgent: toAgent, free: free, stop: stop, buf: make([]byte, SpoolSlot)}
	if err := w.write(first); err != nil {
		return err
	}
	for {
		it, err := next(w.flush)
		if err != nil {
			return err
		}
		if err := w.write(it.p); err != nil {
			return err
		}
		if it.err != nil {
			if err := w.flush(); err != nil {
				return err
			}
			return it.err
		}
		done(it.p)
	}
}

// relayUpSession carries a session's frames from the client to the
// agent: data frames of sessionSpoolMin bytes or more in slots, several to
// a slot while more are at hand, and every other frame on the channel in
// its place (a slot being filled is sent before it).
func relayUpSession(client io.Reader, spool SpoolFile, toAgent func(byte, []byte) error, free, stop chan struct{}) error {
	next, done := readAhead(stop, func(b []byte) aheadItem {
		typ, n, err := readHeader(client)
		if err == nil {
			if cap(b) < n {
				b = make([]byte, n) // a frame larger than a chunk (up to MaxFrame)
			}
			b = b[:n]
			err = readPayload(client, b)
		}
		return aheadItem{typ: typ, p: b, err: err}
	})
	w := &slotSender{spool: spool, toAgent: toAgent, free: free, stop: stop, buf: make([]byte, SpoolSlot)}
	for {
		f, err := next(w.flush)
		if err != nil {
			return err
		}
		if f.err != nil {
			if err := w.flush(); err != nil {
				return err
			}
			return f.err
		}
		switch {
		case f.typ == FrameSpool || f.typ == FrameSpoolAck:
			return fmt.Errorf("the client sent a spool frame (type %d) in a session", f.typ)
		case f.typ == FrameData && len(f.p) >= sessionSpoolMin:
			err = w.write(f.p)
		default:
			if err = w.flush(); err == nil {
				err = toAgent(f.typ, f.p)
			}
		}
		if err != nil {
			return err
		}
		done(f.p)
	}
}

// relayDown carries the agent's frames to the client, its slots as
// FrameData, and takes the acks of the other direction's slots.
func relayDown(client io.Writer, agent io.Reader, spool SpoolFile, toAgent func(byte, []byte) error, free chan struct{}) error {
	buf := make([]byte, 5+SpoolSlot)
	var fb []byte
	down, up := 0, 0 // the slot due next from the agent, and in its next ack
	for {
		typ, p, err := ReadFrame(agent, fb)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		fb = p[:cap(p)]
		switch typ {
		case FrameSpool:
			slot, n, err := parseSpoolFrame(p)
			if err == nil && slot != down {
				err = fmt.Errorf("spool slot %d where %d was due", slot, down)
			}
			if err != nil {
				return fmt.Errorf("the agent: %w", err)
			}
			down = (down + 1) % SpoolSlots
			if _, err := spool.ReadAt(buf[5:5+n], SlotOffset(slot)); err != nil {
				return fmt.Errorf("read the spool: %w", err)
			}
			buf[0] = FrameData
			putLen(buf[1:5], n)
			if _, err := client.Write(buf[:5+n]); err != nil {
				return err
			}
			if err := toAgent(FrameSpoolAck, ackFrame(slot)); err != nil {
				return err
			}
		case FrameSpoolAck:
			slot, err := parseAck(p)
			if err == nil && slot != up {
				err = fmt.Errorf("ack of spool slot %d where %d was due", slot, up)
			}
			if err == nil {
				select {
				case <-free:
				default:
					err = fmt.Errorf("ack of spool slot %d, which is not in use", slot)
				}
			}
			if err != nil {
				return fmt.Errorf("the agent: %w", err)
			}
			up = (up + 1) % SpoolSlots
		default:
			if err := WriteFrame(client, typ, p); err != nil {
				return err
			}
		}
	}
}
