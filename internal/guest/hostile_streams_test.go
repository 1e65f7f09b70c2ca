package guest

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/bangerdev/banger/internal/agent/api"
)

// TestGuestOpenedStreamsNotKept plays a hostile agent that, once the host's
// session is up, opens many streams towards the host and fills each with
// data: bangerd accepts none of them, so it must not keep them (with their
// buffered data) either. With yamux's default backlog of 256 the host held
// all 40 below, 256 KiB each.
func TestGuestOpenedStreamsNotKept(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "serial.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	guestSess := make(chan *yamux.Session, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		br := bufio.NewReader(c)
		// the agent's side of the handshake: ack the preamble, wait for go
		kind, nonce, err := api.ReadMuxLine(br)
		if err != nil || kind != api.MuxPreamble {
			c.Close()
			return
		}
		if _, err := c.Write(api.MuxLine(api.MuxAck, nonce)); err != nil {
			return
		}
		for {
			kind, _, err := api.ReadMuxLine(br)
			if err != nil {
				return
			}
			if kind == api.MuxGo {
				break
			}
		}
		cfg := yamux.DefaultConfig()
		cfg.LogOutput = io.Discard
		sess, err := yamux.Server(&bufferedConn{Conn: c, r: br}, cfg)
		if err != nil {
			return
		}
		guestSess <- sess
	}()

	m := newSerialMux(path, slog.New(slog.DiscardHandler))
	defer m.close()
	hostSess, err := m.session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var gs *yamux.Session
	select {
	case gs = <-guestSess:
	case <-ctx.Done():
		t.Fatal("the fake agent never got its session")
	}
	defer gs.Close()

	const opened = 40
	chunk := make([]byte, 64<<10)
	for i := 0; i < opened; i++ {
		st, err := gs.OpenStream()
		if err != nil {
			t.Fatalf("open stream %d: %v", i, err)
		}
		go func() {
			for {
				if _, err := st.Write(chunk); err != nil {
					return
				}
			}
		}()
	}
	deadline := time.Now().Add(20 * time.Second)
	for hostSess.NumStreams() > 1 || gs.NumStreams() > 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the host keeps %d streams the guest opened (the guest sees %d open); want at most 1", hostSess.NumStreams(), gs.NumStreams())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
