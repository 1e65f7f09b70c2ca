package guest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/agent/sshd"
	"github.com/bangerdev/banger/internal/testenv/conntest"
)

// bulkAgent is an in-process agent serving both SSH and bulk streams on a
// unix socket, as banger-agent's dispatcher does: a bulk stream must
// present key, which a reidentify carrying a bulk key replaces.
type bulkAgent struct {
	dir      string
	sock     string
	hostKey  HostKey
	userKey  UserKey
	sshConns atomic.Int32 // SSH connections accepted
	shutdown atomic.Int32

	mu         sync.Mutex
	key        []byte
	reidentify []api.Reidentify
}

func startBulkAgent(t *testing.T, key []byte) *bulkAgent {
	t.Helper()
	dir := t.TempDir()
	a := &bulkAgent{dir: dir, sock: filepath.Join(dir, "a.sock"), key: key}
	passwd, hk, uk, signer := agentFiles(t, dir, dir)
	a.hostKey, a.userKey = hk, uk
	srv, err := sshd.New(sshd.Config{
		HostKey: signer, AuthorizedKeys: []ssh.PublicKey{a.userKey.Signer.PublicKey()},
		PasswdFile: passwd, GroupFile: filepath.Join(dir, "group"), DefaultUser: "tester",
		OnShutdown: func() { a.shutdown.Add(1) },
		OnReidentify: func(p api.Reidentify) error {
			a.mu.Lock()
			defer a.mu.Unlock()
			a.reidentify = append(a.reidentify, p)
			if p.BulkKey != nil {
				a.key = bytes.Clone(p.BulkKey)
			}
			return nil
		},
		KeepAlive: -1, Logger: testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", a.sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	conntest.ServeEach(t, l, func(c net.Conn) {
		isBulk, pc := bulk.Classify(c, 2*time.Second)
		if !isBulk {
			a.sshConns.Add(1)
			srv.ServeConn(ctx, pc)
			return
		}
		a.mu.Lock()
		k := a.key
		a.mu.Unlock()
		if bulk.Accept(pc, k, 2*time.Second) == nil {
			srv.ServeBulk(ctx, pc)
		}
	})
	t.Cleanup(cancel) // runs before ServeEach's wait
	return a
}

func (a *bulkAgent) client(t *testing.T, pin ssh.PublicKey, key []byte) *Client {
	t.Helper()
	c, err := NewClient(ClientConfig{Dialer: unixDialer(a.sock), HostKey: pin, UserKey: a.userKey.Signer, User: "tester", Logger: testLogger(t), BulkKey: key})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestControlOverBulk: with the agent's bulk key, the control requests a
// restore makes (ping, reidentify) and the others (ports, stats, shutdown)
// need no SSH connection at all. After a reidentify carrying a new host key
// and bulk key, the client presents the new bulk key on its next streams
// and pins the new host key for SSH: an SSH connection pinning the old key
// is refused.
func TestControlOverBulk(t *testing.T) {
	source := bytes.Repeat([]byte{1}, bulk.KeySize)
	a := startBulkAgent(t, source)
	c := a.client(t, a.hostKey.Public, source)
	ctx := testCtx(t)
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ports(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := c.Stats(ctx); err != nil || st.MemTotalBytes == 0 {
		t.Fatalf("stats %+v %v", st, err)
	}
	newHK, err := GenerateHostKey()
	if err != nil {
		t.Fatal(err)
	}
	clone := bytes.Repeat([]byte{2}, bulk.KeySize)
	if err := c.Reidentify(ctx, api.Reidentify{Hostname: "clone", HostKey: string(newHK.PrivatePEM), BulkKey: clone}); err != nil {
		t.Fatal(err)
	}
	if n := a.sshConns.Load(); n != 0 {
		t.Fatalf("%d SSH connections for control requests, want none", n)
	}
	a.mu.Lock()
	if len(a.reidentify) != 1 || a.reidentify[0].Hostname != "clone" {
		t.Fatalf("reidentify calls %+v", a.reidentify)
	}
	a.mu.Unlock()
	// a new control stream must present the clone's key
	c.dropControl()
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("ping on a new stream after reidentify: %v", err)
	}
	c.mu.Lock()
	noBulk := c.noBulk
	c.mu.Unlock()
	if noBulk || a.sshConns.Load() != 0 {
		t.Fatalf("the new stream was refused (fell back to SSH: %v, %d SSH connections)", noBulk, a.sshConns.Load())
	}
	// SSH (banger ssh, exec's fallback, forwards) pins the new host key
	if _, err := c.SSH(ctx); err != nil {
		t.Fatalf("SSH with the re-pinned host key: %v", err)
	}
	old := a.client(t, a.hostKey.Public, nil)
	if _, err := old.SSH(ctx); err == nil || !strings.Contains(err.Error(), "host key") {
		t.Fatalf("an SSH client pinning the old host key: %v, want a host key mismatch", err)
	}
	if err := c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	waitCount(t, &a.shutdown, 1)
}

func waitCount(t *testing.T, n *atomic.Int32, want int32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for n.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("count %d, want %d", n.Load(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestControlFallsBackToSSH: an agent that serves only SSH (older than bulk
// streams), one that knows bulk streams but not control streams, and one
// holding another key than the client's are all still asked over SSH.
func TestControlFallsBackToSSH(t *testing.T) {
	key := bytes.Repeat([]byte{3}, bulk.KeySize)
	t.Run("ssh only", func(t *testing.T) {
		e := startAgent(t)
		c, err := NewClient(ClientConfig{Dialer: e.dialer, HostKey: e.hostKey.Public, UserKey: e.userKey.Signer, User: "tester", Logger: testLogger(t), BulkKey: key})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Ping(testCtx(t)); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("wrong key", func(t *testing.T) {
		a := startBulkAgent(t, key)
		c := a.client(t, a.hostKey.Public, bytes.Repeat([]byte{4}, bulk.KeySize))
		if err := c.Ping(testCtx(t)); err != nil {
			t.Fatal(err)
		}
		if a.sshConns.Load() != 1 {
			t.Fatalf("%d SSH connections, want 1", a.sshConns.Load())
		}
	})
	t.Run("no control op", func(t *testing.T) {
		// an agent of the bulk era before control streams: it accepts the
		// hello, reads the Open frame, refuses the unknown op by closing
		a := startBulkAgent(t, key)
		l := oldBulkAgent(t, key, a.sock)
		c := a.client(t, a.hostKey.Public, key)
		c.cfg.Dialer = unixDialer(l)
		if err := c.Ping(testCtx(t)); err != nil {
			t.Fatal(err)
		}
		if a.sshConns.Load() != 1 {
			t.Fatalf("%d SSH connections, want 1", a.sshConns.Load())
		}
	})
}

// oldBulkAgent listens on a new socket: bulk streams with key get their
// Open frame read and are closed (as an agent that does not know the op
// does); other connections are passed on to sshSock.
func oldBulkAgent(t *testing.T, key []byte, sshSock string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "old.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				isBulk, pc := bulk.Classify(c, 2*time.Second)
				if isBulk {
					if bulk.Accept(pc, key, 2*time.Second) == nil {
						_, _ = bulk.ReadOpen(pc)
					}
					return
				}
				up, err := net.Dial("unix", sshSock)
				if err != nil {
					return
				}
				defer up.Close()
				go io.Copy(up, pc)
				io.Copy(pc, up)
			}()
		}
	}()
	return p
}

// hostileControl serves control streams with key and answers each request
// with the raw bytes answer returns (a compromised guest); hang leaves the
// request unanswered.
func hostileControl(t *testing.T, key []byte, answer func(req string) (raw []byte, hang bool)) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "h.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	conntest.ServeEach(t, l, func(c net.Conn) {
		defer c.Close()
		if _, pc := bulk.Classify(c, 2*time.Second); bulk.Accept(pc, key, 2*time.Second) != nil {
			return
		} else if _, err := bulk.ReadOpen(pc); err != nil {
			return
		} else {
			for {
				typ, p, err := bulk.ReadFrame(pc, nil)
				if err != nil || typ != bulk.FrameRequest {
					return
				}
				var r bulk.Request
				if ssh.Unmarshal(p, &r) != nil {
					return
				}
				raw, hang := answer(r.Type)
				if hang {
					<-done
					return
				}
				if _, err := c.Write(raw); err != nil {
					return
				}
			}
		}
	})
	t.Cleanup(func() { close(done) }) // runs before ServeEach's wait
	return p
}

func frame(typ byte, payload []byte) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	return append(b, payload...)
}

// TestHostileControlReplies plays a compromised guest on the control
// stream: replies over the client's bound, frames over bulk.MaxFrame,
// frames that are not replies, undecodable replies, replies that never
// come. Each is an error (a deadline for the last), never an allocation
// beyond the bounds, and never taken for an older agent (which would turn
// the guest's lie into an SSH fallback the host did not choose).
func TestHostileControlReplies(t *testing.T) {
	key := bytes.Repeat([]byte{5}, bulk.KeySize)
	reply := func(ok bool, p []byte) []byte {
		return frame(bulk.FrameReply, ssh.Marshal(&bulk.Reply{OK: ok, Payload: p}))
	}
	tests := []struct {
		name    string
		raw     []byte
		hang    bool
		wantErr string
	}{
		{"reply over the bound", reply(true, make([]byte, 4097)), false, "over the limit"},
		{"frame over MaxFrame", []byte{bulk.FrameReply, 0xff, 0xff, 0xff, 0xff}, false, "exceeds"},
		{"stdout instead of a reply", frame(bulk.FrameData, []byte("hello")), false, "not a reply"},
		{"undecodable reply", frame(bulk.FrameReply, []byte{1, 2}), false, "undecodable"},
		{"truncated frame", []byte{bulk.FrameReply, 0, 0, 1, 0, 1}, false, "deadline exceeded"},
		{"no reply at all", nil, true, "deadline"},
		{"garbage ports", reply(true, []byte(`{"ports":[{"proto":"sctp"}]}`)), false, "unknown protocol"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := hostileControl(t, key, func(string) ([]byte, bool) { return tt.raw, tt.hang })
			hk, _ := GenerateHostKey()
			uk, _ := LoadOrCreateUserKey(filepath.Join(t.TempDir(), "id"))
			c, err := NewClient(ClientConfig{Dialer: unixDialer(sock), HostKey: hk.Public, UserKey: uk.Signer, Logger: testLogger(t), BulkKey: key, MaxReply: 4096})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			_, err = c.Ports(ctx)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ports: %v, want an error with %q", err, tt.wantErr)
			}
			if tt.hang && !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("a guest that never answers: %v, want the deadline", err)
			}
			c.mu.Lock()
			noBulk := c.noBulk
			c.mu.Unlock()
			if noBulk {
				t.Fatal("a hostile reply made the client fall back to SSH")
			}
		})
	}
}

// TestReachSendsNothing: Reach opens the control stream and sends no
// request; the reidentify that follows is the stream's first request (an
// agent that closes an unknown op's stream is still detected then, and
// asked over SSH). Reach waits for an agent that is not listening yet.
func TestReachSendsNothing(t *testing.T) {
	key := bytes.Repeat([]byte{6}, bulk.KeySize)
	var requests []string
	var mu sync.Mutex
	sock := hostileControl(t, key, func(req string) ([]byte, bool) {
		mu.Lock()
		requests = append(requests, req)
		mu.Unlock()
		return frame(bulk.FrameReply, ssh.Marshal(&bulk.Reply{OK: true})), false
	})
	// the agent's socket appears only after a while: Reach retries
	late := filepath.Join(t.TempDir(), "late.sock")
	hk, _ := GenerateHostKey()
	uk, _ := LoadOrCreateUserKey(filepath.Join(t.TempDir(), "id"))
	c, err := NewClient(ClientConfig{Dialer: unixDialer(late), HostKey: hk.Public, UserKey: uk.Signer, Logger: testLogger(t), BulkKey: key})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	reached := make(chan error, 1)
	go func() { reached <- c.Reach(testCtx(t)) }()
	select {
	case err := <-reached:
		t.Fatalf("Reach returned before the agent listened: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := os.Symlink(sock, late); err != nil {
		t.Fatal(err)
	}
	if err := <-reached; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	n := len(requests)
	mu.Unlock()
	if n != 0 {
		t.Fatalf("Reach sent %v", requests)
	}
	if err := c.Reidentify(testCtx(t), api.Reidentify{Hostname: "x"}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(requests) != 1 || requests[0] != api.RequestReidentify {
		t.Fatalf("requests %v, want one reidentify", requests)
	}

	// an agent without the op, reached first: the reidentify falls back to SSH
	a := startBulkAgent(t, key)
	old := a.client(t, a.hostKey.Public, key)
	old.cfg.Dialer = unixDialer(oldBulkAgent(t, key, a.sock))
	if err := old.Reach(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if err := old.Reidentify(testCtx(t), api.Reidentify{Hostname: "y"}); err != nil {
		t.Fatalf("reidentify through an agent without control streams: %v", err)
	}
	if a.sshConns.Load() != 1 {
		t.Fatalf("%d SSH connections, want 1", a.sshConns.Load())
	}
}

// TestExecBulk: the pool's warm-up command runs on a bulk session (the
// path banger exec takes) with no SSH connection, and reports the exit
// status; a client without the bulk key runs it over SSH.
func TestExecBulk(t *testing.T) {
	key := bytes.Repeat([]byte{9}, bulk.KeySize)
	a := startBulkAgent(t, key)
	marker := filepath.Join(a.dir, "ran")
	c := a.client(t, a.hostKey.Public, key)
	ctx := testCtx(t)
	if code, err := c.ExecBulk(ctx, "touch "+marker+"; exit 3"); err != nil || code != 3 {
		t.Fatalf("exit status %d, %v; want 3", code, err)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("the command did not run: %v", err)
	}
	if n := a.sshConns.Load(); n != 0 {
		t.Fatalf("%d SSH connections, want none", n)
	}
	noKey := a.client(t, a.hostKey.Public, nil)
	if code, err := noKey.ExecBulk(ctx, "exit 4"); err != nil || code != 4 {
		t.Fatalf("without a key: exit status %d, %v; want 4", code, err)
	}
	if n := a.sshConns.Load(); n != 1 {
		t.Fatalf("without a key: %d SSH connections, want 1", n)
	}
}
