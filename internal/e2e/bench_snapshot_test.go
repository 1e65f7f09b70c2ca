package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

// TestBenchSnapshot measures, side by side in one run (rounds alternate):
// cold create → exec-ready, create from a snapshot → exec-ready, fork of a
// running VM → exec-ready; then snapshot sizes and VMM memory for a 256 MiB
// and a 1 GiB guest. Run with scripts/bench-snapshot (BANGER_BENCH_SNAPSHOT=1,
// BANGER_BENCH_ROUNDS, default 10).
func TestBenchSnapshot(t *testing.T) {
	if os.Getenv("BANGER_BENCH_SNAPSHOT") == "" {
		t.Skip("a benchmark: set BANGER_BENCH_SNAPSHOT=1 (scripts/bench-snapshot)")
	}
	rounds := benchRounds()
	// BANGER_BENCH_DAEMON_ENV: extra KEY=VALUE words for bangerd, e.g.
	// BANGER_QEMU_MEMORY_FILE=1 to measure guest memory in a tmpfs file.
	h, d, _ := realHomeEnv(t, strings.Fields(os.Getenv("BANGER_BENCH_DAEMON_ENV"))...)
	mustBanger(t, h, "vm", "create", "src", "--memory", "256M", "--disk", "256M")
	mustBanger(t, h, "exec", "src", "--", "true")
	mustBanger(t, h, "snapshot", "create", "src", "base")

	// Every timed operation starts with the host's dirty pages written
	// (sync, untimed): otherwise each row pays for the writeback of the
	// one before it (a cold create writes its disk and the guest's memory
	// file; run after it, a clone measured ~430 ms where alone it takes
	// ~230 ms), and which row pays depends on the order of the rows.
	timed := func(args ...[]string) time.Duration {
		if err := exec.Command("sync").Run(); err != nil {
			t.Fatalf("sync: %v", err)
		}
		s := time.Now()
		for _, a := range args {
			mustBanger(t, h, a...)
		}
		return time.Since(s)
	}
	var cold, restore, fork []time.Duration
	for r := 0; r < rounds; r++ {
		c, rs, f := fmt.Sprintf("cold-%d", r), fmt.Sprintf("restored-%d", r), fmt.Sprintf("fork-%d", r)
		cold = append(cold, timed([]string{"vm", "create", c, "--memory", "256M", "--disk", "256M"}, []string{"exec", c, "--", "true"}))
		restore = append(restore, timed([]string{"vm", "create", rs, "--snapshot", "base"}, []string{"exec", rs, "--", "true"}))
		fork = append(fork, timed([]string{"vm", "fork", "src", f}, []string{"exec", f, "--", "true"}))
		for _, n := range []string{c, rs, f} {
			mustBanger(t, h, "vm", "delete", n, "--force")
		}
	}
	med := func(d []time.Duration) time.Duration {
		s := append([]time.Duration(nil), d...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2]
	}
	t.Logf("BENCH rounds=%d", rounds)
	t.Logf("BENCH cold create to exec-ready:        median %v  (all %v)", med(cold).Round(time.Millisecond), roundAll(cold))
	t.Logf("BENCH create --snapshot to exec-ready:  median %v  (all %v)", med(restore).Round(time.Millisecond), roundAll(restore))
	t.Logf("BENCH vm fork to exec-ready:            median %v  (all %v)", med(fork).Round(time.Millisecond), roundAll(fork))

	// banger run -- true: cold, restored from the spec's base snapshot, and
	// served from the ready pool (which refills between rounds, untimed).
	runArgs := []string{"run", "--rm", "--image", "busybox", "--kernel", "debian", "--memory", "256M", "--disk", "256M"}
	poolSpec := []string{"--image", "busybox", "--kernel", "debian", "--memory", "256M", "--disk", "256M"}
	mustBanger(t, h, append(append([]string{}, runArgs...), "--", "true")...) // saves the base
	mustBanger(t, h, append([]string{"pool", "set", "1"}, poolSpec...)...)
	poolFull := func() {
		testenv.WaitFor(t, 5*time.Minute, "the pool to fill", func() bool {
			var l []struct {
				Ready int `json:"ready"`
			}
			json.Unmarshal([]byte(mustBanger(t, h, "pool", "ls", "-o", "json")), &l)
			return len(l) == 1 && l[0].Ready == 1
		})
	}
	var runCold, runBase, runPool []time.Duration
	for r := 0; r < rounds; r++ {
		poolFull()
		// The pool serves only its spec: --cold and a --name do not change
		// the spec, so the pool is claimed first, then base, then cold.
		runPool = append(runPool, timed(append(append([]string{}, runArgs...), "--", "true")))
		mustBanger(t, h, append([]string{"pool", "set", "0"}, poolSpec...)...)
		runBase = append(runBase, timed(append(append([]string{}, runArgs...), "--", "true")))
		runCold = append(runCold, timed(append(append([]string{}, runArgs...), "--cold", "--", "true")))
		mustBanger(t, h, append([]string{"pool", "set", "1"}, poolSpec...)...)
	}
	t.Logf("BENCH run -- true, cold:                 median %v  (all %v)", med(runCold).Round(time.Millisecond), roundAll(runCold))
	t.Logf("BENCH run -- true, base snapshot:        median %v  (all %v)", med(runBase).Round(time.Millisecond), roundAll(runBase))
	t.Logf("BENCH run -- true, from the ready pool:  median %v  (all %v)", med(runPool).Round(time.Millisecond), roundAll(runPool))
	mustBanger(t, h, append([]string{"pool", "set", "0"}, poolSpec...)...)
	logReidentifySplit(t, d.logs.String())

	// Sizes and memory: a cold VM and one restored from its snapshot.
	for _, mem := range []string{"256M", "1G"} {
		name := "size-" + strings.ToLower(mem)
		mustBanger(t, h, "vm", "create", name, "--memory", mem, "--disk", "256M")
		mustBanger(t, h, "exec", name, "--", "true")
		coldRSS, coldShmem := vmmMem(t, h, name)
		mustBanger(t, h, "snapshot", "create", name, name+"-snap")
		var sn struct {
			ID         string `json:"id"`
			StateBytes int64  `json:"state_bytes"`
			DiskBytes  int64  `json:"disk_bytes"`
		}
		for _, l := range listSnapshots(t, h) {
			if l.Name == name+"-snap" {
				sn.ID, sn.StateBytes, sn.DiskBytes = l.ID, l.StateBytes, l.DiskBytes
			}
		}
		du := dirUse(t, filepath.Join(h, "snapshots", sn.ID))
		mustBanger(t, h, "vm", "create", name+"-r", "--snapshot", name+"-snap")
		mustBanger(t, h, "exec", name+"-r", "--", "true")
		t.Logf("BENCH %s guest: snapshot state %s, disk copy %s, directory %s on disk; VMM RSS cold %s (tmpfs memory file %s), restored %s",
			mem, mbs(sn.StateBytes), mbs(sn.DiskBytes), mbs(du), mbs(coldRSS), mbs(coldShmem), mbs(vmmRSS(t, h, name+"-r")))
		mustBanger(t, h, "vm", "delete", name, "--force")
		mustBanger(t, h, "vm", "delete", name+"-r", "--force")
	}
}

// logReidentifySplit prints the medians of bangerd's "clone reidentified"
// records (every restore of the run: create --snapshot, fork, run from the
// base, pool refills): reaching the restored agent and the reidentify
// request itself.
func logReidentifySplit(t *testing.T, logs string) {
	t.Helper()
	var reach, reid []time.Duration
	for _, l := range strings.Split(logs, "\n") {
		var r struct {
			Msg          string  `json:"msg"`
			ReachMS      float64 `json:"reach_ms"`
			ReidentifyMS float64 `json:"reidentify_ms"`
		}
		if json.Unmarshal([]byte(l), &r) != nil || r.Msg != "clone reidentified" {
			continue
		}
		reach = append(reach, time.Duration(r.ReachMS*float64(time.Millisecond)))
		reid = append(reid, time.Duration(r.ReidentifyMS*float64(time.Millisecond)))
	}
	if len(reach) == 0 {
		t.Logf("BENCH clone reidentified: no records in bangerd's log")
		return
	}
	med := func(d []time.Duration) time.Duration {
		s := append([]time.Duration(nil), d...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2].Round(100 * time.Microsecond)
	}
	t.Logf("BENCH clone reidentified (n=%d): reach median %v, reidentify median %v", len(reach), med(reach), med(reid))
}

func roundAll(d []time.Duration) []string {
	out := make([]string, len(d))
	for i, x := range d {
		out[i] = x.Round(10 * time.Millisecond).String()
	}
	return out
}

func mbs(n int64) string { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }

type snapJSON struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	StateBytes int64  `json:"state_bytes"`
	DiskBytes  int64  `json:"disk_bytes"`
}

func listSnapshots(t *testing.T, h string) []snapJSON {
	t.Helper()
	var l []snapJSON
	if err := json.Unmarshal([]byte(mustBanger(t, h, "snapshot", "ls", "-o", "json")), &l); err != nil {
		t.Fatal(err)
	}
	return l
}

// vmmRSS is the resident memory of a VM's VMM process.
func vmmRSS(t *testing.T, h, name string) int64 {
	t.Helper()
	rss, _ := vmmMem(t, h, name)
	return rss
}

// vmmMem is the resident memory of a VM's VMM process and the part of it
// that is shared memory (RssShmem: a guest memory file on a tmpfs).
func vmmMem(t *testing.T, h, name string) (rss, shmem int64) {
	t.Helper()
	pid := vmmPID(t, h, showVM(t, h, name).ID)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			switch f[0] {
			case "VmRSS:":
				rss = kb << 10
			case "RssShmem:":
				shmem = kb << 10
			}
		}
	}
	return rss, shmem
}

// dirUse is the disk space (allocated blocks) of the files under dir.
func dirUse(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += diskBlocks(fi)
		}
		return nil
	})
	return n
}

// benchRounds is BANGER_BENCH_ROUNDS, the rounds a warm-start benchmark
// runs (default 10).
func benchRounds() int {
	if v, err := strconv.Atoi(os.Getenv("BANGER_BENCH_ROUNDS")); err == nil && v > 0 {
		return v
	}
	return 10
}
