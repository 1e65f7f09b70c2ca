package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// Ending the VMM of a VM whose release failed.
//
// A release ends the VMM before anything it uses: the "vmm" step of every
// cleanup is a gate (cleanup.addGate), so when the VMM could not be ended
// (the kill failed, the process did not die) its tap, its handles.json and
// the rest stay, the VM is recorded in the error state, and the release
// retried from the record (recordedCleanup) ends it first: the VMM that
// handles.json names, through the driver's own identity checks
// (vmmEnder, vmmproc.End), else any VMM of this home whose command line
// names this VM's directory. A start from the error state boots only once
// that succeeded, so one writable disk never has two VMMs.

// vmmEnder is implemented by the drivers whose VMMs are processes (qemu,
// firecracker): End ends the VMM h names if, and only if, it is provably
// that VM's (same PID and start time, its command line names h's socket
// and VM), with SIGTERM, then SIGKILL after grace; nil when none runs.
type vmmEnder interface {
	End(ctx context.Context, h vmm.Handles, grace time.Duration) error
}

// errVMMAlive is wrapped by a release that could not end the VM's VMM.
var errVMMAlive = errors.New("its VMM is still running")

// vmmEndGrace is how long a VMM ended from the record gets to exit after
// SIGTERM (QEMU flushes its disks) before SIGKILL; vmmEndWait bounds the
// wait after SIGKILL.
const (
	vmmEndGrace = 3 * time.Second
	vmmEndWait  = 10 * time.Second
)

func (s *vmService) endGrace() time.Duration {
	if s.vmmGrace > 0 {
		return s.vmmGrace
	}
	return vmmEndGrace
}

// vmmUndo is the "vmm" gate of a runtime's cleanup: it kills inst. When
// that fails the instance is kept (lingering) so that the release retried
// from the record also waits for its watcher, which removes the sockets the
// VMM leaves, before a new VMM can be started in the same directory.
func (s *vmService) vmmUndo(id string, inst vmm.Instance) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := inst.Kill(ctx); err != nil {
			s.mu.Lock()
			if s.lingering == nil {
				s.lingering = map[string]vmm.Instance{}
			}
			s.lingering[id] = inst
			s.mu.Unlock()
			return fmt.Errorf("%w: %w", errVMMAlive, err)
		}
		return nil
	}
}

// endRecordedVMM ends the VMM that VM id's record names, if it still runs:
// the "vmm" gate of recordedCleanup. Only a process proven to be that VM's
// VMM is signalled; one whose PID was reused is left alone. The error wraps
// errVMMAlive when the VMM may still run.
func (s *vmService) endRecordedVMM(ctx context.Context, id string) error {
	grace := s.endGrace()
	ctx, cancel := context.WithTimeout(ctx, grace+vmmEndWait)
	defer cancel()
	var errs []error
	h, err := readHandles(s.vmDir(id))
	named := false
	if err == nil {
		named, err = s.endByHandles(ctx, h, grace)
	} else if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	if err != nil {
		errs = append(errs, err)
	}
	if !named {
		// No usable handles.json (never written, unreadable, another
		// driver): a VMM of this home whose command line names this VM's
		// directory is this VM's.
		procs, err := findVMMs(s.layout.VMsDir())
		if err != nil {
			errs = append(errs, fmt.Errorf("look for its VMM in /proc: %w", err))
		}
		for _, p := range procs {
			if p.vmID != id {
				continue
			}
			s.log.WarnContext(ctx, "ending a VMM its record does not name", "vm_id", id, "pid", p.pid)
			if err := endScanned(ctx, s.layout.VMsDir(), p, grace); err != nil {
				errs = append(errs, err)
			}
		}
	}
	s.mu.Lock()
	inst := s.lingering[id]
	s.mu.Unlock()
	if inst != nil && len(errs) == 0 {
		// The instance whose kill failed: its process is gone now (or End
		// could not prove it is the VMM); its watcher removes the sockets.
		select {
		case <-inst.Exited():
		case <-time.After(grace):
			if err := inst.Kill(ctx); err != nil {
				errs = append(errs, err)
			}
		}
		if len(errs) == 0 {
			s.mu.Lock()
			if s.lingering[id] == inst {
				delete(s.lingering, id)
			}
			s.mu.Unlock()
		}
	}
	if len(errs) > 0 {
		pid := ""
		if h.PID > 0 {
			pid = fmt.Sprintf(" (pid %d)", h.PID)
		}
		return fmt.Errorf("%w%s and could not be ended: %w", errVMMAlive, pid, errors.Join(errs...))
	}
	return nil
}

// endByHandles ends the VMM h names through its driver. named is false when
// h could not be used (no driver of that name).
func (s *vmService) endByHandles(ctx context.Context, h vmm.Handles, grace time.Duration) (named bool, err error) {
	drv := s.drivers[h.Driver]
	if drv == nil {
		return false, nil
	}
	if e, ok := drv.(vmmEnder); ok {
		return true, e.End(ctx, h, grace)
	}
	// A driver whose VMM is not a process of its own: adopt and kill.
	inst, err := drv.Adopt(ctx, h)
	if errors.Is(err, vmm.ErrGone) {
		return true, nil
	}
	if err != nil {
		return true, err
	}
	return true, inst.Kill(ctx)
}

func readHandles(dir string) (vmm.Handles, error) {
	var h vmm.Handles
	b, err := readBounded(filepath.Join(dir, handlesName), 64<<10)
	if err != nil {
		return h, err
	}
	if err := json.Unmarshal(b, &h); err != nil {
		return h, fmt.Errorf("%s: %w", handlesName, err)
	}
	return h, nil
}

// endScanned ends p, a VMM found in /proc (findVMMs), if it is still that
// process (same start time) and its command line still names its VM's
// directory under vmsDir: SIGTERM, then SIGKILL after grace.
func endScanned(ctx context.Context, vmsDir string, p vmmProc, grace time.Duration) error {
	prefix := filepath.Clean(vmsDir) + "/"
	match := func(argv []string) (string, error) {
		if len(argv) == 0 || !isVMMBinary(argv[0]) {
			return "", errors.New("not a VMM")
		}
		if id := vmIDFromArgs(argv[1:], prefix); id != "" {
			return id, nil
		}
		return "", errors.New("its command line names no VM of this home")
	}
	return vmmproc.End(ctx, vmm.Handles{VMID: p.vmID, PID: p.pid, StartTime: p.startTime}, "VMM", match, grace)
}
