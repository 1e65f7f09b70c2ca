package sshd

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A bulk session's stdin goes into the command's pipe with vmsplice(2)
// rather than write(2): the pipe then refers to the frame buffers the
// stream was read into instead of holding a copy, which saves the guest one
// copy of every byte (under TCG every copy is emulated CPU). The price is
// that a buffer may be reused only once the command has read past it: the
// agent keeps the pipe's read end too and asks it how much is unread
// (FIONREAD), and gives a frame back to the stream only when everything
// written up to its end has been read. What the command leaves unread when
// it exits is never given back (a process the command started may still
// hold the pipe and read it later); strandLimit bounds that, beyond which
// stdin is written with write(2) as before.

// dataSource is a stream's incoming data, frame by frame, without a copy
// (bulk.Chan).
type dataSource interface {
	TakeData() ([]byte, error)
}

// strandLimit bounds the bytes of buffers held for pipes that were never
// read to the end.
const strandLimit = 8 << 20

var stranded struct {
	mu    sync.Mutex
	bufs  [][]byte
	bytes int
}

func strand(bufs []spliced) {
	stranded.mu.Lock()
	defer stranded.mu.Unlock()
	for _, s := range bufs {
		stranded.bufs = append(stranded.bufs, s.b)
		stranded.bytes += cap(s.b)
	}
}

// spliceAllowed reports whether a new session may vmsplice its stdin.
func spliceAllowed() bool {
	stranded.mu.Lock()
	defer stranded.mu.Unlock()
	return stranded.bytes < strandLimit
}

// spliced is a buffer in the pipe and the stream offset of its end.
type spliced struct {
	b   []byte
	end int64
}

// stdinSplicer feeds a command's stdin pipe from a bulk stream.
type stdinSplicer struct {
	w       *os.File // the pipe's write end
	r       *os.File // its read end (the command has its own copy)
	src     dataSource
	release func([]byte) // gives a buffer back to the stream

	mu      sync.Mutex
	written int64
	pending []spliced // in the pipe, oldest first
	gone    bool      // the command exited: r is closed
	noSplc  bool      // vmsplice refused: write(2) from here
}

// unread is how many bytes the pipe holds, or false when it cannot tell.
func (s *stdinSplicer) unread() (int64, bool) {
	if s.gone {
		return 0, false
	}
	rc, err := s.r.SyscallConn()
	if err != nil {
		return 0, false
	}
	var n int
	var ierr error
	// TIOCINQ is FIONREAD: the bytes a pipe holds
	if err := rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.TIOCINQ) }); err != nil || ierr != nil {
		return 0, false
	}
	return int64(n), true
}

// reap gives back the buffers the command has read past; with s.mu held.
func (s *stdinSplicer) reap() {
	if len(s.pending) == 0 {
		return
	}
	n, ok := s.unread()
	if !ok {
		return
	}
	read := s.written - n
	i := 0
	for ; i < len(s.pending) && s.pending[i].end <= read; i++ {
		s.release(s.pending[i].b)
		s.pending[i] = spliced{}
	}
	s.pending = s.pending[i:]
	if len(s.pending) == 0 {
		s.pending = nil
	}
}

// exited is called once the command has exited: what it read is given
// back, the rest stays with the pipe, and the read end is closed so that
// writes fail (EPIPE) unless another process still reads the pipe.
func (s *stdinSplicer) exited() {
	s.mu.Lock()
	s.reap()
	s.gone = true
	s.r.Close()
	left := s.pending
	s.pending = nil
	s.mu.Unlock()
	strand(left)
}

// run copies the stream into the pipe until it ends (or the pipe is
// broken), then closes the write end and gives back what was read.
// Buffers the command has not read yet are given back by exited, or
// stranded when it exits first.
func (s *stdinSplicer) run() {
	for {
		b, err := s.src.TakeData()
		if err != nil {
			break
		}
		if !s.feed(b) {
			break
		}
	}
	s.w.Close()
	s.mu.Lock()
	s.reap()
	var left []spliced
	if s.gone {
		left = s.pending
		s.pending = nil
	}
	s.mu.Unlock()
	strand(left)
}

// feed puts b into the pipe; false when the pipe is broken.
func (s *stdinSplicer) feed(b []byte) bool {
	s.mu.Lock()
	s.reap()
	// once the command has exited nothing more can be given back: a
	// process it left behind reading the pipe gets copies
	splice := !s.noSplc && !s.gone
	s.mu.Unlock()
	if splice {
		n, err := s.vmsplice(b)
		s.mu.Lock()
		s.written += int64(n)
		if n > 0 {
			s.pending = append(s.pending, spliced{b: b, end: s.written})
		}
		s.mu.Unlock()
		if n > 0 || err == nil || !(errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EBADF)) {
			return err == nil
		}
		// no vmsplice here (a seccomp filter, a write end that is not a
		// pipe): write(2) from now on
		s.noSplc = true
	}
	n, err := s.w.Write(b)
	s.mu.Lock()
	s.written += int64(n)
	s.mu.Unlock()
	s.release(b)
	return err == nil
}

// vmsplice splices all of b into the pipe (waiting for room through the
// runtime's poller) and returns how much it spliced.
func (s *stdinSplicer) vmsplice(b []byte) (int, error) {
	rc, err := s.w.SyscallConn()
	if err != nil {
		return 0, err
	}
	done := 0
	var serr error
	err = rc.Write(func(fd uintptr) bool {
		for done < len(b) {
			iov := unix.Iovec{Base: &b[done]}
			iov.SetLen(len(b) - done)
			k, _, e := unix.Syscall6(unix.SYS_VMSPLICE, fd, uintptr(unsafe.Pointer(&iov)), 1, unix.SPLICE_F_NONBLOCK, 0, 0)
			switch {
			case e == syscall.EAGAIN:
				return false // wait for room
			case e == syscall.EINTR:
				continue
			case e != 0:
				serr = e
				return true
			}
			done += int(k)
		}
		return true
	})
	if serr != nil {
		err = serr
	}
	return done, err
}
