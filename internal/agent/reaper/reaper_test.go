package reaper

import (
	"context"
	"os"
	"os/exec"
	"strconv"
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
