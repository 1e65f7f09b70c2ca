package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestReapHelperProcess is not a test: TestKillVMMsUnder runs the test
// binary as a stand-in VMM whose own command line names a path, and which
// waits to be killed.
func TestReapHelperProcess(t *testing.T) {
	if os.Getenv("BANGER_REAP_HELPER") != "1" {
		return
	}
	time.Sleep(time.Minute)
	os.Exit(0)
}

// A process naming a path under home/vms/ is killed; one naming another home is not.
func TestKillVMMsUnder(t *testing.T) {
	home, other := t.TempDir(), t.TempDir()
	type proc struct {
		cmd  *exec.Cmd
		done chan struct{}
		err  error
	}
	start := func(h string) *proc {
		c := exec.Command(os.Args[0], "-test.run=^TestReapHelperProcess$", "--", filepath.Join(h, "vms", "abc", "qmp.sock"))
		c.Env = append(os.Environ(), "BANGER_REAP_HELPER=1")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		p := &proc{cmd: c, done: make(chan struct{})}
		go func() { p.err = c.Wait(); close(p.done) }()
		t.Cleanup(func() { c.Process.Kill(); <-p.done })
		return p
	}
	mine, theirs := start(home), start(other)
	killed, err := KillVMMsUnder(home)
	if err != nil {
		t.Fatal(err)
	}
	if len(killed) != 1 || killed[0] != mine.cmd.Process.Pid {
		t.Fatalf("killed %v, want [%d] (the other home's is %d)", killed, mine.cmd.Process.Pid, theirs.cmd.Process.Pid)
	}
	select {
	case <-mine.done:
		if mine.err == nil {
			t.Fatal("the process under home exited cleanly; want killed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the process under home is still running")
	}
	if err := syscall.Kill(theirs.cmd.Process.Pid, 0); err != nil {
		t.Fatalf("the process under another home is gone: %v", err)
	}
}

// A binary directory of a test process that is gone is swept; this
// process's and a live process's are kept.
func TestSweepBinDirs(t *testing.T) {
	dir := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	live := exec.Command("sleep", "60")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { live.Process.Kill(); live.Wait() })
	mk := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Join(p, "sub"), 0o700); err != nil {
			t.Fatal(err)
		}
		return p
	}
	gone := mk(fmt.Sprintf("%s%d-123", binDirPrefix, dead.Process.Pid))
	self := mk(fmt.Sprintf("%s%d-456", binDirPrefix, os.Getpid()))
	other := mk(fmt.Sprintf("%s%d-789", binDirPrefix, live.Process.Pid))
	unrelated := mk("banger-other-1")
	sweepBinDirs(dir)
	if _, err := os.Stat(gone); !os.IsNotExist(err) {
		t.Errorf("dead process's directory kept (stat: %v)", err)
	}
	for _, p := range []string{self, other, unrelated} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s removed: %v", p, err)
		}
	}
}
