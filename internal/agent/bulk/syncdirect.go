package bulk

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A push writes the work tree's larger files (dioFileMin and up) with
// O_DIRECT where the guest's filesystem takes it (see direct.go for why:
// under TCG a buffered write costs the guest's vCPU several ms per MiB
// more). The file's frames are read straight into page-aligned 1 MiB
// buffers (the pack, if the data is also a blob, copies them from there);
// each full buffer, and the last one, goes to one of dioFileWorkers
// goroutines, which writes it (whole blocks with O_DIRECT, the tail
// buffered), then, after the file's last write, sets its mode and mtime,
// closes it and renames it into place, so that the waits for the disk
// overlap with reading the stream. All of a file's buffers go to the same
// worker, in order. At most dioFileBufs buffers exist: the stream's reader
// waits for one when all are being written. The first failure a worker
// meets ends the push at the next request (or at SyncDone, which waits for
// every file), as a synchronous write's would; a file that failed or was
// left unfinished is removed. A filesystem that refuses O_DIRECT gets
// today's buffered writes from then on.

const (
	// dioFileMin is the smallest file written with O_DIRECT.
	dioFileMin = 64 << 10
	// dioFileWorkers write the files.
	dioFileWorkers = 2
	// dioFileBufs bounds the buffers of files being written.
	dioFileBufs = 6
)

// asyncFile is a file handed to a worker; the worker owns fd from then on.
type asyncFile struct {
	fd      int
	rel     string
	p, tmp  string // written at tmp, renamed to p when they differ
	mode    uint32 // for fchmod, when chmod
	chmod   bool
	mtime   int64
	failed  bool // (the worker's) a write failed or the stream did: remove the file
	direct  bool
	workers *fileWriters
}

// fileJob is one buffer of a file and where it goes; last is the file's
// last (b may be nil then); abort says the stream failed within the file.
type fileJob struct {
	f     *asyncFile
	b     []byte
	off   int64
	last  bool
	abort bool
}

// dioFileBytes counts the bytes of files written with O_DIRECT (for the
// tests).
var dioFileBytes atomic.Int64

// fileWriters is a push's pool of file writers.
type fileWriters struct {
	qs      []chan fileJob
	next    int
	free    chan []byte
	mapped  int
	wg      sync.WaitGroup
	mu      sync.Mutex
	err     error
	failed  atomic.Bool
	refused atomic.Bool // O_DIRECT was refused: buffered from now on
}

func newFileWriters() *fileWriters {
	w := &fileWriters{free: make(chan []byte, dioFileBufs)}
	for range dioFileWorkers {
		q := make(chan fileJob, dioFileBufs)
		w.qs = append(w.qs, q)
		w.wg.Add(1)
		go w.work(q)
	}
	return w
}

func (w *fileWriters) fail(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	w.failed.Store(true)
}

// Err is the first failure of a file write so far.
func (w *fileWriters) Err() error {
	if !w.failed.Load() {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// buf returns an empty buffer, waiting for one when all are in use.
func (w *fileWriters) buf() ([]byte, error) {
	select {
	case b := <-w.free:
		return b[:0], nil
	default:
	}
	if w.mapped < dioFileBufs {
		b, err := getDirectBuf()
		if err != nil {
			return nil, err
		}
		w.mapped++
		return b[:0], nil
	}
	return (<-w.free)[:0], nil
}

// wait lets every file be written and gives back the buffers; it returns
// the first failure.
func (w *fileWriters) wait() error {
	for _, q := range w.qs {
		close(q)
	}
	w.wg.Wait()
	for w.mapped > 0 {
		putDirectBuf(<-w.free)
		w.mapped--
	}
	return w.Err()
}

func (w *fileWriters) work(q chan fileJob) {
	defer w.wg.Done()
	for j := range q {
		f := j.f
		if j.abort {
			f.failed = true
		}
		if !f.failed && !w.failed.Load() && len(j.b) > 0 {
			if err := f.write(j.b, j.off, j.last); err != nil {
				f.failed = true
				w.fail(fmt.Errorf("file %s: %w", f.rel, err))
			}
		}
		if j.b != nil {
			w.free <- j.b
		}
		if j.last {
			if !f.failed && !w.failed.Load() {
				if err := f.finish(); err != nil {
					f.failed = true
					w.fail(fmt.Errorf("file %s: %w", f.rel, err))
				}
			}
			if f.fd >= 0 {
				unix.Close(f.fd)
				f.fd = -1
				os.Remove(f.tmp)
			}
		}
	}
}

// write writes b at off: whole blocks with O_DIRECT, the rest (only in a
// file's last buffer) buffered.
func (f *asyncFile) write(b []byte, off int64, last bool) error {
	if f.direct {
		k := len(b) &^ (directAlign - 1)
		if !last {
			k = len(b)
		}
		err := pwriteAll(f.fd, b[:k], off)
		if err == nil {
			dioFileBytes.Add(int64(k))
		}
		switch {
		case errors.Is(err, unix.EINVAL):
			// refused after all: buffered from here, and for the
			// files after this one
			f.workers.refused.Store(true)
			k = 0
		case err != nil:
			return &fs.PathError{Op: "write", Path: f.p, Err: err}
		}
		b, off = b[k:], off+int64(k)
		if len(b) == 0 {
			return nil
		}
		if err := setDirectFD(f.fd, false); err != nil {
			return &fs.PathError{Op: "clear O_DIRECT", Path: f.p, Err: err}
		}
		f.direct = false
	}
	if err := pwriteAll(f.fd, b, off); err != nil {
		return &fs.PathError{Op: "write", Path: f.p, Err: err}
	}
	return nil
}

// finish sets mode and mtime after the last write, closes the file and
// renames it into place.
func (f *asyncFile) finish() error {
	if f.chmod {
		if err := unix.Fchmod(f.fd, f.mode); err != nil {
			return &fs.PathError{Op: "chmod", Path: f.p, Err: err}
		}
	}
	if err := futimens(f.fd, f.mtime); err != nil {
		return &fs.PathError{Op: "utimens", Path: f.p, Err: err}
	}
	err := unix.Close(f.fd)
	f.fd = -1
	if err != nil {
		os.Remove(f.tmp)
		return &fs.PathError{Op: "close", Path: f.p, Err: err}
	}
	if f.tmp != f.p {
		if err := os.Rename(f.tmp, f.p); err != nil {
			os.Remove(f.tmp)
			return err
		}
	}
	return nil
}

func pwriteAll(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.EIO
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// writeAsync reads size bytes of data frames into aligned buffers, each
// also to obj, and hands them to a worker, which owns f (and its fd) from
// the start: on a failure here it removes the file.
func (s *Syncer) writeAsync(f *asyncFile, size uint64, r io.Reader, obj dataSink) error {
	w := s.files
	q := w.qs[w.next]
	w.next = (w.next + 1) % len(w.qs)
	var cur []byte
	var off int64
	abort := func(err error) error {
		q <- fileJob{f: f, b: cur, last: true, abort: true}
		return err
	}
	for left := size; left > 0; {
		typ, n, err := readHeader(r)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return abort(err)
		}
		if typ != FrameData || uint64(n) > left {
			return abort(fmt.Errorf("file data: frame type %d of %d bytes with %d left", typ, n, left))
		}
		left -= uint64(n)
		for n > 0 {
			if cur == nil {
				if cur, err = w.buf(); err != nil {
					return abort(err)
				}
			}
			k := min(n, cap(cur)-len(cur))
			d := cur[len(cur) : len(cur)+k]
			if err := readPayload(r, d); err != nil {
				return abort(err)
			}
			if obj != nil {
				if err := obj.write(d); err != nil {
					return abort(err)
				}
			}
			cur = cur[:len(cur)+k]
			n -= k
			if len(cur) == cap(cur) && (n > 0 || left > 0) {
				q <- fileJob{f: f, b: cur, off: off}
				off += int64(len(cur))
				cur = nil
			}
		}
	}
	q <- fileJob{f: f, b: cur, off: off, last: true}
	return nil
}
