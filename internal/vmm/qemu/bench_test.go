package qemu

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
)

// TestBenchSnapshotMemory measures, side by side in one run (rounds
// alternate), a 256 MiB guest's pause + save and its restore (to running,
// and to an answer over the agent channel) with the guest's memory in a
// tmpfs file (device-state stream + sparse memory file, the clone maps it
// privately) and with anonymous memory (the whole memory in the stream).
// Run with BANGER_BENCH_SNAPSHOT=1 (BANGER_BENCH_ROUNDS, default 10):
//
//	BANGER_BENCH_SNAPSHOT=1 go test -run '^TestBenchSnapshotMemory$' -v ./internal/vmm/qemu
func TestBenchSnapshotMemory(t *testing.T) {
	if os.Getenv("BANGER_BENCH_SNAPSHOT") == "" {
		t.Skip("a benchmark: set BANGER_BENCH_SNAPSHOT=1")
	}
	if !memTmpfs(t) {
		t.Skip("/dev/shm is not a tmpfs with 2 GiB free here")
	}
	rounds := 10
	if v, err := strconv.Atoi(os.Getenv("BANGER_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	type mode struct {
		name                  string
		d                     *Driver
		src                   vmm.Instance
		cfg                   vmm.MachineConfig
		save, running, answer []time.Duration
		bytes                 int64
	}
	modes := []*mode{{name: "memory file", d: testDriver()}, {name: "anonymous+stream", d: fallbackDriver(t)}}
	for _, m := range modes {
		m.src, m.cfg = bootWith(t, m.d, "snapshot", nil)
		if m.src.Handles().Channel.Kind != vmm.ChannelSerial {
			t.Skip("the echo check uses the virtio-serial channel; this host has vhost-vsock")
		}
		waitConsole(t, m.src, "agent port open", bootTimeout)
		waitTick(t, m.src, 2)
	}
	for r := 0; r < rounds; r++ {
		for _, m := range modes {
			src, cfg := m.src, m.cfg
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			snap := src.(vmm.Snapshotter)
			dir := filepath.Join(shortDir(t), "s")
			os.Mkdir(dir, 0o700)
			t0 := time.Now()
			if err := snap.Pause(ctx); err != nil {
				t.Fatal(err)
			}
			saved, err := snap.SaveState(ctx, dir)
			if err != nil {
				t.Fatal(err)
			}
			m.save = append(m.save, time.Since(t0))
			m.bytes = saved.Bytes
			snap.Resume(ctx)
			clone := cfg
			clone.VMID = cfg.VMID + "r" + strconv.Itoa(r)
			clone.Dir = filepath.Join(shortDir(t), "vm")
			t0 = time.Now()
			inst, err := m.d.Restore(ctx, clone, dir)
			if err != nil {
				t.Fatal(err)
			}
			m.running = append(m.running, time.Since(t0))
			echoOverAgent(t, inst, "bench")
			m.answer = append(m.answer, time.Since(t0))
			killInst(t, inst)
			os.RemoveAll(dir)
			cancel()
		}
	}
	med := func(d []time.Duration) time.Duration {
		s := append([]time.Duration(nil), d...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2].Round(time.Millisecond)
	}
	t.Logf("BENCH rounds=%d, 256 MiB test guest (busybox initramfs)", rounds)
	for _, m := range modes {
		t.Logf("BENCH %-17s pause+save median %v, restore to running %v, to an agent echo %v; snapshot %.1f MB",
			m.name+":", med(m.save), med(m.running), med(m.answer), float64(m.bytes)/1e6)
	}
}
