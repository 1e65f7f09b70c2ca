// Package latelog writes the agent's routine records of a warm start (a
// clone's channel resync, new identity and its step timings) a moment
// later, in the background, instead of on the clone's way to its first
// command.
//
// In a guest just restored from a snapshot under emulation, every code
// path runs cold, and the guest's one vCPU is what the whole restore waits
// on (measured: busy from the resume to the first command's exit). A
// console record there (slog's formatting, then the tty and UART paths)
// cost 3-28 ms each, about 20-60 ms for the four of a clone; written later
// they cost the same, but after the clone has answered.
//
// Records are written in the order they were queued, all at once, Delay
// after the first of a batch. Errors and warnings are not for here: they
// are logged at once.
package latelog

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Delay is how long a queued record waits. A clone answers its first
// command within a few hundred milliseconds of its restore.
var Delay = time.Second

type record struct {
	log  *slog.Logger
	msg  string
	args []any
}

var (
	mu      sync.Mutex
	queue   []record
	pending bool
)

// Info queues msg with args for l, to be written at Info level Delay later.
func Info(l *slog.Logger, msg string, args ...any) {
	if !l.Enabled(context.Background(), slog.LevelInfo) {
		return
	}
	mu.Lock()
	defer mu.Unlock()
	queue = append(queue, record{log: l, msg: msg, args: args})
	if !pending {
		pending = true
		time.AfterFunc(Delay, Flush)
	}
}

// Flush writes the queued records now (the agent calls it before powering
// off, so that none is lost).
func Flush() {
	mu.Lock()
	q := queue
	queue, pending = nil, false
	mu.Unlock()
	for _, r := range q {
		r.log.Info(r.msg, r.args...)
	}
}
