package sshd

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
)

func bulkServer(t *testing.T) *Server {
	t.Helper()
	dir := t.TempDir()
	passwd := filepath.Join(dir, "passwd")
	line := fmt.Sprintf("tester:x:%d:%d:Tester:%s:/bin/sh\n", os.Getuid(), os.Getgid(), dir)
	if err := os.WriteFile(passwd, []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(Config{HostKey: signer, AuthorizedKeys: []ssh.PublicKey{signer.PublicKey()}, PasswdFile: passwd,
		GroupFile: filepath.Join(dir, "group"), DefaultUser: "tester", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

// openBulk serves one bulk stream (hello already done) with op.
func openBulk(t *testing.T, srv *Server, o bulk.Open) net.Conn {
	t.Helper()
	host, agent := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.ServeBulk(ctx, agent); close(done) }()
	t.Cleanup(func() { host.Close(); cancel(); <-done })
	host.SetDeadline(time.Now().Add(20 * time.Second))
	if err := bulk.WriteOpen(host, o); err != nil {
		t.Fatal(err)
	}
	return host
}

// TestBulkSession runs commands through a bulk session as the SSH server
// would: env, working directory (refused when missing), stdin, stdout,
// stderr, exit status, a command that cannot start.
func TestBulkSession(t *testing.T) {
	srv := bulkServer(t)
	tests := []struct {
		name     string
		cmd      string
		stdin    string
		dir      string
		dirOK    bool
		wantOut  string
		wantErr  string
		wantCode uint32
	}{
		{"streams and status", "cat; echo err >&2; exit 3", "in", "", true, "in", "err\n", 3},
		{"env and dir", `printf "%s %s" "$A" "$(pwd)"`, "", "/tmp", true, "1 /tmp", "", 0},
		{"missing dir", "true", "", "/no/such/dir", false, "", "", 0},
		{"cannot start", "exec /no/such/binary", "", "", true, "", "", 127},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ch := bulk.NewChan(openBulk(t, srv, bulk.Open{Op: bulk.OpSession}))
			defer ch.Close()
			ch.SendRequest("env", false, ssh.Marshal(&envMsg{"A", "1"}))
			if tt.dir != "" {
				ok, err := ch.SendRequest("banger-workdir@banger", true, ssh.Marshal(&workDirMsg{tt.dir}))
				if err != nil || ok != tt.dirOK {
					t.Fatalf("workdir %q: ok %v err %v", tt.dir, ok, err)
				}
				if !ok {
					return
				}
			}
			ch.SendRequest("exec", false, ssh.Marshal(&execMsg{tt.cmd}))
			ch.Write([]byte(tt.stdin))
			ch.CloseWrite()
			var errOut []byte
			done := make(chan struct{})
			go func() { errOut, _ = io.ReadAll(ch.Stderr()); close(done) }()
			out, _ := io.ReadAll(ch)
			<-done
			code := uint32(999)
			for r := range ch.Requests() {
				if r.Type == "exit-status" {
					code = binary.BigEndian.Uint32(r.Payload)
				}
			}
			if string(out) != tt.wantOut || code != tt.wantCode {
				t.Fatalf("stdout %q code %d, want %q %d (stderr %q)", out, code, tt.wantOut, tt.wantCode, errOut)
			}
			if tt.wantErr != "" && string(errOut) != tt.wantErr {
				t.Fatalf("stderr %q, want %q", errOut, tt.wantErr)
			}
		})
	}
}

func TestBulkRawOps(t *testing.T) {
	srv := bulkServer(t)
	c := openBulk(t, srv, bulk.Open{Op: bulk.OpZero, N: 3<<20 + 5})
	n, err := io.Copy(io.Discard, c)
	if err != nil || n != 3<<20+5 {
		t.Fatalf("zero: %d bytes, %v", n, err)
	}
	c = openBulk(t, srv, bulk.Open{Op: bulk.OpSink, N: 1 << 20})
	go c.Write(make([]byte, 1<<20))
	var b [8]byte
	if _, err := io.ReadFull(c, b[:]); err != nil || binary.BigEndian.Uint64(b[:]) != 1<<20 {
		t.Fatalf("sink: %v %d", err, binary.BigEndian.Uint64(b[:]))
	}
	// unknown operations and garbage instead of Open end the stream
	for _, o := range []bulk.Open{{Op: "rm-rf"}} {
		c = openBulk(t, srv, o)
		if n, _ := io.Copy(io.Discard, c); n != 0 {
			t.Fatalf("op %q answered %d bytes", o.Op, n)
		}
	}
	host, agent := net.Pipe()
	go host.Write([]byte(strings.Repeat("x", 64)))
	done := make(chan struct{})
	go func() { srv.ServeBulk(context.Background(), agent); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a garbage stream was not closed")
	}
	host.Close()
	_ = bytes.MinRead
}

// TestBeforeCommandGatesCommands: a session's command starts only once
// BeforeCommand returns (the agent makes commands wait for a reidentify's
// files); the session's other requests are answered meanwhile.
func TestBeforeCommandGatesCommands(t *testing.T) {
	srv := bulkServer(t)
	release := make(chan struct{})
	var waited atomic.Int32
	srv.cfg.BeforeCommand = func() error { waited.Add(1); <-release; return nil }
	dir := t.TempDir()
	marker := filepath.Join(dir, "ran")
	ch := bulk.NewChan(openBulk(t, srv, bulk.Open{Op: bulk.OpSession}))
	defer ch.Close()
	if ok, err := ch.SendRequest("banger-workdir@banger", true, ssh.Marshal(&workDirMsg{dir})); err != nil || !ok {
		t.Fatalf("workdir: %v %v", ok, err)
	}
	ch.SendRequest("exec", false, ssh.Marshal(&execMsg{"touch " + marker}))
	ch.CloseWrite()
	deadline := time.Now().Add(10 * time.Second)
	for waited.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("BeforeCommand was not called")
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the command ran before BeforeCommand returned")
	}
	close(release)
	io.ReadAll(ch)
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("the command did not run once released: %v", err)
	}
}

// TestBeforeCommandErrorRefusesCommand: when BeforeCommand fails (a clone
// whose identity files were not written) the command does not run and the
// session reports why on stderr with exit status 127, as any client shows.
func TestBeforeCommandErrorRefusesCommand(t *testing.T) {
	srv := bulkServer(t)
	srv.cfg.BeforeCommand = func() error { return errors.New("identity not written") }
	marker := filepath.Join(t.TempDir(), "ran")
	for _, req := range []struct {
		typ     string
		payload []byte
	}{
		{"exec", ssh.Marshal(&execMsg{"touch " + marker})},
		{"shell", nil},
		{"subsystem", ssh.Marshal(&subsystemMsg{"sftp"})},
	} {
		t.Run(req.typ, func(t *testing.T) {
			ch := bulk.NewChan(openBulk(t, srv, bulk.Open{Op: bulk.OpSession}))
			defer ch.Close()
			if ok, err := ch.SendRequest(req.typ, true, req.payload); err != nil || !ok {
				t.Fatalf("%s: ok %v err %v (want accepted, then the failure)", req.typ, ok, err)
			}
			ch.CloseWrite()
			var errOut []byte
			done := make(chan struct{})
			go func() { errOut, _ = io.ReadAll(ch.Stderr()); close(done) }()
			io.ReadAll(ch)
			<-done
			code := uint32(999)
			for r := range ch.Requests() {
				if r.Type == "exit-status" {
					code = binary.BigEndian.Uint32(r.Payload)
				}
			}
			if code != 127 || !strings.Contains(string(errOut), "identity not written") {
				t.Fatalf("exit status %d, stderr %q; want 127 and the reason", code, errOut)
			}
			if _, err := os.Stat(marker); err == nil {
				t.Fatal("the command ran")
			}
		})
	}
}

// askReader serves n bytes and records the size of every Read asked.
type askReader struct {
	n    int
	asks []int
}

func (r *askReader) Read(p []byte) (int, error) {
	r.asks = append(r.asks, len(p))
	if r.n == 0 {
		return 0, io.EOF
	}
	k := min(len(p), r.n)
	r.n -= k
	return k, nil
}

// TestSinkReadsLarge: the raw channel's sink reads what it is sent in
// reads of 256 KiB (io.Copy to io.Discard would ask for 8 KiB at a time,
// each through one more copy), stops at its limit, and counts to EOF.
func TestSinkReadsLarge(t *testing.T) {
	for _, tt := range []struct {
		have      int
		limit     uint64
		want      int64
		wantAsks0 int
	}{
		{have: 1 << 20, limit: 1 << 30, want: 1 << 20, wantAsks0: 256 << 10},
		{have: 1 << 20, limit: 300 << 10, want: 300 << 10, wantAsks0: 256 << 10},
		{have: 10, limit: 5, want: 5, wantAsks0: 5},
	} {
		r := &askReader{n: tt.have}
		n, err := sink(r, tt.limit)
		if err != nil || n != tt.want {
			t.Fatalf("sink of %d limited to %d: %d, %v; want %d", tt.have, tt.limit, n, err, tt.want)
		}
		if r.asks[0] != tt.wantAsks0 {
			t.Fatalf("sink asked for %v, want a first read of %d", r.asks, tt.wantAsks0)
		}
	}
}

// TestBulkSessionSpool: a command's stdin through a session's spool form
// (bangerd's relay between this test and ServeBulk, a spool file as the
// device) reaches the command whole, large frames in slots and small ones
// on frames; its output and exit status come back as on a plain session.
func TestBulkSessionSpool(t *testing.T) {
	if _, err := exec.LookPath("sha256sum"); err != nil {
		t.Skip("no sha256sum on this machine")
	}
	spoolPath := filepath.Join(t.TempDir(), "spool.img")
	if err := os.WriteFile(spoolPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(spoolPath, bulk.SpoolSize); err != nil {
		t.Fatal(err)
	}
	srv := bulkServer(t)
	opened := 0
	srv.cfg.OpenSpool = func() (*os.File, error) { opened++; return os.OpenFile(spoolPath, os.O_RDWR, 0) }
	host, agent := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { srv.ServeBulk(ctx, agent); close(served) }()
	defer func() { host.Close(); cancel(); <-served }()
	client, relayEnd := net.Pipe()
	hostSpool, err := os.OpenFile(spoolPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer hostSpool.Close()
	relayed := make(chan error, 1)
	go func() {
		defer relayEnd.Close()
		frames, o, ok, err := bulk.StartSpool(relayEnd)
		if err == nil && !ok {
			err = fmt.Errorf("no spool form for %q", o.Op)
		}
		if err == nil {
			err = bulk.RelaySpool(relayEnd, host, hostSpool, frames, o)
		}
		relayed <- err
	}()
	client.SetDeadline(time.Now().Add(20 * time.Second))
	if err := bulk.WriteOpen(client, bulk.Open{Op: bulk.OpSession}); err != nil {
		t.Fatal(err)
	}
	ch := bulk.NewChan(client)
	defer ch.Close()
	in := make([]byte, 3<<20+12345)
	rand.Read(in)
	ch.SendRequest("exec", false, ssh.Marshal(&execMsg{"sha256sum"}))
	go func() {
		ch.Write(in[:10]) // a small frame first, then frames of 256 KiB
		ch.Write(in[10:])
		ch.CloseWrite()
	}()
	out, _ := io.ReadAll(ch)
	code := uint32(999)
	for r := range ch.Requests() {
		if r.Type == "exit-status" {
			code = binary.BigEndian.Uint32(r.Payload)
		}
	}
	sum := sha256.Sum256(in)
	if want := hex.EncodeToString(sum[:]); !strings.HasPrefix(string(out), want) || code != 0 {
		t.Fatalf("stdout %q code %d, want %s… and 0", out, code, want)
	}
	if err := <-relayed; err != nil {
		t.Fatalf("relay: %v", err)
	}
	if opened != 1 {
		t.Fatalf("the spool device was opened %d times, want 1", opened)
	}
}
