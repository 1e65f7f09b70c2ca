package bulk

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sizes records the size of every Write.
type sizes struct {
	bytes.Buffer
	writes []int
}

func (s *sizes) Write(p []byte) (int, error) {
	s.writes = append(s.writes, len(p))
	return s.Buffer.Write(p)
}

// TestChanWriteToWholeFrames: io.Copy from a Chan (a command's stdin in
// the agent) hands each data frame over in one Write, in order, without
// cutting it into io.Copy's 32 KiB pieces.
func TestChanWriteToWholeFrames(t *testing.T) {
	host, agent := pipe(t)
	ch := NewChan(agent)
	defer ch.Close()
	data := randomBytes(3*chunk + 100)
	go func() {
		hc := NewChan(host)
		hc.Write(data) // frames of chunk bytes
		hc.CloseWrite()
	}()
	var got sizes
	n, err := io.Copy(&got, ch)
	if err != nil || n != int64(len(data)) || !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("copied %d bytes, %v; equal %v", n, err, bytes.Equal(got.Bytes(), data))
	}
	want := []int{chunk, chunk, chunk, 100}
	if len(got.writes) != len(want) {
		t.Fatalf("writes %v, want %v (a frame per write)", got.writes, want)
	}
	for i := range want {
		if got.writes[i] != want[i] {
			t.Fatalf("writes %v, want %v (a frame per write)", got.writes, want)
		}
	}
}

// TestQueueReadAcrossFrames: Read fills a buffer from several queued
// frames; what was queued before a failure stays readable, then the
// failure is returned; pushes after it fail.
func TestQueueReadAcrossFrames(t *testing.T) {
	q := newQueue(1 << 20)
	q.write([]byte("abc"))
	q.write([]byte("defg"))
	q.write(nil)
	b := make([]byte, 5)
	if n, err := q.Read(b); n != 5 || err != nil || string(b[:n]) != "abcde" {
		t.Fatalf("read %q %v", b[:n], err)
	}
	q.fail(net.ErrClosed)
	if n, err := q.Read(b); n != 2 || err != nil || string(b[:n]) != "fg" {
		t.Fatalf("read after fail %q %v", b[:n], err)
	}
	if _, err := q.Read(b); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read past the data: %v", err)
	}
	if err := q.write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after fail: %v", err)
	}
	if n, err := q.WriteTo(io.Discard); n != 0 || !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteTo after fail: %d %v", n, err)
	}
	q = newQueue(1 << 20)
	q.write([]byte("xyz"))
	q.closeWrite()
	var out bytes.Buffer
	if n, err := q.WriteTo(&out); n != 3 || err != nil || out.String() != "xyz" {
		t.Fatalf("WriteTo to EOF: %d %v %q", n, err, out.String())
	}
	if err := q.write([]byte("x")); err == nil {
		t.Fatal("data after EOF accepted")
	}
}

// TestQueueBound: push waits while the queue holds its maximum.
func TestQueueBound(t *testing.T) {
	q := newQueue(10)
	q.write(make([]byte, 10))
	pushed := make(chan struct{})
	go func() { q.write([]byte("y")); close(pushed) }()
	// A push that does not wait ends within microseconds; checked at once
	// (default:) the goroutine has rarely run yet, so give it 100 ms.
	select {
	case <-pushed:
		t.Fatal("a push beyond the bound did not wait")
	case <-time.After(100 * time.Millisecond):
	}
	io.ReadFull(q, make([]byte, 10))
	<-pushed
	b := make([]byte, 1)
	if _, err := q.Read(b); err != nil || b[0] != 'y' {
		t.Fatalf("%q %v", b, err)
	}
}

// TestChanToPipeReaderSplices: a command's stdin fed from a Chan (io.Copy,
// as the agent's session does) into a pipe, whose reader moves the bytes
// into another pipe with splice(2) (pv, Go's io.Copy between pipes) and
// reads that one only after the stream has ended and its buffers have been
// reused, still gets the bytes sent. A feeder that vmsplices frame buffers
// into the pipe (0a255c4, reverted) fails this: the second pipe still
// refers to a buffer the first reported read.
func TestChanToPipeReaderSplices(t *testing.T) {
	host, agent := pipe(t)
	ch := NewChan(agent)
	defer ch.Close()
	data := randomBytes(4*chunk + 100)
	go func() {
		hc := NewChan(host)
		hc.Write(data)
		hc.CloseWrite()
	}()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	pr2, pw2, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr2.Close()
	for _, w := range []*os.File{pw, pw2} {
		if _, err := unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, 2<<20); err != nil {
			t.Skipf("cannot grow a pipe to hold the whole stream: %v", err)
		}
	}
	fed := make(chan error, 1)
	go func() {
		_, err := io.Copy(pw, ch)
		pw.Close()
		fed <- err
	}()
	for moved := 0; moved < len(data); {
		n, err := unix.Splice(int(pr.Fd()), nil, int(pw2.Fd()), nil, len(data)-moved, 0)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Fatalf("the stream ended after %d of %d bytes", moved, len(data))
		}
		moved += int(n)
	}
	pw2.Close()
	select {
	case err := <-fed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the feed did not end")
	}
	// the stream's buffers go back to the pool: let another stream take
	// and overwrite them before the spliced bytes are read
	other := randomBytes(4 * chunk)
	var taken [][]byte
	for i := 0; i < 8; i++ {
		b := getBuf(chunk)
		copy(b, other)
		taken = append(taken, b)
	}
	for _, b := range taken {
		putBuf(b)
	}
	got, err := io.ReadAll(pr2)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes, equal %v: a buffer was reused while a pipe still referred to it", len(got), bytes.Equal(got, data))
	}
}
