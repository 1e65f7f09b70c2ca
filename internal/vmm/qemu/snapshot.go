package qemu

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// Snapshots use QEMU's migration: SaveState runs `migrate` to a unix socket
// that bangerd serves and copies into a file (QEMU runs with -sandbox
// spawn=deny, so exec: URIs are refused, and QEMU 7.2 has no file: URI);
// Restore starts the same command line with `-incoming defer -S`, runs
// `migrate-incoming` on a unix socket QEMU serves, streams the file into it
// and then `cont`. Every microvm device banger uses migrates.
//
// When the guest's memory is a file on a tmpfs (memory.go), the stream is
// saved with the x-ignore-shared capability, so it holds only the device
// state (a few hundred KB), and the memory file is copied sparsely to
// qemu.ram beside it. A clone maps qemu.ram privately as its memory and
// loads only the device state: nothing of the memory is copied or parsed.
// qemu.meta says which of the two a snapshot is (format 2); a snapshot
// without it is format 1, the whole memory in the stream, and still restores.

const (
	stateFileName = "qemu.vmstate"
	migSockName   = "mig.sock"
	// snapshotTimeout bounds SaveState and the load in Restore when ctx has
	// no deadline.
	snapshotTimeout = 2 * time.Minute
	// migratePoll is the first and migratePollMax the longest wait between
	// two query-migrate: a device-state stream takes a few ms, a whole
	// memory stream ~100 ms.
	migratePoll    = 2 * time.Millisecond
	migratePollMax = 10 * time.Millisecond
)

var (
	_ vmm.Snapshotter = (*instance)(nil)
	_ vmm.Restorer    = (*Driver)(nil)
)

func withSnapshotTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, snapshotTimeout)
}

// Pause implements vmm.Snapshotter (QMP stop: QEMU drains and flushes the
// disks before it returns).
func (i *instance) Pause(ctx context.Context) error {
	err := i.qmp(ctx, func(ctx context.Context, q *QMP) error {
		return q.Execute(ctx, "stop", nil, nil)
	})
	if err != nil {
		return fmt.Errorf("pause the guest: %w", err)
	}
	return nil
}

// Resume implements vmm.Snapshotter.
func (i *instance) Resume(ctx context.Context) error {
	err := i.qmp(ctx, func(ctx context.Context, q *QMP) error {
		return q.Execute(ctx, "cont", nil, nil)
	})
	if err != nil {
		return fmt.Errorf("resume the guest: %w", err)
	}
	return nil
}

type migrationInfo struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
}

// waitMigration polls query-migrate until the snapshot's outgoing
// migration completed or failed.
func (i *instance) waitMigration(ctx context.Context) error {
	return i.pollMigration(ctx, "finish the snapshot", 0, migratePoll, migratePollMax, func(ctx context.Context, mi *migrationInfo) error {
		return i.qmp(ctx, func(ctx context.Context, q *QMP) error {
			return q.Execute(ctx, "query-migrate", nil, mi)
		})
	})
}

// pollMigration asks query until the migration completed or failed: first
// after first, then every poll, doubling up to max. what names the
// operation in a timeout.
func (i *instance) pollMigration(ctx context.Context, what string, first, poll, max time.Duration, query func(context.Context, *migrationInfo) error) error {
	t := time.NewTimer(first)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("qemu did not %s in time: %w", what, ctx.Err())
		case <-i.Exited():
			return fmt.Errorf("qemu exited before it could %s: %s", what, i.Status().Reason)
		case <-t.C:
		}
		var mi migrationInfo
		if err := query(ctx, &mi); err != nil {
			return err
		}
		switch mi.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("qemu's migration %s: %s", mi.Status, mi.ErrorDesc)
		}
		t.Reset(poll)
		poll = min(2*poll, max)
	}
}

// SaveState implements vmm.Snapshotter: the paused machine's state goes to
// dir/qemu.vmstate. Zero pages take no room in the stream, so the file holds
// about the memory the guest has used, not its size.
func (i *instance) SaveState(ctx context.Context, dir string) (vmm.SavedState, error) {
	ctx, cancel := withSnapshotTimeout(ctx)
	defer cancel()
	st, err := i.queryStatus(ctx)
	if err != nil {
		return vmm.SavedState{}, err
	}
	if st.Status != "paused" {
		return vmm.SavedState{}, fmt.Errorf("save the guest's state: the machine is %q; pause it first", st.Status)
	}
	sock := filepath.Join(dir, migSockName)
	if err := vmmproc.CheckSocketPath(sock); err != nil {
		return vmm.SavedState{}, err
	}
	if err := vmmproc.RemoveSocket(sock); err != nil {
		return vmm.SavedState{}, err
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return vmm.SavedState{}, fmt.Errorf("save the guest's state: %w", err)
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	path := filepath.Join(dir, stateFileName)
	// With the memory in a file of its own, the stream leaves it out.
	fileMem := i.h.MemFile != ""
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return vmm.SavedState{}, fmt.Errorf("save the guest's state: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			for _, n := range []string{stateFileName, snapRAMName, snapMetaName} {
				os.Remove(filepath.Join(dir, n))
			}
		}
	}()
	copied := make(chan error, 1)
	go func() {
		defer out.Close()
		c, err := ln.Accept()
		if err != nil {
			copied <- err
			return
		}
		defer c.Close()
		stopConn := context.AfterFunc(ctx, func() { c.Close() })
		defer stopConn()
		// Not synced here: the caller syncs a snapshot it keeps once the
		// guest runs again (vmm.Snapshotter).
		_, err = io.Copy(out, c)
		copied <- err
	}()
	err = i.qmp(ctx, func(ctx context.Context, q *QMP) error {
		// The default cap (32 MiB/s) is for live migration over a network;
		// the guest is paused and the stream goes to a local file.
		if err := q.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
			return err
		}
		// Set either way: a clone restored from a file snapshot has it on
		// from its restore, but its own memory is in no file.
		if err := setIgnoreShared(ctx, q, fileMem); err != nil {
			return err
		}
		return q.Execute(ctx, "migrate", map[string]any{"uri": "unix:" + sock}, nil)
	})
	if err == nil {
		err = i.waitMigration(ctx)
	}
	if err != nil {
		ln.Close()
		<-copied
		return vmm.SavedState{}, fmt.Errorf("save the guest's state: %w", err)
	}
	select {
	case err = <-copied:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		return vmm.SavedState{}, fmt.Errorf("save the guest's state: write %s: %w", path, err)
	}
	files := []string{stateFileName}
	meta := snapMeta{Version: snapFormat, Memory: "stream"}
	if fileMem {
		// The guest is paused: the file is what the stream left out. Only
		// the pages the guest has touched are copied (and take room).
		t0 := time.Now()
		n, err := vmmproc.CopySparseSkipZeros(ctx, i.h.MemFile, filepath.Join(dir, snapRAMName))
		if err != nil {
			return vmm.SavedState{}, fmt.Errorf("save the guest's memory: %w", err)
		}
		inUse, _ := vmmproc.DiskUse(i.h.MemFile)
		i.log.InfoContext(ctx, "guest memory copied", "touched_bytes", inUse, "copied_bytes", n, "copy_ms", time.Since(t0).Milliseconds())
		files = append(files, snapRAMName)
		meta.Memory = "file"
	}
	if err := writeSnapMeta(dir, meta); err != nil {
		return vmm.SavedState{}, fmt.Errorf("save the guest's state: %w", err)
	}
	files = append(files, snapMetaName)
	ok = true
	var use int64
	for _, f := range files {
		n, _ := vmmproc.DiskUse(filepath.Join(dir, f))
		use += n
	}
	streamUse, _ := vmmproc.DiskUse(path)
	i.log.InfoContext(ctx, "qemu state saved", "memory", meta.Memory, "bytes", use, "stream_bytes", streamUse)
	return vmm.SavedState{Driver: DriverName, Files: files, Bytes: use}, nil
}

// setIgnoreShared sets the x-ignore-shared migration capability: RAM
// blocks mapped shared (a memory-backend-file with share=on) stay out of
// the stream.
func setIgnoreShared(ctx context.Context, q *QMP, on bool) error {
	return q.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": on}},
	}, nil)
}

// Restore implements vmm.Restorer. A snapshot with a memory file (format 2,
// memory "file") gives the clone that file, mapped privately, as its memory;
// any other gets the whole memory from the stream, into a memory file of
// its own when a memory directory is usable.
func (d *Driver) Restore(ctx context.Context, cfg vmm.MachineConfig, dir string) (vmm.Instance, error) {
	meta, err := readSnapMeta(dir)
	if err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	var ram *os.File
	if meta.Memory == "file" {
		if ram, err = openSnapshotRAM(dir, cfg.MemoryMiB); err != nil {
			return nil, fmt.Errorf("restore: %w", err)
		}
		defer ram.Close()
	}
	state := filepath.Join(dir, stateFileName)
	in, err := os.OpenFile(state, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("restore: open the saved state: %w", err)
	}
	defer in.Close()
	if fi, err := in.Stat(); err != nil || !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("restore: %s is not a regular file", state)
	}
	ctx, cancel := withSnapshotTimeout(ctx)
	defer cancel()
	t0 := time.Now()
	inst, err := d.launch(ctx, cfg, launchOpts{Incoming: true, SnapshotRAM: ram})
	launched := time.Since(t0)
	if err != nil {
		return nil, err
	}
	if ram != nil {
		ram.Close() // QEMU has its own
	}
	if err := inst.load(ctx, cfg.Dir, in, meta.Memory == "file"); err != nil {
		kctx, kcancel := context.WithTimeout(context.WithoutCancel(ctx), defaultOpTimeout)
		defer kcancel()
		if kerr := inst.Kill(kctx); kerr != nil {
			inst.log.ErrorContext(ctx, "could not kill qemu after a failed restore", "error", kerr)
		}
		if tail := readTail(inst.h.VMMLog, 5); tail != "" {
			err = fmt.Errorf("%w; qemu log: %s", err, tail)
		}
		return nil, fmt.Errorf("restore: %w", err)
	}
	inst.log.InfoContext(ctx, "qemu restored from a saved state", "snapshot_memory", meta.Memory,
		"launch_ms", launched.Milliseconds(), "load_ms", (time.Since(t0) - launched).Milliseconds())
	return inst, nil
}

// load feeds the saved state to a QEMU waiting with -incoming defer and runs
// the guest. ignoreShared must match the capability the state was saved with.
// It all goes over one monitor connection (the guest is not running yet, so
// every greeting and capabilities round trip of a fresh one is on a
// restore's critical path), polling the migration every loadPoll.
func (i *instance) load(ctx context.Context, vmDir string, state io.Reader, ignoreShared bool) error {
	sock := filepath.Join(vmDir, migSockName)
	if err := vmmproc.CheckSocketPath(sock); err != nil {
		return err
	}
	if err := vmmproc.RemoveSocket(sock); err != nil {
		return err
	}
	defer vmmproc.RemoveSocket(sock)
	return i.qmp(ctx, func(ctx context.Context, q *QMP) error {
		var st statusInfo
		if err := q.Execute(ctx, "query-status", nil, &st); err != nil {
			return err
		}
		if st.Status != "inmigrate" {
			return fmt.Errorf("qemu reports the machine %q instead of inmigrate; qemu log: %s", st.Status, readTail(i.h.VMMLog, 5))
		}
		if ignoreShared {
			if err := setIgnoreShared(ctx, q, true); err != nil {
				return err
			}
		}
		if err := q.Execute(ctx, "migrate-incoming", map[string]any{"uri": "unix:" + sock}, nil); err != nil {
			return err
		}
		conn, err := vmmproc.DialConsole(ctx, sock, i.Exited())
		if err != nil {
			return err
		}
		stop := context.AfterFunc(ctx, func() { conn.Close() })
		defer stop()
		sent := make(chan error, 1)
		go func() {
			_, err := io.Copy(conn, state)
			if uc, ok := conn.(*net.UnixConn); ok {
				uc.CloseWrite()
			}
			sent <- err
		}()
		err = i.waitIncoming(ctx, q)
		conn.Close()
		<-sent
		if err != nil {
			return err
		}
		if err := q.Execute(ctx, "cont", nil, nil); err != nil {
			return fmt.Errorf("resume the guest: %w", err)
		}
		// cont starts the machine before it replies; say so if it did not
		if err := q.Execute(ctx, "query-status", nil, &st); err != nil {
			return err
		}
		if st.Status != "running" {
			return fmt.Errorf("qemu reports the machine %q after cont; qemu log: %s", st.Status, readTail(i.h.VMMLog, 5))
		}
		return nil
	})
}

// loadPoll is how often a restore asks for the incoming migration's status:
// loading a saved device state takes a few ms.
const loadPoll = time.Millisecond

// waitIncoming polls the incoming migration on q until it completes.
func (i *instance) waitIncoming(ctx context.Context, q *QMP) error {
	return i.pollMigration(ctx, "load the saved state", loadPoll, loadPoll, loadPoll, func(ctx context.Context, mi *migrationInfo) error {
		return q.Execute(ctx, "query-migrate", nil, mi)
	})
}
