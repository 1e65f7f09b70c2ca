package daemon

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// loopStopWait bounds how long stopping a background loop waits for the
// round in progress.
const loopStopWait = 30 * time.Second

// runEvery runs fn at once, then every interval and whenever kick fires (nil:
// never), until the returned stop is called. stop cancels fn's context and
// waits for the round in progress to return, at most loopStopWait; it is
// safe to call more than once. The loop does not end with ctx: only stop
// ends it, so bangerd's closers decide when it goes.
func runEvery(ctx context.Context, what string, interval time.Duration, kick <-chan struct{}, fn func(context.Context)) (stop func() error) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			fn(ctx)
			select {
			case <-ctx.Done():
				return
			case <-kick:
			case <-t.C:
			}
		}
	}()
	var once sync.Once
	var err error
	return func() error {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(loopStopWait):
				err = fmt.Errorf("the %s did not stop within %s", what, loopStopWait)
			}
		})
		return err
	}
}
