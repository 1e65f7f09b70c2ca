package bulk

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// countingSpool counts the host's slot writes (and checks each is within
// one slot, as recordingSpool does).
type countingSpool struct {
	recordingSpool
	writes *atomic.Int32
}

func (c countingSpool) WriteAt(b []byte, off int64) (int, error) {
	c.writes.Add(1)
	return c.recordingSpool.WriteAt(b, off)
}

// vectorFile is the agent's device with ReadvAt (VectorDev), as lazyDev is.
type vectorFile struct{ *os.File }

func (v vectorFile) ReadvAt(bufs [][]byte, off int64) error { return ReadvFull(v.File, bufs, off) }

// sessionAgent plays the agent's dispatch for a session's spool form
// (sshd.ServeBulk): it accepts the spool and serves a Chan on dev.
func sessionAgent(c net.Conn, dev SpoolDev) (*Chan, func(), error) {
	o, err := ReadOpen(c)
	if err != nil {
		return nil, nil, err
	}
	if op, spool := SpoolOp(o.Op); !spool || op != OpSession {
		return nil, nil, fmt.Errorf("op %q", o.Op)
	}
	release, err := AcquireSpool()
	if err != nil {
		return nil, nil, refuse(c, err)
	}
	if err := SpoolAccept(c); err != nil {
		release()
		return nil, nil, err
	}
	return NewSpoolChan(c, dev), release, nil
}

// TestSpoolSession: a session's stdin through bangerd's relay and the
// spool arrives whole and in order, whether its frames went in slots or on
// the channel; what a person types (a small frame) and a large frame with
// nothing after it both reach the command without waiting for more; small
// frames never touch the spool; the agent's acceptance and acks never
// reach the client, and the agent's output does.
func TestSpoolSession(t *testing.T) {
	for _, vector := range []bool{false, true} {
		t.Run(fmt.Sprintf("vector=%v", vector), func(t *testing.T) {
			sp := spoolFile(t)
			var dev SpoolDev = sp
			if vector {
				dev = vectorFile{sp}
			}
			var writes atomic.Int32
			client, hostEnd := socketPair(t)
			relayEnd, agentEnd := socketPair(t)
			typed, burst := []byte("ls -l\n"), randomBytes(300<<10)
			var rest [][]byte
			for _, n := range []int{sessionSpoolMin, 5, SpoolSlot, MaxFrame, 1, sessionSpoolMin - 1, chunk, 3*chunk + 7, 4096} {
				rest = append(rest, randomBytes(n))
			}
			all := sha256.New()
			for _, b := range append([][]byte{typed, burst}, rest...) {
				all.Write(b)
			}
			step := make(chan string, 4)
			served := make(chan error, 1)
			go func() {
				served <- func() error {
					defer agentEnd.Close()
					ch, release, err := sessionAgent(agentEnd, dev)
					if err != nil {
						return err
					}
					defer release()
					defer ch.Close()
					h := sha256.New()
					for _, want := range [][]byte{typed, burst} {
						got := make([]byte, len(want))
						if _, err := io.ReadFull(ch, got); err != nil {
							return err
						}
						if !bytes.Equal(got, want) {
							return fmt.Errorf("got %d bytes that differ from those sent", len(got))
						}
						h.Write(got)
						step <- fmt.Sprint(len(got))
					}
					if _, err := io.Copy(h, ch); err != nil {
						return err
					}
					if _, err := ch.Write(h.Sum(nil)); err != nil {
						return err
					}
					return ch.CloseWrite()
				}()
			}()
			_, relayed := relay(hostEnd, relayEnd, countingSpool{recordingSpool{t, sp}, &writes})
			if err := WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpSession})); err != nil {
				t.Fatal(err)
			}
			WriteFrame(client, FrameData, typed)
			waitStep(t, step, "typed")
			if n := writes.Load(); n != 0 {
				t.Fatalf("%d spool writes for a typed line, want 0", n)
			}
			WriteFrame(client, FrameData, burst)
			waitStep(t, step, "burst")
			if n := writes.Load(); n != 1 {
				t.Fatalf("%d spool writes for one frame of 300 KiB, want 1", n)
			}
			for _, b := range rest {
				if err := WriteFrame(client, FrameData, b); err != nil {
					t.Fatal(err)
				}
			}
			WriteFrame(client, FrameEOF, nil)
			typ, p, err := ReadFrame(client, nil)
			if err != nil || typ != FrameData || !bytes.Equal(p, all.Sum(nil)) {
				t.Fatalf("first frame to the client: type %d %x %v, want the agent's hash of all sent", typ, p, err)
			}
			// then the agent's EOF and close, until the relay ends
			for {
				typ, _, err := ReadFrame(client, nil)
				if err != nil {
					break
				}
				if typ != FrameEOF && typ != FrameClose {
					t.Fatalf("frame type %d after the hash", typ)
				}
			}
			client.Close()
			if err := <-served; err != nil {
				t.Fatalf("agent: %v", err)
			}
			if err := <-relayed; err != nil {
				t.Fatalf("relay: %v", err)
			}
			if n := writes.Load(); n < 4 {
				t.Fatalf("%d spool writes in all, want the large frames' slots", n)
			}
		})
	}
}

func waitStep(t *testing.T, step chan string, what string) {
	t.Helper()
	select {
	case <-step:
	case <-time.After(10 * time.Second):
		t.Fatalf("the agent did not get the %s frame: held back by the relay", what)
	}
}

// TestSpoolSessionRefused: an agent without a session spool form closes
// the stream, a busy one refuses it; either way the relay reports
// ErrSpoolRefused having sent the client nothing (bangerd then opens a
// plain stream), and an agent that answers with anything but its
// acceptance ends the relay.
func TestSpoolSessionRefused(t *testing.T) {
	sp := spoolFile(t)
	tests := []struct {
		name    string
		agent   func(c net.Conn)
		refused bool
	}{
		{"old agent", func(c net.Conn) { ReadOpen(c) }, true},
		{"busy", func(c net.Conn) {
			release, err := AcquireSpool()
			if err != nil {
				t.Error(err)
				return
			}
			defer release()
			sessionAgent(c, sp)
		}, true},
		{"a failure", func(c net.Conn) {
			ReadOpen(c)
			refuse(c, errors.New("no"))
			io.Copy(io.Discard, c)
		}, false},
		{"data first", func(c net.Conn) {
			ReadOpen(c)
			WriteFrame(c, FrameData, []byte("x"))
			io.Copy(io.Discard, c)
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, hostEnd := socketPair(t)
			relayEnd, agentEnd := socketPair(t)
			go func() { tt.agent(agentEnd); agentEnd.Close() }()
			_, relayed := relay(hostEnd, relayEnd, sp)
			WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpSession}))
			err := <-relayed
			if errors.Is(err, ErrSpoolRefused) != tt.refused || err == nil {
				t.Fatalf("relay: %v, want refused %v", err, tt.refused)
			}
			if b, _ := io.ReadAll(client); len(b) != 0 {
				t.Fatalf("the client got %q", b)
			}
		})
	}
}

// TestSpoolSessionHostileHost: the agent's session refuses slots out of
// turn, out of range or malformed (a host bug must not reorder or invent
// stdin); a plain session refuses spool frames altogether.
func TestSpoolSessionHostileHost(t *testing.T) {
	sp := spoolFile(t)
	tests := []struct {
		name   string
		dev    bool
		typ    byte
		p      []byte
		errHas string
	}{
		{"a slot out of turn", true, FrameSpool, spoolFrame(3, 10), "where 0 was due"},
		{"beyond a slot", true, FrameSpool, spoolFrame(0, SpoolSlot+1), "1 to"},
		{"an empty slot", true, FrameSpool, spoolFrame(0, 0), "1 to"},
		{"out of range", true, FrameSpool, spoolFrame(SpoolSlots, 1), "out of range"},
		{"a short spool frame", true, FrameSpool, []byte{0, 0, 0, 0}, "want 8"},
		{"an ack from the host", true, FrameSpoolAck, ackFrame(0), "unknown frame type"},
		{"a spool frame in a plain session", false, FrameSpool, spoolFrame(0, 10), "unknown frame type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, agent := socketPair(t)
			var ch *Chan
			if tt.dev {
				ch = NewSpoolChan(agent, sp)
			} else {
				ch = NewChan(agent)
			}
			defer ch.Close()
			WriteFrame(host, FrameData, []byte("first"))
			WriteFrame(host, tt.typ, tt.p)
			got, err := io.ReadAll(ch)
			if string(got) != "first" || err == nil || !strings.Contains(err.Error(), tt.errHas) {
				t.Fatalf("stdin %q, error %v; want what came before and an error saying %q", got, err, tt.errHas)
			}
		})
	}
}

// TestRelaySpoolSessionClientSpoolFrame: a client may not speak the
// spool's frames itself in a session.
func TestRelaySpoolSessionClientSpoolFrame(t *testing.T) {
	sp := spoolFile(t)
	client, hostEnd := socketPair(t)
	relayEnd, agentEnd := socketPair(t)
	go func() {
		ch, release, err := sessionAgent(agentEnd, sp)
		if err == nil {
			io.Copy(io.Discard, ch)
			release()
		}
		agentEnd.Close()
	}()
	_, relayed := relay(hostEnd, relayEnd, sp)
	WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpSession}))
	WriteFrame(client, FrameSpool, spoolFrame(0, 10))
	if err := <-relayed; err == nil || !strings.Contains(err.Error(), "spool frame") {
		t.Fatalf("relay: %v, want a refusal of the client's spool frame", err)
	}
}

// TestReadvFull: a read into several buffers fills each in turn from the
// offset; past the end is an error, not a short success.
func TestReadvFull(t *testing.T) {
	data := randomBytes(64 << 10)
	p := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, tt := range []struct {
		sizes []int
		off   int64
		ok    bool
	}{
		{[]int{4096}, 0, true},
		{[]int{4096, 8192, 4096}, 8192, true},
		{[]int{32 << 10, 32 << 10}, 0, true},
		{[]int{32 << 10, 32 << 10}, 4096, false},
	} {
		var bufs [][]byte
		for _, n := range tt.sizes {
			bufs = append(bufs, make([]byte, n))
		}
		err := ReadvFull(f, append([][]byte(nil), bufs...), tt.off)
		if (err == nil) != tt.ok {
			t.Fatalf("sizes %v at %d: %v, want ok %v", tt.sizes, tt.off, err, tt.ok)
		}
		if !tt.ok {
			continue
		}
		off := tt.off
		for i, b := range bufs {
			if !bytes.Equal(b, data[off:off+int64(len(b))]) {
				t.Fatalf("sizes %v at %d: buffer %d differs", tt.sizes, tt.off, i)
			}
			off += int64(len(b))
		}
	}
}
