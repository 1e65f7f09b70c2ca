package daemon

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/store"
)

// op.cancel stops an image pull that a registry holds up, and the pull
// leaves no work directory.
func TestCancelImagePull(t *testing.T) {
	asked := make(chan struct{}, 16)
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			w.WriteHeader(http.StatusOK)
			return
		}
		asked <- struct{}{}
		<-r.Context().Done() // a registry that never answers
	}))
	defer reg.Close()

	dir := t.TempDir()
	l := paths.Layout{ConfigDir: dir, DataDir: dir, RunDir: filepath.Join(dir, "run")}
	if err := l.Ensure(); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(context.Background(), l.DB())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	d := &Daemon{cfg: Config{Layout: l}, log: logging.Discard(), store: st, events: newEventBus()}
	ctx := logging.WithOpID(context.Background(), "op-pull-1")
	ref := strings.TrimPrefix(reg.URL, "http://") + "/stuck/image:v1"
	st0, err := d.beginImageOp(ctx, "pull", api.ImageOpParams{Ref: ref, Insecure: true, Name: "stuck"})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-asked:
	case <-time.After(10 * time.Second):
		t.Fatal("the pull never reached the registry")
	}
	op := d.imageOps.get(st0.OpID)
	if !op.cancelOp() {
		t.Fatal("cancel says the pull had finished")
	}
	deadline := time.Now().Add(10 * time.Second)
	for !op.snapshot().Done {
		if time.Now().After(deadline) {
			t.Fatal("the pull did not end within 10s of its cancel")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s := op.snapshot(); s.Error == "" || !strings.Contains(s.Error, "cancel") {
		t.Fatalf("status after cancel: %+v", s)
	}
	ents, _ := os.ReadDir(l.ImagesDir())
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") {
			t.Fatalf("work directory left: %s", e.Name())
		}
	}
	if op.cancelOp() {
		t.Fatal("a finished pull claims to be cancelled")
	}
}

// Each bangerd keeps its own image operations: stopping one (which cancels
// its running operations) or asking it for an operation id leaves another
// bangerd's operations alone — as when tests run several in one process.
func TestImageOpsPerDaemon(t *testing.T) {
	a := &Daemon{log: logging.Discard()}
	b := &Daemon{log: logging.Discard()}
	cancelled := false
	op := &imageOp{status: api.ImageOpStatus{OpID: "op-a", Kind: "pull"}, cancel: func(error) { cancelled = true }}
	a.imageOps.add("op-a", op)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	b.cancelRunningOps(ctx)
	if cancelled {
		t.Fatal("stopping one bangerd cancelled another's image operation")
	}
	if b.imageOps.get("op-a") != nil {
		t.Fatal("a bangerd knows another's image operation")
	}
	if a.imageOps.get("op-a") != op {
		t.Fatal("the operation is not in its own bangerd's registry")
	}
	release := a.imageOps.holdTemp("/x/.tmp-1")
	if !a.imageOps.tempHeld("/x/.tmp-1") || b.imageOps.tempHeld("/x/.tmp-1") {
		t.Fatal("a work directory is held by the wrong bangerd")
	}
	release()
	if a.imageOps.tempHeld("/x/.tmp-1") {
		t.Fatal("a released work directory is still held")
	}
	if got := a.imageOps.cancelRunning(errShutdown); len(got) != 1 || !cancelled {
		t.Fatalf("cancelRunning: %d operations, cancelled=%v", len(got), cancelled)
	}
}
