package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
)

// cleanup is the one owner of what a VM runtime made: every stage of the
// start pipeline registers its undo here as soon as the thing exists, and a
// failed start, a stop, a VMM crash and a delete all release the runtime by
// running it. Each undo runs once (in reverse order of registration); errors
// are joined and each is logged with the op id of the context.
type cleanup struct {
	mu    sync.Mutex
	steps []cleanupStep
}

type cleanupStep struct {
	name string
	fn   func(context.Context) error
	gate bool // its failure stops the run (addGate)
}

func newCleanup() *cleanup { return &cleanup{} }

// add registers an undo. A nil fn is ignored.
func (c *cleanup) add(name string, fn func(context.Context) error) {
	if fn == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.steps = append(c.steps, cleanupStep{name: name, fn: fn})
}

// addGate registers an undo that the older ones depend on: ending the VMM,
// without which the host resources it uses (tap, disk, the handles.json
// that names it) must not be released. When a gate fails, run stops there:
// the gate and every older undo stay registered, for a later run.
func (c *cleanup) addGate(name string, fn func(context.Context) error) {
	if fn == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.steps = append(c.steps, cleanupStep{name: name, fn: fn, gate: true})
}

// run runs every registered undo not yet run, newest first, and returns the
// joined errors. An undo added while run is running is run too. Concurrent
// calls never run one undo twice.
func (c *cleanup) run(ctx context.Context, log *slog.Logger, attrs ...any) error {
	var errs []error
	for {
		c.mu.Lock()
		if len(c.steps) == 0 {
			c.mu.Unlock()
			return errors.Join(errs...)
		}
		s := c.steps[len(c.steps)-1]
		c.steps = c.steps[:len(c.steps)-1]
		c.mu.Unlock()
		if err := s.fn(ctx); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.name, err))
			if log != nil {
				log.WarnContext(ctx, "cleanup step failed", append(attrs, "step", s.name, "error", err.Error())...)
			}
			if s.gate {
				c.mu.Lock()
				c.steps = append(c.steps, s)
				c.mu.Unlock()
				if log != nil {
					log.WarnContext(ctx, "cleanup stopped: what is left depends on that step", append(attrs, "step", s.name)...)
				}
				return errors.Join(errs...)
			}
		}
	}
}
