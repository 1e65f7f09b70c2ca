// Package guest is bangerd's side of the host-guest channel: it reaches the
// banger-agent SSH server inside a VM over Firecracker's hybrid vsock, a real
// AF_VSOCK socket, or a multiplexed virtio-serial port, and drives it with an
// SSH client (exec, ports, stats, shutdown, raw connections for banger ssh).
package guest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
	"github.com/mdlayher/vsock"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/vmm"
)

// Dialer opens a byte stream to the agent's SSH server.
type Dialer interface {
	Dial(ctx context.Context) (net.Conn, error)
}

// ErrClosed is returned by a closed Transport.
var ErrClosed = errors.New("guest channel is closed")

// Transport reaches one VM's agent. Vsock channels dial a fresh connection
// each time; a serial channel keeps one long-lived multiplexed session (the
// VMM accepts a single host connection) and reconnects when it breaks. A
// Transport is safe for concurrent use; bangerd holds one per running VM.
type Transport struct {
	ch  vmm.GuestChannel
	log *slog.Logger
	mux *serialMux // ChannelSerial only
}

// NewTransport checks ch and returns a Transport for it.
func NewTransport(ch vmm.GuestChannel, log *slog.Logger) (*Transport, error) {
	if log == nil {
		log = slog.Default()
	}
	t := &Transport{ch: ch, log: log}
	switch ch.Kind {
	case vmm.ChannelVsockUDS:
		if ch.Path == "" || ch.Port == 0 {
			return nil, fmt.Errorf("vsock-uds guest channel needs a socket path and a port (got %q, %d)", ch.Path, ch.Port)
		}
	case vmm.ChannelVsock:
		if ch.CID < 3 || ch.Port == 0 {
			return nil, fmt.Errorf("vsock guest channel needs a guest CID >= 3 and a port (got %d, %d)", ch.CID, ch.Port)
		}
	case vmm.ChannelSerial:
		if ch.Path == "" {
			return nil, errors.New("serial guest channel needs a socket path")
		}
		t.mux = newSerialMux(ch.Path, log)
	default:
		return nil, fmt.Errorf("unknown guest channel kind %q", ch.Kind)
	}
	return t, nil
}

// Channel returns the channel this transport reaches.
func (t *Transport) Channel() vmm.GuestChannel { return t.ch }

// Dial opens a new connection to the agent's SSH server.
func (t *Transport) Dial(ctx context.Context) (net.Conn, error) {
	switch t.ch.Kind {
	case vmm.ChannelVsockUDS:
		return DialVsockUDS(ctx, t.ch.Path, t.ch.Port)
	case vmm.ChannelVsock:
		return DialVsock(ctx, t.ch.CID, t.ch.Port)
	default:
		return t.mux.dial(ctx)
	}
}

// Close ends the serial session, if any; open streams are closed with it.
func (t *Transport) Close() error {
	if t.mux != nil {
		return t.mux.close()
	}
	return nil
}

// Dial opens one connection over a vsock channel. Serial channels need a
// long-lived Transport (the VMM accepts one host connection at a time).
func Dial(ctx context.Context, ch vmm.GuestChannel) (net.Conn, error) {
	switch ch.Kind {
	case vmm.ChannelVsockUDS:
		return DialVsockUDS(ctx, ch.Path, ch.Port)
	case vmm.ChannelVsock:
		return DialVsock(ctx, ch.CID, ch.Port)
	case vmm.ChannelSerial:
		return nil, errors.New("a serial guest channel is multiplexed: dial it through a guest.Transport")
	}
	return nil, fmt.Errorf("unknown guest channel kind %q", ch.Kind)
}

// ErrAgentNotListening means the VMM reached the guest but nothing listens on
// the agent's port (yet): the guest is still booting, or the agent failed.
var ErrAgentNotListening = errors.New("the guest agent is not listening (yet)")

// connectTimeout bounds the hybrid vsock CONNECT exchange when ctx has no
// earlier deadline.
const connectTimeout = 10 * time.Second

// DialVsockUDS connects through Firecracker's hybrid vsock: connect to the
// unix socket at path, send "CONNECT <port>\n", expect "OK <hostport>\n".
func DialVsockUDS(ctx context.Context, path string, port uint32) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to the VM's vsock socket %s: %w (is the VM running?)", path, err)
	}
	deadline := time.Now().Add(connectTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = c.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	fail := func(err error) (net.Conn, error) {
		stop()
		c.Close()
		if cerr := expired(ctx, err); cerr != nil {
			return nil, fmt.Errorf("vsock connect to port %d: %w", port, cerr)
		}
		return nil, err
	}
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		return fail(fmt.Errorf("vsock connect to port %d: %w", port, err))
	}
	// Read the reply one byte at a time: what follows it belongs to the stream.
	line, err := readLine(c, 64)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fail(fmt.Errorf("vsock port %d: %w", port, ErrAgentNotListening))
		}
		return fail(fmt.Errorf("vsock connect to port %d: %w", port, err))
	}
	f := strings.Fields(line)
	if len(f) != 2 || f[0] != "OK" {
		return fail(fmt.Errorf("vsock connect to port %d: unexpected reply %q", port, line))
	}
	if _, err := strconv.ParseUint(f[1], 10, 32); err != nil {
		return fail(fmt.Errorf("vsock connect to port %d: unexpected reply %q", port, line))
	}
	if !stop() {
		c.Close()
		return nil, fmt.Errorf("vsock connect to port %d: %w", port, ctx.Err())
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// readLine reads up to max bytes, one at a time, until '\n'.
func readLine(r io.Reader, max int) (string, error) {
	var b [1]byte
	var line []byte
	for len(line) < max {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			if len(line) > 0 && errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return string(line), err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
	return string(line), fmt.Errorf("reply line longer than %d bytes", max)
}

// DialVsock connects to an AF_VSOCK port in the guest with the given CID.
func DialVsock(ctx context.Context, cid, port uint32) (net.Conn, error) {
	c, err := vsock.DialContext(ctx, cid, port, nil)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("vsock connect to %d:%d: %w", cid, port, ctx.Err())
		}
		return nil, fmt.Errorf("vsock connect to %d:%d: %w (is the guest up and vhost_vsock loaded on the host?)", cid, port, err)
	}
	return c, nil
}

// serialMux is the host end of the virtio-serial multiplexer (see api).
type serialMux struct {
	path string
	log  *slog.Logger
	lock chan struct{} // held while (re)establishing the session

	mu     sync.Mutex
	sess   *yamux.Session
	conn   net.Conn
	closed bool
}

func newSerialMux(path string, log *slog.Logger) *serialMux {
	return &serialMux{path: path, log: log, lock: make(chan struct{}, 1)}
}

// handshakeTimeout bounds one resynchronisation when ctx allows longer. The
// agent may still be booting, so it is generous; ctx usually ends it first.
const handshakeTimeout = 30 * time.Second

func (m *serialMux) dial(ctx context.Context) (net.Conn, error) {
	for attempt := 0; ; attempt++ {
		sess, err := m.session(ctx)
		if err != nil {
			return nil, err
		}
		st, err := sess.OpenStream()
		if err == nil {
			return st, nil
		}
		m.drop(sess)
		if attempt > 0 || ctx.Err() != nil {
			return nil, fmt.Errorf("open a stream to the guest agent: %w", err)
		}
		m.log.Debug("guest channel session broke; reconnecting", "error", err)
	}
}

// session returns the live session, establishing a new one if needed.
func (m *serialMux) session(ctx context.Context) (*yamux.Session, error) {
	select {
	case m.lock <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("connect to the guest agent: %w", ctx.Err())
	}
	defer func() { <-m.lock }()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, ErrClosed
	}
	if m.sess != nil && !m.sess.IsClosed() {
		s := m.sess
		m.mu.Unlock()
		return s, nil
	}
	if m.conn != nil {
		m.conn.Close()
		m.conn, m.sess = nil, nil
	}
	m.mu.Unlock()

	began := time.Now()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", m.path)
	if err != nil {
		return nil, fmt.Errorf("connect to the VM's serial channel %s: %w (is the VM running?)", m.path, err)
	}
	br := bufio.NewReader(c)
	if err := hostHandshake(ctx, c, br, api.MuxResendInterval); err != nil {
		c.Close()
		return nil, err
	}
	cfg := yamux.DefaultConfig()
	cfg.LogOutput = nil
	cfg.Logger = slog.NewLogLogger(m.log.Handler(), slog.LevelDebug)
	cfg.KeepAliveInterval = 15 * time.Second
	cfg.StreamOpenTimeout = 30 * time.Second
	cfg.StreamCloseTimeout = 30 * time.Second
	cfg.MaxStreamWindowSize = api.MuxWindow
	// bangerd never accepts a stream the guest opens: one may wait (yamux
	// wants a backlog), the rest are reset at once. With yamux's default
	// of 256 a guest could park 256 streams of 256 KiB each (64 MiB) in
	// bangerd's memory.
	cfg.AcceptBacklog = 1
	sess, err := yamux.Client(&bufferedConn{Conn: c, r: br}, cfg)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("start the guest channel multiplexer: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		sess.Close()
		return nil, ErrClosed
	}
	m.sess, m.conn = sess, c
	m.log.DebugContext(ctx, "guest channel session established", "path", m.path, "took", time.Since(began).Round(time.Millisecond))
	return sess, nil
}

// drop forgets sess (if it is still the current one) and closes it.
func (m *serialMux) drop(sess *yamux.Session) {
	m.mu.Lock()
	if m.sess == sess {
		m.sess = nil
		if m.conn != nil {
			m.conn.Close()
			m.conn = nil
		}
	}
	m.mu.Unlock()
	sess.Close()
}

func (m *serialMux) close() error {
	m.mu.Lock()
	m.closed = true
	sess, c := m.sess, m.conn
	m.sess, m.conn = nil, nil
	m.mu.Unlock()
	if sess != nil {
		sess.Close()
	}
	if c != nil {
		c.Close()
	}
	return nil
}

// hostHandshake runs the host side of the resynchronisation: resend the
// preamble every resend, and at once whenever the agent says hello, until
// the agent acknowledges our nonce; then send "go".
func hostHandshake(ctx context.Context, c net.Conn, br *bufio.Reader, resend time.Duration) error {
	var nb [8]byte
	if _, err := rand.Read(nb[:]); err != nil {
		return err
	}
	nonce := hex.EncodeToString(nb[:])
	deadline := time.Now().Add(handshakeTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = c.SetDeadline(deadline)
	defer c.SetDeadline(time.Time{})
	stopCtx := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stopCtx()

	var wmu sync.Mutex
	stopped := false
	writeErr := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(resend)
		defer t.Stop()
		for {
			wmu.Lock()
			if stopped {
				wmu.Unlock()
				return
			}
			_, err := c.Write(api.MuxLine(api.MuxPreamble, nonce))
			wmu.Unlock()
			if err != nil {
				writeErr <- err
				return
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	defer close(done)

	for {
		kind, got, err := api.ReadMuxLine(br)
		if err != nil {
			select {
			case werr := <-writeErr:
				err = werr
			default:
			}
			if cerr := expired(ctx, err); cerr != nil {
				return fmt.Errorf("wait for the guest agent: %w", cerr)
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return fmt.Errorf("the guest agent did not answer on the serial channel within %s (still booting, or the agent failed; see the console log)", handshakeTimeout)
			}
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("the VM closed its serial channel (is the VM running?): %w", err)
			}
			return fmt.Errorf("guest channel handshake: %w", err)
		}
		if kind == api.MuxHello {
			// The agent starts a new cycle and waits for a preamble: send
			// one now rather than at the next tick. A restored clone's
			// stale session swallows the first preamble, so this saves a
			// whole MuxResendInterval on every restore.
			wmu.Lock()
			if !stopped {
				_, err = c.Write(api.MuxLine(api.MuxPreamble, nonce))
			}
			wmu.Unlock()
			if err != nil {
				return fmt.Errorf("guest channel handshake: %w", err)
			}
			continue
		}
		if kind != api.MuxAck || got != nonce {
			continue
		}
		wmu.Lock()
		stopped = true
		_, err = c.Write(api.MuxLine(api.MuxGo, nonce))
		wmu.Unlock()
		if err != nil {
			return fmt.Errorf("guest channel handshake: %w", err)
		}
		return nil
	}
}

// bufferedConn reads through the handshake's bufio.Reader so that no byte
// read ahead is lost.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// expired returns ctx's error when ctx has ended, or when err is the I/O
// timeout of a connection deadline taken from ctx's deadline (which can fire
// a moment before ctx itself reports it); else nil.
func expired(ctx context.Context, err error) error {
	if e := ctx.Err(); e != nil {
		return e
	}
	var ne net.Error
	if dl, ok := ctx.Deadline(); ok && errors.As(err, &ne) && ne.Timeout() && time.Until(dl) < 100*time.Millisecond {
		return context.DeadlineExceeded
	}
	return nil
}
