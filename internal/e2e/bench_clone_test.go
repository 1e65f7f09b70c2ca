package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

// TestBenchClone takes a clone of an existing snapshot apart: per round
// `vm create --snapshot` and two `exec -- true` (CLI wall clock each),
// bangerd's stage records for that create (start stages, the QEMU launch
// and state load, reach and reidentify, RPC durations), the clone's QEMU
// threads' CPU time to the first exec's exit, and, where each CLI returned,
// the vCPU thread's CPU time and the TBs TCG has translated (`info jit` over
// the clone's QMP socket, read between the CLIs): TBs by the create, by the
// first exec and by the second, and µs of vCPU per TB.
// BANGER_BENCH_CLONE_SHADOW=1 puts a cold create + exec before each clone,
// as scripts/bench-snapshot does. Run with scripts/bench-clone
// (BANGER_BENCH_CLONE=1, BANGER_BENCH_ROUNDS).
func TestBenchClone(t *testing.T) {
	if os.Getenv("BANGER_BENCH_CLONE") == "" {
		t.Skip("a benchmark: set BANGER_BENCH_CLONE=1 (scripts/bench-clone)")
	}
	rounds := benchRounds()
	shadow := os.Getenv("BANGER_BENCH_CLONE_SHADOW") != ""
	type arm struct {
		name string
		h    string
		d    *daemonProc
		rows map[string][]time.Duration
		vals map[string][]float64 // counts and ratios (the jit rows)
	}
	var arms []*arm
	// BANGER_BENCH_CLONE_A=DIR: an interleaved A/B, arm A's bangerd and
	// agent from DIR (another build), arm B this checkout's (or
	// BANGER_BENCH_CLONE_B's); rounds alternate, which arm goes first too.
	if dir := os.Getenv("BANGER_BENCH_CLONE_A"); dir != "" {
		h, d := realHomeBin(t, filepath.Join(dir, "bangerd"), append([]string{"BANGER_AGENT=" + filepath.Join(dir, "banger-agent")},
			strings.Fields(os.Getenv("BANGER_BENCH_CLONE_A_ENV"))...)...)
		arms = append(arms, &arm{name: "A", h: h, d: d})
	}
	if dir := os.Getenv("BANGER_BENCH_CLONE_B"); dir != "" {
		h, d := realHomeBin(t, filepath.Join(dir, "bangerd"), append([]string{"BANGER_AGENT=" + filepath.Join(dir, "banger-agent")},
			strings.Fields(os.Getenv("BANGER_BENCH_CLONE_B_ENV"))...)...)
		arms = append(arms, &arm{name: "B", h: h, d: d})
	} else {
		h, d, _ := realHomeEnv(t, strings.Fields(os.Getenv("BANGER_BENCH_DAEMON_ENV"))...)
		arms = append(arms, &arm{name: "B", h: h, d: d})
	}
	for _, a := range arms {
		a.rows = map[string][]time.Duration{}
		a.vals = map[string][]float64{}
		mustBanger(t, a.h, "vm", "create", "src", "--memory", "256M", "--disk", "256M")
		mustBanger(t, a.h, "exec", "src", "--", "true")
		if os.Getenv("BANGER_BENCH_CLONE_INFO") != "" {
			t.Logf("guest: %s", mustBanger(t, a.h, "exec", "src", "--", "sh", "-c", "grep . /sys/devices/system/cpu/vulnerabilities/*; cat /proc/cmdline; grep -m1 'model name' /proc/cpuinfo; grep -m1 flags /proc/cpuinfo; cat /sys/devices/system/clocksource/clocksource0/current_clocksource; mount"))
		}
		mustBanger(t, a.h, "snapshot", "create", "src", "base")
	}
	var order, valOrder []string
	seen := map[string]bool{}
	ms := func(f float64) time.Duration { return time.Duration(f * float64(time.Millisecond)) }
	for r := 0; r < rounds; r++ {
		for i := range arms {
			// alternate which arm goes first
			a := arms[(i+r)%len(arms)]
			h, d := a.h, a.d
			add := func(k string, v time.Duration) {
				if !seen[k] {
					seen[k] = true
					order = append(order, k)
				}
				a.rows[k] = append(a.rows[k], v)
			}
			count := func(k string, v float64) {
				if !seen[k] {
					seen[k] = true
					valOrder = append(valOrder, k)
				}
				a.vals[k] = append(a.vals[k], v)
			}
			c, rs := fmt.Sprintf("cold-%d", r), fmt.Sprintf("clone-%d", r)
			if shadow {
				mustBanger(t, h, "vm", "create", c, "--memory", "256M", "--disk", "256M")
				mustBanger(t, h, "exec", c, "--", "true")
				if os.Getenv("BANGER_BENCH_CLONE_SHADOW") == "delete" {
					mustBanger(t, h, "vm", "delete", c, "--force")
					c = ""
				}
			}
			if err := exec.Command("sync").Run(); err != nil {
				t.Fatalf("sync: %v", err)
			}
			s := time.Now()
			mustBanger(t, h, "version")
			add("cli: banger version", time.Since(s))
			st0 := procStat()
			off := len(d.logs.String())
			before := vmDirs(h)
			s = time.Now()
			mustBanger(t, h, "vm", "create", rs, "--snapshot", "base")
			t1 := time.Now()
			// the clone's QEMU where each CLI returned: its vCPU time and
			// the TBs TCG has translated (`info jit`, read between the
			// CLIs, outside their timings)
			id := newVMDir(before, vmDirs(h))
			if id == "" {
				id = showVM(t, h, rs).ID
			}
			pid, sock := vmmPID(t, h, id), vmQMPSocket(h, id)
			var cpus []map[string]int64 // by thread id
			var jits []jitStats
			var jitErr error
			var queries []time.Duration
			probe := func() {
				cpus = append(cpus, taskCPU(pid))
				if jitErr != nil {
					return
				}
				q := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				js, err := readJIT(ctx, sock)
				cancel()
				if err != nil {
					jitErr = err
					return
				}
				jits = append(jits, js)
				queries = append(queries, time.Since(q))
			}
			probe()
			t1b := time.Now()
			mustBanger(t, h, "exec", rs, "--", "true")
			t2 := time.Now()
			st1 := procStat()
			probe()
			t2b := time.Now()
			mustBanger(t, h, "exec", rs, "--", "true")
			t3 := time.Now()
			probe()
			add("total: create + exec", t1.Sub(s)+t2.Sub(t1b))
			add("cli: create", t1.Sub(s))
			add("cli: exec -- true", t2.Sub(t1b))
			add("cli: exec -- true, second", t3.Sub(t2b))
			for i, n := range []string{"user", "system", "idle", "steal"} {
				j := map[string]int{"user": 0, "system": 2, "idle": 3, "steal": 7}[n]
				_ = i
				add("host cpu (2 cores) "+n, time.Duration((st1[j]-st0[j])*10)*time.Millisecond)
			}
			// cumulative to the first exec's exit, as before the second
			// exec; the vCPU is the thread busiest at the last reading
			var vcpu string
			for tid, ns := range cpus[2] {
				if vcpu == "" || ns > cpus[2][vcpu] {
					vcpu = tid
				}
			}
			all := int64(0)
			for _, ns := range cpus[1] {
				all += ns
			}
			add("qemu cpu: all threads", time.Duration(all))
			add("qemu cpu: busiest thread (vCPU)", time.Duration(cpus[1][vcpu]))
			add("qemu vCPU: create (start to exit)", time.Duration(cpus[0][vcpu]))
			add("qemu vCPU: first exec", time.Duration(cpus[1][vcpu]-cpus[0][vcpu]))
			add("qemu vCPU: second exec", time.Duration(cpus[2][vcpu]-cpus[1][vcpu]))
			for _, q := range queries {
				add("jit: `info jit` query (between CLIs)", q)
			}
			if jitErr != nil {
				t.Logf("BENCH jit: arm %s round %d: no TB counts: %v", a.name, r, jitErr)
			} else {
				count("jit: TBs translated by create", float64(jits[0].TBs))
				if jits[0].TBs > 0 {
					count("jit: µs vCPU per TB, create", float64(cpus[0][vcpu])/1e3/float64(jits[0].TBs))
				}
				for k, n := range []string{"first", "second"} {
					tbs, ok := jitDelta(jits[k], jits[k+1])
					if !ok {
						t.Logf("BENCH jit: arm %s round %d: TB count of the %s exec not comparable (code buffer flushed: %+v → %+v)", a.name, r, n, jits[k], jits[k+1])
						continue
					}
					count("jit: TBs translated by "+n+" exec", float64(tbs))
					if n == "first" && tbs > 0 {
						count("jit: µs vCPU per TB, first exec", float64(cpus[1][vcpu]-cpus[0][vcpu])/1e3/float64(tbs))
					}
				}
			}
			logs := d.logs.String()[off:]
			var firstRPC, bulkStart time.Time
			for _, l := range strings.Split(logs, "\n") {
				var rec struct {
					Time   time.Time `json:"time"`
					Msg    string    `json:"msg"`
					VM     string    `json:"vm"`
					Stage  string    `json:"stage"`
					Method string    `json:"method"`
					Dur    float64   `json:"duration_ms"`
					Launch float64   `json:"launch_ms"`
					Load   float64   `json:"load_ms"`
					Reach  float64   `json:"reach_ms"`
					Reid   float64   `json:"reidentify_ms"`
				}
				if json.Unmarshal([]byte(l), &rec) != nil {
					continue
				}
				switch {
				case rec.Msg == "start stage" && rec.VM == rs:
					add("stage: "+rec.Stage, ms(rec.Dur))
				case rec.Msg == "qemu restored from a saved state":
					add("restore: qemu launch", ms(rec.Launch))
					add("restore: state load + cont", ms(rec.Load))
				case rec.Msg == "clone reidentified" && rec.VM == rs:
					add("reidentify: reach", ms(rec.Reach))
					add("reidentify: request", ms(rec.Reid))
				case rec.Method != "" && rec.Dur > 0:
					st := rec.Time.Add(-ms(rec.Dur))
					if !st.Before(t2b) {
						continue // the second exec's
					}
					add("rpc: "+rec.Method, ms(rec.Dur))
					if firstRPC.IsZero() {
						firstRPC = st
					}
					if rec.Method == "vm.bulk" {
						bulkStart = st
					}
				}
			}
			if !firstRPC.IsZero() {
				add("cli start to first rpc start", firstRPC.Sub(s))
			}
			if !bulkStart.IsZero() {
				add("create exit to vm.bulk start", bulkStart.Sub(t1b))
			}
			if os.Getenv("BANGER_BENCH_CLONE_CONSOLE") != "" && r == rounds-1 {
				time.Sleep(1500 * time.Millisecond) // latelog's records
				b, _ := os.ReadFile(filepath.Join(h, "vms", id, "console.log"))
				lines := strings.Split(string(b), "\n")
				t.Logf("arm %s clone console tail:\n%s", a.name, strings.Join(lines[max(0, len(lines)-40):], "\n"))
			}
			for _, n := range []string{c, rs} {
				if (shadow && n != "") || n == rs {
					mustBanger(t, h, "vm", "delete", n, "--force")
				}
			}
		}
	}
	t.Logf("BENCH clone rounds=%d shadow=%v arms=%d (medians, ms; min–max)", rounds, shadow, len(arms))
	med := func(d []time.Duration) string {
		if len(d) == 0 {
			return "-"
		}
		s := append([]time.Duration(nil), d...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return fmt.Sprintf("%6.1f (%.0f–%.0f)", float64(s[len(s)/2].Microseconds())/1000,
			float64(s[0].Microseconds())/1000, float64(s[len(s)-1].Microseconds())/1000)
	}
	if len(arms) == 2 {
		for _, k := range order {
			a, b := arms[0].rows[k], arms[1].rows[k]
			if len(a) != len(b) || len(a) == 0 {
				continue
			}
			d := make([]time.Duration, len(a))
			for i := range a {
				d[i] = b[i] - a[i]
			}
			t.Logf("BENCH paired B−A %-36s n=%-3d median %s", k, len(d), med(d))
		}
	}
	for _, k := range order {
		line := fmt.Sprintf("BENCH %-36s", k)
		for _, a := range arms {
			line += fmt.Sprintf("  %s n=%-3d %-22s", a.name, len(a.rows[k]), med(a.rows[k]))
		}
		t.Log(line)
	}
	// counts (TBs) and µs of vCPU per TB: medians, min–max
	medv := func(k string, v []float64) string {
		if len(v) == 0 {
			return "-"
		}
		s := append([]float64(nil), v...)
		sort.Float64s(s)
		f := "%6.0f (%.0f–%.0f)"
		if strings.Contains(k, "µs") {
			f = "%6.2f (%.2f–%.2f)"
		}
		return fmt.Sprintf(f, s[len(s)/2], s[0], s[len(s)-1])
	}
	if len(arms) == 2 {
		for _, k := range valOrder {
			a, b := arms[0].vals[k], arms[1].vals[k]
			if len(a) != len(b) || len(a) == 0 {
				continue
			}
			d := make([]float64, len(a))
			for i := range a {
				d[i] = b[i] - a[i]
			}
			t.Logf("BENCH paired B−A %-36s n=%-3d median %s", k, len(d), medv(k, d))
		}
	}
	for _, k := range valOrder {
		line := fmt.Sprintf("BENCH %-36s", k)
		for _, a := range arms {
			line += fmt.Sprintf("  %s n=%-3d %-22s", a.name, len(a.vals[k]), medv(k, a.vals[k]))
		}
		t.Log(line)
	}
}

// realHomeBin is realHomeEnv with bangerd from another build (path).
func realHomeBin(t *testing.T, bangerd string, env ...string) (string, *daemonProc) {
	t.Helper()
	testenv.RequireQEMU(t)
	deb := testenv.KernelPackage(t)
	rootfs := testenv.BusyboxRootfs(t, 64)
	h := home(t)
	deb, rootfs = copyIntoHome(t, h, deb), copyIntoHome(t, h, rootfs)
	env = append([]string{"BANGER_VMM=qemu"}, env...)
	var d *daemonProc
	if uid := daemonUID(); uid == 0 {
		d = startDaemonWith(t, h, func(cmd *exec.Cmd) { cmd.Path, cmd.Args[0] = bangerd, bangerd }, env...)
	} else {
		os.Chmod(filepath.Dir(bangerd), 0o755)
		chownTree(t, h, int(uid))
		os.Chmod(h, 0o700)
		d = startDaemonWith(t, h, func(cmd *exec.Cmd) {
			cmd.Path, cmd.Args[0] = bangerd, bangerd
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		}, append([]string{"HOME=" + h}, env...)...)
	}
	mustBanger(t, h, "kernel", "import", "--deb", deb, "--name", "debian")
	mustBanger(t, h, "image", "import", rootfs, "--name", "busybox")
	os.Remove(deb)
	os.Remove(rootfs)
	return h, d
}

// taskCPU is the CPU time (ns, schedstat) of each thread of pid, by
// thread id. Without QEMU's debug-threads every thread is named
// qemu-system-x86: under TCG the vCPU is the busiest.
func taskCPU(pid int) map[string]int64 {
	out := map[string]int64{}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	for _, tk := range tasks {
		ss, err := os.ReadFile(filepath.Join(tk, "schedstat"))
		if err != nil {
			continue
		}
		f := strings.Fields(string(ss))
		if len(f) == 0 {
			continue
		}
		if ns, err := strconv.ParseInt(f[0], 10, 64); err == nil {
			out[filepath.Base(tk)] = ns
		}
	}
	return out
}

// vmDirs is the set of VM directories under home h.
func vmDirs(h string) map[string]bool {
	out := map[string]bool{}
	es, _ := os.ReadDir(filepath.Join(h, "vms"))
	for _, e := range es {
		if e.IsDir() {
			out[e.Name()] = true
		}
	}
	return out
}

// newVMDir is the one directory in after that is not in before, or "".
func newVMDir(before, after map[string]bool) string {
	id := ""
	for n := range after {
		if !before[n] {
			if id != "" {
				return ""
			}
			id = n
		}
	}
	return id
}

// procStat is the machine's cpu line of /proc/stat (ticks of 10 ms).
func procStat() []int64 {
	b, _ := os.ReadFile("/proc/stat")
	f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
	out := make([]int64, 10)
	for i := 1; i < len(f) && i <= 10; i++ {
		out[i-1], _ = strconv.ParseInt(f[i], 10, 64)
	}
	return out
}

// TestBenchRunBaseReach: `run --rm -- true` from the spec's base snapshot,
// with bangerd's reach and reidentify per run (BANGER_BENCH_CLONE=1).
func TestBenchRunBaseReach(t *testing.T) {
	if os.Getenv("BANGER_BENCH_CLONE") == "" {
		t.Skip("a benchmark: set BANGER_BENCH_CLONE=1")
	}
	var h string
	var d *daemonProc
	if dir := os.Getenv("BANGER_BENCH_CLONE_B"); dir != "" {
		h, d = realHomeBin(t, filepath.Join(dir, "bangerd"), "BANGER_AGENT="+filepath.Join(dir, "banger-agent"))
	} else {
		h, d, _ = realHomeEnv(t)
	}
	runArgs := []string{"run", "--rm", "--image", "busybox", "--kernel", "debian", "--memory", "256M", "--disk", "256M", "--", "true"}
	exec.Command("sync").Run()
	s0 := time.Now()
	mustBanger(t, h, runArgs...) // boots cold, saves the base
	t.Logf("BENCH first run (cold, saves the base): %v", time.Since(s0).Round(time.Millisecond))
	if os.Getenv("BANGER_BENCH_CLONE_CONSOLE") != "" {
		for _, sn := range listSnapshots(t, h) {
			mustBanger(t, h, "vm", "create", "x", "--snapshot", sn.Name)
			mustBanger(t, h, "exec", "x", "--", "true")
			time.Sleep(1500 * time.Millisecond)
			b, _ := os.ReadFile(filepath.Join(h, "vms", showVM(t, h, "x").ID, "console.log"))
			t.Logf("console of a clone of %s:\n%s", sn.Name, b)
			mustBanger(t, h, "vm", "delete", "x", "--force")
		}
	}
	for r := 0; r < 6; r++ {
		exec.Command("sync").Run()
		off := len(d.logs.String())
		s := time.Now()
		mustBanger(t, h, runArgs...)
		took := time.Since(s)
		for _, l := range strings.Split(d.logs.String()[off:], "\n") {
			var rec struct {
				Msg   string  `json:"msg"`
				Reach float64 `json:"reach_ms"`
				Reid  float64 `json:"reidentify_ms"`
			}
			if json.Unmarshal([]byte(l), &rec) == nil && rec.Msg == "clone reidentified" {
				t.Logf("BENCH run from base: %v, reach %.1f ms, reidentify %.1f ms", took.Round(time.Millisecond), rec.Reach, rec.Reid)
			}
		}
	}
}
