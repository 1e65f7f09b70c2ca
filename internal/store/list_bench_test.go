package store

import (
	"context"
	"fmt"
	"testing"
)

// go test -run xxx -bench ListVMs ./internal/store
func BenchmarkListVMs1000(b *testing.B) {
	s, err := Open(context.Background(), b.TempDir()+"/b.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	img := &Image{ID: "img1", Name: "img", RootfsPath: "/x"}
	if err := s.CreateImage(ctx, img); err != nil {
		b.Fatal(err)
	}
	k := &Kernel{ID: "k1", Name: "k", VmlinuxPath: "/x"}
	if err := s.CreateKernel(ctx, k); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 1000; i++ {
		v := &VM{ID: fmt.Sprintf("%016x", i), Name: fmt.Sprintf("vm-%04d", i), ImageID: "img1", KernelID: "k1", VCPUs: 1, MemoryMiB: 256, DiskMiB: 256, State: StateStopped, Driver: "qemu"}
		if err := s.CreateVM(ctx, v); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		vms, err := s.ListVMs(ctx)
		if err != nil || len(vms) != 1000 {
			b.Fatal(err, len(vms))
		}
	}
}

func BenchmarkListVMsJSON1000(b *testing.B) {
	s, err := Open(context.Background(), b.TempDir()+"/b.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	s.CreateImage(ctx, &Image{ID: "img1", Name: "img", RootfsPath: "/x"})
	s.CreateKernel(ctx, &Kernel{ID: "k1", Name: "k", VmlinuxPath: "/x"})
	for i := 0; i < 1000; i++ {
		v := &VM{ID: fmt.Sprintf("%016x", i), Name: fmt.Sprintf("vm-%04d", i), ImageID: "img1", KernelID: "k1", VCPUs: 1, MemoryMiB: 256, DiskMiB: 256, State: StateStopped, Driver: "qemu"}
		if err := s.CreateVM(ctx, v); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.ListVMsJSON(ctx, false); err != nil {
			b.Fatal(err)
		}
	}
}
