package qemu

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/system"
)

// End (a release retried from a VM's record, no instance held) ends a real
// QEMU with SIGTERM, within the grace (so it exits cleanly, disks flushed),
// and leaves alone every process its handles do not prove to be that QEMU.
func TestEndOfRecordedQEMU(t *testing.T) {
	inst, _ := boot(t, "echo", nil)
	h := inst.Handles()
	d := testDriver()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	wrong, other, self := h, h, h
	wrong.StartTime++
	other.VMID = "fedcba9876543210"
	self.PID = os.Getpid()
	self.StartTime, _ = system.ProcessStartTime(self.PID)
	for _, tc := range []struct {
		name string
		pid  int
		st   uint64
		vmID string
	}{
		{"another start time", wrong.PID, wrong.StartTime, wrong.VMID},
		{"another VM's id", other.PID, other.StartTime, other.VMID},
		{"a live process that is not a qemu", self.PID, self.StartTime, self.VMID},
	} {
		hh := h
		hh.PID, hh.StartTime, hh.VMID = tc.pid, tc.st, tc.vmID
		if err := d.End(ctx, hh, time.Millisecond); err != nil {
			t.Errorf("End with %s: %v", tc.name, err)
		}
		if !system.SameProcess(h.PID, h.StartTime) {
			t.Fatalf("End with %s ended the VM's qemu", tc.name)
		}
	}

	start := time.Now()
	if err := d.End(ctx, h, 10*time.Second); err != nil {
		t.Fatalf("End: %v", err)
	}
	took := time.Since(start)
	t.Logf("End took %v", took.Round(time.Millisecond))
	st := waitExit(t, inst, 10*time.Second)
	if st.Signal == "killed" || took >= 10*time.Second {
		t.Errorf("qemu did not exit on SIGTERM within the grace: %+v after %v", st, took)
	}
	if err := d.End(ctx, h, time.Millisecond); err != nil {
		t.Errorf("End of an ended qemu: %v", err)
	}
}
