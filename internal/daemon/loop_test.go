package daemon

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// runEvery runs a round at once and on each kick, and its stop ends the
// goroutine (no round runs after stop returns) and cancels the round's context.
func TestRunEveryKickAndStop(t *testing.T) {
	var rounds atomic.Int32
	var lastCtx atomic.Value
	kick := make(chan struct{}, 1)
	stop := runEvery(context.Background(), "test loop", time.Hour, kick, func(ctx context.Context) {
		lastCtx.Store(ctx)
		rounds.Add(1)
	})
	waitFor := func(n int32) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for rounds.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("%d rounds, want %d", rounds.Load(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitFor(1)
	kick <- struct{}{}
	waitFor(2)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if err := stop(); err != nil {
		t.Fatalf("second stop: %v", err)
	}
	n := rounds.Load()
	if ctx := lastCtx.Load().(context.Context); ctx.Err() == nil {
		t.Error("the round's context is not cancelled after stop")
	}
	select {
	case kick <- struct{}{}:
	default:
	}
	if rounds.Load() != n {
		t.Error("a round ran after stop returned")
	}
}
