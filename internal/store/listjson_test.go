package store

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"testing"
	"time"
)

// ListVMsJSON must decode to exactly what ListVMs returns: vm.list serves it
// in place of encoding ListVMs.
func TestListVMsJSONMatchesListVMs(t *testing.T) {
	s := openTest(t)
	ctx := context.Background()
	if got, err := s.ListVMsJSON(ctx); err != nil || string(got) != "[]" {
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
	want, err := s.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := s.ListVMsJSON(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []*VM
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, raw)
	}
	if !reflect.DeepEqual(got, want) {
		wb, _ := json.Marshal(want)
		t.Fatalf("ListVMsJSON decodes differently from ListVMs:\n got %s\nwant %s", raw, wb)
	}
}
