package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
)

// ListVMsJSON must decode to exactly what ListVMs returns: vm.list serves it
// in place of encoding ListVMs.
func TestListVMsJSONMatchesListVMs(t *testing.T) {
	s := openTest(t)
	ctx := context.Background()
	if got, err := s.ListVMsJSON(ctx, true); err != nil || string(got) != "[]" {
		t.Fatalf("empty list: %q, %v", got, err)
	}
	if err := s.CreateImage(ctx, &Image{ID: "img1", Name: "img-\"quoted\"", RootfsPath: "/x"}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKernel(ctx, &Kernel{ID: "k1", Name: "k", VmlinuxPath: "/x"}); err != nil {
		t.Fatal(err)
	}
	base := time.Date(2026, 12, 1, 10, 0, 0, 123456000, time.UTC)
	vms := []*VM{
		{ID: "b2", Name: "second", CreatedAt: base.Add(time.Second)},
		{ID: "a1", Name: "first", CreatedAt: base, Driver: "qemu", IP: "10.0.0.2", MAC: "02:00:00:00:00:01", Tap: "tap0",
			Workspace: "/home/u/repo", LastError: "the guest said: \"\x01\x1b[31m\u202e\\\n\ttab\" 日本"},
		{ID: "c3", Name: "same-time-b", CreatedAt: base.Add(2 * time.Second)},
		{ID: "c4", Name: "same-time-a", CreatedAt: base.Add(2 * time.Second)},
	}
	for i, v := range vms {
		v.ImageID, v.KernelID, v.VCPUs, v.MemoryMiB, v.DiskMiB, v.State = "img1", "k1", i+1, 256*(i+1), 1024, StateStopped
		if err := s.CreateVM(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 50; i++ {
		v := &VM{ID: fmt.Sprintf("z%02d", i), Name: fmt.Sprintf("bulk-%02d", i), ImageID: "img1", KernelID: "k1", State: StateRunning}
		if err := s.CreateVM(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	// the columns UpdateVM leaves alone: expiry, published ports, pool
	if err := s.SetVMExpiry(ctx, "a1", base.Add(time.Hour+123*time.Microsecond)); err != nil {
		t.Fatal(err)
	}
	fws := []api.Forward{{Spec: "127.0.0.1:8080:80", Host: "127.0.0.1", Port: 8080, GuestPort: 80, Error: "live state, not stored"}, {Spec: "0:22", GuestPort: 22}}
	if err := s.SetVMForwards(ctx, "a1", fws); err != nil {
		t.Fatal(err)
	}
	if err := s.SetVMPool(ctx, "c3", "img1/k1/1/256/1024/qemu"); err != nil {
		t.Fatal(err)
	}
	all, err := s.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var notPool []*VM
	for _, v := range all {
		if !v.Pool {
			notPool = append(notPool, v)
		}
	}
	if len(notPool) != len(all)-1 {
		t.Fatalf("%d pool VMs, want 1", len(all)-len(notPool))
	}
	for _, v := range all {
		if v.ID != "a1" {
			continue
		}
		if v.ExpiresAt == nil || !v.ExpiresAt.Equal(base.Add(time.Hour+123*time.Microsecond)) {
			t.Fatalf("expiry read back as %v", v.ExpiresAt)
		}
		want := []api.Forward{{Spec: "127.0.0.1:8080:80", Host: "127.0.0.1", GuestPort: 80}, {Spec: "0:22", GuestPort: 22}}
		if !reflect.DeepEqual(v.Forwards, want) {
			t.Fatalf("forwards read back as %+v, want %+v (the listening port and its error are not stored)", v.Forwards, want)
		}
	}
	for _, tc := range []struct {
		all  bool
		want []*VM
	}{{true, all}, {false, notPool}} {
		raw, err := s.ListVMsJSON(ctx, tc.all)
		if err != nil {
			t.Fatal(err)
		}
		var got []*VM
		if err := json.Unmarshal(raw, &got); err != nil {
			t.Fatalf("not JSON: %v\n%s", err, raw)
		}
		if !reflect.DeepEqual(got, tc.want) {
			wb, _ := json.Marshal(tc.want)
			t.Fatalf("ListVMsJSON(all=%v) decodes differently from ListVMs:\n got %s\nwant %s", tc.all, raw, wb)
		}
	}
}

// A pool claim is one conditional update: only a running VM of that pool is
// claimed, only once, and a taken name changes nothing.
func TestClaimPoolVM(t *testing.T) {
	s := openTest(t)
	ctx := context.Background()
	if err := s.CreateImage(ctx, &Image{ID: "img1", Name: "img", RootfsPath: "/x"}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKernel(ctx, &Kernel{ID: "k1", Name: "k", VmlinuxPath: "/x"}); err != nil {
		t.Fatal(err)
	}
	for _, v := range []*VM{
		{ID: "p1", Name: "pool-p1", State: StateRunning},
		{ID: "p2", Name: "pool-p2", State: StateStarting},
		{ID: "t1", Name: "taken", State: StateStopped},
	} {
		v.ImageID, v.KernelID = "img1", "k1"
		if err := s.CreateVM(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"p1", "p2"} {
		if err := s.SetVMPool(ctx, id, "key-a"); err != nil {
			t.Fatal(err)
		}
	}
	if ok, err := s.ClaimPoolVM(ctx, "p1", "key-b", "mine", ""); ok || err != nil {
		t.Fatalf("claim with another pool's key: %v %v", ok, err)
	}
	if ok, err := s.ClaimPoolVM(ctx, "p2", "key-a", "mine", ""); ok || err != nil {
		t.Fatalf("claim of a VM not running: %v %v", ok, err)
	}
	if ok, err := s.ClaimPoolVM(ctx, "p1", "key-a", "taken", ""); ok || !errors.Is(err, ErrConflict) {
		t.Fatalf("claim with a taken name: %v %v", ok, err)
	}
	if v, _ := s.GetVM(ctx, "p1"); !v.Pool || v.Name != "pool-p1" {
		t.Fatalf("a failed claim changed the VM: %+v", v)
	}
	if ok, err := s.ClaimPoolVM(ctx, "p1", "key-a", "mine", "/home/u/repo"); !ok || err != nil {
		t.Fatalf("claim: %v %v", ok, err)
	}
	if ok, err := s.ClaimPoolVM(ctx, "p1", "key-a", "again", ""); ok || err != nil {
		t.Fatalf("second claim of the same VM: %v %v", ok, err)
	}
	v, _ := s.GetVM(ctx, "p1")
	if v.Pool || v.Name != "mine" || v.Workspace != "/home/u/repo" {
		t.Fatalf("claimed VM: %+v", v)
	}
	vms, keys, err := s.PoolVMs(ctx)
	if err != nil || len(vms) != 1 || vms[0].ID != "p2" || keys[0] != "key-a" {
		t.Fatalf("pool VMs after the claim: %v %v %v", vms, keys, err)
	}
}

// ListVMsJSON is cached until the database changes: every kind of change,
// by this store or by another process's connection, must show in the next
// answer, which stays byte-identical to the query's.
func TestListVMsJSONCacheFollowsEveryChange(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "banger.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.CreateImage(ctx, &Image{ID: "img1", Name: "img", RootfsPath: "/x"}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKernel(ctx, &Kernel{ID: "k1", Name: "k", VmlinuxPath: "/x"}); err != nil {
		t.Fatal(err)
	}
	// another process: its own connections to the same file
	other, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	mk := func(id string) *VM {
		return &VM{ID: id, Name: "vm-" + id, ImageID: "img1", KernelID: "k1", VCPUs: 1, MemoryMiB: 256, DiskMiB: 256, State: StateStopped, Driver: "qemu"}
	}
	check := func(step string, want ...string) {
		t.Helper()
		for _, all := range []bool{false, true} {
			got, err := s.ListVMsJSON(ctx, all)
			if err != nil {
				t.Fatalf("%s: %v", step, err)
			}
			q, err := s.QueryVMsJSON(ctx, all)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != string(q) {
				t.Fatalf("%s (all=%v): cached answer is stale:\n got %s\nwant %s", step, all, got, q)
			}
		}
		var vms []api.VM
		b, _ := s.ListVMsJSON(ctx, true)
		if err := json.Unmarshal(b, &vms); err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, v := range vms {
			names = append(names, v.Name+"/"+string(v.State))
		}
		if !reflect.DeepEqual(names, want) {
			t.Fatalf("%s: listed %v, want %v", step, names, want)
		}
	}
	check("empty")
	steps := []struct {
		name string
		do   func() error
		want []string
	}{
		{"create here", func() error { return s.CreateVM(ctx, mk("a")) }, []string{"vm-a/stopped"}},
		{"create in another process", func() error { return other.CreateVM(ctx, mk("b")) }, []string{"vm-a/stopped", "vm-b/stopped"}},
		{"update in another process", func() error {
			v, err := other.GetVM(ctx, "a")
			if err != nil {
				return err
			}
			v.State = StateRunning
			return other.UpdateVM(ctx, v)
		}, []string{"vm-a/running", "vm-b/stopped"}},
		{"pool vm here", func() error { return s.CreatePoolVM(ctx, mk("p"), "spec") }, []string{"vm-a/running", "vm-b/stopped", "vm-p/stopped"}},
		{"delete here", func() error { return s.DeleteVM(ctx, "b") }, []string{"vm-a/running", "vm-p/stopped"}},
		{"delete in another process", func() error { return other.DeleteVM(ctx, "p") }, []string{"vm-a/running"}},
	}
	for _, st := range steps {
		check(st.name+" (before: warm the cache)", namesBefore(t, s)...)
		if err := st.do(); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		check(st.name, st.want...)
	}
}

func namesBefore(t *testing.T, s *Store) []string {
	t.Helper()
	vms, err := s.ListVMs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, v := range vms {
		out = append(out, v.Name+"/"+string(v.State))
	}
	return out
}
