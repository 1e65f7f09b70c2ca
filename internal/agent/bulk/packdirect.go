package bulk

import (
	"errors"
	"io/fs"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A push's pack is written with O_DIRECT where the guest's filesystem takes
// it, as a put's file is (direct.go: under TCG a buffered write costs the
// guest's vCPU several ms per MiB more). The pack's pieces (entry headers
// and the frames' data) are copied into page-aligned 1 MiB buffers (the
// mapped ones of direct.go's pool); each full buffer goes to a second
// goroutine that writes it at its offset while the stream is read on. The
// last part, not a whole buffer, is written at the end: its whole blocks
// with O_DIRECT, the rest buffered, then the header's count (a 12-byte
// write at offset 0, buffered). An entry cut off again (a file that changed
// during the push) is dropped from the buffer being filled, or, when it
// reaches back into buffers already handed to the writer, the writer is
// drained, the file truncated and the block the cut falls in read back
// into a fresh buffer. A filesystem that refuses O_DIRECT when it is set
// gets today's pwritev per frame (packWriter.flush); one that refuses it
// at a write (EINVAL) gets the rest of the buffers written buffered.

// dioJob is one full buffer and where it goes.
type dioJob struct {
	b   []byte
	off int64
}

// packOut writes a pack's bytes in order through aligned buffers.
type packOut struct {
	fd   int
	path string // for errors
	// base is the file offset of cur[0] (a multiple of directBuf, or of
	// directAlign after a cut-off); cur holds the bytes from there not yet
	// handed to the writer.
	base int64
	cur  []byte
	// full holds the buffers commit filled, until handoff (at most two:
	// a frame is at most one buffer long)
	full []dioJob
	// todo carries full buffers to the writer, in order; done brings every
	// one back, written or not (its capacity holds them all).
	todo        chan dioJob
	done        chan []byte
	copied      int // bytes put copied in (the rest were read in place)
	mapped      int // buffers taken from the pool
	outstanding int // buffers handed to the writer and not yet back
	werr        error
	failed      atomic.Bool
	direct      atomic.Bool // O_DIRECT is set on fd
	closed      bool
	// pwrite and setDirect are unix.Pwrite and fcntl (seams for tests).
	pwrite    func(fd int, b []byte, off int64) (int, error)
	setDirect func(fd int, on bool) error
}

// setDirectFD sets or clears O_DIRECT on fd.
func setDirectFD(fd int, on bool) error {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		fl |= unix.O_DIRECT
	} else {
		fl &^= unix.O_DIRECT
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl)
	return err
}

// newPackOut returns a packOut on fd (open for reading and writing, empty),
// or nil when O_DIRECT cannot be set on it.
func newPackOut(fd int, path string) *packOut {
	o := &packOut{fd: fd, path: path, pwrite: unix.Pwrite, setDirect: setDirectFD}
	if o.setDirect(fd, true) != nil {
		return nil
	}
	o.direct.Store(true)
	o.start()
	return o
}

func (o *packOut) start() {
	o.todo = make(chan dioJob, directBufs)
	o.done = make(chan []byte, directBufs)
	go o.writer()
}

// writer writes the buffers todo brings, until it is closed.
func (o *packOut) writer() {
	defer close(o.done)
	for j := range o.todo {
		if o.werr == nil {
			if o.werr = o.writeAt(j.b, j.off); o.werr != nil {
				o.failed.Store(true)
			}
		}
		o.done <- j.b
	}
}

// writeAt writes b at off: with O_DIRECT while the file takes it (b and
// off aligned), else buffered. It runs on the writer, or on the caller
// once the writer is drained.
func (o *packOut) writeAt(b []byte, off int64) error {
	for len(b) > 0 {
		n, err := o.pwrite(o.fd, b, off)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EINVAL) && o.direct.Load():
			// refused after all (an overlayfs checks at the first
			// write, a device may want larger blocks): buffered from here
			if err := o.setDirect(o.fd, false); err != nil {
				return &fs.PathError{Op: "clear O_DIRECT", Path: o.path, Err: err}
			}
			o.direct.Store(false)
			continue
		case err != nil:
			return &fs.PathError{Op: "write", Path: o.path, Err: err}
		case n == 0:
			return &fs.PathError{Op: "write", Path: o.path, Err: unix.EIO}
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// next returns an empty buffer: a fresh one while fewer than directBufs
// exist, else the next one the writer is done with.
func (o *packOut) next() ([]byte, error) {
	if o.mapped < directBufs {
		select {
		case b := <-o.done:
			o.outstanding--
			return b[:0], nil
		default:
		}
		b, err := getDirectBuf()
		if err != nil {
			return nil, err
		}
		o.mapped++
		return b[:0], nil
	}
	b := <-o.done
	o.outstanding--
	return b[:0], nil
}

// append copies iov's bytes after what came before.
func (o *packOut) append(iov [][]byte) error {
	err := o.put(iov)
	o.handoff()
	return err
}

// put copies iov's bytes after what came before, without handing the
// buffers it fills to the writer (see commit).
func (o *packOut) put(iov [][]byte) error {
	for _, p := range iov {
		for len(p) > 0 {
			b, err := o.room(len(p))
			if err != nil {
				return err
			}
			k := copy(b, p)
			o.copied += k
			o.commit(k)
			p = p[k:]
		}
	}
	return nil
}

// room returns the free space at the end of the buffer being filled, at
// most n bytes (n > 0), taking a fresh buffer when it is full: the caller
// puts bytes there (append copies them; the push reads a file's data from
// the stream straight into it) and commits them.
func (o *packOut) room(n int) ([]byte, error) {
	if o.failed.Load() {
		if err := o.drain(); err != nil {
			return nil, err
		}
	}
	if o.cur == nil {
		b, err := o.next()
		if err != nil {
			return nil, err
		}
		o.cur = b
	}
	return o.cur[len(o.cur):min(cap(o.cur), len(o.cur)+n)], nil
}

// commit adds the first k bytes of room's slice after what came before. A
// buffer it fills is held until handoff, so that the slices room gave stay
// the caller's until then (the writer gives a written buffer back to next
// for reuse).
func (o *packOut) commit(k int) {
	o.cur = o.cur[:len(o.cur)+k]
	if len(o.cur) == cap(o.cur) {
		o.full = append(o.full, dioJob{o.cur, o.base})
		o.base += int64(len(o.cur))
		o.cur = nil
	}
}

// handoff gives the buffers commit filled to the writer, in order.
func (o *packOut) handoff() {
	for _, j := range o.full {
		o.todo <- j
		o.outstanding++
	}
	o.full = o.full[:0]
}

// drain waits until the writer has written every buffer handed to it and
// returns its error.
func (o *packOut) drain() error {
	o.handoff()
	for o.outstanding > 0 {
		b, ok := <-o.done
		if !ok {
			break
		}
		o.outstanding--
		if o.cur == nil {
			o.cur = b[:0]
		} else {
			putDirectBuf(b)
			o.mapped--
		}
	}
	return o.werr
}

// truncate drops every byte from off on (off at or after the pack's
// header).
func (o *packOut) truncate(off int64) error {
	if off >= o.base {
		if o.cur != nil {
			o.cur = o.cur[:off-o.base]
		}
		return nil
	}
	if err := o.drain(); err != nil {
		return err
	}
	if err := unix.Ftruncate(o.fd, off); err != nil {
		return &fs.PathError{Op: "truncate", Path: o.path, Err: err}
	}
	if o.cur == nil {
		b, err := o.next()
		if err != nil {
			return err
		}
		o.cur = b
	}
	// the block the cut falls in, read back (a whole aligned block: an
	// O_DIRECT read returns what the file has of it)
	base := off &^ (directAlign - 1)
	keep := int(off - base)
	o.cur = o.cur[:0]
	if keep > 0 {
		for got := 0; got < keep; {
			n, err := unix.Pread(o.fd, o.cur[got:directAlign], base+int64(got))
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return &fs.PathError{Op: "read back", Path: o.path, Err: err}
			}
			if n == 0 {
				return &fs.PathError{Op: "read back", Path: o.path, Err: unix.EIO}
			}
			got += n
		}
		o.cur = o.cur[:keep]
	}
	o.base = base
	return nil
}

// finish writes what is left, then header at offset 0, and gives back the
// buffers; the caller closes fd.
func (o *packOut) finish(header []byte) error {
	if err := o.drain(); err != nil {
		o.release()
		return err
	}
	var err error
	if len(o.cur) > 0 {
		b := o.cur
		if o.direct.Load() {
			if k := len(b) &^ (directAlign - 1); k > 0 {
				err = o.writeAt(b[:k], o.base)
				b = b[k:]
			}
		}
		if err == nil && len(b) > 0 {
			err = o.buffered(b, o.base+int64(len(o.cur)-len(b)))
		}
	}
	if err == nil {
		err = o.buffered(header, 0)
	}
	o.release()
	return err
}

// buffered writes b at off with O_DIRECT cleared.
func (o *packOut) buffered(b []byte, off int64) error {
	if o.direct.Load() {
		if err := o.setDirect(o.fd, false); err != nil {
			return &fs.PathError{Op: "clear O_DIRECT", Path: o.path, Err: err}
		}
		o.direct.Store(false)
	}
	return o.writeAt(b, off)
}

// release stops the writer and gives back every buffer (idempotent).
func (o *packOut) release() {
	if o.closed {
		return
	}
	o.closed = true
	if o.cur != nil {
		putDirectBuf(o.cur)
		o.cur = nil
	}
	for _, j := range o.full {
		putDirectBuf(j.b)
	}
	o.full = nil
	close(o.todo)
	for b := range o.done {
		putDirectBuf(b)
	}
	o.outstanding = 0
}
