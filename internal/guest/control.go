package guest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
)

// controlTimeout bounds one control request (dial, hello and reply) when
// ctx allows longer.
const controlTimeout = 60 * time.Second

// errNoControl means the agent does not serve bulk control streams.
var errNoControl = errors.New("the guest agent does not serve control streams")

// control sends one control request over the bulk control stream, opening
// the stream first if needed. handled is false when the request must go
// over SSH instead: the client has no bulk key, or the agent does not serve
// control streams (an older agent; remembered for this client). A request
// that fails on a stream that already answered (the agent restarted its
// server, say) is sent once more on a new stream when retry is set, which
// idempotent requests allow.
func (c *Client) control(ctx context.Context, name string, payload []byte, retry bool) (handled, ok bool, data []byte, err error) {
	select {
	case c.ctlLock <- struct{}{}:
	case <-ctx.Done():
		return true, false, nil, fmt.Errorf("connect to the guest agent: %w", ctx.Err())
	}
	defer func() { <-c.ctlLock }()
	for attempt := 0; ; attempt++ {
		conn, proven, handled, err := c.controlStream(ctx)
		if !handled || err != nil {
			return handled, false, nil, err
		}
		ok, data, err = c.call(ctx, conn, name, payload)
		if err == nil {
			c.mu.Lock()
			if c.ctl == conn {
				c.ctlProven = true
			}
			c.mu.Unlock()
			return true, ok, data, nil
		}
		c.forgetControl(conn)
		if !proven && errors.Is(err, bulk.ErrControlClosed) {
			// An agent that knows bulk streams but not this operation
			// closes the stream after the Open frame.
			c.useSSH(err)
			return false, false, nil, nil
		}
		if !proven || !retry || attempt > 0 || ctx.Err() != nil {
			return true, false, nil, err
		}
		c.log.DebugContext(ctx, "the guest agent's control stream broke; opening another", "error", err)
	}
}

// controlStream returns the control stream, opening it if needed, and
// whether it has answered a request yet; handled false: use SSH. ctlLock
// is held.
func (c *Client) controlStream(ctx context.Context) (conn net.Conn, proven, handled bool, err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, false, true, ErrClosed
	}
	key, conn, proven := c.bulkKey, c.ctl, c.ctlProven
	if key == nil || c.noBulk {
		c.mu.Unlock()
		return nil, false, false, nil
	}
	c.mu.Unlock()
	if conn != nil {
		return conn, proven, true, nil
	}
	conn, err = c.openControl(ctx, key)
	if errors.Is(err, errNoControl) {
		c.useSSH(err)
		return nil, false, false, nil
	}
	if err != nil {
		return nil, false, true, fmt.Errorf("%w: %w", errNotReached, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		conn.Close()
		return nil, false, true, ErrClosed
	}
	c.ctl, c.ctlProven = conn, false
	return conn, false, true, nil
}

// errNotReached wraps the errors of opening the agent's control stream and
// of a Reidentify that could not reach the agent over SSH: the request was
// not sent.
var errNotReached = errors.New("the guest agent was not reached")

// Reach returns once the agent can take a request: its control stream is
// open (or, for an agent asked over SSH, the SSH connection), retrying like
// Ping until ctx is done. Unlike Ping it sends nothing, so a restore reaches
// the clone and then sends its reidentify without a ping's round trip.
func (c *Client) Reach(ctx context.Context) error {
	return c.retry(ctx, func(ctx context.Context) error {
		select {
		case c.ctlLock <- struct{}{}:
		case <-ctx.Done():
			return fmt.Errorf("connect to the guest agent: %w", ctx.Err())
		}
		_, _, handled, err := c.controlStream(ctx)
		<-c.ctlLock
		if handled {
			return err
		}
		_, err = c.SSH(ctx)
		return err
	})
}

// useSSH remembers that this client's agent is asked over SSH.
func (c *Client) useSSH(why error) {
	c.mu.Lock()
	c.noBulk = true
	c.mu.Unlock()
	c.log.Debug("the guest agent does not serve control streams; using SSH", "reason", why)
}

// openControl dials the agent and opens a control stream with key.
func (c *Client) openControl(ctx context.Context, key []byte) (net.Conn, error) {
	began := time.Now()
	nc, err := c.cfg.Dialer.Dial(ctx)
	if err != nil {
		return nil, err
	}
	stop := bound(ctx, nc)
	err = bulk.Hello(nc, key)
	if err == nil {
		err = bulk.WriteOpen(nc, bulk.Open{Op: bulk.OpControl})
	}
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		nc.Close()
		if errors.Is(err, bulk.ErrUnsupported) || errors.Is(err, bulk.ErrRefused) {
			// an SSH-only agent, or one holding another key than the
			// one bangerd recorded: SSH still authenticates both ends
			return nil, fmt.Errorf("%w: %w", errNoControl, err)
		}
		if cerr := expired(ctx, err); cerr != nil {
			return nil, fmt.Errorf("open a control stream to the guest agent: %w", cerr)
		}
		return nil, fmt.Errorf("open a control stream to the guest agent: %w", err)
	}
	c.log.DebugContext(ctx, "control stream to the guest agent", "took", time.Since(began).Round(time.Millisecond))
	return nc, nil
}

// call runs one request on conn, bounded by ctx (and controlTimeout).
func (c *Client) call(ctx context.Context, conn net.Conn, name string, payload []byte) (bool, []byte, error) {
	stop := bound(ctx, conn)
	ok, data, err := bulk.ControlCall(conn, name, payload, c.cfg.MaxReply)
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		if cerr := expired(ctx, err); cerr != nil {
			return false, nil, cerr
		}
		return false, nil, err
	}
	return ok, data, nil
}

// bound sets conn's deadline from ctx (at most controlTimeout away) and
// ends it early when ctx ends. The returned stop clears the deadline and
// reports false when ctx ended meanwhile.
func bound(ctx context.Context, conn net.Conn) func() bool {
	deadline := time.Now().Add(controlTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = conn.SetDeadline(deadline)
	after := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	return func() bool {
		ok := after()
		if ok {
			_ = conn.SetDeadline(time.Time{})
		}
		return ok
	}
}

// forgetControl drops conn if it is the control stream, and closes it.
func (c *Client) forgetControl(conn net.Conn) {
	c.mu.Lock()
	if c.ctl == conn {
		c.ctl = nil
	}
	c.mu.Unlock()
	conn.Close()
}

// dropControl closes the control stream, if any.
func (c *Client) dropControl() {
	c.mu.Lock()
	conn := c.ctl
	c.ctl = nil
	c.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
}

// ExecBulk runs a shell command line in the guest on a bulk session (the
// path `banger exec` takes, bulk.OpSession), as the agent's default user,
// with no stdin and its output discarded, and returns its exit status.
// bangerd warms a pool VM up with it: the claim's exec then runs on guest
// code already translated, and no SSH handshake is made. Without a bulk key
// it runs over SSH.
func (c *Client) ExecBulk(ctx context.Context, line string) (int, error) {
	c.mu.Lock()
	key, closed := c.bulkKey, c.closed
	c.mu.Unlock()
	if closed {
		return -1, ErrClosed
	}
	if key == nil {
		return c.ExecShell(ctx, line, nil, io.Discard, io.Discard, ExecOptions{})
	}
	nc, err := c.cfg.Dialer.Dial(ctx)
	if err != nil {
		return -1, err
	}
	stop := bound(ctx, nc)
	var b bulk.Batch
	b.Open(bulk.Open{Op: bulk.OpSession})
	b.Request("exec", ssh.Marshal(&struct{ Command string }{line}))
	b.EOF()
	err = bulk.Hello(nc, key)
	if err == nil {
		var first []byte
		if first, err = b.Bytes(); err == nil {
			_, err = nc.Write(first)
		}
	}
	if err != nil {
		stop()
		nc.Close()
		if errors.Is(err, bulk.ErrUnsupported) || errors.Is(err, bulk.ErrRefused) {
			return c.ExecShell(ctx, line, nil, io.Discard, io.Discard, ExecOptions{})
		}
		return -1, fmt.Errorf("exec over a bulk stream: %w", err)
	}
	ch := bulk.NewChanAfter(nc, &b)
	defer ch.Close()
	defer stop()
	go func() { _, _ = io.Copy(io.Discard, ch) }()
	go func() { _, _ = io.Copy(io.Discard, ch.Stderr()) }()
	code := -1
	for r := range ch.Requests() {
		if r.Type == "exit-status" && len(r.Payload) == 4 {
			code = int(binary.BigEndian.Uint32(r.Payload))
		}
		if r.Type == "exit-signal" {
			code = 128 // the signal's number does not matter here
		}
	}
	if code < 0 {
		if err := ctx.Err(); err != nil {
			return -1, err
		}
		return -1, errors.New("exec over a bulk stream: the session ended without an exit status")
	}
	return code, nil
}
