package cli

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/rpc"
)

// fakeVMs is a bangerd stand-in holding VM records in memory, on
// BANGER_HOME's socket.
type fakeVMs struct {
	mu      sync.Mutex
	vms     []*api.VM
	deleted []string
	creates []api.CreateParams
}

// fakeBangerdHome makes a fresh BANGER_HOME (in /tmp: the socket path must
// fit sun_path) with its run directory, removed when the test ends.
func fakeBangerdHome(t *testing.T, prefix string) string {
	t.Helper()
	home, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(home) })
	t.Setenv("BANGER_HOME", home)
	if err := os.MkdirAll(filepath.Join(home, "run"), 0o700); err != nil {
		t.Fatal(err)
	}
	return home
}

// serveFakeBangerd serves m as bangerd on home's socket until the test ends.
func serveFakeBangerd(t *testing.T, home string, m *rpc.Mux) {
	t.Helper()
	ln, err := net.Listen("unix", filepath.Join(home, "run", "bangerd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &rpc.Server{Mux: m, Logger: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		sctx, c2 := context.WithTimeout(context.Background(), 5*time.Second)
		defer c2()
		srv.Shutdown(sctx)
		ln.Close()
		<-done
	})
}

func startFakeVMs(t *testing.T, vms ...*api.VM) *fakeVMs {
	t.Helper()
	home := fakeBangerdHome(t, "bgfake")
	f := &fakeVMs{vms: vms}
	m := rpc.NewMux()
	rpc.Handle(m, api.MethodPing, func(ctx context.Context, _ struct{}) (string, error) { return "pong", nil })
	rpc.Handle(m, api.MethodVMList, func(ctx context.Context, _ struct{}) ([]*api.VM, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		return append([]*api.VM{}, f.vms...), nil
	})
	rpc.Handle(m, api.MethodVMGet, func(ctx context.Context, p api.VMRef) (*api.VM, error) {
		if v := f.find(p.VM); v != nil {
			return v, nil
		}
		return nil, rpc.Errorf(rpc.CodeNotFound, "vm %q not found", p.VM)
	})
	rpc.Handle(m, api.MethodVMDelete, func(ctx context.Context, p api.DeleteParams) (*api.DeleteResult, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		for i, v := range f.vms {
			if v.Name == p.VM || v.ID == p.VM {
				if v.State == api.StateRunning && !p.Force {
					return nil, rpc.Errorf(rpc.CodeConflict, "vm %q is running; stop it first or use --force", v.Name)
				}
				f.vms = append(f.vms[:i], f.vms[i+1:]...)
				f.deleted = append(f.deleted, v.Name)
				return &api.DeleteResult{Deleted: v.Name, ID: v.ID}, nil
			}
		}
		return nil, rpc.Errorf(rpc.CodeNotFound, "vm %q not found", p.VM)
	})
	rpc.Handle(m, api.MethodVMCreateBegin, func(ctx context.Context, p api.CreateParams) (api.CreateStatus, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.creates = append(f.creates, p)
		v := &api.VM{ID: "new" + p.Name, Name: p.Name, State: api.StateRunning, VCPUs: p.VCPUs, MemoryMiB: p.MemoryMiB, DiskMiB: p.DiskMiB}
		return api.CreateStatus{OpID: "op-fake1", VMID: v.ID, Name: p.Name, Done: true, Stages: []api.Stage{}, VM: v}, nil
	})
	serveFakeBangerd(t, home, m)
	return f
}

func (f *fakeVMs) find(ref string) *api.VM {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, v := range f.vms {
		if v.Name == ref || v.ID == ref {
			return v
		}
	}
	return nil
}

func testVMs() []*api.VM {
	now := time.Now()
	return []*api.VM{
		{ID: "aaaa1111", Name: "web", State: api.StateRunning, Image: "debian", ImageID: "img1", VCPUs: 2, MemoryMiB: 2048, DiskMiB: 4096, IP: "10.0.0.2", CreatedAt: now},
		{ID: "bbbb2222", Name: "web-old", State: api.StateStopped, Image: "debian", ImageID: "img1", VCPUs: 1, MemoryMiB: 512, DiskMiB: 4096, CreatedAt: now},
		{ID: "cccc3333", Name: "db", State: api.StateStopped, Image: "alpine", ImageID: "img2", VCPUs: 1, MemoryMiB: 512, DiskMiB: 4096, CreatedAt: now},
	}
}
