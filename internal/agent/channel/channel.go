// Package channel gives banger-agent its listener for the host: a vsock
// listener, or a virtio-serial port multiplexed with yamux (see package api
// for the resynchronisation protocol), where each yamux stream is one SSH
// connection.
package channel

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
	"github.com/mdlayher/vsock"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/latelog"
	"github.com/bangerdev/banger/internal/agent/memcopy"
)

// ListenVsock listens on an AF_VSOCK port of this guest.
func ListenVsock(port uint32) (net.Listener, error) {
	l, err := vsock.Listen(port, nil)
	if err != nil {
		return nil, fmt.Errorf("listen on vsock port %d: %w (is the virtio vsock device present and vmw_vsock_virtio_transport loaded?)", port, err)
	}
	return l, nil
}

// FindSerialPort returns the device (/dev/vportNpM) of the virtio-serial port
// whose name (as set by the VMM) is name, looking under sysRoot (normally
// "/sys") and devRoot (normally "/dev"). It returns os.ErrNotExist (wrapped)
// when no such port exists yet.
func FindSerialPort(sysRoot, devRoot, name string) (string, error) {
	dirs, err := filepath.Glob(filepath.Join(sysRoot, "class", "virtio-ports", "*", "name"))
	if err != nil {
		return "", err
	}
	var seen []string
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		got := strings.TrimSpace(string(b))
		seen = append(seen, got)
		if got == name {
			return filepath.Join(devRoot, filepath.Base(filepath.Dir(p))), nil
		}
	}
	return "", fmt.Errorf("no virtio-serial port named %q (ports: %q): %w", name, seen, os.ErrNotExist)
}

// Port is the guest end of a virtio-serial port. Like the kernel's
// /dev/vportNpM: Read returns io.EOF while no host is connected, and Write
// blocks until one is. An *os.File opened on the device satisfies it.
type Port interface {
	io.ReadWriter
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// SerialListener accepts the yamux streams the host opens over a
// virtio-serial port, across host reconnections.
type SerialListener struct {
	port   Port
	log    *slog.Logger
	conns  chan net.Conn
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu   sync.Mutex
	sess *yamux.Session
}

// minCycle spaces out resynchronisation attempts so that a misbehaving port
// can never make the loop spin.
const minCycle = 100 * time.Millisecond

// ListenSerial starts serving the port. Close stops it.
func ListenSerial(port Port, log *slog.Logger) *SerialListener {
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &SerialListener{
		port:   port,
		log:    log,
		conns:  make(chan net.Conn),
		ctx:    ctx,
		cancel: cancel,
		done:   make(chan struct{}),
	}
	go l.run()
	return l
}

// Accept returns the next stream opened by the host.
func (l *SerialListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.ctx.Done():
		return nil, net.ErrClosed
	}
}

// Close stops serving and ends the current session.
func (l *SerialListener) Close() error {
	l.cancel()
	past := time.Unix(1, 0)
	_ = l.port.SetReadDeadline(past)
	_ = l.port.SetWriteDeadline(past)
	l.mu.Lock()
	sess := l.sess
	l.mu.Unlock()
	if sess != nil {
		sess.Close()
	}
	<-l.done
	return nil
}

// Addr returns a placeholder address.
func (l *SerialListener) Addr() net.Addr { return serialAddr{} }

type serialAddr struct{}

func (serialAddr) Network() string { return "virtio-serial" }
func (serialAddr) String() string  { return "virtio-serial" }

func (l *SerialListener) run() {
	defer close(l.done)
	br := bufio.NewReaderSize(readerFunc(func(p []byte) (int, error) { return l.port.Read(p) }), 64<<10)
	for l.ctx.Err() == nil {
		start := time.Now()
		err := l.cycle(br)
		if l.ctx.Err() != nil {
			return
		}
		switch {
		case err == nil, errors.Is(err, io.EOF):
			l.log.Debug("host channel session ended; waiting for the host", "error", err)
		case errors.Is(err, yamux.ErrInvalidVersion), errors.Is(err, yamux.ErrInvalidMsgType):
			// A new host started talking before this end saw the old one go:
			// a clone's first contact. Logged later, off the clone's way to
			// its first command (see latelog).
			latelog.Info(l.log, "host channel resynchronising with a new host connection")
		default:
			l.log.Warn("host channel error; resynchronising", "error", err)
		}
		if d := minCycle - time.Since(start); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-l.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// cycle waits for a host, synchronises with it and serves one yamux session.
func (l *SerialListener) cycle(br *bufio.Reader) error {
	// Blocks until a host is connected.
	if _, err := l.port.Write(api.MuxLine(api.MuxHello, "-")); err != nil {
		return fmt.Errorf("write hello: %w", err)
	}
	nonce, err := l.handshake(br)
	if err != nil {
		return err
	}
	cfg := yamux.DefaultConfig()
	cfg.LogOutput = nil
	cfg.Logger = slog.NewLogLogger(l.log.Handler(), slog.LevelDebug)
	cfg.KeepAliveInterval = 15 * time.Second
	cfg.StreamCloseTimeout = 30 * time.Second
	cfg.MaxStreamWindowSize = api.MuxWindow
	pc := newPortConn(br, l.port)
	sess, err := yamux.Server(pc, cfg)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.sess = sess
	l.mu.Unlock()
	l.log.Debug("host channel session started", "nonce", nonce)
	defer func() {
		sess.Close()
		l.mu.Lock()
		l.sess = nil
		l.mu.Unlock()
		if l.ctx.Err() == nil {
			_ = l.port.SetReadDeadline(time.Time{})
			_ = l.port.SetWriteDeadline(time.Time{})
		}
	}()
	for {
		st, err := sess.Accept()
		if err != nil {
			if errors.Is(err, yamux.ErrSessionShutdown) {
				return io.EOF
			}
			return err
		}
		select {
		case l.conns <- st:
		case <-l.ctx.Done():
			st.Close()
			return nil
		}
	}
}

// handshake answers the host's preamble and returns its nonce once the host
// says go (see api).
func (l *SerialListener) handshake(br *bufio.Reader) (string, error) {
	acked := ""
	for {
		kind, nonce, err := api.ReadMuxLine(br)
		if err != nil {
			return "", err
		}
		switch kind {
		case api.MuxPreamble:
			if nonce == acked {
				continue
			}
			if _, err := l.port.Write(api.MuxLine(api.MuxAck, nonce)); err != nil {
				return "", fmt.Errorf("write ack: %w", err)
			}
			acked = nonce
		case api.MuxGo:
			if acked != "" && nonce == acked {
				return nonce, nil
			}
		}
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// portConn is what yamux runs on: reads through the shared buffered reader,
// writes to the port through a coalescing writer; Close unblocks both
// without closing the device.
//
// yamux writes each frame as two writes (header, then body), and every
// write to a virtio-serial port costs a virtqueue notification, which is
// expensive in an emulated guest. So writes are queued and one flusher
// writes whatever has accumulated in a single write: small frames travel
// together, and while one write is in flight the next batch builds up.
type portConn struct {
	r    *bufio.Reader
	port Port

	mu      sync.Mutex
	cond    *sync.Cond
	pending []byte
	spare   []byte
	err     error
	started bool
	closed  bool
}

// maxPending bounds the bytes queued for the port; writers wait beyond it.
const maxPending = 1 << 20

func newPortConn(r *bufio.Reader, port Port) *portConn {
	c := &portConn{r: r, port: port}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// Read returns what the handshake left buffered, then reads the port
// directly: a read of a virtio-serial port returns at most one of its
// buffers (a page) whatever the size asked, so a buffer in front of it
// batches nothing and costs a copy of every byte it holds.
func (c *portConn) Read(p []byte) (int, error) {
	if n := c.r.Buffered(); n > 0 {
		return c.r.Read(p[:min(len(p), n)])
	}
	return c.port.Read(p)
}

func (c *portConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.started {
		c.started = true
		go c.flush()
	}
	for c.err == nil && !c.closed && len(c.pending) >= maxPending {
		c.cond.Wait()
	}
	if c.err != nil {
		return 0, c.err
	}
	if c.closed {
		return 0, net.ErrClosed
	}
	// yamux's frames put a 12-byte header before each body: copied in
	// one piece the body would take memmove's slow unaligned path
	// (package memcopy)
	c.pending = memcopy.Append(c.pending, p)
	c.cond.Broadcast()
	return len(p), nil
}

// flush writes what Write queued, batch by batch, until the conn is closed
// or the port fails.
func (c *portConn) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		for len(c.pending) == 0 && !c.closed {
			c.cond.Wait()
		}
		if c.closed {
			return
		}
		batch := c.pending
		c.pending = c.spare[:0]
		c.cond.Broadcast()
		c.mu.Unlock()
		_, err := c.port.Write(batch)
		c.mu.Lock()
		c.spare = batch
		if err != nil {
			c.err = err
			c.cond.Broadcast()
			return
		}
	}
}

func (c *portConn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.cond.Broadcast()
	c.mu.Unlock()
	past := time.Unix(1, 0)
	_ = c.port.SetReadDeadline(past)
	_ = c.port.SetWriteDeadline(past)
	return nil
}
