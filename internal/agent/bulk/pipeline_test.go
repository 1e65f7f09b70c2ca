package bulk

import (
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// TestBatchOneWrite: a Batch's Open, requests and EOF arrive as one write
// and the agent's side reads them as the frames Chan would have sent one by
// one; the Chan made after it does not send its EOF twice.
func TestBatchOneWrite(t *testing.T) {
	host, guest := net.Pipe()
	defer host.Close()
	defer guest.Close()
	var b Batch
	b.Open(Open{Op: OpSession, User: "u"})
	b.Request("env", ssh.Marshal(&struct{ Name, Value string }{"A", "1"}))
	b.Request("exec", ssh.Marshal(&struct{ Command string }{"true"}))
	b.EOF()
	p, err := b.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	writes := make(chan int, 8)
	go func() {
		buf := make([]byte, 64<<10)
		var all []byte
		for {
			n, err := guest.Read(buf)
			if n > 0 {
				writes <- n
				all = append(all, buf[:n]...)
			}
			if err != nil || bytes.HasSuffix(all, []byte{FrameClose, 0, 0, 0, 0}) {
				close(writes)
				return
			}
		}
	}()
	if _, err := host.Write(p); err != nil {
		t.Fatal(err)
	}
	// net.Pipe delivers one Write as one Read when the buffer is large enough.
	if n := <-writes; n != len(p) {
		t.Fatalf("the batch arrived as a read of %d bytes, want %d in one", n, len(p))
	}
	ch := NewChanAfter(host, &b)
	if err := ch.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	go ch.Close()
	var rest []int
	for n := range writes {
		rest = append(rest, n)
	}
	if len(rest) != 1 || rest[0] != 5 {
		t.Fatalf("after the batch the host sent reads of %v bytes, want only the 5-byte close (no second EOF)", rest)
	}

	// The frames parse as the agent reads them.
	r := bytes.NewReader(p)
	o, err := ReadOpen(r)
	if err != nil || o.Op != OpSession || o.User != "u" {
		t.Fatalf("open %+v, %v", o, err)
	}
	var types []byte
	for {
		typ, payload, err := ReadFrame(r, nil)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		types = append(types, typ)
		if typ == FrameRequest {
			var req Request
			if err := ssh.Unmarshal(payload, &req); err != nil || req.WantReply {
				t.Fatalf("request %+v, %v", req, err)
			}
		}
	}
	if !bytes.Equal(types, []byte{FrameRequest, FrameRequest, FrameEOF}) {
		t.Fatalf("frame types %v", types)
	}

	var big Batch
	big.Request("env", make([]byte, MaxFrame))
	if _, err := big.Bytes(); err == nil {
		t.Fatal("a frame over MaxFrame was batched")
	}
}

// TestAfterHello: writes go through before the agent's answer; the answer
// is stripped from what is read; a refusal or an SSH server fails the read
// with nothing of the agent's bytes, and is reported once.
func TestAfterHello(t *testing.T) {
	for _, tt := range []struct {
		answer string
		want   error
	}{
		{Accepted + "frames", nil},
		{Refused + "leak", ErrRefused},
		{"SSH-2.0-leak\r\n", ErrUnsupported},
	} {
		host, guest := net.Pipe()
		var failed []error
		c := AfterHello(host, time.Second, func(err error) { failed = append(failed, err) })
		go func() {
			buf := make([]byte, 5)
			io.ReadFull(guest, buf) // the caller's frame, before any answer
			guest.Write([]byte(tt.answer))
			guest.Close()
		}()
		if _, err := c.Write([]byte("frame")); err != nil {
			t.Fatalf("%q: write before the answer: %v", tt.answer, err)
		}
		got, err := io.ReadAll(c)
		if tt.want == nil {
			if err != nil || string(got) != "frames" || failed != nil {
				t.Errorf("%q: read %q, %v, failures %v", tt.answer, got, err, failed)
			}
		} else if len(got) != 0 || !errors.Is(err, tt.want) || len(failed) != 1 || strings.Contains(string(got), "leak") {
			t.Errorf("%q: read %q, %v, failures %v; want nothing and %v", tt.answer, got, err, failed, tt.want)
		}
		host.Close()
	}
	// An agent that never answers: the read ends at the wait.
	host, guest := net.Pipe()
	defer guest.Close()
	c := AfterHello(host, 50*time.Millisecond, nil)
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("a read with no answer succeeded")
	}
	host.Close()
}

// TestNewChanReusesThePeekBuffer: on the agent a stream is a PeekConn with
// its buffer already; NewChan must not allocate another 256 KiB one per
// stream (under TCG its zeroing and page faults are on every exec's path).
func TestNewChanReusesThePeekBuffer(t *testing.T) {
	host, guest := net.Pipe()
	defer host.Close()
	defer guest.Close()
	_, pc := Classify(guest, time.Millisecond) // nothing sent: a PeekConn all the same
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	c := NewChan(pc)
	runtime.ReadMemStats(&after)
	defer c.Close()
	if got := after.TotalAlloc - before.TotalAlloc; got >= 256<<10 {
		t.Fatalf("NewChan on a PeekConn allocated %d bytes", got)
	}
}
