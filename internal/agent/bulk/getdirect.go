package bulk

import (
	"errors"
	"fmt"
	"io"
	"syscall"

	"golang.org/x/crypto/ssh"
)

// A get reads its file with O_DIRECT where the guest's filesystem allows
// it, the mirror of a put (direct.go). Measured in the guest under TCG
// (100 MiB, caches dropped): a buffered read 352 MiB/s, about the raw
// channel's own rate, so the two added up; an O_DIRECT read 1250 MiB/s
// (256 KiB) to 1470 MiB/s (1 MiB). The page cache's copy and bookkeeping
// are emulated CPU, and the guest has one vCPU for the disk and the
// channel both. Two goroutines pipeline it: one reads the file into mapped
// buffers while the other writes the buffer before to the stream. Each
// buffer leaves its first block free for the frame's header, so a frame
// (header and up to directBuf-directAlign bytes) goes out in one Write.
//
// The reads are whole blocks at block offsets, so the last one may ask for
// up to a block beyond the announced size (a file that grew meanwhile):
// what lies beyond the size is never sent. A read that ends off a block
// (the end of the file) or a file that refuses O_DIRECT at its first read
// (EINVAL) goes on buffered; a file that shrank fails the get as before.

// dioReader is the file a get reads: an *os.File (osFile) in the agent.
type dioReader interface {
	io.Reader
	// SetDirect sets (on) or clears O_DIRECT.
	SetDirect(on bool) error
}

// getPayload is the data a get's frame carries: a buffer less its first
// block, which holds the header.
const getPayload = directBuf - directAlign

// directReader reads a get's file in order: with O_DIRECT while the file
// takes it, buffered after.
type directReader struct {
	f      dioReader
	direct bool
}

// read fills b (len(b) a multiple of directAlign, its start aligned) with
// the next min(len(b), left) bytes of the file and returns how many it got:
// fewer only at the end of the file.
func (r *directReader) read(b []byte, left int64) (int, error) {
	need := len(b)
	if int64(need) > left {
		need = int(left)
	}
	want := need
	if r.direct {
		want = (need + directAlign - 1) &^ (directAlign - 1)
	}
	n := 0
	for n < need {
		k, err := r.f.Read(b[n:want])
		n += k
		switch {
		case r.direct && k == 0 && errors.Is(err, syscall.EINVAL):
			// refused after all (an overlayfs may check at the first read)
			if err := r.clear(); err != nil {
				return n, err
			}
			want = need
			continue
		case errors.Is(err, io.EOF), err == nil && k == 0:
			return min(n, need), nil
		case err != nil:
			return min(n, need), err
		}
		if r.direct && k%directAlign != 0 && n < need {
			// short and off a block: an O_DIRECT read from here would be refused
			if err := r.clear(); err != nil {
				return n, err
			}
			want = need
		}
	}
	return min(n, need), nil
}

func (r *directReader) clear() error {
	if err := r.f.SetDirect(false); err != nil {
		return fmt.Errorf("clear O_DIRECT: %w", err)
	}
	r.direct = false
	return nil
}

// sendDirect sends the size bytes of f (O_DIRECT set) to c as FrameData
// frames, then a FrameEOF; a file that fails to read or shrank ends in a
// failure reply instead (as ServeGet's buffered loop does). path names the
// file in errors.
func sendDirect(c io.Writer, f dioReader, size int64, path string) error {
	type filled struct {
		b   []byte
		n   int
		err error
	}
	// full carries read buffers to the sender in order, free brings them
	// back; neither ever holds more than the directBufs buffers there are,
	// so no send on them blocks.
	full := make(chan filled, directBufs)
	free := make(chan []byte, directBufs)
	stop := make(chan struct{})
	go func() {
		defer close(full)
		r := &directReader{f: f, direct: true}
		mapped := 0
		for off := int64(0); off < size; {
			select {
			case <-stop:
				return
			default:
			}
			var b []byte
			select {
			case b = <-free:
			default:
				if mapped < directBufs {
					var err error
					if b, err = getDirectBuf(); err != nil {
						full <- filled{err: err}
						return
					}
					mapped++
				} else {
					select {
					case b = <-free:
					case <-stop:
						return
					}
				}
			}
			n, err := r.read(b[directAlign:directAlign+getPayload], size-off)
			if err == nil && n < int(min(int64(getPayload), size-off)) {
				err = fmt.Errorf("%s shrank while it was read (%d of %d bytes)", path, off+int64(n), size)
			}
			full <- filled{b: b, n: n, err: err}
			if err != nil {
				return
			}
			off += int64(n)
		}
	}()
	var err error
	failed := false
	for it := range full {
		if err == nil {
			if it.err != nil {
				err, failed = it.err, true
			} else {
				frame := it.b[directAlign-5 : directAlign+it.n]
				frame[0] = FrameData
				putLen(frame[1:5], it.n)
				if _, err = c.Write(frame); err != nil {
					close(stop)
				}
			}
		}
		if it.b != nil {
			free <- it.b
		}
	}
	close(free)
	for b := range free {
		putDirectBuf(b)
	}
	if failed {
		_ = WriteFrame(c, FrameReply, ssh.Marshal(&Reply{Payload: []byte(err.Error())}))
		return err
	}
	if err != nil {
		return err
	}
	return WriteFrame(c, FrameEOF, nil)
}
