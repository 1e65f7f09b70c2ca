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
	"testing"
	"time"
)

// fileOpsDriver is a main package that times client.ReadFile or WriteFile,
// or the MCP read_file or write_file tool (the tree's mcpserver, in this
// process over in-memory transports, one session for the N calls, as
// `banger mcp` keeps one), against a running VM:
//
//	fileops VM read|write|mcpread|mcpwrite SIZE N
//
// prints N lines, each the wall time of one call in µs, of a SIZE-byte file
// (/root/bench-fileops-SIZE; a read writes it first, untimed). It is built
// against two trees, so the arms differ only in their client (and MCP
// server).
const fileOpsDriver = `package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/mcpserver"
)

func main() {
	vm, op := os.Args[1], os.Args[2]
	size, _ := strconv.Atoi(os.Args[3])
	n, _ := strconv.Atoi(os.Args[4])
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New()
	if err != nil {
		panic(err)
	}
	data := bytes.Repeat([]byte("b"), size)
	p := "/root/bench-fileops-" + os.Args[3]
	if op == "read" || op == "mcpread" {
		if err := c.WriteFile(ctx, vm, p, data, 0o644); err != nil {
			panic(err)
		}
	}
	var cs *mcp.ClientSession
	if strings.HasPrefix(op, "mcp") {
		st, ct := mcp.NewInMemoryTransports()
		if _, err := mcpserver.New(c, mcpserver.Options{Version: "bench"}).Connect(ctx, st, nil); err != nil {
			panic(err)
		}
		if cs, err = mcp.NewClient(&mcp.Implementation{Name: "bench"}, nil).Connect(ctx, ct, nil); err != nil {
			panic(err)
		}
		defer cs.Close()
	}
	tool := func(name string, args map[string]any) {
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
		if err != nil || res.IsError {
			panic(fmt.Sprint(name, err, res))
		}
	}
	for i := 0; i < n; i++ {
		t0 := time.Now()
		switch op {
		case "read":
			b, err := c.ReadFile(ctx, vm, p, int64(size))
			if err != nil || len(b) != size {
				panic(fmt.Sprint(len(b), err))
			}
		case "write":
			if err := c.WriteFile(ctx, vm, p, data, 0o644); err != nil {
				panic(err)
			}
		case "mcpread":
			tool("read_file", map[string]any{"vm": vm, "path": p, "max_bytes": size})
		case "mcpwrite":
			tool("write_file", map[string]any{"vm": vm, "path": p, "content": string(data), "mode": "0644"})
		default:
			panic(op)
		}
		fmt.Println(time.Since(t0).Microseconds())
	}
}
`

// buildFileOpsDriver builds fileOpsDriver against the tree at root (its
// own go.mod), adding the file through an overlay: the tree is not
// written to.
func buildFileOpsDriver(t *testing.T, root, out string) {
	t.Helper()
	src := filepath.Join(t.TempDir(), "main.go")
	if err := os.WriteFile(src, []byte(fileOpsDriver), 0o644); err != nil {
		t.Fatal(err)
	}
	ov, _ := json.Marshal(map[string]map[string]string{"Replace": {filepath.Join(root, "internal", "benchfileops", "main.go"): src}})
	ovPath := filepath.Join(t.TempDir(), "overlay.json")
	os.WriteFile(ovPath, ov, 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-overlay", ovPath, "-o", out, "./internal/benchfileops")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the driver against %s: %v\n%s", root, err, b)
	}
}

// TestBenchFileOps measures client.ReadFile and WriteFile, and the MCP
// read_file and write_file tools, of a 100-byte and a 1 MiB file in one
// real VM, the client of a base tree (A: before, e.g.
// main exported with git archive, BANGER_BENCH_FILEOPS_BASE) against this
// tree's (B), arms alternating (A B A B ...) in one run against the same
// bangerd and VM: BANGER_BENCH_ROUNDS rounds (default 10), each a process
// of BANGER_BENCH_FILEOPS_CALLS calls (default 2) per arm, operation and
// size. Run it under the bench lock:
//
//	git archive --prefix=base/ main | tar -x -C /tmp
//	BANGER_BENCH_FILEOPS_BASE=/tmp/base flock /work/wt/.bench.lock \
//	  go test ./internal/e2e -run TestBenchFileOps -v -timeout 20m
func TestBenchFileOps(t *testing.T) {
	base := os.Getenv("BANGER_BENCH_FILEOPS_BASE")
	if base == "" {
		t.Skip("a benchmark: set BANGER_BENCH_FILEOPS_BASE to the tree to compare with (see the comment)")
	}
	rounds := benchRounds()
	calls := 2
	if v, err := strconv.Atoi(os.Getenv("BANGER_BENCH_FILEOPS_CALLS")); err == nil && v > 0 {
		calls = v
	}
	drivers := t.TempDir()
	os.Chmod(drivers, 0o755)
	arms := []struct{ name, bin string }{{"A", filepath.Join(drivers, "A")}, {"B", filepath.Join(drivers, "B")}}
	buildFileOpsDriver(t, base, arms[0].bin)
	buildFileOpsDriver(t, repoRoot(t), arms[1].bin)

	h, _, _ := realHome(t)
	mustBanger(t, h, "vm", "create", "fo", "--memory", "256M", "--disk", "256M")
	mustBanger(t, h, "exec", "fo", "--", "true")

	run := func(bin, op string, size int) []time.Duration {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, "fo", op, strconv.Itoa(size), strconv.Itoa(calls))
		cmd.Env = append(os.Environ(), "BANGER_HOME="+h)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s %s %d: %v\n%s", bin, op, size, err, out)
		}
		var ds []time.Duration
		for _, f := range strings.Fields(string(out)) {
			us, err := strconv.ParseInt(f, 10, 64)
			if err != nil {
				t.Fatalf("driver output %q", out)
			}
			ds = append(ds, time.Duration(us)*time.Microsecond)
		}
		return ds
	}
	type key struct {
		arm, op string
		size    int
	}
	got := map[key][]time.Duration{}
	loads := []string{loadAvg()}
	sizes := []int{100, 1 << 20}
	ops := []string{"read", "write", "mcpread", "mcpwrite"}
	for r := 0; r < rounds; r++ {
		for _, op := range ops {
			for _, size := range sizes {
				for i := range arms {
					a := arms[(i+r)%2] // who goes first alternates by round
					k := key{a.name, op, size}
					got[k] = append(got[k], run(a.bin, op, size)...)
				}
			}
		}
		loads = append(loads, loadAvg())
	}
	med := func(d []time.Duration) time.Duration {
		s := append([]time.Duration(nil), d...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2]
	}
	t.Logf("BENCH file ops: rounds=%d, %d calls per process; load (1 min) over the run %s", rounds, calls, strings.Join(loads, " "))
	names := map[string]string{"read": "client.ReadFile", "write": "client.WriteFile", "mcpread": "MCP read_file", "mcpwrite": "MCP write_file"}
	for _, op := range ops {
		for _, size := range sizes {
			a, b := got[key{"A", op, size}], got[key{"B", op, size}]
			t.Logf("BENCH %-16s %7d B: A %7v  B %7v  (n=%d each; A all %v; B all %v)", names[op], size,
				med(a).Round(100*time.Microsecond), med(b).Round(100*time.Microsecond), len(a), msAll(a), msAll(b))
		}
	}
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); len(f) > 0 {
		return f[0]
	}
	return "?"
}

func msAll(d []time.Duration) string {
	s := make([]string, len(d))
	for i, x := range d {
		s[i] = fmt.Sprintf("%.0f", float64(x)/float64(time.Millisecond))
	}
	return "[" + strings.Join(s, " ") + "]"
}
