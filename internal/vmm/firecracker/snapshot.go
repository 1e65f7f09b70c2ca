package firecracker

import (
	"context"

	"fmt"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// Snapshots, as Firecracker's snapshot-support.md describes them:
//
//	PATCH /vm {"state": "Paused"}
//	PUT /snapshot/create    snapshot_path <dir>/fc.vmstate, mem_file_path <dir>/fc.mem, Full
//	PATCH /vm {"state": "Resumed"}        (or kill the source)
//
// and, in a new Firecracker process, before anything but the logger and
// metrics is configured:
//
//	PUT /snapshot/load      mem_backend File <dir>/fc.mem, the tap as a
//	                        network override, the VM's own vsock socket as
//	                        the vsock override, resume_vm false
//	PATCH /vm {"state": "Resumed"}
//
// Drives are opened under fixed names relative to Firecracker's working
// directory (driveLink), so the restored machine opens the disks of its own
// directory. In jailer mode the state files are created in the jail and moved
// out (same filesystem), and hard-linked into the new jail for a restore.
// Firecracker resets the guest's vsock connections across a snapshot, and
// updates its VMGenID on load (guest kernels from 5.18 reseed their RNG).

// Saved state file names.
const (
	StateFileName = "fc.vmstate"
	MemFileName   = "fc.mem"
)

var (
	_ vmm.Snapshotter = (*instance)(nil)
	_ vmm.Restorer    = (*Driver)(nil)
)

// Pause implements vmm.Snapshotter.
func (in *instance) Pause(ctx context.Context) error {
	if err := in.api.do(ctx, "PATCH", "/vm", "pause", apiVM{State: "Paused"}, nil); err != nil {
		return fmt.Errorf("pause the guest: %w", in.explain(err))
	}
	return nil
}

// Resume implements vmm.Snapshotter.
func (in *instance) Resume(ctx context.Context) error {
	if err := in.api.do(ctx, "PATCH", "/vm", "resume", apiVM{State: "Resumed"}, nil); err != nil {
		return fmt.Errorf("resume the guest: %w", in.explain(err))
	}
	return nil
}

// SaveState implements vmm.Snapshotter: a full snapshot, <dir>/fc.vmstate
// and <dir>/fc.mem (sparse where the guest's memory is zero).
func (in *instance) SaveState(ctx context.Context, dir string) (vmm.SavedState, error) {
	files := []string{StateFileName, MemFileName}
	host := []string{filepath.Join(dir, StateFileName), filepath.Join(dir, MemFileName)}
	fc := host
	if in.jailDir != "" {
		root := filepath.Join(in.jailDir, "root")
		fc = []string{"/" + StateFileName, "/" + MemFileName}
		for _, p := range fc {
			os.Remove(filepath.Join(root, p))
		}
	}
	for _, p := range host {
		if _, err := os.Lstat(p); err == nil {
			return vmm.SavedState{}, fmt.Errorf("save the guest's state: %s already exists", p)
		}
	}
	err := in.api.put(ctx, "/snapshot/create", "snapshot", apiSnapshotCreate{SnapshotPath: fc[0], MemFilePath: fc[1], SnapshotType: "Full"})
	if err != nil {
		for _, p := range host {
			os.Remove(p)
		}
		return vmm.SavedState{}, fmt.Errorf("save the guest's state: %w", in.explain(err))
	}
	if in.jailDir != "" {
		root := filepath.Join(in.jailDir, "root")
		for i, p := range fc {
			if err := os.Rename(filepath.Join(root, p), host[i]); err != nil {
				return vmm.SavedState{}, fmt.Errorf("save the guest's state: move %s out of the jail: %w", files[i], err)
			}
		}
	}
	st := vmm.SavedState{Driver: DriverName, Files: files}
	for _, p := range host {
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() {
			return vmm.SavedState{}, fmt.Errorf("save the guest's state: firecracker did not write %s", p)
		}
		use, _ := vmmproc.DiskUse(p)
		st.Bytes += use
	}
	return st, nil
}

// Restore implements vmm.Restorer.
func (d *Driver) Restore(ctx context.Context, cfg vmm.MachineConfig, dir string) (vmm.Instance, error) {
	for _, name := range []string{StateFileName, MemFileName} {
		fi, err := os.Lstat(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("restore: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("restore: %s is not a regular file", filepath.Join(dir, name))
		}
	}
	inst, err := d.launch(ctx, cfg, dir)
	if err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	return inst, nil
}

// restore loads the saved state into a fresh Firecracker and resumes it.
func (d *Driver) restore(ctx context.Context, inst *instance, cfg vmm.MachineConfig, l layout) error {
	if err := d.waitAPI(ctx, inst); err != nil {
		return err
	}
	c := inst.api
	if err := c.put(ctx, "/logger", "logger", apiLogger{LogPath: l.fcLog2, Level: "Info", ShowLevel: true}); err != nil {
		return inst.explain(err)
	}
	if err := c.put(ctx, "/metrics", "metrics", apiMetrics{MetricsPath: l.fcMetrics}); err != nil {
		return inst.explain(err)
	}
	load := apiSnapshotLoad{
		SnapshotPath:  l.fcStateFile,
		MemBackend:    apiMemoryBackend{BackendPath: l.fcMemFile, BackendType: "File"},
		VsockOverride: &apiVsockOverride{UDSPath: l.fcVsock},
	}
	if n := cfg.Net; n != nil {
		load.NetworkOverrides = []apiNetworkOverride{{IfaceID: "eth0", HostDevName: n.Tap}}
	}
	if err := c.put(ctx, "/snapshot/load", "snapshot load", load); err != nil {
		return inst.explain(err)
	}
	if err := inst.Resume(ctx); err != nil {
		return err
	}
	var info apiInstanceInfo
	if err := c.do(ctx, "GET", "/", "instance info", nil, &info); err != nil {
		return inst.explain(err)
	}
	if info.State != "Running" {
		return fmt.Errorf("firecracker reports the instance %q after the restore, not Running", info.State)
	}
	return nil
}
