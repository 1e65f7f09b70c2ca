package agent

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/agent/sshd"
)

// TestDispatchBulkKey plays a local user who reaches the agent's port (as
// anyone can on vsock): a bulk stream without the VM's key is refused and
// runs nothing; with it, the operation runs; an SSH client still reaches
// the SSH server.
func TestDispatchBulkKey(t *testing.T) {
	srv, l, log := newDispatchTestServer(t)
	key := bytes.Repeat([]byte{5}, bulk.KeySize)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := newDispatchListener(ctx, l, newBulkKey(key), srv, log)
	defer d.Close()

	zero := func(k []byte) (int64, error) {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if err := bulk.Hello(c, k); err != nil {
			return 0, err
		}
		bulk.WriteOpen(c, bulk.Open{Op: bulk.OpZero, N: 1000})
		return io.Copy(io.Discard, c)
	}
	if n, err := zero(key); err != nil || n != 1000 {
		t.Fatalf("right key: %d bytes, %v", n, err)
	}
	if n, err := zero(bytes.Repeat([]byte{6}, bulk.KeySize)); err == nil || n != 0 {
		t.Fatalf("wrong key: %d bytes, %v", n, err)
	}
	// an agent booted without a key refuses every bulk stream
	l2, _ := net.Listen("unix", t.TempDir()+"/s2")
	d2 := newDispatchListener(ctx, l2, newBulkKey(nil), srv, log)
	defer d2.Close()
	c, _ := net.Dial("unix", l2.Addr().String())
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := bulk.Hello(c, make([]byte, bulk.KeySize)); err == nil {
		t.Fatal("an agent without a key accepted a bulk stream")
	}
	c.Close()

	// SSH passes through to Accept with its first bytes intact
	cc, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	go cc.Write([]byte("SSH-2.0-test\r\n"))
	sc, err := d.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	sc.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 14)
	if _, err := io.ReadFull(sc, buf); err != nil || string(buf) != "SSH-2.0-test\r\n" {
		t.Fatalf("ssh stream: %q %v", buf, err)
	}
}

// TestReidentifyReplacesBulkKey: a clone restored from a snapshot starts
// with its source's bulk key in memory; the reidentify that carries its own
// key makes bulk streams with the source's key fail and the clone's work.
// A key of the wrong size refuses the whole request before anything applies.
func TestReidentifyReplacesBulkKey(t *testing.T) {
	srv, l, log := newDispatchTestServer(t)
	source, clone := bytes.Repeat([]byte{1}, bulk.KeySize), bytes.Repeat([]byte{2}, bulk.KeySize)
	keys := newBulkKey(source)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := newDispatchListener(ctx, l, keys, srv, log)
	defer d.Close()
	hello := func(k []byte) error {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return bulk.Hello(c, k)
	}
	applied := 0
	on := keys.onReidentify(func(api.Reidentify) error { applied++; return nil })
	for _, bad := range [][]byte{{}, make([]byte, bulk.KeySize-1), make([]byte, bulk.KeySize+1)} {
		if err := on(api.Reidentify{Hostname: "x", BulkKey: bad}); err == nil {
			t.Errorf("a %d-byte bulk key was accepted", len(bad))
		}
	}
	if applied != 0 {
		t.Fatalf("a request with a bad bulk key was applied %d times", applied)
	}
	if err := hello(source); err != nil {
		t.Fatalf("source key before reidentify: %v", err)
	}
	// a rename (no key) keeps the key
	if err := on(api.Reidentify{Hostname: "x"}); err != nil || hello(source) != nil {
		t.Fatalf("a reidentify without a key changed the key (%v)", err)
	}
	if err := on(api.Reidentify{Hostname: "x", BulkKey: clone}); err != nil {
		t.Fatal(err)
	}
	if err := hello(source); err == nil {
		t.Error("the source's bulk key still works after reidentify")
	}
	if err := hello(clone); err != nil {
		t.Errorf("the clone's bulk key: %v", err)
	}
	// a failed reidentify leaves the key alone
	failing := keys.onReidentify(func(api.Reidentify) error { return io.ErrUnexpectedEOF })
	if err := failing(api.Reidentify{BulkKey: source}); err == nil || hello(clone) != nil {
		t.Errorf("a failed reidentify replaced the key (%v)", err)
	}
}

// newDispatchTestServer is an SSH server that trusts its own host key and a
// unix listener for the dispatcher to serve.
func newDispatchTestServer(t *testing.T) (*sshd.Server, net.Listener, *slog.Logger) {
	t.Helper()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	signer, _ := ssh.NewSignerFromKey(priv)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := sshd.New(sshd.Config{HostKey: signer, AuthorizedKeys: []ssh.PublicKey{signer.PublicKey()}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	return srv, l, log
}

// TestDispatchCloseReleasesPending: an SSH connection classified while
// nobody Accepts (the server stopped, the agent listens again) is closed
// by Close, not held open until the agent exits.
func TestDispatchCloseReleasesPending(t *testing.T) {
	srv, l, log := newDispatchTestServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := newDispatchListener(ctx, l, newBulkKey(nil), srv, log)
	c, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("SSH-2.0-test\r\n")); err != nil {
		t.Fatal(err)
	}
	d.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	// EOF, or a reset when Close came before the listener accepted it
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the pending connection was not closed: %v", err)
	}
}

// TestDispatchControlNeedsTheKey plays a local user who reaches the agent's
// port and asks for a control stream (bulk.OpControl: shutdown, reidentify)
// without the VM's key: the stream is refused at the hello and nothing
// reaches the server; with the key, the same shutdown request is served. A
// reidentify carrying a new key, sent over a control stream, retires the
// old key for new streams.
func TestDispatchControlNeedsTheKey(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	signer, _ := ssh.NewSignerFromKey(priv)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	key, clone := bytes.Repeat([]byte{7}, bulk.KeySize), bytes.Repeat([]byte{8}, bulk.KeySize)
	keys := newBulkKey(key)
	shutdowns := make(chan struct{}, 4)
	srv, err := sshd.New(sshd.Config{HostKey: signer, AuthorizedKeys: []ssh.PublicKey{signer.PublicKey()}, Logger: log,
		OnShutdown:   func() { shutdowns <- struct{}{} },
		OnReidentify: keys.onReidentify(func(api.Reidentify) error { return nil })})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := newDispatchListener(ctx, l, keys, srv, log)
	defer d.Close()

	open := func(k []byte) (net.Conn, error) {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if err := bulk.Hello(c, k); err != nil {
			// a client that goes on regardless still gets nothing served
			bulk.WriteOpen(c, bulk.Open{Op: bulk.OpControl})
			bulk.ControlCall(c, api.RequestShutdown, nil, 1024)
			return nil, err
		}
		if err := bulk.WriteOpen(c, bulk.Open{Op: bulk.OpControl}); err != nil {
			t.Fatal(err)
		}
		return c, nil
	}
	for _, bad := range [][]byte{bytes.Repeat([]byte{9}, bulk.KeySize), make([]byte, bulk.KeySize)} {
		if _, err := open(bad); !errors.Is(err, bulk.ErrRefused) {
			t.Fatalf("a control stream with a wrong key: %v, want refused", err)
		}
	}
	select {
	case <-shutdowns:
		t.Fatal("a control stream without the key shut the guest down")
	default:
	}
	c, err := open(key)
	if err != nil {
		t.Fatal(err)
	}
	if ok, _, err := bulk.ControlCall(c, api.RequestPing, nil, 1024); err != nil || !ok {
		t.Fatalf("ping with the key: %v %v", ok, err)
	}
	if ok, _, err := bulk.ControlCall(c, api.RequestShutdown, nil, 1024); err != nil || !ok {
		t.Fatalf("shutdown with the key: %v %v", ok, err)
	}
	select {
	case <-shutdowns:
	case <-time.After(10 * time.Second):
		t.Fatal("the shutdown request was not served")
	}
	// reidentify over the control stream: the clone's key from then on
	b := []byte(`{"bulk_key":"` + base64.StdEncoding.EncodeToString(clone) + `"}`)
	if ok, msg, err := bulk.ControlCall(c, api.RequestReidentify, b, 1024); err != nil || !ok {
		t.Fatalf("reidentify: %v %q %v", ok, msg, err)
	}
	if _, err := open(key); !errors.Is(err, bulk.ErrRefused) {
		t.Fatalf("the retired key still opens control streams: %v", err)
	}
	if _, err := open(clone); err != nil {
		t.Fatalf("the new key: %v", err)
	}
}

// TestBackgroundWait: wait returns only once every batch started before it
// is done, and batches run one after the other, in order.
func TestBackgroundWait(t *testing.T) {
	var b background
	b.wait() // nothing pending: returns at once
	var order []int
	first, second := make(chan struct{}), make(chan struct{})
	b.run(func() error { <-first; order = append(order, 1); return nil })
	b.run(func() error { <-second; order = append(order, 2); return nil })
	waited := make(chan struct{})
	go func() { b.wait(); close(waited) }()
	close(second) // the second batch may not overtake the first
	select {
	case <-waited:
		t.Fatal("wait returned with batches pending")
	case <-time.After(50 * time.Millisecond):
	}
	close(first)
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Fatal("wait did not return")
	}
	if len(order) != 2 || order[0] != 1 || order[1] != 2 {
		t.Fatalf("batches ran in order %v", order)
	}
}

// TestBackgroundWaitReportsFailure: a batch that fails makes every later
// wait fail with its error, even after a later batch succeeds (it does not
// rewrite what the failed one missed).
func TestBackgroundWaitReportsFailure(t *testing.T) {
	var b background
	if err := b.wait(); err != nil {
		t.Fatalf("nothing run: %v", err)
	}
	b.run(func() error { return nil })
	if err := b.wait(); err != nil {
		t.Fatalf("after a batch that succeeded: %v", err)
	}
	bad := errors.New("write /etc/machine-id: read-only file system")
	b.run(func() error { return bad })
	b.run(func() error { return nil })
	for range 2 {
		if err := b.wait(); !errors.Is(err, bad) {
			t.Fatalf("wait after a failed batch: %v, want its error", err)
		}
	}
}

// TestReidentifyFileFailureRefusesCommands: a reidentify whose identity files
// cannot be written (here /etc is a file) replies ok (the files are written
// after the reply) but every later command is refused with the reason; done
// in the foreground, the reidentify itself fails.
func TestReidentifyFileFailureRefusesCommands(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("reidentify reseeds the kernel's RNG (RNDRESEEDCRNG), which needs root")
	}
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "etc"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	p := api.Reidentify{MachineID: strings.Repeat("ab", 16)}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var files background
	if err := reidentify(root, p, &files, log); err != nil {
		t.Fatalf("reidentify with its files in the background: %v", err)
	}
	var ie *errIdentity
	err := files.wait()
	if !errors.As(err, &ie) || !strings.Contains(err.Error(), "/etc/machine-id") || !strings.Contains(err.Error(), "delete it") {
		t.Fatalf("commands after the failed write: %v, want the identity error", err)
	}
	if err := reidentify(root, p, nil, log); !errors.As(err, &ie) {
		t.Fatalf("reidentify with its files in the foreground: %v, want the identity error", err)
	}
	// written: commands go on
	root = t.TempDir()
	files = background{}
	if err := reidentify(root, p, &files, log); err != nil {
		t.Fatal(err)
	}
	if err := files.wait(); err != nil {
		t.Fatalf("after a reidentify whose files were written: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(root, "etc", "machine-id")); err != nil || string(b) != p.MachineID+"\n" {
		t.Fatalf("machine-id %q, %v", b, err)
	}
}
