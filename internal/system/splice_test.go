package system

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

func TestSpliceBothWaysWithHalfClose(t *testing.T) {
	// client <-> (a | Splice | b) <-> server, over real TCP loopback so CloseWrite exists
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pair := func() (net.Conn, net.Conn) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return c, s
	}
	client, a := pair()
	b, server := pair()
	done := make(chan struct{})
	go func() { Splice(a, b); close(done) }()

	// server echoes until EOF, then answers "bye"
	go func() {
		data, _ := io.ReadAll(server)
		server.Write(append(data, []byte(" bye")...))
		server.Close()
	}()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	client.Write([]byte("hello"))
	client.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(client)
	if err != nil || string(got) != "hello bye" {
		t.Fatalf("got %q, %v", got, err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Splice did not return after both directions ended")
	}
}

// writeSizes records the size of every Write to its net.Conn.
type writeSizes struct {
	net.Conn
	mu    sync.Mutex
	sizes []int
}

func (w *writeSizes) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.sizes = append(w.sizes, len(p))
	w.mu.Unlock()
	return w.Conn.Write(p)
}

// TestSpliceBufferWriteSize: SpliceBuffer hands on what one read returns in
// one write, beyond io.Copy's 32 KiB (a bulk frame reaches yamux whole).
func TestSpliceBufferWriteSize(t *testing.T) {
	const frame = 256 << 10
	client, a := net.Pipe()
	b, server := net.Pipe()
	for _, c := range []net.Conn{client, a, b, server} {
		c.SetDeadline(time.Now().Add(20 * time.Second))
	}
	rec := &writeSizes{Conn: b}
	done := make(chan struct{})
	go func() { SpliceBuffer(a, rec, 512<<10); close(done) }()
	go func() {
		client.Write(make([]byte, frame))
		client.Close()
	}()
	n, err := io.Copy(io.Discard, server)
	if err != nil || n != frame {
		t.Fatalf("spliced %d bytes, %v", n, err)
	}
	server.Close()
	<-done
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.sizes) != 1 || rec.sizes[0] != frame {
		t.Fatalf("writes %v, want one of %d", rec.sizes, frame)
	}
}
