package bench

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/testenv"
)

var (
	flagQuick = flag.Bool("quick", false, "CI smoke run: fewer repetitions, smaller payloads (under 3 minutes)")
	flagJSON  = flag.String("json", "", "write the results as JSON to this file")
	flagMD    = flag.String("md", "", "write the table as markdown to this file")
	flagDoc   = flag.String("doc", "", "replace the table between the bench markers of this markdown file (docs/BENCHMARKS.md)")
	flagBoots = flag.Int("boots", 0, "boots per create figure (default 2 quick, 5 full)")
	flagOnly  = flag.String("only", "", "comma-separated groups to run (disk,rpc,create,guest,workspace,image,concurrent; workspace, bulk and exec: those rows of guest alone)")
)

// Result is one row of the table.
type Result struct {
	Group    string  `json:"group"`
	Metric   string  `json:"metric"`
	Unit     string  `json:"unit"`
	Banger   float64 `json:"banger"`
	Baseline float64 `json:"baseline"` // NaN-free: 0 when there is none
	Base     string  `json:"baseline_what,omitempty"`
	// Ratio is banger/baseline (0 without a baseline).
	Ratio  float64 `json:"ratio"`
	Target string  `json:"target,omitempty"`
	// Pass is "yes", "no" or "" (no target).
	Pass    string    `json:"pass,omitempty"`
	N       int       `json:"n"`
	Samples []float64 `json:"banger_samples,omitempty"`
	BaseSmp []float64 `json:"baseline_samples,omitempty"`
	Note    string    `json:"note,omitempty"`
	Error   string    `json:"error,omitempty"`
}

// Report is the JSON file.
type Report struct {
	Started  time.Time `json:"started"`
	Seconds  float64   `json:"seconds"`
	Quick    bool      `json:"quick"`
	Command  string    `json:"command"`
	Host     string    `json:"host"`
	CPUs     int       `json:"cpus"`
	LoadAvg  []string  `json:"loadavg_start_end"`
	OtherVMM int       `json:"other_qemu_processes_at_start"`
	Results  []Result  `json:"results"`
}

type bench struct {
	t      *testing.T
	quick  bool
	home   string
	banger string // CLI binary
	cl     *client.Client
	pid    int // bangerd
	rep    Report
	tmp    string
	raw    *rawSpec // the captured QEMU command line
}

// runs is how many times a fast figure is measured.
func (b *bench) runs() int {
	if b.quick {
		return 5
	}
	return 30
}

// boots is how many times a boot is measured.
func (b *bench) boots() int {
	if *flagBoots > 0 {
		return *flagBoots
	}
	if b.quick {
		return 2
	}
	return 5
}

func (b *bench) want(group string) bool {
	if *flagOnly == "" {
		return group != "bulk" // a part of guest, run alone only when named
	}
	for _, g := range strings.Split(*flagOnly, ",") {
		if g == group {
			return true
		}
	}
	return false
}

func TestBench(t *testing.T) {
	if os.Getenv("BANGER_BENCH") == "" {
		t.Skip("the benchmark suite runs from scripts/bench (BANGER_BENCH=1)")
	}
	testenv.RequireQEMU(t)
	b := &bench{t: t, quick: *flagQuick, tmp: shortTemp(t)}
	host, _ := os.Hostname()
	b.rep = Report{Started: time.Now().UTC(), Quick: b.quick, Host: host, CPUs: runtime.NumCPU(),
		LoadAvg: []string{loadavg()}, OtherVMM: countQEMU(), Command: "scripts/bench" + map[bool]string{true: " --quick"}[b.quick]}
	defer b.finish()

	b.banger = testenv.Command(t, "banger")
	deb := testenv.KernelPackage(t)
	rootfs := testenv.BusyboxRootfs(t, 64)
	bd := testenv.StartBangerd(t, "BANGER_VMM=qemu")
	b.home = bd.Home
	var err error
	if b.cl, err = client.New(client.WithHome(b.home)); err != nil {
		t.Fatal(err)
	}
	b.pid = bangerdPID(t, b.home)
	if b.pid > 0 && b.want("rpc") {
		time.Sleep(time.Second) // let it settle after start
		if rss, err := rssMiB(b.pid); err == nil {
			b.add(Result{Group: "rpc", Metric: "bangerd RSS idle", Unit: "MiB", Banger: rss, Target: "<30", Pass: passIf(rss < 30), N: 1,
				Note: "fresh start, empty home"})
		}
	}
	if _, err := b.cli(5*time.Minute, nil, "kernel", "import", "--deb", deb, "--name", "debian"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.cli(5*time.Minute, nil, "image", "import", rootfs, "--name", "busybox"); err != nil {
		t.Fatal(err)
	}

	type group struct {
		name string
		fn   func()
	}
	for _, g := range []group{
		{"disk", b.benchDisks},
		{"rpc", b.benchRPC},
		{"create", b.benchCreate},
		{"guest", b.benchGuest},
		{"image", b.benchImage},
		{"concurrent", b.benchConcurrent},
	} {
		if !b.want(g.name) && !(g.name == "guest" && (b.want("workspace") || b.want("bulk") || b.want("exec"))) {
			continue
		}
		start := time.Now()
		func() {
			defer func() {
				if r := recover(); r != nil {
					b.add(Result{Group: g.name, Metric: g.name, Error: fmt.Sprint(r)})
				}
			}()
			g.fn()
		}()
		t.Logf("group %s: %v", g.name, time.Since(start).Round(time.Millisecond))
	}
}

func (b *bench) add(r Result) {
	if r.Baseline != 0 {
		r.Ratio = r.Banger / r.Baseline
	}
	if r.Error != "" {
		b.t.Logf("%s: %s: %s", r.Group, r.Metric, r.Error)
	}
	b.rep.Results = append(b.rep.Results, r)
}

// fail records a figure that could not be measured (the run goes on).
func (b *bench) fail(group, metric string, err error) {
	b.add(Result{Group: group, Metric: metric, Error: err.Error()})
}

func (b *bench) finish() {
	b.rep.LoadAvg = append(b.rep.LoadAvg, loadavg())
	b.rep.Seconds = time.Since(b.rep.Started).Seconds()
	table := b.table(false)
	fmt.Fprintln(os.Stdout)
	fmt.Fprint(os.Stdout, table)
	if *flagJSON != "" {
		buf, err := json.MarshalIndent(b.rep, "", "  ")
		if err == nil {
			err = os.WriteFile(*flagJSON, append(buf, '\n'), 0o644)
		}
		if err != nil {
			b.t.Errorf("write %s: %v", *flagJSON, err)
		}
	}
	if *flagMD != "" {
		if err := os.WriteFile(*flagMD, []byte(b.table(true)), 0o644); err != nil {
			b.t.Errorf("write %s: %v", *flagMD, err)
		}
	}
	if *flagDoc != "" {
		if err := replaceBetween(*flagDoc, b.table(true)); err != nil {
			b.t.Errorf("update %s: %v", *flagDoc, err)
		}
	}
}

const (
	docBegin = "<!-- scripts/bench table: begin -->"
	docEnd   = "<!-- scripts/bench table: end -->"
)

// replaceBetween puts table between the markers of the file at p.
func replaceBetween(p, table string) error {
	b, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	s := string(b)
	i, j := strings.Index(s, docBegin), strings.Index(s, docEnd)
	if i < 0 || j < i {
		return fmt.Errorf("no %q … %q markers", docBegin, docEnd)
	}
	s = s[:i+len(docBegin)] + "\n" + table + s[j:]
	return os.WriteFile(p, []byte(s), 0o644)
}

func num(v float64) string {
	switch {
	case v == 0:
		return "-"
	case math.Abs(v) >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case math.Abs(v) >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case math.Abs(v) >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}

// table renders the results (markdown when md).
func (b *bench) table(md bool) string {
	var sb strings.Builder
	if md {
		fmt.Fprintf(&sb, "`%s` on %s: %d CPUs, load average %s at the start and %s at the end, %d other QEMU processes running at the start; %.0f s.\n\n",
			b.rep.Command, b.rep.Started.Format("2006-01-02 15:04 UTC"), b.rep.CPUs, first(b.rep.LoadAvg), last(b.rep.LoadAvg), b.rep.OtherVMM, b.rep.Seconds)
	}
	head := []string{"metric", "unit", "banger", "baseline", "ratio", "target", "pass", "n", "baseline is / note"}
	var w io.Writer = &sb
	var tw *tabwriter.Writer
	row := func(cells []string) {
		if md {
			fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
		} else {
			fmt.Fprintln(tw, strings.Join(cells, "\t"))
		}
	}
	if !md {
		tw = tabwriter.NewWriter(&sb, 2, 4, 2, ' ', 0)
		w = tw
	}
	row(head)
	if md {
		fmt.Fprintf(w, "|%s\n", strings.Repeat("---|", len(head)))
	}
	for _, r := range b.rep.Results {
		note := r.Base
		if r.Note != "" {
			note = strings.TrimPrefix(note+"; "+r.Note, "; ")
		}
		if r.Error != "" {
			note = "ERROR: " + r.Error
		}
		note = strings.Join(strings.Fields(note), " ")
		if len(note) > 300 {
			note = note[:300] + "… (see the JSON)"
		}
		if md {
			note = strings.ReplaceAll(note, "|", `\|`)
		}
		ratio := "-"
		if r.Ratio != 0 {
			ratio = strconv.FormatFloat(r.Ratio, 'f', 2, 64) + "×"
		}
		row([]string{r.Metric, r.Unit, num(r.Banger), num(r.Baseline), ratio, r.Target, r.Pass, strconv.Itoa(r.N), note})
	}
	if tw != nil {
		tw.Flush()
	}
	return sb.String()
}

// --- helpers ---

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func passIf(ok bool) string {
	if ok {
		return "yes"
	}
	return "no"
}

// timeN runs fn n times and returns the durations in ms; it stops at the
// first error.
func timeN(n int, fn func() error) ([]float64, error) {
	var out []float64
	for i := 0; i < n; i++ {
		start := time.Now()
		if err := fn(); err != nil {
			return out, err
		}
		out = append(out, ms(time.Since(start)))
	}
	return out, nil
}

// timeNPrep is timeN with prep run before each sample, untimed.
func timeNPrep(n int, prep, fn func() error) ([]float64, error) {
	var out []float64
	for i := 0; i < n; i++ {
		if err := prep(); err != nil {
			return out, err
		}
		start := time.Now()
		if err := fn(); err != nil {
			return out, err
		}
		out = append(out, ms(time.Since(start)))
	}
	return out, nil
}

// hostSync writes the host's dirty pages out. A transfer into a guest
// leaves its bytes dirty in the host's page cache (QEMU writes the guest's
// disk through it), and on these machines a guest's writes slow down as
// that grows: a 100 MiB cp in took 206-211 ms after a sync and 470-614 ms
// with 0.2-0.7 GB of earlier transfers still dirty. Each timed transfer
// starts after one (untimed), so that no row pays for the rows before it
// (bench-snapshot does the same).
func hostSync() error {
	unix.Sync()
	return nil
}

// timeBoth runs a and b in turn n times each (so that both see the same
// load) and returns their durations in ms; it stops at the first error.
func timeBoth(n int, a, b func() error) ([]float64, []float64, error) {
	var as, bs []float64
	for i := 0; i < n; i++ {
		for _, f := range []struct {
			fn  func() error
			out *[]float64
		}{{a, &as}, {b, &bs}} {
			start := time.Now()
			if err := f.fn(); err != nil {
				return as, bs, err
			}
			*f.out = append(*f.out, ms(time.Since(start)))
		}
	}
	return as, bs, nil
}

// cli runs banger with the bench's home; stdin may be nil.
func (b *bench) cli(timeout time.Duration, stdin io.Reader, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, b.banger, args...)
	cmd.Env = append(os.Environ(), "BANGER_HOME="+b.home)
	cmd.Stdin = stdin
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("banger %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// sh runs a shell pipeline with the bench's home in the environment and
// $BANGER as the CLI.
func (b *bench) sh(timeout time.Duration, script string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", script)
	cmd.Env = append(os.Environ(), "BANGER_HOME="+b.home, "BANGER="+b.banger)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %v: %s", script, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func shortTemp(t *testing.T) string {
	d, err := os.MkdirTemp("", "bb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// countQEMU counts qemu-system processes on the machine (other users' VMs
// load the machine too).
func countQEMU() int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		c, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		s := strings.TrimSpace(string(c))
		if strings.HasPrefix(s, "qemu-system") || strings.HasPrefix(s, "banger-") {
			n++
		}
	}
	return n
}

func bangerdPID(t *testing.T, home string) int {
	for _, p := range []string{filepath.Join(home, "run", "bangerd.lock"), filepath.Join(home, "bangerd.lock")} {
		if b, err := os.ReadFile(p); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				return pid
			}
		}
	}
	t.Logf("bangerd's pid not found under %s: RSS not measured", home)
	return 0
}

// rssMiB is the resident set of pid in MiB.
func rssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			kb, err := strconv.ParseFloat(f[1], 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

func first(s []string) string {
	if len(s) == 0 {
		return "?"
	}
	return s[0]
}

func last(s []string) string {
	if len(s) == 0 {
		return "?"
	}
	return s[len(s)-1]
}
