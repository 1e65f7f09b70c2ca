package bulk

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"
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
