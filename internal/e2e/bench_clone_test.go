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
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

// TestBenchClone takes a clone of an existing snapshot apart: per round
// `vm create --snapshot` and `exec -- true` (CLI wall clock each), bangerd's
// stage records for that create (start stages, the QEMU launch and state
// load, reach and reidentify, RPC durations) and the clone's QEMU threads'
// CPU time to the exec's exit. BANGER_BENCH_CLONE_SHADOW=1 puts a cold
// create + exec before each clone, as scripts/bench-snapshot does. Run with
// scripts/bench-clone (BANGER_BENCH_CLONE=1, BANGER_BENCH_ROUNDS).
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
		mustBanger(t, a.h, "vm", "create", "src", "--memory", "256M", "--disk", "256M")
		mustBanger(t, a.h, "exec", "src", "--", "true")
		if os.Getenv("BANGER_BENCH_CLONE_INFO") != "" {
			t.Logf("guest: %s", mustBanger(t, a.h, "exec", "src", "--", "sh", "-c", "grep . /sys/devices/system/cpu/vulnerabilities/*; cat /proc/cmdline; grep -m1 'model name' /proc/cpuinfo; grep -m1 flags /proc/cpuinfo; cat /sys/devices/system/clocksource/clocksource0/current_clocksource; mount"))
		}
		mustBanger(t, a.h, "snapshot", "create", "src", "base")
	}
	var order []string
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
			s = time.Now()
			mustBanger(t, h, "vm", "create", rs, "--snapshot", "base")
			t1 := time.Now()
			mustBanger(t, h, "exec", rs, "--", "true")
			t2 := time.Now()
			st1 := procStat()
			add("total: create + exec", t2.Sub(s))
			add("cli: create", t1.Sub(s))
			add("cli: exec -- true", t2.Sub(t1))
			for i, n := range []string{"user", "system", "idle", "steal"} {
				j := map[string]int{"user": 0, "system": 2, "idle": 3, "steal": 7}[n]
				_ = i
				add("host cpu (2 cores) "+n, time.Duration((st1[j]-st0[j])*10)*time.Millisecond)
			}
			v := showVM(t, h, rs)
			cpu := threadCPU(vmmPID(t, h, v.ID))
			add("qemu cpu: all threads", time.Duration(cpu["all threads"]))
			add("qemu cpu: busiest thread (vCPU)", time.Duration(cpu["busiest thread (vCPU)"]))
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
					add("rpc: "+rec.Method, ms(rec.Dur))
					st := rec.Time.Add(-ms(rec.Dur))
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
				add("create exit to vm.bulk start", bulkStart.Sub(t1))
			}
			if os.Getenv("BANGER_BENCH_CLONE_CONSOLE") != "" && r == rounds-1 {
				time.Sleep(1500 * time.Millisecond) // latelog's records
				b, _ := os.ReadFile(filepath.Join(h, "vms", v.ID, "console.log"))
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

// threadCPU is the CPU time (ns, schedstat) of each thread of pid, summed
// by thread name.
func threadCPU(pid int) map[string]int64 {
	out := map[string]int64{}
	var busiest int64
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	for _, tk := range tasks {
		comm, err1 := os.ReadFile(filepath.Join(tk, "comm"))
		ss, err2 := os.ReadFile(filepath.Join(tk, "schedstat"))
		if err1 != nil || err2 != nil {
			continue
		}
		f := strings.Fields(string(ss))
		if len(f) == 0 {
			continue
		}
		ns, _ := strconv.ParseInt(f[0], 10, 64)
		name := strings.TrimSpace(string(comm))
		if !strings.HasPrefix(name, "CPU") {
			name = "other threads"
		}
		out[name] += ns
		out["all threads"] += ns
		if ns > busiest {
			busiest = ns
		}
	}
	// without debug-threads every thread is named qemu-system-x86: the
	// busiest is the vCPU under TCG
	out["busiest thread (vCPU)"] = busiest
	return out
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
