package channel

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/vmm"
)

// fakePort behaves like the guest end of a virtio-serial port whose host end
// is a unix socket served by the VMM: one host connection at a time; reads
// return io.EOF while no host is connected; writes wait for a host.
type fakePort struct {
	l net.Listener

	mu       sync.Mutex
	cond     *sync.Cond
	conn     net.Conn
	rdl, wdl time.Time
	closed   bool
	conns    int // connections accepted so far
}

func newFakePort(t *testing.T) (*fakePort, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "serial.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	p := &fakePort{l: l}
	p.cond = sync.NewCond(&p.mu)
	go p.acceptLoop()
	t.Cleanup(p.close)
	return p, sock
}

func (p *fakePort) acceptLoop() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conn = c
		p.conns++
		p.cond.Broadcast()
		// Like QEMU, take the next host only once this one is gone.
		for p.conn == c && !p.closed {
			p.cond.Wait()
		}
		p.mu.Unlock()
	}
}

func (p *fakePort) close() {
	p.l.Close()
	p.mu.Lock()
	p.closed = true
	if p.conn != nil {
		p.conn.Close()
	}
	p.cond.Broadcast()
	p.mu.Unlock()
}

func (p *fakePort) drop(c net.Conn) {
	p.mu.Lock()
	if p.conn == c {
		p.conn = nil
		c.Close()
		p.cond.Broadcast()
	}
	p.mu.Unlock()
}

func (p *fakePort) Read(b []byte) (int, error) {
	p.mu.Lock()
	c, dl := p.conn, p.rdl
	p.mu.Unlock()
	if !dl.IsZero() && time.Now().After(dl) {
		return 0, os.ErrDeadlineExceeded
	}
	if c == nil {
		return 0, io.EOF
	}
	_ = c.SetReadDeadline(dl)
	n, err := c.Read(b)
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		p.drop(c)
		if n == 0 {
			return 0, io.EOF
		}
		return n, nil
	}
	return n, err
}

func (p *fakePort) Write(b []byte) (int, error) {
	for {
		p.mu.Lock()
		for p.conn == nil && !p.closed && (p.wdl.IsZero() || time.Now().Before(p.wdl)) {
			p.waitWithDeadline()
		}
		c, dl, closed := p.conn, p.wdl, p.closed
		p.mu.Unlock()
		if closed {
			return 0, net.ErrClosed
		}
		if !dl.IsZero() && !time.Now().Before(dl) {
			return 0, os.ErrDeadlineExceeded
		}
		_ = c.SetWriteDeadline(dl)
		n, err := c.Write(b)
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			return n, err
		}
		p.drop(c) // host went away mid-write: wait for the next one
		b = b[n:]
	}
}

// waitWithDeadline waits on the cond, woken at the write deadline too.
func (p *fakePort) waitWithDeadline() {
	if !p.wdl.IsZero() {
		t := time.AfterFunc(time.Until(p.wdl), func() {
			p.mu.Lock()
			p.cond.Broadcast()
			p.mu.Unlock()
		})
		defer t.Stop()
	}
	p.cond.Wait()
}

func (p *fakePort) SetReadDeadline(t time.Time) error {
	p.mu.Lock()
	p.rdl = t
	c := p.conn
	p.mu.Unlock()
	if c != nil {
		_ = c.SetReadDeadline(t)
	}
	return nil
}

func (p *fakePort) SetWriteDeadline(t time.Time) error {
	p.mu.Lock()
	p.wdl = t
	c := p.conn
	p.cond.Broadcast()
	p.mu.Unlock()
	if c != nil {
		_ = c.SetWriteDeadline(t)
	}
	return nil
}

func quietLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// startEcho runs the agent end: every accepted stream echoes what it reads.
func startEcho(t *testing.T, port Port) *SerialListener {
	t.Helper()
	l := ListenSerial(port, quietLogger())
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return l
}

func newTransport(t *testing.T, sock string) *guest.Transport {
	t.Helper()
	tr, err := guest.NewTransport(vmm.GuestChannel{Kind: vmm.ChannelSerial, Path: sock, Name: api.DefaultSerialName}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

func echoRoundTrip(t *testing.T, tr *guest.Transport, msg []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := tr.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		errc <- err
	}()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("echo differs")
	}
}

func TestSerialMuxBasic(t *testing.T) {
	port, sock := newFakePort(t)
	startEcho(t, port)
	tr := newTransport(t, sock)
	echoRoundTrip(t, tr, []byte("hello"))
	// Many concurrent streams on one session.
	var wg sync.WaitGroup
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			echoRoundTrip(t, tr, bytes.Repeat([]byte{byte(i)}, 300<<10))
		}()
	}
	wg.Wait()
	if port.conns != 1 {
		t.Fatalf("host connected %d times, want once", port.conns)
	}
}

// TestSerialMuxReconnect: the host goes away (bangerd restarts) and a new
// one connects; garbage and stale handshakes in the stream do not matter.
func TestSerialMuxReconnect(t *testing.T) {
	port, sock := newFakePort(t)
	startEcho(t, port)

	tr := newTransport(t, sock)
	echoRoundTrip(t, tr, []byte("first"))
	tr.Close()

	// A host that writes garbage, a half yamux frame and a stale preamble,
	// then vanishes.
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = c.Write([]byte("\x00\x01garbage\nmore garbage without newline\x00\x00\x00\x02"))
	_, _ = c.Write(api.MuxLine(api.MuxPreamble, "dead"))
	_, _ = c.Write([]byte{0, 0, 0, 1, 0, 0, 0, 9})
	c.Close()

	for i := 0; i < 3; i++ {
		tr2 := newTransport(t, sock)
		echoRoundTrip(t, tr2, []byte(fmt.Sprintf("round %d", i)))
		tr2.Close()
	}
}

// TestSerialMuxHostBeforeAgent: the host connects and sends its preamble
// before the agent listens (the guest is still booting).
func TestSerialMuxHostBeforeAgent(t *testing.T) {
	port, sock := newFakePort(t)
	tr := newTransport(t, sock)
	dialed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		c, err := tr.Dial(ctx)
		if err == nil {
			c.Close()
		}
		dialed <- err
	}()
	// Let the host send a few preambles into the void first.
	deadline := time.Now().Add(10 * time.Second)
	for {
		port.mu.Lock()
		n := port.conns
		port.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("host never connected")
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(2 * api.MuxResendInterval) // several preambles queue up
	startEcho(t, port)
	if err := <-dialed; err != nil {
		t.Fatal(err)
	}
	echoRoundTrip(t, tr, []byte("after boot"))
}

// TestSerialMuxAgentRestart: the agent side restarts (a new listener on the
// same port) while the host holds a session; the host notices and
// reconnects on the next Dial.
func TestSerialMuxAgentRestart(t *testing.T) {
	port, sock := newFakePort(t)
	l := startEcho(t, port)
	tr := newTransport(t, sock)
	echoRoundTrip(t, tr, []byte("before"))
	l.Close()
	port.SetReadDeadline(time.Time{})
	port.SetWriteDeadline(time.Time{})
	startEcho(t, port)
	// The first dial may land on the dead session; a later one must work.
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := tr.Dial(ctx)
		cancel()
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			_, werr := c.Write([]byte("x"))
			b := make([]byte, 1)
			_, rerr := io.ReadFull(c, b)
			c.Close()
			if werr == nil && rerr == nil && b[0] == 'x' {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("host never recovered after the agent restarted: %v", err)
		}
	}
}

func TestFindSerialPort(t *testing.T) {
	sys := t.TempDir()
	for dev, name := range map[string]string{"vport0p1": "org.qemu.guest_agent.0", "vport1p1": "banger.agent", "vport1p2": ""} {
		d := filepath.Join(sys, "class", "virtio-ports", dev)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "name"), []byte(name+"\n"), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	got, err := FindSerialPort(sys, "/dev", "banger.agent")
	if err != nil || got != "/dev/vport1p1" {
		t.Fatalf("FindSerialPort = %q, %v", got, err)
	}
	if _, err := FindSerialPort(sys, "/dev", "other"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing port: %v", err)
	}
}

// askPort is a Port that serves data in reads of at most one page (as a
// virtio-serial port does) and records the size of every Read asked.
type askPort struct {
	data []byte
	asks []int
}

func (p *askPort) Read(b []byte) (int, error) {
	p.asks = append(p.asks, len(b))
	if len(p.data) == 0 {
		return 0, io.EOF
	}
	n := copy(b[:min(len(b), 4096)], p.data)
	p.data = p.data[n:]
	return n, nil
}
func (p *askPort) Write(b []byte) (int, error)      { return len(b), nil }
func (p *askPort) SetReadDeadline(time.Time) error  { return nil }
func (p *askPort) SetWriteDeadline(time.Time) error { return nil }

// TestPortConnReadsThePortDirectly: the session's reads first drain what
// the handshake's buffer holds, then go to the port with the reader's own
// buffer, so no byte is copied through the handshake's 64 KiB buffer.
func TestPortConnReadsThePortDirectly(t *testing.T) {
	want := make([]byte, 40<<10)
	for i := range want {
		want[i] = byte(i * 13)
	}
	port := &askPort{data: bytes.Clone(want)}
	br := bufio.NewReaderSize(port, 64<<10)
	if _, err := br.Peek(10); err != nil { // the handshake's read: one page buffered
		t.Fatal(err)
	}
	port.asks = nil
	pc := newPortConn(br, port)
	var got []byte
	buf := make([]byte, 32<<10)
	for {
		n, err := pc.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, want %d, or they differ", len(got), len(want))
	}
	for _, a := range port.asks {
		if a != len(buf) {
			t.Fatalf("the port was asked for %v: every read after the handshake's buffer should ask for the reader's %d", port.asks, len(buf))
		}
	}
	if len(port.asks) == 0 {
		t.Fatal("the port was never read after the handshake")
	}
}
