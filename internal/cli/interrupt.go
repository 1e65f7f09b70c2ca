package cli

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/bangerdev/banger/client"
)

// cancelWait bounds how long an interrupted CLI waits for bangerd to undo
// a cancelled operation before it gives up waiting (the undo goes on).
const cancelWait = 60 * time.Second

// followCancellable runs wait, which follows operation opID in bangerd until
// it finishes. When ctx ends first (Ctrl-C or SIGTERM), it asks bangerd to
// cancel the operation (op.cancel: bangerd undoes what it made) and waits for
// that; a second Ctrl-C exits at once, saying what is left running.
func (a *App) followCancellable(ctx context.Context, c *client.Client, what, opID string, wait func(context.Context) error) error {
	err := wait(ctx)
	if ctx.Err() == nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	bg := context.WithoutCancel(ctx)
	cctx, cancel := context.WithTimeout(bg, 10*time.Second)
	res, cerr := c.CancelOp(client.WithOpID(cctx, opID), opID)
	cancel()
	if cerr != nil {
		fmt.Fprintf(a.Stderr, "\ninterrupted; could not cancel %s (op %s): %v\nit may still be running in bangerd; follow it with: banger events -f\n", what, opID, cerr)
		return &ExitError{Code: 130}
	}
	if !res.Cancelled {
		fmt.Fprintf(a.Stderr, "\ninterrupted, but %s (op %s) had already finished; see: banger vm list, banger image list\n", what, opID)
		return &ExitError{Code: 130}
	}
	fmt.Fprintf(a.Stderr, "\ncancelling %s (op %s): bangerd is undoing what it made (Ctrl-C again to stop waiting)\n", what, opID)
	wctx, wcancel := context.WithTimeout(bg, cancelWait)
	defer wcancel()
	done := make(chan error, 1)
	go func() { done <- wait(wctx) }()
	select {
	case <-done:
		if wctx.Err() != nil {
			fmt.Fprintf(a.Stderr, "%s is still being undone after %s (op %s); follow it with: banger events -f\n", what, cancelWait, opID)
		} else {
			fmt.Fprintf(a.Stderr, "%s cancelled; nothing it made is left\n", what)
		}
	case <-sig:
		fmt.Fprintf(a.Stderr, "stopped waiting; bangerd is still undoing %s (op %s); follow it with: banger events -f\n", what, opID)
	}
	return &ExitError{Code: 130}
}
