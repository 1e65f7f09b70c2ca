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
// channel both. The file is read into a mapped buffer (page-aligned, as
// O_DIRECT wants) whose first block is left free for the frame's header,
// so a frame (header and up to directBuf-directAlign bytes) goes out in
// one Write.
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
//
// One buffer, read then sent in turn: a pipeline of three (a goroutine
// reading the next buffer while the last one is sent, as a put does) was
// no faster in an A/B here, with one vCPU or two (docs/BENCHMARKS.md).
func sendDirect(c io.Writer, f dioReader, size int64, path string) error {
	b, err := getDirectBuf()
	if err != nil {
		return err
	}
	defer putDirectBuf(b)
	r := &directReader{f: f, direct: true}
	for off := int64(0); off < size; {
		n, err := r.read(b[directAlign:directAlign+getPayload], size-off)
		if err == nil && int64(n) < min(int64(getPayload), size-off) {
			err = fmt.Errorf("%s shrank while it was read (%d of %d bytes)", path, off+int64(n), size)
		}
		if err != nil {
			_ = WriteFrame(c, FrameReply, ssh.Marshal(&Reply{Payload: []byte(err.Error())}))
			return err
		}
		frame := b[directAlign-5 : directAlign+n]
		frame[0] = FrameData
		putLen(frame[1:5], n)
		if _, err := c.Write(frame); err != nil {
			return err
		}
		off += int64(n)
	}
	return WriteFrame(c, FrameEOF, nil)
}
