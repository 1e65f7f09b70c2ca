package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
)

// eventBus keeps the recent state changes and hands each new one to the
// subscribers. A subscriber too slow to keep up is dropped (its stream ends)
// rather than holding up the operation that published.
type eventBus struct {
	mu     sync.Mutex
	recent []api.Event
	subs   map[chan api.Event]struct{}
}

const (
	eventsKept   = 256
	eventsBuffer = 256
)

func newEventBus() *eventBus { return &eventBus{subs: map[chan api.Event]struct{}{}} }

// publish records ev with the time and the op id of ctx.
func (b *eventBus) publish(ctx context.Context, ev api.Event) {
	if b == nil {
		return
	}
	ev.Time = time.Now().UTC()
	if ev.OpID == "" {
		ev.OpID = logging.OpID(ctx)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.recent = append(b.recent, ev)
	if len(b.recent) > eventsKept {
		b.recent = append([]api.Event(nil), b.recent[len(b.recent)-eventsKept:]...)
	}
	for ch := range b.subs {
		select {
		case ch <- ev:
		default:
			delete(b.subs, ch)
			close(ch)
		}
	}
}

// subscribe returns the recent events and, with follow, a channel of the
// new ones (closed when the subscriber falls behind) and its cancel.
func (b *eventBus) subscribe(follow bool) ([]api.Event, <-chan api.Event, func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	past := append([]api.Event(nil), b.recent...)
	if !follow {
		return past, nil, func() {}
	}
	ch := make(chan api.Event, eventsBuffer)
	b.subs[ch] = struct{}{}
	return past, ch, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if _, ok := b.subs[ch]; ok {
			delete(b.subs, ch)
			close(ch)
		}
	}
}

// registerEventsAPI registers events.subscribe and op.cancel.
func (d *Daemon) registerEventsAPI() {
	rpc.Handle(d.mux, api.MethodEventsSubscribe, func(ctx context.Context, p api.EventsParams) (*rpc.Upgrade, error) {
		past, ch, cancel := d.events.subscribe(p.Follow)
		return &rpc.Upgrade{
			Result: api.EventsResult{Recent: len(past)},
			Then: func(ctx context.Context, c net.Conn) {
				defer cancel()
				streamEvents(ctx, c, past, ch)
			},
		}, nil
	})
	rpc.Handle(d.mux, api.MethodOpCancel, logOp(d.log, api.MethodOpCancel, "cancelled_op", func(p api.OpCancelParams) string { return p.OpID },
		func(ctx context.Context, p api.OpCancelParams) (api.OpCancelResult, error) {
			if op := d.vms.createOp(p.OpID); op != nil {
				return api.OpCancelResult{OpID: p.OpID, Kind: "create", Cancelled: op.cancelOp()}, nil
			}
			if iop := d.imageOps.get(p.OpID); iop != nil {
				return api.OpCancelResult{OpID: p.OpID, Kind: "image", Cancelled: iop.cancelOp()}, nil
			}
			return api.OpCancelResult{}, rpc.Errorf(rpc.CodeNotFound, "no create or image operation %q is known (finished ones are forgotten after a while)", p.OpID)
		}))
}

// errShutdown is the cause given to operations cancelled by a stopping bangerd.
var errShutdown = errors.New("bangerd is shutting down")

// cancelRunningOps cancels every create and image operation still running
// and waits (until ctx ends) for them to finish undoing what they made.
func (d *Daemon) cancelRunningOps(ctx context.Context) {
	var dones []<-chan struct{}
	if d.vms != nil {
		d.vms.mu.Lock()
		for _, op := range d.vms.creates {
			select {
			case <-op.done:
				continue
			default:
			}
			if op.cancel != nil {
				op.cancel(errShutdown)
			}
			dones = append(dones, op.done)
		}
		d.vms.mu.Unlock()
	}
	running := d.imageOps.cancelRunning(errShutdown)
	if len(dones)+len(running) == 0 {
		return
	}
	d.log.InfoContext(ctx, "cancelling operations still running", "creates", len(dones), "image_operations", len(running))
	for _, done := range dones {
		select {
		case <-done:
		case <-ctx.Done():
			return
		}
	}
	for _, op := range running {
		for !op.snapshot().Done {
			select {
			case <-ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
}

// streamEvents writes past, then each event from ch, as JSON lines until
// ch closes, ctx ends or the client goes away.
func streamEvents(ctx context.Context, c net.Conn, past []api.Event, ch <-chan api.Event) {
	gone := make(chan struct{})
	go func() {
		io.Copy(io.Discard, c) // returns when the client closes
		close(gone)
	}()
	w := bufio.NewWriter(c)
	enc := json.NewEncoder(w)
	for _, ev := range past {
		if enc.Encode(ev) != nil {
			return
		}
	}
	if w.Flush() != nil || ch == nil {
		return
	}
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return
			}
			if enc.Encode(ev) != nil || w.Flush() != nil {
				return
			}
		case <-gone:
			return
		case <-ctx.Done():
			return
		}
	}
}

// logOp wraps a mutating RPC handler so that each call writes one Info line
// with the op id (from ctx), the method, the VM or artifact it names, the
// duration and the outcome.
func logOp[P, R any](log *slog.Logger, method, key string, target func(P) string, fn func(context.Context, P) (R, error)) func(context.Context, P) (R, error) {
	return func(ctx context.Context, p P) (R, error) {
		t0 := time.Now()
		r, err := fn(ctx, p)
		attrs := []any{"method", method, key, target(p), "duration_ms", logging.Ms(time.Since(t0))}
		if err != nil {
			attrs = append(attrs, "outcome", "failed", "error", err.Error())
		} else {
			attrs = append(attrs, "outcome", "ok")
		}
		log.InfoContext(ctx, "operation", attrs...)
		return r, err
	}
}
