package bulk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A put writes its file with O_DIRECT where the guest's filesystem allows
// it. Under TCG every copy the guest makes costs emulated CPU, and a
// buffered write copies each byte into the page cache (dd bs=1M in the
// guest: 163 MiB/s buffered, 577 MiB/s with oflag=direct): with O_DIRECT
// the frames are read straight into page-aligned buffers and the VMM takes
// them from there. Two goroutines pipeline it: the stream's reader fills
// one buffer while the writer writes the one before, so the wait for the
// disk overlaps with reading the channel. The tail that is not a whole
// number of blocks is written with O_DIRECT cleared; a file whose
// filesystem refuses O_DIRECT (EINVAL: some tmpfs and overlayfs, devices,
// a block size above directAlign) is written buffered, as before.

const (
	// directBuf is the size of one write (and one buffer).
	directBuf = 1 << 20
	// directBufs bounds a put's buffers: one filling, one being written,
	// one waiting.
	directBufs = 3
	// directAlign is the alignment of every O_DIRECT write's buffer, offset
	// and length: a page, which covers the usual logical block sizes
	// (512, 4096). A device with a larger one refuses the write (EINVAL)
	// and the put goes on buffered.
	directAlign = 4096
	// directIdle is how long unused buffers stay mapped after a put, for
	// the next file of a cp of many.
	directIdle = 10 * time.Second
)

// dioFile is the file a put writes: an *os.File (osFile) in the agent.
type dioFile interface {
	io.Writer
	// SetDirect sets (on) or clears O_DIRECT.
	SetDirect(on bool) error
}

// osFile sets O_DIRECT with fcntl.
type osFile struct{ *os.File }

func (f osFile) SetDirect(on bool) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var fl int
		if fl, serr = unix.FcntlInt(fd, unix.F_GETFL, 0); serr != nil {
			return
		}
		if on {
			fl |= unix.O_DIRECT
		} else {
			fl &^= unix.O_DIRECT
		}
		_, serr = unix.FcntlInt(fd, unix.F_SETFL, fl)
	}); err != nil {
		return err
	}
	return serr
}

// directWriter writes a put's buffers in order: the whole blocks with
// O_DIRECT while the file takes it, the rest buffered.
type directWriter struct {
	f      dioFile
	direct bool
}

func (w *directWriter) write(b []byte) error {
	if w.direct {
		if k := len(b) &^ (directAlign - 1); k > 0 {
			n, err := w.f.Write(b[:k])
			b = b[n:]
			switch {
			case errors.Is(err, syscall.EINVAL):
				// refused after all (an overlayfs checks at the first
				// write, a device may want larger blocks): buffered from here
			case err != nil:
				return err
			}
		}
		if len(b) > 0 {
			if err := w.f.SetDirect(false); err != nil {
				return fmt.Errorf("clear O_DIRECT: %w", err)
			}
			w.direct = false
		}
	}
	if len(b) == 0 {
		return nil
	}
	_, err := w.f.Write(b)
	return err
}

// receiveDirect writes the FrameData frames r yields to f until FrameEOF,
// with O_DIRECT when f takes it, else as receiveBuffered does.
func receiveDirect(f dioFile, r io.Reader) error {
	if f.SetDirect(true) != nil {
		return receiveBuffered(f, r)
	}
	w := &directWriter{f: f, direct: true}
	// todo carries filled buffers to the writer, in order; done brings
	// every one back, written or not (its capacity holds them all, so the
	// writer never blocks on it).
	todo := make(chan []byte, directBufs)
	done := make(chan []byte, directBufs)
	var werr error
	var failed atomic.Bool
	go func() {
		defer close(done)
		for b := range todo {
			if werr == nil {
				if werr = w.write(b); werr != nil {
					failed.Store(true)
				}
			}
			done <- b
		}
	}()
	// cur is the buffer the reader fills (nil when it has none); finish
	// stops the writer, takes back every buffer and returns err, or the
	// writer's error first (the reason the stream went wrong).
	var cur []byte
	finish := func(err error) error {
		if cur != nil {
			putDirectBuf(cur)
		}
		close(todo)
		for b := range done {
			putDirectBuf(b)
		}
		if werr != nil {
			return werr
		}
		return err
	}
	// next returns an empty buffer: a fresh one while fewer than
	// directBufs exist, else the next one the writer is done with.
	mapped := 0
	next := func() ([]byte, error) {
		if mapped < directBufs {
			select {
			case b := <-done:
				return b[:0], nil
			default:
			}
			mapped++
			b, err := getDirectBuf()
			return b[:0], err
		}
		return (<-done)[:0], nil
	}
	fail := func(err error) error { return finish(fmt.Errorf("receive the file: %w", err)) }
	var err error
	if cur, err = next(); err != nil {
		return finish(err)
	}
	for !failed.Load() {
		typ, n, err := readHeader(r)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fail(err)
		}
		switch typ {
		case FrameData:
			for n > 0 {
				k := min(n, cap(cur)-len(cur))
				if err := readPayload(r, cur[len(cur):len(cur)+k]); err != nil {
					return fail(err)
				}
				cur = cur[:len(cur)+k]
				n -= k
				if len(cur) == cap(cur) {
					todo <- cur
					if cur, err = next(); err != nil {
						return finish(err)
					}
				}
			}
		case FrameEOF:
			if _, err := io.CopyN(io.Discard, r, int64(n)); err != nil {
				return fail(err)
			}
			todo <- cur
			cur = nil
			return finish(nil)
		default:
			return fail(fmt.Errorf("unexpected frame type %d", typ))
		}
	}
	return finish(nil) // the writer failed: its error
}

// The mapped buffers: anonymous mappings are page-aligned, which O_DIRECT
// wants, and stay outside the Go heap. Up to directBufs unused ones are
// kept for directIdle.
var dioPool struct {
	mu    sync.Mutex
	free  [][]byte
	timer *time.Timer
}

func getDirectBuf() ([]byte, error) {
	dioPool.mu.Lock()
	if n := len(dioPool.free); n > 0 {
		b := dioPool.free[n-1]
		dioPool.free = dioPool.free[:n-1]
		dioPool.mu.Unlock()
		return b, nil
	}
	dioPool.mu.Unlock()
	b, err := unix.Mmap(-1, 0, directBuf, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("map a write buffer: %w", err)
	}
	dioMapped.Add(1)
	return b, nil
}

func putDirectBuf(b []byte) {
	b = b[:cap(b)]
	dioPool.mu.Lock()
	defer dioPool.mu.Unlock()
	if len(dioPool.free) >= directBufs {
		unmapDirectBuf(b)
		return
	}
	dioPool.free = append(dioPool.free, b)
	if dioPool.timer == nil {
		dioPool.timer = time.AfterFunc(directIdle, releaseDirectBufs)
	} else {
		dioPool.timer.Reset(directIdle)
	}
}

// releaseDirectBufs unmaps the unused buffers.
func releaseDirectBufs() {
	dioPool.mu.Lock()
	defer dioPool.mu.Unlock()
	for _, b := range dioPool.free {
		unmapDirectBuf(b)
	}
	dioPool.free = nil
}

// dioMapped counts the buffers mapped and not yet unmapped (the tests
// check that a put gives back all it took).
var dioMapped atomic.Int64

func unmapDirectBuf(b []byte) {
	if unix.Munmap(b) == nil {
		dioMapped.Add(-1)
	}
}
