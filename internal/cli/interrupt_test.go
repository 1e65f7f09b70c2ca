package cli

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/testenv"
)

// followCancellable after an interrupt: bangerd is asked to cancel, the CLI
// waits for the undo, and a second Ctrl-C (a real SIGINT to this process)
// makes it stop waiting at once, saying what is left running in bangerd.
func TestSecondInterruptStopsWaiting(t *testing.T) {
	home := fakeBangerdHome(t, "bgint")
	var cancels atomic.Int32
	m := rpc.NewMux()
	rpc.Handle(m, api.MethodOpCancel, func(ctx context.Context, p api.OpCancelParams) (api.OpCancelResult, error) {
		cancels.Add(1)
		return api.OpCancelResult{OpID: p.OpID, Kind: "create", Cancelled: true}, nil
	})
	serveFakeBangerd(t, home, m)
	c, err := client.New(client.WithSocket(filepath.Join(home, "run", "bangerd.sock")))
	if err != nil {
		t.Fatal(err)
	}

	stderr := &testenv.LockedBuffer{}
	a := &App{Stderr: stderr}
	// The first Ctrl-C already happened: the command's context is done.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	undoStarted := make(chan struct{}, 1)
	wait := func(wctx context.Context) error {
		if wctx.Err() == nil { // the wait for the undo, not the first follow
			undoStarted <- struct{}{}
		}
		<-wctx.Done() // the undo never finishes while we watch
		return wctx.Err()
	}

	done := make(chan error, 1)
	go func() { done <- a.followCancellable(ctx, c, "vm create web", "op-abc123", wait) }()

	select {
	case <-undoStarted:
	case err := <-done:
		t.Fatalf("returned before waiting for the undo: %v\n%s", err, stderr.String())
	case <-time.After(10 * time.Second):
		t.Fatalf("never started waiting for the undo\n%s", stderr.String())
	}
	// The handler is installed before the "cancelling" line is printed.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(stderr.String(), "Ctrl-C again") {
		if time.Now().After(deadline) {
			t.Fatalf("no 'Ctrl-C again' hint\n%s", stderr.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	sent := time.Now()
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		var ee *ExitError
		if !errors.As(err, &ee) || ee.Code != 130 {
			t.Fatalf("err = %v, want exit status 130", err)
		}
		if d := time.Since(sent); d > 2*time.Second {
			t.Fatalf("second Ctrl-C took %s to return; want at once", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("second Ctrl-C did not stop the wait\n%s", stderr.String())
	}
	out := stderr.String()
	for _, want := range []string{"stopped waiting", "still undoing vm create web", "op-abc123", "banger events -f"} {
		if !strings.Contains(out, want) {
			t.Errorf("stderr lacks %q:\n%s", want, out)
		}
	}
	if n := cancels.Load(); n != 1 {
		t.Errorf("op.cancel called %d times, want 1", n)
	}
}
