package bulk

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// TestServeControl: the agent side answers each request with one reply, in
// order, runs after only once the reply is out, and ends the stream on
// anything but a request (the host's goodbye ends it cleanly).
func TestServeControl(t *testing.T) {
	type result struct{ err error }
	serve := func(t *testing.T, h ControlHandler) (net.Conn, chan result) {
		host, agent := net.Pipe()
		done := make(chan result, 1)
		go func() { done <- result{ServeControl(agent, agent, h)}; agent.Close() }()
		t.Cleanup(func() { host.Close() })
		host.SetDeadline(time.Now().Add(10 * time.Second))
		return host, done
	}
	t.Run("requests and replies", func(t *testing.T) {
		var order []string
		host, done := serve(t, func(name string, p []byte) (bool, []byte, func()) {
			order = append(order, "handle "+name)
			return name == "yes", append([]byte(name+":"), p...), func() { order = append(order, "after "+name) }
		})
		for _, name := range []string{"yes", "no"} {
			ok, reply, err := ControlCall(host, name, []byte("p"), 1024)
			if err != nil || ok != (name == "yes") || string(reply) != name+":p" {
				t.Fatalf("%s: %v %q %v", name, ok, reply, err)
			}
		}
		WriteFrame(host, FrameClose, nil)
		if r := <-done; r.err != nil {
			t.Fatalf("a goodbye ended the stream with %v", r.err)
		}
		if got := strings.Join(order, ","); got != "handle yes,after yes,handle no,after no" {
			t.Fatalf("order %s", got)
		}
	})
	bad := []struct {
		name  string
		frame func() []byte
	}{
		{"data frame", func() []byte { return frameBytes(FrameData, []byte("x")) }},
		{"unknown frame", func() []byte { return frameBytes(99, nil) }},
		{"undecodable request", func() []byte { return frameBytes(FrameRequest, []byte{0, 0, 0, 9}) }},
		{"request over the bound", func() []byte {
			return frameBytes(FrameRequest, ssh.Marshal(&Request{Type: "x", WantReply: true, Payload: make([]byte, MaxControlRequest+2048)}))
		}},
		{"frame over MaxFrame", func() []byte { return []byte{FrameRequest, 0x7f, 0xff, 0xff, 0xff} }},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			called := false
			host, done := serve(t, func(string, []byte) (bool, []byte, func()) { called = true; return true, nil, nil })
			go host.Write(tt.frame())
			if r := <-done; r.err == nil {
				t.Fatal("the stream was not ended with an error")
			}
			if called {
				t.Fatal("the handler ran")
			}
		})
	}
}

func frameBytes(typ byte, p []byte) []byte {
	var b bytes.Buffer
	WriteFrame(&b, typ, p)
	return b.Bytes()
}

// TestControlCallBounds: the host refuses to send an oversized request, and
// an agent that closes the stream instead of answering is reported as such
// (what an agent without the operation does).
func TestControlCallBounds(t *testing.T) {
	var sink bytes.Buffer
	if _, _, err := ControlCall(struct {
		io.Reader
		io.Writer
	}{strings.NewReader(""), &sink}, "x", make([]byte, MaxControlRequest+1), 1024); err == nil || sink.Len() != 0 {
		t.Fatalf("an oversized request: %v, %d bytes sent", err, sink.Len())
	}
	// the agent's close seen by the request's write (EPIPE) or the read
	host, agent := net.Pipe()
	agent.Close()
	if _, _, err := ControlCall(host, "x", nil, 1024); !errors.Is(err, ErrControlClosed) {
		t.Fatalf("a stream the agent closed: %v, want ErrControlClosed", err)
	}
	for _, answer := range [][]byte{nil, frameBytes(FrameClose, nil)} {
		_, _, err := ControlCall(struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(answer), io.Discard}, "x", nil, 1024)
		if !errors.Is(err, ErrControlClosed) {
			t.Fatalf("answer %q: %v, want ErrControlClosed", answer, err)
		}
	}
}
