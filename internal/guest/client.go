package guest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/termsafe"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	Dialer  Dialer        // usually a *Transport
	HostKey ssh.PublicKey // the VM's pinned host key
	UserKey ssh.Signer    // the user's banger key
	User    string        // guest user; default "root"
	Logger  *slog.Logger
	// MaxReply bounds the payload of one reply from the agent (ports,
	// stats); default DefaultMaxReply.
	MaxReply int
	// BulkKey, when set, is the agent's current bulk key: control requests
	// (Ping, Reidentify, Ports, Stats, Shutdown) then go over one bulk
	// control stream (bulk.OpControl) instead of SSH, with no handshake.
	// An agent that does not serve control streams is asked over SSH.
	BulkKey []byte
}

// Bounds on what the guest may say in one reply. The guest is not trusted:
// a reply over a bound is an error, never a bigger allocation.
const (
	// DefaultMaxReply is the default ClientConfig.MaxReply. The SSH layer
	// already refuses packets over 256 KiB; the agent keeps replies under
	// 200 KiB.
	DefaultMaxReply = 256 << 10
	// MaxPorts bounds the listening sockets accepted in one ports reply.
	MaxPorts = 8192
	// MaxProcessName bounds a process name (Linux's comm is 15 bytes).
	MaxProcessName = 64
	// maxRefusal bounds how much of a refusal's text is kept.
	maxRefusal = 512
)

// Client talks SSH to one VM's agent. It keeps one SSH connection, opened on
// first use and re-opened when it breaks, that concurrent calls share. Safe
// for concurrent use.
type Client struct {
	cfg    ClientConfig
	sshCfg *ssh.ClientConfig
	log    *slog.Logger
	lock   chan struct{} // held while connecting

	mu     sync.Mutex
	conn   *ssh.Client
	closed bool

	// The bulk control stream: ctlLock is held while it is used (one
	// request at a time, as the agent answers them); ctl, bulkKey and
	// noBulk are guarded by mu.
	ctlLock chan struct{}
	ctl     net.Conn
	// ctlProven: ctl has answered a request (so it is the agent's
	// control op, not an older agent about to close it)
	ctlProven bool
	bulkKey   []byte
	noBulk    bool // the agent does not serve control streams: use SSH
}

// NewClient returns a Client; it does not connect yet.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Dialer == nil || cfg.HostKey == nil || cfg.UserKey == nil {
		return nil, errors.New("guest client needs a dialer, a host key and a user key")
	}
	if cfg.User == "" {
		cfg.User = "root"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxReply <= 0 {
		cfg.MaxReply = DefaultMaxReply
	}
	return &Client{
		cfg: cfg,
		log: cfg.Logger,
		sshCfg: &ssh.ClientConfig{
			User:              cfg.User,
			Auth:              []ssh.AuthMethod{ssh.PublicKeys(cfg.UserKey)},
			HostKeyCallback:   ssh.FixedHostKey(cfg.HostKey),
			HostKeyAlgorithms: []string{cfg.HostKey.Type()},
			ClientVersion:     "SSH-2.0-bangerd",
			Config:            SSHConfig(),
		},
		lock:    make(chan struct{}, 1),
		ctlLock: make(chan struct{}, 1),
		bulkKey: bytes.Clone(cfg.BulkKey),
	}, nil
}

// Close closes the shared SSH connection. The Dialer is not closed.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	conn := c.conn
	c.conn = nil
	ctl := c.ctl
	c.ctl = nil
	c.mu.Unlock()
	if ctl != nil {
		ctl.Close()
	}
	if conn != nil {
		return conn.Close()
	}
	return nil
}

// DialRaw opens a new byte stream to the agent's SSH server, for a client
// that speaks SSH itself (banger ssh, an OpenSSH ProxyCommand).
func (c *Client) DialRaw(ctx context.Context) (net.Conn, error) {
	return c.cfg.Dialer.Dial(ctx)
}

// defaultHandshakeTimeout bounds the SSH handshake when ctx allows longer.
const defaultHandshakeTimeout = 20 * time.Second

// SSH returns the shared SSH connection, connecting if needed.
func (c *Client) SSH(ctx context.Context) (*ssh.Client, error) {
	select {
	case c.lock <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("connect to the guest agent: %w", ctx.Err())
	}
	defer func() { <-c.lock }()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	if conn := c.conn; conn != nil {
		c.mu.Unlock()
		return conn, nil
	}
	c.mu.Unlock()

	conn, err := c.connect(ctx)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		conn.Close()
		return nil, ErrClosed
	}
	c.conn = conn
	go func() {
		_ = conn.Wait()
		c.forget(conn)
	}()
	go c.keepalive(conn)
	return conn, nil
}

// connect dials and authenticates a new SSH connection.
func (c *Client) connect(ctx context.Context) (*ssh.Client, error) {
	began := time.Now()
	nc, err := c.cfg.Dialer.Dial(ctx)
	if err != nil {
		return nil, err
	}
	dialed := time.Now()
	deadline := time.Now().Add(defaultHandshakeTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = nc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	c.mu.Lock()
	cfg := c.sshCfg
	c.mu.Unlock()
	sc, chans, reqs, err := ssh.NewClientConn(nc, "banger-guest", cfg)
	if !stop() || err != nil {
		nc.Close()
		if cerr := expired(ctx, err); cerr != nil {
			return nil, fmt.Errorf("ssh handshake with the guest agent: %w", cerr)
		}
		if err == nil {
			err = errors.New("cancelled")
		}
		return nil, fmt.Errorf("ssh handshake with the guest agent: %w", explainHandshake(err))
	}
	_ = nc.SetDeadline(time.Time{})
	c.log.DebugContext(ctx, "ssh connection to the guest agent", "dial", dialed.Sub(began).Round(time.Millisecond), "handshake", time.Since(dialed).Round(time.Millisecond))
	return ssh.NewClient(sc, chans, reqs), nil
}

// explainHandshake adds a hint to the usual handshake failures.
func explainHandshake(err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "host key mismatch"):
		return fmt.Errorf("%w (the guest presented a different host key than the one banger pinned for this VM)", err)
	case strings.Contains(msg, "unable to authenticate"):
		return fmt.Errorf("%w (the guest does not accept this user's banger key; it is installed at VM start)", err)
	}
	return err
}

// forget drops conn if it is the shared connection.
func (c *Client) forget(conn *ssh.Client) {
	c.mu.Lock()
	if c.conn == conn {
		c.conn = nil
	}
	c.mu.Unlock()
}

// broken drops and closes conn after an I/O error on it.
func (c *Client) broken(conn *ssh.Client) {
	c.forget(conn)
	conn.Close()
}

const (
	keepaliveInterval = 15 * time.Second
	keepaliveTimeout  = 10 * time.Second
)

func (c *Client) keepalive(conn *ssh.Client) {
	t := time.NewTicker(keepaliveInterval)
	defer t.Stop()
	closed := make(chan struct{})
	go func() { _ = conn.Wait(); close(closed) }()
	for {
		select {
		case <-closed:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), keepaliveTimeout)
		_, _, err := sendRequest(ctx, conn, "keepalive@openssh.com", nil)
		cancel()
		if err != nil {
			c.log.Debug("guest agent stopped answering keepalives; dropping the connection", "error", err)
			c.broken(conn)
			return
		}
	}
}

// sendRequest sends a global request, bounded by ctx.
func sendRequest(ctx context.Context, conn *ssh.Client, name string, payload []byte) (bool, []byte, error) {
	type result struct {
		ok   bool
		data []byte
		err  error
	}
	res := make(chan result, 1)
	go func() {
		ok, data, err := conn.SendRequest(name, true, payload)
		res <- result{ok, data, err}
	}()
	select {
	case r := <-res:
		return r.ok, r.data, r.err
	case <-ctx.Done():
		return false, nil, ctx.Err()
	}
}

// request sends a banger global request on the shared connection and
// returns its reply payload.
func (c *Client) request(ctx context.Context, name string) ([]byte, error) {
	if handled, ok, data, err := c.control(ctx, name, nil, true); handled {
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if !ok {
			return nil, refused(name, data)
		}
		return data, nil
	}
	conn, err := c.SSH(ctx)
	if err != nil {
		return nil, err
	}
	ok, data, err := sendRequest(ctx, conn, name, nil)
	if err != nil {
		if ctx.Err() == nil {
			c.broken(conn)
		}
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if !ok {
		return nil, refused(name, data)
	}
	if len(data) > c.cfg.MaxReply {
		return nil, fmt.Errorf("the guest agent's reply to %s is %d bytes, over the limit of %d: not decoding it (a broken or hostile guest)", name, len(data), c.cfg.MaxReply)
	}
	return data, nil
}

// refused is the error for a request the agent answered with a failure.
func refused(name string, data []byte) error {
	if len(data) > 0 {
		return fmt.Errorf("the guest agent refused %s: %s", name, refusalText(data))
	}
	return fmt.Errorf("the guest agent refused %s (agent too old?)", name)
}

// refusalText is the guest's reason for a refusal, cut to maxRefusal bytes
// and with terminal control sequences removed: it ends up in logs and on
// the user's terminal.
func refusalText(data []byte) string {
	cut := len(data) > maxRefusal
	if cut {
		data = data[:maxRefusal]
	}
	s := termsafe.Line(string(data))
	if cut {
		s += "…"
	}
	return s
}

// Ping returns once the agent answers, retrying until ctx is done. bangerd
// uses it to wait for a booting guest.
func (c *Client) Ping(ctx context.Context) error {
	return c.retry(ctx, func(ctx context.Context) error {
		_, err := c.request(ctx, api.RequestPing)
		return err
	})
}

// retry runs attempt until it succeeds, with a short backoff, bounded by
// ctx (each attempt by 10 s).
func (c *Client) retry(ctx context.Context, attempt func(context.Context) error) error {
	start := time.Now()
	backoff := 50 * time.Millisecond
	var last error
	for {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := attempt(actx)
		cancel()
		if err == nil {
			c.log.DebugContext(ctx, "guest agent answered", "after", time.Since(start).Round(time.Millisecond))
			return nil
		}
		if errors.Is(err, ErrClosed) {
			return err
		}
		last = err
		c.mu.Lock()
		if conn := c.conn; conn != nil {
			c.conn = nil
			conn.Close()
		}
		c.mu.Unlock()
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("the guest agent did not answer within %s: %w (last error: %v)", time.Since(start).Round(time.Second), ctx.Err(), last)
		case <-t.C:
		}
		if backoff < 500*time.Millisecond {
			backoff *= 2
		}
	}
}

// Shutdown asks the guest to power off. It returns once the agent has
// accepted; the VMM exits shortly after. A connection that drops before the
// reply arrives counts as accepted.
func (c *Client) Shutdown(ctx context.Context) error {
	if handled, ok, data, err := c.control(ctx, api.RequestShutdown, nil, false); handled {
		c.dropControl()
		if err != nil {
			if errors.Is(err, bulk.ErrControlClosed) || errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("ask the guest to power off: %w", err)
		}
		if !ok {
			return fmt.Errorf("the guest agent refused to power off: %s", refusalText(data))
		}
		return nil
	}
	conn, err := c.SSH(ctx)
	if err != nil {
		return err
	}
	ok, data, err := sendRequest(ctx, conn, api.RequestShutdown, nil)
	c.broken(conn)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil
		}
		return fmt.Errorf("ask the guest to power off: %w", err)
	}
	if !ok {
		return fmt.Errorf("the guest agent refused to power off: %s", data)
	}
	return nil
}

// Reidentify gives a clone its own identity (see api.Reidentify). When it
// carries a host key, the client pins the new key from then on (the SSH
// connection made with the old one is dropped); when it carries a bulk key,
// the client presents the new key on its next bulk streams. A rename keeps
// the connections.
func (c *Client) Reidentify(ctx context.Context, p api.Reidentify) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	var newPin ssh.PublicKey
	if p.HostKey != "" {
		s, err := ssh.ParsePrivateKey([]byte(p.HostKey))
		if err != nil {
			return fmt.Errorf("the clone's new host key: %w", err)
		}
		newPin = s.PublicKey()
	}
	handled, ok, data, err := c.control(ctx, api.RequestReidentify, b, false)
	if !handled {
		var conn *ssh.Client
		conn, err = c.SSH(ctx)
		if err != nil {
			return fmt.Errorf("%w: %w", errNotReached, err)
		}
		ok, data, err = sendRequest(ctx, conn, api.RequestReidentify, b)
		if p.HostKey != "" || err != nil {
			c.broken(conn)
		}
	}
	if err != nil {
		return fmt.Errorf("give the clone its identity: %w", err)
	}
	if !ok {
		return fmt.Errorf("the guest agent refused its new identity: %s", refusalText(data))
	}
	c.mu.Lock()
	if p.BulkKey != nil {
		c.bulkKey = bytes.Clone(p.BulkKey)
	}
	var stale *ssh.Client
	if newPin != nil {
		cfg := *c.sshCfg
		cfg.HostKeyCallback = ssh.FixedHostKey(newPin)
		cfg.HostKeyAlgorithms = []string{newPin.Type()}
		c.sshCfg = &cfg
		stale, c.conn = c.conn, nil
	}
	c.mu.Unlock()
	if stale != nil {
		stale.Close()
	}
	return nil
}

// Ports lists the guest's listening sockets.
func (c *Client) Ports(ctx context.Context) ([]api.Port, error) {
	data, err := c.request(ctx, api.RequestPorts)
	if err != nil {
		return nil, err
	}
	var r api.PortsReply
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("decode the guest's port list: %w", err)
	}
	if err := checkPorts(r.Ports); err != nil {
		return nil, fmt.Errorf("the guest's port list: %w", err)
	}
	return r.Ports, nil
}

// checkPorts refuses a port list no honest agent sends: too long, unknown
// protocols, addresses that are not IP addresses, ports out of range, long
// process names. (Process names may still hold any bytes: the CLI strips
// them before printing.)
func checkPorts(ps []api.Port) error {
	if len(ps) > MaxPorts {
		return fmt.Errorf("%d sockets listed, at most %d accepted", len(ps), MaxPorts)
	}
	for i, p := range ps {
		switch p.Proto {
		case "tcp", "tcp6", "udp", "udp6":
		default:
			return fmt.Errorf("entry %d: unknown protocol %q", i, termsafe.Line(truncate(p.Proto, 16)))
		}
		if _, err := netip.ParseAddr(p.Address); err != nil {
			return fmt.Errorf("entry %d: %q is not an IP address", i, termsafe.Line(truncate(p.Address, 64)))
		}
		if p.Port < 0 || p.Port > 65535 || p.PID < 0 {
			return fmt.Errorf("entry %d: port %d, pid %d out of range", i, p.Port, p.PID)
		}
		if len(p.Process) > MaxProcessName {
			return fmt.Errorf("entry %d: a process name of %d bytes (at most %d)", i, len(p.Process), MaxProcessName)
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// Stats reports the guest's view of its resource use.
func (c *Client) Stats(ctx context.Context) (api.Stats, error) {
	var st api.Stats
	data, err := c.request(ctx, api.RequestStats)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(data, &st); err != nil {
		return st, fmt.Errorf("decode the guest's stats: %w", err)
	}
	return st, nil
}

// SFTP opens an SFTP session (for banger cp and workspace transfers). Close
// it when done; the SSH connection stays shared.
func (c *Client) SFTP(ctx context.Context) (*sftp.Client, error) {
	conn, err := c.SSH(ctx)
	if err != nil {
		return nil, err
	}
	type result struct {
		c   *sftp.Client
		err error
	}
	res := make(chan result, 1)
	go func() {
		sc, err := sftp.NewClient(conn)
		res <- result{sc, err}
	}()
	select {
	case r := <-res:
		if r.err != nil {
			return nil, fmt.Errorf("start sftp in the guest: %w", r.err)
		}
		return r.c, nil
	case <-ctx.Done():
		go func() {
			if r := <-res; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, fmt.Errorf("start sftp in the guest: %w", ctx.Err())
	}
}

// WindowSize is a terminal size.
type WindowSize struct{ Rows, Cols int }

// ExecOptions tunes Exec.
type ExecOptions struct {
	TTY    bool              // run on a pseudo-terminal (stdout and stderr merge)
	Term   string            // TERM for the pty; default xterm-256color
	Size   WindowSize        // initial pty size; default 24x80
	Resize <-chan WindowSize // pty size changes, until Exec returns
	Env    []string          // "K=V" added to the command's environment
	Dir    string            // working directory in the guest
	// Signals are forwarded to the command's process group (ssh.SIGINT
	// for a Ctrl-C the CLI caught, say), until Exec returns.
	Signals <-chan ssh.Signal
}

// Exec runs cmd (an argument vector, quoted for the guest user's shell) in
// the guest and returns its exit status: 128+n when killed by signal n. When
// ctx ends first, the command is sent SIGTERM, its session closed (the agent
// then hangs it up) and ctx's error returned.
func (c *Client) Exec(ctx context.Context, cmd []string, stdin io.Reader, stdout, stderr io.Writer, opts ExecOptions) (int, error) {
	if len(cmd) == 0 {
		return -1, errors.New("exec: empty command")
	}
	return c.run(ctx, ShellQuote(cmd), stdin, stdout, stderr, opts)
}

// ExecShell runs a shell command line as is (ssh semantics).
func (c *Client) ExecShell(ctx context.Context, line string, stdin io.Reader, stdout, stderr io.Writer, opts ExecOptions) (int, error) {
	return c.run(ctx, line, stdin, stdout, stderr, opts)
}

func (c *Client) run(ctx context.Context, line string, stdin io.Reader, stdout, stderr io.Writer, opts ExecOptions) (int, error) {
	conn, err := c.SSH(ctx)
	if err != nil {
		return -1, err
	}
	sess, err := newSession(ctx, conn)
	if err != nil {
		if ctx.Err() == nil {
			c.broken(conn)
		}
		return -1, err
	}
	defer sess.Close()
	// Everything below talks on the session; end it if ctx ends meanwhile.
	stop := context.AfterFunc(ctx, func() {
		_ = sess.Signal(ssh.SIGTERM)
		_ = sess.Close()
	})
	defer stop()
	for _, kv := range opts.Env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return -1, fmt.Errorf("exec: bad environment entry %q (want NAME=value)", kv)
		}
		if err := sess.Setenv(k, v); err != nil {
			return -1, ctxErr(ctx, fmt.Errorf("exec: set %s: %w", k, err))
		}
	}
	if opts.Dir != "" {
		ok, err := sess.SendRequest(api.RequestWorkDir, true, ssh.Marshal(struct{ Dir string }{opts.Dir}))
		if err != nil {
			return -1, ctxErr(ctx, fmt.Errorf("exec: %w", err))
		}
		if !ok {
			return -1, fmt.Errorf("exec: working directory %q does not exist in the guest", opts.Dir)
		}
	}
	if opts.TTY {
		term := opts.Term
		if term == "" {
			term = "xterm-256color"
		}
		rows, cols := opts.Size.Rows, opts.Size.Cols
		if rows <= 0 || cols <= 0 {
			rows, cols = 24, 80
		}
		modes := ssh.TerminalModes{ssh.ECHO: 1, ssh.TTY_OP_ISPEED: 38400, ssh.TTY_OP_OSPEED: 38400}
		if err := sess.RequestPty(term, rows, cols, modes); err != nil {
			return -1, ctxErr(ctx, fmt.Errorf("exec: allocate a terminal: %w", err))
		}
	}
	sess.Stdin = stdin
	sess.Stdout = stdout
	sess.Stderr = stderr
	if err := sess.Start(line); err != nil {
		return -1, ctxErr(ctx, fmt.Errorf("exec: start command: %w", err))
	}
	done := make(chan struct{})
	defer close(done)
	if opts.Resize != nil || opts.Signals != nil {
		go func() {
			resize, signals := opts.Resize, opts.Signals
			for resize != nil || signals != nil {
				select {
				case <-done:
					return
				case ws, ok := <-resize:
					if !ok {
						resize = nil
						continue
					}
					_ = sess.WindowChange(ws.Rows, ws.Cols)
				case sig, ok := <-signals:
					if !ok {
						signals = nil
						continue
					}
					_ = sess.Signal(sig)
				}
			}
		}()
	}
	err = sess.Wait()
	if ctx.Err() != nil {
		return -1, ctx.Err()
	}
	if err == nil {
		return 0, nil
	}
	var ee *ssh.ExitError
	if errors.As(err, &ee) {
		return ee.ExitStatus(), nil
	}
	var missing *ssh.ExitMissingError
	if errors.As(err, &missing) {
		return -1, errors.New("exec: the command ended without an exit status (did the guest power off or the agent restart?)")
	}
	return -1, fmt.Errorf("exec: %w", err)
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// newSession opens a session channel, bounded by ctx.
func newSession(ctx context.Context, conn *ssh.Client) (*ssh.Session, error) {
	type result struct {
		s   *ssh.Session
		err error
	}
	res := make(chan result, 1)
	go func() {
		s, err := conn.NewSession()
		res <- result{s, err}
	}()
	select {
	case r := <-res:
		if r.err != nil {
			return nil, fmt.Errorf("open a session in the guest: %w", r.err)
		}
		return r.s, nil
	case <-ctx.Done():
		go func() {
			if r := <-res; r.s != nil {
				r.s.Close()
			}
		}()
		return nil, fmt.Errorf("open a session in the guest: %w", ctx.Err())
	}
}

// ShellQuote joins args into a POSIX shell command line that runs exactly
// that argument vector.
func ShellQuote(args []string) string {
	var b strings.Builder
	for i, a := range args {
		if i > 0 {
			b.WriteByte(' ')
		}
		if a != "" && strings.Trim(a, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=:,+@%") == "" {
			b.WriteString(a)
			continue
		}
		b.WriteByte('\'')
		b.WriteString(strings.ReplaceAll(a, "'", `'"'"'`))
		b.WriteByte('\'')
	}
	return b.String()
}
