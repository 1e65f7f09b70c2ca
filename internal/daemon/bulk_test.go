package daemon

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
)

// TestBulkHelloPipelined: the first bulk hello of a runtime waits for the
// agent's answer (so a refusal or an old agent is an error the caller can
// act on); later ones do not, so the caller's first frames reach the agent
// before its answer comes back. The fake agent of the second stream answers
// only once it holds the caller's frame: a vm.bulk that waited for the
// answer first would never get it.
func TestBulkHelloPipelined(t *testing.T) {
	s := &vmService{log: logging.Discard()}
	rt := &runtime{}
	key := bytes.Repeat([]byte{7}, bulk.KeySize)
	hello := len(bulk.Magic) + bulk.KeySize
	ctx := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	// agent serves one stream: it reads `want` bytes, then writes answer.
	agent := func(t *testing.T, want int, answer string) (net.Conn, <-chan []byte) {
		host, guest := net.Pipe()
		t.Cleanup(func() { host.Close(); guest.Close() })
		got := make(chan []byte, 1)
		go func() {
			buf := make([]byte, want)
			if _, err := io.ReadFull(guest, buf); err != nil {
				got <- nil
				return
			}
			got <- buf
			guest.Write([]byte(answer))
		}()
		return host, got
	}

	// 1: waits for the answer.
	host, got := agent(t, hello, bulk.Accepted+"one")
	sc, err := s.bulkHello(ctx(t), rt, "vm", host, key)
	if err != nil {
		t.Fatalf("first hello: %v", err)
	}
	if b := <-got; !bytes.Equal(b[len(bulk.Magic):], key) {
		t.Fatalf("the agent got hello %q", b)
	}
	if !rt.bulkHelloOK.Load() {
		t.Fatal("an accepted hello was not remembered")
	}
	buf := make([]byte, 3)
	if _, err := io.ReadFull(sc, buf); err != nil || string(buf) != "one" {
		t.Fatalf("first stream read %q, %v", buf, err)
	}

	// 2: pipelined — the agent answers only after the caller's frame.
	frame := []byte("caller's first frame")
	host, got = agent(t, hello+len(frame), bulk.Accepted+"two")
	sc, err = s.bulkHello(ctx(t), rt, "vm", host, key)
	if err != nil {
		t.Fatalf("second hello: %v", err)
	}
	go sc.Write(frame)
	if b := <-got; !bytes.Equal(b[hello:], frame) {
		t.Fatalf("the agent got %q after the hello", b[hello:])
	}
	if _, err := io.ReadFull(sc, buf); err != nil || string(buf) != "two" {
		t.Fatalf("second stream read %q, %v (the answer must be stripped)", buf, err)
	}

	// 3: a refusal after all ends the stream with nothing of the agent's,
	// and the next hello waits again.
	host, _ = agent(t, hello, bulk.Refused+"secret")
	sc, err = s.bulkHello(ctx(t), rt, "vm", host, key)
	if err != nil {
		t.Fatalf("third hello: %v", err)
	}
	if n, err := sc.Read(buf); n != 0 || !errors.Is(err, bulk.ErrRefused) {
		t.Fatalf("refused stream read %d bytes (%q), %v", n, buf[:n], err)
	}
	if rt.bulkHelloOK.Load() {
		t.Fatal("a refusal left later hellos pipelined")
	}

	// 4: an agent without bulk streams, on a waited hello, is a failed
	// precondition (the client falls back to SSH).
	host, _ = agent(t, hello, "SSH-2.0-x\r\n")
	if _, err := s.bulkHello(ctx(t), rt, "vm", host, key); rpc.CodeOf(err) != rpc.CodeFailedPrecondition {
		t.Fatalf("old agent: %v (code %s), want %s", err, rpc.CodeOf(err), rpc.CodeFailedPrecondition)
	}
}
