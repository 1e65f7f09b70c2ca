// Package logging sets up banger's structured logs: log/slog JSON records to
// stderr (or a file), the operation id from the context on every record, and
// an operation helper that records start, end, duration and outcome of an
// operation and of the named steps inside it.
package logging

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"time"
)

type opIDKey struct{}

// WithOpID returns a context carrying the operation id.
func WithOpID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, opIDKey{}, id)
}

// OpID returns the operation id carried by ctx, or "".
func OpID(ctx context.Context) string {
	if ctx == nil {
		return ""
	}
	id, _ := ctx.Value(opIDKey{}).(string)
	return id
}

// NewOpID mints a fresh operation id: "op-" and 12 lowercase hex digits.
func NewOpID() string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		// crypto/rand does not fail on Linux; keep ids unique enough regardless.
		return "op-" + hex.EncodeToString([]byte(time.Now().Format("150405.000")))[:12]
	}
	return "op-" + hex.EncodeToString(b[:])
}

// contextHandler adds op_id from the context to every record.
type contextHandler struct{ slog.Handler }

func (h contextHandler) Handle(ctx context.Context, r slog.Record) error {
	if id := OpID(ctx); id != "" {
		r.AddAttrs(slog.String("op_id", id))
	}
	return h.Handler.Handle(ctx, r)
}

func (h contextHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return contextHandler{h.Handler.WithAttrs(attrs)}
}

func (h contextHandler) WithGroup(name string) slog.Handler {
	return contextHandler{h.Handler.WithGroup(name)}
}

// NewHandler wraps any handler so records carry the context's op_id.
func NewHandler(h slog.Handler) slog.Handler { return contextHandler{h} }

// New returns a JSON logger writing to w at the given level; records logged
// with a context carry that context's op_id.
func New(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(NewHandler(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level})))
}

// Discard is a logger that writes nothing (tests, libraries given none).
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// Op records one operation: a start record, named steps, and an end record
// with duration_ms and outcome.
type Op struct {
	log   *slog.Logger
	ctx   context.Context
	name  string
	start time.Time
}

// StartOp logs the start of an operation and returns it.
func StartOp(ctx context.Context, log *slog.Logger, name string, attrs ...any) *Op {
	if log == nil {
		log = slog.Default()
	}
	l := log.With(append([]any{"operation", name}, attrs...)...)
	l.DebugContext(ctx, "operation started")
	return &Op{log: l, ctx: ctx, name: name, start: time.Now()}
}

// End logs the end of the operation with its duration and outcome and
// returns err unchanged.
func (o *Op) End(err error) error {
	d := time.Since(o.start)
	if err != nil {
		o.log.WarnContext(o.ctx, "operation failed", "duration_ms", ms(d), "outcome", "error", "error", err.Error())
	} else {
		o.log.InfoContext(o.ctx, "operation completed", "duration_ms", ms(d), "outcome", "ok")
	}
	return err
}

// Step runs fn as a named step of the operation, logging its duration and outcome.
func (o *Op) Step(name string, fn func() error) error {
	start := time.Now()
	err := fn()
	d := time.Since(start)
	if err != nil {
		o.log.WarnContext(o.ctx, "step failed", "step", name, "duration_ms", ms(d), "outcome", "error", "error", err.Error())
	} else {
		o.log.DebugContext(o.ctx, "step completed", "step", name, "duration_ms", ms(d), "outcome", "ok")
	}
	return err
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Ms converts a duration to fractional milliseconds for log attributes.
func Ms(d time.Duration) float64 { return ms(d) }
