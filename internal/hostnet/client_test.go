package hostnet

import (
	"bufio"
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// busyHelper answers the first busy connections "unavailable" (as the
// helper does over its per-uid cap) and then answers system.ping.
func busyHelper(t *testing.T, busy int64) (string, *atomic.Int64) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "h.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if n.Add(1) <= busy {
				c.Write([]byte(`{"error":{"code":"unavailable","message":"uid 1000 already has 8 connections open","op_id":"op-abc123"}}` + "\n"))
				c.Close()
				continue
			}
			bufio.NewReader(c).ReadString('\n')
			c.Write([]byte(`{"result":{"helper":"banger-helper","bridge":"banger0"},"op_id":"op-abc124"}` + "\n"))
			c.Close()
		}
	}()
	return sock, &n
}

func TestClientRetriesWhileHelperBusy(t *testing.T) {
	sock, n := busyHelper(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := (&Client{Socket: sock}).Ping(ctx)
	if err != nil || p.Bridge != "banger0" || n.Load() != 4 {
		t.Fatalf("ping through a busy helper: %+v %v after %d connections", p, err, n.Load())
	}
	// Always busy: the caller's deadline ends the wait, and says why.
	sock, _ = busyHelper(t, 1<<40)
	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = (&Client{Socket: sock}).Ping(ctx)
	if err == nil || !strings.Contains(err.Error(), "8 connections") || time.Since(start) > 5*time.Second {
		t.Fatalf("always busy: %v after %s", err, time.Since(start))
	}
}
