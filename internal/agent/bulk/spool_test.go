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
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// spoolFile is a host spool file for a test; the "device" the agent side
// uses is the same file (in a VM, QEMU makes the host file the device).
func spoolFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "spool.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(SpoolSize); err != nil {
		t.Fatal(err)
	}
	return f
}

// serveSpoolAgent plays the agent's dispatch (sshd.ServeBulk) for the
// one-file operations: the spool form runs the plain one with dev.
func serveSpoolAgent(c net.Conn, dev SpoolDev) error {
	defer c.Close()
	o, err := ReadOpen(c)
	if err != nil {
		return err
	}
	op, spool := SpoolOp(o.Op)
	if spool {
		release, err := AcquireSpool()
		if err != nil {
			return refuse(c, err)
		}
		defer release()
	} else {
		dev = nil
	}
	switch op {
	case OpPut:
		return ServePut(c, c, o.Arg, dev)
	case OpGet:
		return ServeGet(c, c, o.Arg, dev)
	case OpPutFile:
		req, err := ReadPutFile(c)
		if err != nil {
			return err
		}
		return ServePutFile(c, c, req, o.Arg, false, dev)
	case OpGetFile:
		return ServeGetFile(c, c, o.Arg, dev)
	}
	return fmt.Errorf("op %q", o.Op)
}

// relay plays bangerd's vm.bulk with BulkParams.Spool: StartSpool, then
// RelaySpool when the operation has a spool form, else a plain relay.
// It reports whether the spool was taken.
func relay(client, agent net.Conn, spool SpoolFile) (spooled chan bool, done chan error) {
	spooled, done = make(chan bool, 1), make(chan error, 1)
	go func() {
		defer client.Close()
		defer agent.Close()
		frames, o, ok, err := StartSpool(client)
		spooled <- ok && err == nil
		if err != nil {
			done <- err
			return
		}
		if ok {
			done <- RelaySpool(client, agent, spool, frames, o)
			return
		}
		agent.Write(frames)
		go io.Copy(agent, client)
		_, err = io.Copy(client, agent)
		done <- err
	}()
	return spooled, done
}

// recordingSpool checks that every read and write of the host file is
// within one slot.
type recordingSpool struct {
	t *testing.T
	f *os.File
}

func (r recordingSpool) check(n int, off int64) {
	if off < SpoolHeader || (off-SpoolHeader)%SpoolSlot != 0 || off >= SpoolSize || n > SpoolSlot {
		r.t.Errorf("host spool I/O of %d bytes at %d: not within one slot", n, off)
	}
}
func (r recordingSpool) ReadAt(b []byte, off int64) (int, error) {
	r.check(len(b), off)
	return r.f.ReadAt(b, off)
}
func (r recordingSpool) WriteAt(b []byte, off int64) (int, error) {
	r.check(len(b), off)
	return r.f.WriteAt(b, off)
}

// TestSpoolRoundTrip: files put into the guest and got back (OpPut/OpGet
// and OpPutFile/OpGetFile) through bangerd's relay and the spool arrive
// whole, for sizes around a block, a slot, the inline limit, and more than
// all the slots (so slots are reused); the small ones stay on frames.
func TestSpoolRoundTrip(t *testing.T) {
	sizes := []int{0, 1, 4095, MaxInline, MaxInline + 1, SpoolSlot - 1, SpoolSlot, SpoolSlot + 1, SpoolSlots*SpoolSlot + 12345}
	for _, files := range []bool{false, true} {
		for _, size := range sizes {
			t.Run(fmt.Sprintf("files=%v/%d", files, size), func(t *testing.T) {
				sp := spoolFile(t)
				dir := t.TempDir()
				p := filepath.Join(dir, "f")
				data := randomBytes(size)
				run := func(open Open, client func(net.Conn) error) bool {
					t.Helper()
					c, hostEnd := socketPair(t)
					relayEnd, agentEnd := socketPair(t)
					served := make(chan error, 1)
					go func() { served <- serveSpoolAgent(agentEnd, sp) }()
					spooled, relayed := relay(hostEnd, relayEnd, recordingSpool{t, sp})
					if err := WriteFrame(c, FrameOpen, ssh.Marshal(&open)); err != nil {
						t.Fatal(err)
					}
					if err := client(c); err != nil {
						t.Fatalf("%s: client: %v", open.Op, err)
					}
					c.Close()
					if err := <-served; err != nil {
						t.Fatalf("%s: agent: %v", open.Op, err)
					}
					if err := <-relayed; err != nil {
						t.Fatalf("%s: relay: %v", open.Op, err)
					}
					return <-spooled
				}
				var put, get bool
				var out bytes.Buffer
				if files {
					put = run(Open{Op: OpPutFile, Arg: dir}, func(c net.Conn) error {
						_, err := PutFileHost(c, "f", 0o640, time.Unix(1700000000, 0), bytes.NewReader(data))
						return err
					})
					get = run(Open{Op: OpGetFile, Arg: p}, func(c net.Conn) error {
						g, m, err := StartGetFile(c)
						if err == nil && m.Mode != 0o640 {
							err = fmt.Errorf("mode %o", m.Mode)
						}
						if err == nil {
							_, err = g.WriteTo(&out)
						}
						return err
					})
				} else {
					put = run(Open{Op: OpPut, Arg: p}, func(c net.Conn) error {
						w, err := StartPut(c)
						if err != nil {
							return err
						}
						if _, err := w.Write(data[:size/3]); err != nil {
							return err
						}
						if _, err := w.ReadFrom(bytes.NewReader(data[size/3:])); err != nil {
							return err
						}
						return w.Finish()
					})
					get = run(Open{Op: OpGet, Arg: p}, func(c net.Conn) error {
						g, err := StartGet(c)
						if err == nil {
							_, err = g.WriteTo(&out)
						}
						return err
					})
				}
				if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, data) {
					t.Fatalf("put: a file of %d bytes (%v), want %d", len(got), err, size)
				}
				if !bytes.Equal(out.Bytes(), data) {
					t.Fatalf("get: %d bytes back, want %d", out.Len(), size)
				}
				// an inline OpPutFile stays on frames
				if wantPut := !files || size > MaxInline; put != wantPut {
					t.Fatalf("put through the spool: %v, want %v", put, wantPut)
				}
				if !get {
					t.Fatal("get not through the spool")
				}
			})
		}
	}
}

// TestSpoolRefused: without a spool device, with the spool busy, or with
// an agent that does not know the operation, RelaySpool says
// ErrSpoolRefused and its client got nothing (bangerd then sends the
// client's frames on a new stream).
func TestSpoolRefused(t *testing.T) {
	sp := spoolFile(t)
	tests := []struct {
		name  string
		agent func(c net.Conn)
	}{
		{"no device", func(c net.Conn) {
			ReadOpen(c)
			refuse(c, errors.New(Unsupported+"no spool device"))
		}},
		{"busy", func(c net.Conn) {
			release, err := AcquireSpool()
			if err != nil {
				t.Error(err)
				return
			}
			defer release()
			serveSpoolAgent(c, sp)
		}},
		{"old agent", func(c net.Conn) { ReadOpen(c) }}, // closes the stream
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, hostEnd := socketPair(t)
			relayEnd, agentEnd := socketPair(t)
			go func() { tt.agent(agentEnd); agentEnd.Close() }()
			_, relayed := relay(hostEnd, relayEnd, sp)
			WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpPut, Arg: "f"}))
			if err := <-relayed; !errors.Is(err, ErrSpoolRefused) {
				t.Fatalf("relay: %v, want ErrSpoolRefused", err)
			}
			if b, _ := io.ReadAll(client); len(b) != 0 {
				t.Fatalf("the client got %q", b)
			}
		})
	}
	// An error that is not a refusal (no such directory) reaches the
	// client as the plain operation's would.
	client, hostEnd := socketPair(t)
	relayEnd, agentEnd := socketPair(t)
	go serveSpoolAgent(agentEnd, sp)
	_, relayed := relay(hostEnd, relayEnd, sp)
	WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpPut, Arg: "/nonexistent/dir/f"}))
	if _, err := StartPut(client); !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("put into a missing directory: %v", err)
	}
	client.Close()
	if err := <-relayed; err != nil {
		t.Fatal(err)
	}
}

// TestRelaySpoolHostileAgent plays a guest agent that lies about its
// slots: the relay reads nothing of the host file but the slot due, and
// ends on every deviation.
func TestRelaySpoolHostileAgent(t *testing.T) {
	spool := func(slot, n uint32) []byte {
		var b [8]byte
		b[0], b[1], b[2], b[3] = byte(slot>>24), byte(slot>>16), byte(slot>>8), byte(slot)
		b[4], b[5], b[6], b[7] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
		return b[:]
	}
	type step struct {
		typ byte
		p   []byte
	}
	tests := []struct {
		name   string
		steps  []step
		errHas string
	}{
		{"a slot out of turn", []step{{FrameSpool, spool(1, 10)}}, "where 0 was due"},
		{"a later slot out of turn", []step{{FrameSpool, spool(0, 10)}, {FrameSpool, spool(0, 10)}}, "where 1 was due"},
		{"a slot out of range", []step{{FrameSpool, spool(SpoolSlots, 10)}}, "out of range"},
		{"a huge slot", []step{{FrameSpool, spool(0xffffffff, 10)}}, "out of range"},
		{"beyond a slot", []step{{FrameSpool, spool(0, SpoolSlot+1)}}, "1 to"},
		{"an empty slot", []step{{FrameSpool, spool(0, 0)}}, "1 to"},
		{"a short spool frame", []step{{FrameSpool, []byte{0, 0, 0}}}, "want 8"},
		{"an ack of nothing", []step{{FrameSpoolAck, ackFrame(0)}}, "not in use"},
		{"an ack out of range", []step{{FrameSpoolAck, ackFrame(SpoolSlots)}}, "out of range"},
		{"a short ack", []step{{FrameSpoolAck, []byte{0}}}, "want 4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sp := spoolFile(t)
			client, hostEnd := socketPair(t)
			relayEnd, agentEnd := socketPair(t)
			go func() {
				ReadOpen(agentEnd)
				WriteFrame(agentEnd, FrameReply, ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&FileInfo{Size: 1 << 30, Mode: 0o600})}))
				for _, s := range tt.steps {
					WriteFrame(agentEnd, s.typ, s.p)
				}
				io.Copy(io.Discard, agentEnd) // the acks, until the relay closes
			}()
			_, relayed := relay(hostEnd, relayEnd, recordingSpool{t, sp})
			WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpGet, Arg: "f"}))
			g, err := StartGet(client)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := g.WriteTo(io.Discard); err == nil {
				t.Fatal("the client's get succeeded")
			}
			if err := <-relayed; err == nil || !strings.Contains(err.Error(), tt.errHas) {
				t.Fatalf("relay: %v, want one saying %q", err, tt.errHas)
			}
		})
	}
}

// TestRelaySpoolPutAgentGivesUp: an agent that cannot write the file (no
// space left) says so mid-put, and the client hears why.
func TestRelaySpoolPutAgentGivesUp(t *testing.T) {
	sp := spoolFile(t)
	client, hostEnd := socketPair(t)
	relayEnd, agentEnd := socketPair(t)
	go func() {
		ReadOpen(agentEnd)
		WriteFrame(agentEnd, FrameReply, ssh.Marshal(&Reply{OK: true}))
		ReadFrame(agentEnd, nil)
		WriteFrame(agentEnd, FrameReply, ssh.Marshal(&Reply{Payload: []byte("no space left on device")}))
		agentEnd.Close()
	}()
	_, relayed := relay(hostEnd, relayEnd, recordingSpool{t, sp})
	WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpPut, Arg: "f"}))
	w, err := StartPut(client)
	if err != nil {
		t.Fatal(err)
	}
	_, err = w.ReadFrom(bytes.NewReader(make([]byte, 3*SpoolSlots*SpoolSlot)))
	if err == nil {
		err = w.Finish()
	}
	if !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("client: %v, want the agent's reason", err)
	}
	<-relayed
}

// TestRelaySpoolClientGoes: a client that goes away mid-put ends the
// agent's side (which fails the file) and the relay.
func TestRelaySpoolClientGoes(t *testing.T) {
	sp := spoolFile(t)
	p := filepath.Join(t.TempDir(), "f")
	client, hostEnd := socketPair(t)
	relayEnd, agentEnd := socketPair(t)
	served := make(chan error, 1)
	go func() { served <- serveSpoolAgent(agentEnd, sp) }()
	_, relayed := relay(hostEnd, relayEnd, sp)
	WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpPut, Arg: p}))
	w, err := StartPut(client)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(make([]byte, 3*SpoolSlot)); err != nil {
		t.Fatal(err)
	}
	client.Close()
	if err := <-relayed; err == nil {
		t.Fatal("relay: no error")
	}
	if err := <-served; err == nil {
		t.Fatal("agent: no error for a put cut off")
	}
}

// TestServeSpoolHostileHost: the agent refuses a slot out of turn (a host
// bug must not reorder a file), and one spool operation runs at a time.
func TestServeSpoolHostileHost(t *testing.T) {
	sp := spoolFile(t)
	p := filepath.Join(t.TempDir(), "f")
	host, agent := socketPair(t)
	served := make(chan error, 1)
	go func() { served <- serveSpoolAgent(agent, sp) }()
	WriteFrame(host, FrameOpen, ssh.Marshal(&Open{Op: OpPut + SpoolSuffix, Arg: p}))
	if _, err := StartPut(host); err != nil {
		t.Fatal(err)
	}
	// while it runs, a second one is refused as busy
	h2, a2 := socketPair(t)
	go serveSpoolAgent(a2, sp)
	WriteFrame(h2, FrameOpen, ssh.Marshal(&Open{Op: OpGet + SpoolSuffix, Arg: p}))
	if _, err := StartGet(h2); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("second operation: %v, want busy", err)
	}
	WriteFrame(host, FrameSpool, spoolFrame(2, 10))
	if err := <-served; err == nil || !strings.Contains(err.Error(), "where 0 was due") {
		t.Fatalf("agent: %v", err)
	}
	if rep, err := readReply(host); err != nil || rep.OK || !strings.Contains(string(rep.Payload), "where 0 was due") {
		t.Fatalf("final reply %+v %v", rep, err)
	}
}

// TestSpoolOp: the one-file operations, a push and a session have a spool
// form.
func TestSpoolOp(t *testing.T) {
	for _, tt := range []struct {
		op, base string
		spool    bool
	}{
		{"put.spool", "put", true}, {"get.spool", "get", true}, {"putfile.spool", "putfile", true}, {"getfile.spool", "getfile", true},
		{"sync.spool", "sync", true},
		{"session.spool", "session", true},
		{"put", "put", false}, {"pull.spool", "pull.spool", false}, {".spool", ".spool", false},
	} {
		if base, spool := SpoolOp(tt.op); base != tt.base || spool != tt.spool {
			t.Errorf("SpoolOp(%q) = %q, %v", tt.op, base, spool)
		}
	}
}

// TestSpoolStream: a workspace push's spool form carries the whole stream
// from the host in slots (SpoolReader on the agent's side), in order,
// whatever its frames; a little sent and then waited on is not held back
// (each request here waits for its answer), and a lot fills slots in turn.
func TestSpoolStream(t *testing.T) {
	sp := spoolFile(t)
	client, hostEnd := socketPair(t)
	relayEnd, agentEnd := socketPair(t)
	served := make(chan error, 1)
	go func() {
		served <- func() error {
			defer agentEnd.Close()
			o, err := ReadOpen(agentEnd)
			if err != nil {
				return err
			}
			if op, spool := SpoolOp(o.Op); !spool || !SpoolStream(op) {
				return fmt.Errorf("op %q", o.Op)
			}
			release, err := AcquireSpool()
			if err != nil {
				return err
			}
			defer release()
			sr, err := NewSpoolReader(agentEnd, agentEnd, sp)
			if err != nil {
				return err
			}
			defer sr.Close()
			WriteFrame(agentEnd, FrameData, []byte("manifest"))
			h := sha256.New()
			for {
				typ, p, err := ReadFrame(sr, nil)
				if err != nil {
					return err
				}
				switch typ {
				case FrameData:
					h.Write(p)
				case FrameRequest:
					WriteFrame(agentEnd, FrameReply, h.Sum(nil))
				case FrameEOF:
					return WriteFrame(agentEnd, FrameReply, []byte("done"))
				default:
					return fmt.Errorf("frame type %d", typ)
				}
			}
		}()
	}()
	_, relayed := relay(hostEnd, relayEnd, recordingSpool{t, sp})
	WriteFrame(client, FrameOpen, ssh.Marshal(&Open{Op: OpSync, Arg: "/w"}))
	if typ, p, err := ReadFrame(client, nil); err != nil || typ != FrameData || string(p) != "manifest" {
		t.Fatalf("first frame %d %q %v", typ, p, err)
	}
	h := sha256.New()
	for i, sizes := range [][]int{{1}, {0, 7, 100}, {SpoolSlot - 3, 9}, {MaxFrame, MaxFrame, 12345}, {3 * 4096}} {
		for _, n := range sizes {
			b := randomBytes(n)
			h.Write(b)
			if err := WriteFrame(client, FrameData, b); err != nil {
				t.Fatal(err)
			}
		}
		WriteFrame(client, FrameRequest, nil)
		typ, p, err := ReadFrame(client, nil)
		if err != nil || typ != FrameReply || !bytes.Equal(p, h.Sum(nil)) {
			t.Fatalf("round %d: answer %d %x %v, want the hash of all sent", i, typ, p, err)
		}
	}
	WriteFrame(client, FrameEOF, nil)
	if typ, p, err := ReadFrame(client, nil); err != nil || typ != FrameReply || string(p) != "done" {
		t.Fatalf("last answer %d %q %v", typ, p, err)
	}
	client.Close()
	if err := <-served; err != nil {
		t.Fatalf("agent: %v", err)
	}
	if err := <-relayed; err != nil {
		t.Fatalf("relay: %v", err)
	}
}
