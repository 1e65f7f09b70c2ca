package testenv

import (
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// A process naming a path under home/vms/ is killed; one naming another home is not.
func TestKillVMMsUnder(t *testing.T) {
	home, other := t.TempDir(), t.TempDir()
	start := func(h string) *exec.Cmd {
		// sleep ignores its extra arguments' meaning only if they are numbers,
		// so name the path through sh's $0 instead.
		c := exec.Command("sh", "-c", "sleep 60", filepath.Join(h, "vms", "abc", "qmp.sock"))
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
		return c
	}
	mine, theirs := start(home), start(other)
	done := make(chan error, 1)
	go func() { done <- mine.Wait() }()
	killed, err := KillVMMsUnder(home)
	if err != nil {
		t.Fatal(err)
	}
	if len(killed) != 1 || killed[0] != mine.Process.Pid {
		t.Fatalf("killed %v, want [%d]", killed, mine.Process.Pid)
	}
	if err := <-done; err == nil {
		t.Fatal("the process under home exited cleanly; want killed")
	}
	if err := syscall.Kill(theirs.Process.Pid, 0); err != nil {
		t.Fatalf("the process under another home is gone: %v", err)
	}
}
