package system

import (
	"context"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseStartTime(t *testing.T) {
	tests := []struct {
		stat string
		want uint64
		ok   bool
	}{
		{"1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 42 1000 100", 42, true},
		{"7 (a b) c)) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0", 99, true}, // comm with spaces and ')'
		{"garbage", 0, false},
		{"1 (x) S 1 2", 0, false},
	}
	for _, tc := range tests {
		got, err := parseStartTime(tc.stat)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseStartTime(%q) = %d, %v", tc.stat, got, err)
		}
	}
}

func FuzzParseStartTime(f *testing.F) {
	f.Add("1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 42 1000 100")
	f.Add(") ) )")
	f.Fuzz(func(t *testing.T, s string) { parseStartTime(s) })
}

func TestDetachedChildAndAdoption(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	p, err := StartDetached(cmd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(p.PID, syscall.SIGKILL) })
	if sid, _ := unix.Getsid(p.PID); sid != p.PID {
		t.Fatalf("child session %d, want its own (%d)", sid, p.PID)
	}
	if !SameProcess(p.PID, p.StartTime) || SameProcess(p.PID, p.StartTime+1) {
		t.Fatal("SameProcess does not tell the process by its start time")
	}
	if _, err := Adopt(p.PID, p.StartTime+1); err != ErrNotSameProcess {
		t.Fatalf("Adopt with a wrong start time: %v", err)
	}
	a, err := Adopt(p.PID, p.StartTime)
	if err != nil {
		t.Fatal(err)
	}
	if args, _ := ProcessCmdline(p.PID); len(args) != 2 || args[1] != "30" {
		t.Fatalf("cmdline %v", args)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.KillAndWait(ctx); err != nil {
		t.Fatal(err)
	}
	if code, sig := p.Exit(); code != -1 || sig != "killed" {
		t.Fatalf("exit %d %q", code, sig)
	}
	if err := a.Wait(ctx); err != nil {
		t.Fatalf("adopted watcher did not see the exit: %v", err)
	}
	if SameProcess(p.PID, p.StartTime) {
		t.Fatal("dead process still looks alive")
	}
}
