package daemon

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// TestPublishedPorts: -p specs are checked, listened on while the VM runs
// (PORT 0 reported as the chosen port) and closed when it stops.
func TestPublishedPorts(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	if _, err := ts.createBegin(ctx, api.CreateParams{Name: "bad", Ports: []string{"99999:80"}}); rpc.CodeOf(err) != rpc.CodeInvalidArgument {
		t.Fatalf("bad spec: %v", err)
	}
	st, err := ts.createBegin(rpc.WithOpID(ctx, "op-ports1"), api.CreateParams{Name: "web", Ports: []string{"127.0.0.1:0:80"}})
	if err != nil {
		t.Fatal(err)
	}
	ts.waitCreate(t, st.OpID, 30*time.Second)
	vm, err := ts.st.GetVM(ctx, st.VMID)
	if err != nil {
		t.Fatal(err)
	}
	ts.markForwards(vm)
	if len(vm.Forwards) != 1 || vm.Forwards[0].Port == 0 || vm.Forwards[0].GuestPort != 80 || vm.Forwards[0].Error != "" {
		t.Fatalf("forwards %+v", vm.Forwards)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(vm.Forwards[0].Port))
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("published port not listening: %v", err)
	}
	c.Close()
	// the same boot keeps the same listener
	vm2, _ := ts.st.GetVM(ctx, st.VMID)
	ts.markForwards(vm2)
	if vm2.Forwards[0].Port != vm.Forwards[0].Port {
		t.Fatalf("port changed within one boot: %d then %d", vm.Forwards[0].Port, vm2.Forwards[0].Port)
	}
	// reading the VM does not open listeners: closed (as at bangerd's
	// shutdown), they stay closed until the housekeeping opens them again
	ts.closeForwards()
	vm2b, _ := ts.st.GetVM(ctx, st.VMID)
	ts.markForwards(vm2b)
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("reading the VM opened its published port")
	}
	if vm2b.Forwards[0].Port != 0 {
		t.Fatalf("a closed listener reported as port %d", vm2b.Forwards[0].Port)
	}
	vms, _ := ts.st.ListVMs(ctx)
	ts.syncForwards(ctx, vms)
	vm2c, _ := ts.st.GetVM(ctx, st.VMID)
	ts.markForwards(vm2c) // port 0 in the spec: a new port is chosen
	addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(vm2c.Forwards[0].Port))
	if c, err := net.DialTimeout("tcp", addr, 5*time.Second); err != nil {
		t.Fatalf("the housekeeping did not open the published port again: %v", err)
	} else {
		c.Close()
	}
	// stopped: the housekeeping closes it
	if err := ts.kill(ctx, vm); err != nil {
		t.Fatal(err)
	}
	vms, _ = ts.st.ListVMs(ctx)
	ts.syncForwards(ctx, vms)
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("published port still listening after the VM stopped")
	}
	vm3, _ := ts.st.GetVM(ctx, st.VMID)
	ts.markForwards(vm3)
	if len(vm3.Forwards) != 1 || vm3.Forwards[0].Port != 0 {
		t.Fatalf("stopped VM forwards %+v", vm3.Forwards)
	}
	ts.closeForwards()
}

// vm.list takes its fast path (SQLite's JSON, no decoration) unless some VM
// has runtime state to add: a listener of a published port or a pause.
// Expiry, published ports and pool membership are in the records.
func TestListDecorated(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	vm := ts.newVM(t, "v", store.StateStopped)
	if err := ts.st.SetVMExpiry(ctx, vm.ID, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := ts.st.SetVMForwards(ctx, vm.ID, []api.Forward{{Spec: "0:80", GuestPort: 80}}); err != nil {
		t.Fatal(err)
	}
	if ts.listDecorated() {
		t.Fatal("listDecorated with only recorded state")
	}
	if err := ts.start(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	defer ts.closeForwards()
	if !ts.listDecorated() {
		t.Fatal("listDecorated false with a published port listening")
	}
	got, _ := ts.st.GetVM(ctx, vm.ID)
	ts.markForwards(got)
	if len(got.Forwards) != 1 || got.Forwards[0].Port == 0 {
		t.Fatalf("the start did not open the published port: %+v", got.Forwards)
	}
}
