package reaper

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	tests := []struct {
		in    string
		state string
		ppid  int
		ok    bool
	}{
		{"123 (sh) Z 1 123 123 0 -1", "Z", 1, true},
		{"123 (a) b) c) S 42 1 1", "S", 42, true},
		{"123 (sh)", "", 0, false},
		{"garbage", "", 0, false},
		{"1 (x) R notanumber", "", 0, false},
	}
	for _, tt := range tests {
		st, pp, ok := parseStat(tt.in)
		if st != tt.state || pp != tt.ppid || ok != tt.ok {
			t.Errorf("parseStat(%q) = %q, %d, %v", tt.in, st, pp, ok)
		}
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	st, _, ok := parseStat(string(b))
	return ok && st == "Z"
}

// TestTrackedChildKeepsStatus starts an untracked and a tracked child that both
// exit at once: the reaper must reap the first and leave the second to Wait.
func TestTrackedChildKeepsStatus(t *testing.T) {
	r := New("/proc", nil)
	orphan := exec.Command("/bin/sh", "-c", "exit 0")
	if err := orphan.Start(); err != nil {
		t.Skipf("cannot start /bin/sh: %v", err)
	}
	tracked := exec.Command("/bin/sh", "-c", "exit 7")
	if err := r.Start(func() (int, error) {
		if err := tracked.Start(); err != nil {
			return 0, err
		}
		return tracked.Process.Pid, nil
	}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !(isZombie(orphan.Process.Pid) && isZombie(tracked.Process.Pid)) {
		if time.Now().After(deadline) {
			t.Fatal("children did not exit within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := r.ReapOnce(); n < 1 {
		t.Fatalf("ReapOnce reaped %d, want at least 1", n)
	}
	if isZombie(orphan.Process.Pid) {
		t.Fatal("untracked zombie still present")
	}
	err := tracked.Wait()
	r.Forget(tracked.Process.Pid)
	if tracked.ProcessState == nil || tracked.ProcessState.ExitCode() != 7 {
		t.Fatalf("tracked child lost its status: %v", err)
	}
}

func TestNilReaper(t *testing.T) {
	var r *Reaper
	called := false
	if err := r.Start(func() (int, error) { called = true; return 1, nil }); err != nil || !called {
		t.Fatal("nil reaper did not run start")
	}
	r.Forget(1)
	if r.ReapOnce() != 0 {
		t.Fatal("nil reaper reaped")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r.Run(ctx, time.Second)
}

// TestChildPIDs reads children lists: every thread's, bounded, with junk
// skipped; no task directory or no children file at all means "no lists".
func TestChildPIDs(t *testing.T) {
	mk := func(t *testing.T, files map[string]string) string {
		root := t.TempDir()
		for p, c := range files {
			full := filepath.Join(root, p)
			if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return root
	}
	tests := []struct {
		name  string
		files map[string]string
		want  []int
		ok    bool
	}{
		{"two threads", map[string]string{"self/task/1/children": "12 34 ", "self/task/7/children": "56\n"}, []int{12, 34, 56}, true},
		{"none", map[string]string{"self/task/1/children": ""}, nil, true},
		{"junk", map[string]string{"self/task/1/children": "12 x -3 0 99999999999999999999 7"}, []int{12, 7}, true},
		{"no lists", map[string]string{"self/task/1/stat": "1 (x) S 0"}, nil, false},
		{"no task dir", map[string]string{"self/stat": "1 (x) S 0"}, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := childPIDs(mk(t, tt.files))
			if ok != tt.ok || !slices.Equal(got, tt.want) {
				t.Fatalf("childPIDs = %v, %v; want %v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
	t.Run("bounded", func(t *testing.T) {
		big := strings.Repeat("1 ", maxChildList) // twice the bound
		got, ok := childPIDs(mk(t, map[string]string{"self/task/1/children": big}))
		if !ok || len(got) != maxChildList/2 {
			t.Fatalf("read %d PIDs (ok %v), want the first %d", len(got), ok, maxChildList/2)
		}
	})
}

// TestChildPIDsReal: this process's running child is listed (when the
// kernel has children lists; ReapOnce falls back to the /proc scan where
// it has not, which TestReapFallback covers).
func TestChildPIDsReal(t *testing.T) {
	c := exec.Command("/bin/sh", "-c", "read x")
	in, err := c.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(); err != nil {
		t.Skipf("cannot start /bin/sh: %v", err)
	}
	defer func() { in.Close(); c.Wait() }()
	got, ok := childPIDs("/proc")
	if !ok {
		if _, err := os.Stat("/proc/self/task/" + strconv.Itoa(os.Getpid()) + "/children"); err == nil {
			t.Fatal("childPIDs found no children lists, but the kernel has them")
		}
		t.Skip("this kernel has no /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN)")
	}
	if !slices.Contains(got, c.Process.Pid) {
		t.Fatalf("child %d not in %v", c.Process.Pid, got)
	}
}

// TestReapFallback: without children lists (a procRoot that has none) the
// reaper scans every process's stat file, and still reaps only untracked
// zombies.
func TestReapFallback(t *testing.T) {
	root := t.TempDir()
	orphan := exec.Command("/bin/sh", "-c", "exit 0")
	if err := orphan.Start(); err != nil {
		t.Skipf("cannot start /bin/sh: %v", err)
	}
	pid := orphan.Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for !isZombie(pid) {
		if time.Now().After(deadline) {
			t.Fatal("child did not exit within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// the fake root lists the zombie's real stat file
	if err := os.MkdirAll(filepath.Join(root, strconv.Itoa(pid)), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, strconv.Itoa(pid), "stat"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, ok := childPIDs(root); ok {
		t.Fatal("the fake root has children lists")
	}
	if n := New(root, nil).ReapOnce(); n != 1 {
		t.Fatalf("ReapOnce reaped %d, want 1", n)
	}
	if isZombie(pid) {
		t.Fatal("zombie still present")
	}
}
