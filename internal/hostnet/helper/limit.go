package helper

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/rpc"
)

// Refusal log limits: at most refusalBurst refusal records per
// refusalWindow, then one summary record with the count of the rest.
const (
	refusalBurst  = 5
	refusalWindow = time.Minute
	// SuppressedMsg is the summary record of refusals not logged one by one.
	SuppressedMsg = "helper refusals suppressed"
)

// refusalLog rate-limits the records of refused connections and requests,
// so that a caller who is not allowed cannot fill the helper's log.
type refusalLog struct {
	log    *slog.Logger
	burst  int
	window time.Duration

	mu         sync.Mutex
	start      time.Time
	logged     int
	suppressed int
	timer      *time.Timer
}

func newRefusalLog(log *slog.Logger) *refusalLog {
	return &refusalLog{log: log, burst: refusalBurst, window: refusalWindow}
}

// record logs one refusal, or counts it when the window's burst is spent.
func (r *refusalLog) record(ctx context.Context, msg string, attrs ...slog.Attr) {
	r.mu.Lock()
	now := time.Now()
	if r.start.IsZero() || now.Sub(r.start) >= r.window {
		if r.timer == nil {
			r.start, r.logged = now, 0
		}
	}
	if r.logged < r.burst {
		r.logged++
		r.mu.Unlock()
		r.log.LogAttrs(ctx, slog.LevelWarn, msg, attrs...)
		return
	}
	r.suppressed++
	if r.timer == nil {
		r.timer = time.AfterFunc(r.start.Add(r.window).Sub(now), r.flush)
	}
	r.mu.Unlock()
}

// flush writes the summary of the suppressed refusals and opens a new window.
func (r *refusalLog) flush() {
	r.mu.Lock()
	n := r.suppressed
	r.suppressed, r.logged, r.start = 0, 0, time.Now()
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
	}
	r.mu.Unlock()
	if n > 0 {
		r.log.Warn(SuppressedMsg, "count", n, "window_s", r.window.Seconds())
	}
}

// peerConn is an accepted connection with its peer's credentials; closing
// it gives its slot back to the listener.
type peerConn struct {
	*net.UnixConn
	cred    Caller
	release func()
	once    sync.Once
}

func (c *peerConn) Close() error {
	c.once.Do(c.release)
	return c.UnixConn.Close()
}

// limitListener accepts unix connections, reads each peer's credentials,
// and turns away (with one error line, then close) a connection beyond
// perUID for its uid (root is not capped) or beyond total overall.
type limitListener struct {
	*net.UnixListener
	perUID, total int
	refusals      *refusalLog

	mu    sync.Mutex
	n     int
	byUID map[uint32]int
}

func newLimitListener(ln *net.UnixListener, perUID, total int, r *refusalLog) *limitListener {
	return &limitListener{UnixListener: ln, perUID: perUID, total: total, refusals: r, byUID: map[uint32]int{}}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, err
		}
		cred, err := PeerCred(c)
		if err != nil {
			l.refusals.record(context.Background(), "refused a connection whose caller cannot be identified", slog.String("error", err.Error()))
			c.Close()
			continue
		}
		if why := l.admit(cred); why != "" {
			l.turnAway(c, cred, why)
			continue
		}
		return &peerConn{UnixConn: c, cred: cred, release: func() { l.done(cred.UID) }}, nil
	}
}

func (l *limitListener) admit(c Caller) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.total > 0 && l.n >= l.total {
		return fmt.Sprintf("the helper is serving its maximum of %d connections; try again", l.total)
	}
	if !c.IsRoot() && l.perUID > 0 && l.byUID[c.UID] >= l.perUID {
		return fmt.Sprintf("uid %d already has %d connections open to the helper (its limit); close some and try again", c.UID, l.perUID)
	}
	l.n++
	l.byUID[c.UID]++
	return ""
}

func (l *limitListener) done(uid uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n--
	if l.byUID[uid]--; l.byUID[uid] <= 0 {
		delete(l.byUID, uid)
	}
}

// turnAway answers a connection over the limits with one error line
// (without waiting for its request) and closes it.
func (l *limitListener) turnAway(c *net.UnixConn, cred Caller, why string) {
	op := rpc.NewOpID()
	ctx := rpc.WithOpID(withCaller(context.Background(), cred), op)
	l.refusals.record(ctx, "refused a connection over the limits", slog.String("code", rpc.CodeUnavailable), slog.String("error", why), slog.Int("pid", int(cred.PID)))
	b, _ := json.Marshal(rpc.Response{Error: &rpc.ErrorResponse{Code: rpc.CodeUnavailable, Message: why, OpID: op}})
	c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	c.Write(append(b, '\n'))
	c.Close()
}
