package e2e

import (
	"bufio"
	"bytes"
	"cmp"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestBenchTBProfile shows where a clone's time goes under TCG: a restored
// QEMU starts with no translated code, so every guest code path a clone
// runs is translated first (bench-clone counts the translation blocks,
// `info jit`; this says which code they are). The clones' QEMUs are started
// through a wrapper that adds `-d in_asm` (QEMU logs each block it
// translates, with its guest address), the agent is built with its symbol
// table, and each block is attributed to a kernel function (the clone's
// /proc/kallsyms) or an agent function, per phase: the create (restore,
// reidentify), the first `exec -- true`, the second. Run with
// scripts/tb-profile (BANGER_BENCH_TBPROFILE=1); BANGER_BENCH_TBPROFILE_TOP
// sets how many functions a phase lists (default 15).
func TestBenchTBProfile(t *testing.T) {
	if os.Getenv("BANGER_BENCH_TBPROFILE") == "" {
		t.Skip("a benchmark: set BANGER_BENCH_TBPROFILE=1 (scripts/tb-profile)")
	}
	top := 15
	if n, err := strconv.Atoi(os.Getenv("BANGER_BENCH_TBPROFILE_TOP")); err == nil && n > 0 {
		top = n
	}
	real, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skipf("no QEMU: %v", err)
	}
	work, err := os.MkdirTemp("", "tbprof-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	logs := filepath.Join(work, "logs")
	for _, d := range []string{filepath.Join(work, "bin"), logs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// bangerd may run as nobody: it must reach the wrapper and the agent,
	// and QEMU must write its log.
	for _, p := range []string{work, filepath.Join(work, "bin")} {
		os.Chmod(p, 0o755)
	}
	os.Chmod(logs, 0o777)
	if err := goBuild(t, work, []string{"CGO_ENABLED=0"}, "-trimpath", "./cmd/banger-agent"); err != nil {
		t.Fatalf("build the agent with its symbols: %v", err)
	}
	// The two paths go into a shell script, single-quoted.
	for _, p := range []string{real, logs} {
		if strings.ContainsRune(p, '\'') {
			t.Fatalf("cannot quote %q for the QEMU wrapper", p)
		}
	}
	wrapper := fmt.Sprintf("#!/bin/sh\n# restored QEMUs log each translation block\ncase \" $* \" in\n*\" -incoming \"*) exec '%s' \"$@\" -d in_asm -D '%s'/q.$$.log ;;\nesac\nexec '%s' \"$@\"\n", real, logs, real)
	if err := os.WriteFile(filepath.Join(work, "bin", "qemu-system-x86_64"), []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	h, _, _ := realHomeEnv(t, "PATH="+filepath.Join(work, "bin")+":"+os.Getenv("PATH"), "BANGER_AGENT="+filepath.Join(work, "banger-agent"))
	mustBanger(t, h, "vm", "create", "src", "--memory", "256M", "--disk", "256M")
	mustBanger(t, h, "exec", "src", "--", "true")
	mustBanger(t, h, "snapshot", "create", "src", "base")

	logSize := func() (string, int64) {
		fs, _ := filepath.Glob(filepath.Join(logs, "q.*.log"))
		if len(fs) != 1 {
			t.Fatalf("want the one clone's QEMU log in %s, have %v", logs, fs)
		}
		st, err := os.Stat(fs[0])
		if err != nil {
			t.Fatal(err)
		}
		return fs[0], st.Size()
	}
	phases := []string{"create --snapshot (restore, reidentify)", "first exec -- true", "second exec -- true"}
	mustBanger(t, h, "vm", "create", "clone", "--snapshot", "base")
	_, m1 := logSize()
	mustBanger(t, h, "exec", "clone", "--", "true")
	_, m2 := logSize()
	mustBanger(t, h, "exec", "clone", "--", "true")
	log, m3 := logSize()
	// The clone has its source's kernel layout (KASLR is decided at boot).
	ks, err := parseKallsyms(mustBanger(t, h, "exec", "clone", "--", "cat", "/proc/kallsyms"))
	if err != nil {
		t.Fatal(err)
	}
	as, err := elfSymbols(filepath.Join(work, "banger-agent"))
	if err != nil {
		t.Fatal(err)
	}
	if m3 > maxTBLog {
		t.Fatalf("QEMU's log %s has %d bytes: more than %d", log, m3, maxTBLog)
	}
	b, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	bounds := []int64{0, m1, m2, m3}
	t.Logf("BENCH translation blocks of a clone by phase (QEMU -d in_asm; top %d functions)", top)
	for i, name := range phases {
		addrs := tbAddrs(b[bounds[i]:bounds[i+1]])
		var p tbPhase
		for _, a := range addrs {
			p.add(a, ks, as)
		}
		t.Logf("BENCH %s: %d TBs: kernel %d, agent %d, other %d", name, len(addrs), p.kernel, p.agent, p.other)
		t.Logf("BENCH   agent by package: %s", topCounts(p.pkgs, top))
		t.Logf("BENCH   kernel functions: %s", topCounts(p.kfuncs, top))
		t.Logf("BENCH   agent functions:  %s", topCounts(p.afuncs, top))
	}
}

// sym is a function's start address and name.
type sym struct {
	addr uint64
	name string
}

// symtab finds the function an address is in.
type symtab []sym

func (s symtab) find(a uint64) string {
	i, _ := slices.BinarySearchFunc(s, a, func(x sym, a uint64) int { return cmp.Compare(x.addr, a+1) })
	if i == 0 {
		return "?"
	}
	return s[i-1].name
}

// The guest's /proc/kallsyms is read whole through `banger exec`; past
// these bounds the profile stops (a real one is ~10 MB, ~200,000 lines).
const (
	maxKallsyms      = 64 << 20
	maxKallsymsLines = 500000
	maxTBLog         = 2 << 30
)

// parseKallsyms reads the text symbols of /proc/kallsyms.
func parseKallsyms(s string) (symtab, error) {
	if len(s) > maxKallsyms {
		return nil, fmt.Errorf("/proc/kallsyms of %d bytes: more than %d", len(s), maxKallsyms)
	}
	var out symtab
	sc := bufio.NewScanner(strings.NewReader(s))
	for n := 0; sc.Scan() && n < maxKallsymsLines; n++ {
		f := strings.Fields(sc.Text())
		if len(f) < 3 || !strings.ContainsAny(f[1], "tTwW") {
			continue
		}
		a, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil || a == 0 {
			continue
		}
		out = append(out, sym{a, safeSym(f[2])})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no kernel text symbols in /proc/kallsyms (%d bytes)", len(s))
	}
	slices.SortFunc(out, func(a, b sym) int { return cmp.Compare(a.addr, b.addr) })
	return out, nil
}

// elfSymbols reads an executable's function symbols.
func elfSymbols(path string) (symtab, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ss, err := f.Symbols()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var out symtab
	for _, s := range ss {
		if elf.ST_TYPE(s.Info) == elf.STT_FUNC && s.Value != 0 {
			out = append(out, sym{s.Value, s.Name})
		}
	}
	slices.SortFunc(out, func(a, b sym) int { return cmp.Compare(a.addr, b.addr) })
	return out, nil
}

// tbStart matches the first guest address of a block in QEMU's in_asm log.
var tbStart = regexp.MustCompile(`(?m)^IN:[^\n]*\n(0x[0-9a-f]+):`)

// tbAddrs lists the guest address of each block translated in log.
func tbAddrs(log []byte) []uint64 {
	var out []uint64
	for _, m := range tbStart.FindAllSubmatch(log, -1) {
		if a, err := strconv.ParseUint(string(bytes.TrimPrefix(m[1], []byte("0x"))), 16, 64); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// tbPhase counts one phase's blocks.
type tbPhase struct {
	kernel, agent, other int
	kfuncs, afuncs, pkgs map[string]int
}

// agentText is where the agent's (static, non-PIE) code is mapped.
const agentTextLo, agentTextHi = 0x400000, 0x4000000

func (p *tbPhase) add(a uint64, ks, as symtab) {
	if p.kfuncs == nil {
		p.kfuncs, p.afuncs, p.pkgs = map[string]int{}, map[string]int{}, map[string]int{}
	}
	switch {
	case a >= 0xffff800000000000:
		p.kernel++
		p.kfuncs[ks.find(a)]++
	case a >= agentTextLo && a < agentTextHi:
		p.agent++
		n := as.find(a)
		p.afuncs[n]++
		p.pkgs[goPackage(n)]++
	default:
		p.other++
	}
}

// goPackage is the package of a Go symbol ("runtime" for runtime.x,
// "github.com/a/b/c" for github.com/a/b/c.(*T).m).
func goPackage(n string) string {
	slash := strings.LastIndexByte(n, '/')
	if i := strings.IndexByte(n[slash+1:], '.'); i >= 0 {
		return n[:slash+1+i]
	}
	return n
}

// safeSym keeps what a symbol name needs (the guest's kallsyms reaches the
// terminal): letters, digits and _.$/()*[]{}<>,:=- and space, at most 120
// bytes; anything else becomes '?'.
func safeSym(s string) string {
	if len(s) > 120 {
		s = s[:120]
	}
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', strings.ContainsRune("_.$/()*[]{}<>,:=- ", r):
			return r
		}
		return '?'
	}, s)
}

// topCounts renders the n largest counts as "name:count, …".
func topCounts(m map[string]int, n int) string {
	type kv struct {
		k string
		v int
	}
	var l []kv
	for k, v := range m {
		l = append(l, kv{k, v})
	}
	slices.SortFunc(l, func(a, b kv) int { return cmp.Or(cmp.Compare(b.v, a.v), cmp.Compare(a.k, b.k)) })
	var out []string
	for i, e := range l {
		if i == n {
			break
		}
		out = append(out, fmt.Sprintf("%s:%d", e.k, e.v))
	}
	return strings.Join(out, ", ")
}

// TestTBProfileParsers: the profile's parsers on lines a guest could write.
func TestTBProfileParsers(t *testing.T) {
	ks, err := parseKallsyms("ffffffff81000000 T _stext\nffffffff81000100 t do_x\x1b[31m\n0000000000000000 T zero\nffffffff81000200 D data\nnot a line\n")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		a    uint64
		want string
	}{{0xffffffff81000000, "_stext"}, {0xffffffff810000ff, "_stext"}, {0xffffffff81000150, "do_x?[31m"}, {0xffffffff81000300, "do_x?[31m"}, {0x1000, "?"}} {
		if got := ks.find(tt.a); got != tt.want {
			t.Errorf("find(%#x) = %q, want %q", tt.a, got, tt.want)
		}
	}
	if _, err := parseKallsyms(strings.Repeat("x", maxKallsyms+1)); err == nil {
		t.Error("an oversized kallsyms was parsed")
	}
	if _, err := parseKallsyms("ffffffff81000000 D data\n"); err == nil {
		t.Error("no text symbols, no error")
	}
	got := tbAddrs([]byte("----\nIN: \n0xffffffff81000010:  6a 28  pushq $0x28\n\nIN: sym\n0x0000000000401000:  c3  retq\nIN: \ngarbage\n"))
	if !slices.Equal(got, []uint64{0xffffffff81000010, 0x401000}) {
		t.Errorf("tbAddrs = %#x", got)
	}
	for in, want := range map[string]string{"runtime.selectgo": "runtime", "github.com/a/b.(*T).m": "github.com/a/b", "os/exec.(*Cmd).Start": "os/exec", "main": "main"} {
		if got := goPackage(in); got != want {
			t.Errorf("goPackage(%q) = %q, want %q", in, got, want)
		}
	}
}
