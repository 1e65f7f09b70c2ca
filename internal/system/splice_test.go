package system

import (
	"io"
	"net"
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
