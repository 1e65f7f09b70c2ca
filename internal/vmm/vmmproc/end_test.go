package vmmproc

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
)

// startSleeper starts `sleep 60` (ignoring SIGTERM when ignoreTerm) and waits,
// with a deadline, until its command line is sleep's.
func startSleeper(t *testing.T, ignoreTerm bool) *system.Process {
	t.Helper()
	script := "exec sleep 60"
	if ignoreTerm {
		script = `trap "" TERM; exec sleep 60` // an ignored signal stays ignored across exec
	}
	proc, err := system.StartDetached(exec.Command("bash", "-c", script))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.KillAndWait(context.Background()) })
	for deadline := time.Now().Add(5 * time.Second); ; {
		if argv, _ := system.ProcessCmdline(proc.PID); len(argv) > 0 && argv[0] == "sleep" {
			return proc
		}
		if time.Now().After(deadline) {
			t.Fatal("sleep did not start")
		}
		time.Sleep(5 * time.Millisecond) // polling for exec, with a deadline
	}
}

// sleeperMatch accepts `sleep 60` as the VMM of VM "vm1".
func sleeperMatch(argv []string) (string, error) {
	if len(argv) == 2 && argv[0] == "sleep" && argv[1] == "60" {
		return "vm1", nil
	}
	return "", fmt.Errorf("not a sleeper: %q", argv)
}

func TestEndTermThenKill(t *testing.T) {
	for _, tc := range []struct {
		name       string
		ignoreTerm bool
		want       string // the signal that ended it
	}{
		{"exits on SIGTERM", false, "terminated"},
		{"ignores SIGTERM: SIGKILL after the grace", true, "killed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proc := startSleeper(t, tc.ignoreTerm)
			h := vmm.Handles{VMID: "vm1", PID: proc.PID, StartTime: proc.StartTime}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := End(ctx, h, "sleep", sleeperMatch, 200*time.Millisecond); err != nil {
				t.Fatal(err)
			}
			select {
			case <-proc.Done():
			case <-ctx.Done():
				t.Fatal("End returned but the process did not exit")
			}
			if _, sig := proc.Exit(); sig != tc.want {
				t.Fatalf("ended by %q, want %q", sig, tc.want)
			}
			// Gone: End again is a no-op.
			if err := End(ctx, h, "sleep", sleeperMatch, time.Millisecond); err != nil {
				t.Fatalf("End of a gone process: %v", err)
			}
		})
	}
}

// End never signals a process that is not provably the VMM the handles name.
func TestEndLeavesOtherProcesses(t *testing.T) {
	proc := startSleeper(t, false)
	refuse := func([]string) (string, error) { return "", errors.New("not it") }
	for _, tc := range []struct {
		name  string
		h     vmm.Handles
		match Match
	}{
		{"pid reused (another start time)", vmm.Handles{VMID: "vm1", PID: proc.PID, StartTime: proc.StartTime + 1}, sleeperMatch},
		{"command line of another program", vmm.Handles{VMID: "vm1", PID: proc.PID, StartTime: proc.StartTime}, refuse},
		{"the VMM of another VM", vmm.Handles{VMID: "vm2", PID: proc.PID, StartTime: proc.StartTime}, sleeperMatch},
		{"no pid", vmm.Handles{VMID: "vm1"}, sleeperMatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := End(context.Background(), tc.h, "sleep", tc.match, time.Millisecond); err != nil {
				t.Fatal(err)
			}
			if !system.SameProcess(proc.PID, proc.StartTime) {
				t.Fatal("a process that is not the VMM was ended")
			}
		})
	}
}
