package fakefc

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

// snapshotMagic marks a fake snapshot state file.
const snapshotMagic = "fakefc-snapshot-v1"

// savedState is what the fake's snapshot state file holds: the machine's
// configuration (a real Firecracker saves device state; this is enough for
// the fake to resume "the same" machine and check the load request).
type savedState struct {
	Magic     string                    `json:"magic"`
	ID        string                    `json:"id"`
	Machine   map[string]any            `json:"machine"`
	Boot      map[string]any            `json:"boot"`
	Drives    map[string]drive          `json:"drives"`
	NetIfs    map[string]map[string]any `json:"net_ifs"`
	Vsock     map[string]any            `json:"vsock"`
	MemSizeMi int64                     `json:"mem_size_mib"`
	SavedAt   time.Time                 `json:"saved_at"`
}

// vmState handles PATCH /vm. s.mu held.
func (s *Server) vmState(obj map[string]any) (int, any, *fault) {
	if !s.started {
		return 0, nil, violation("The requested operation is not supported before starting the microVM: PATCH /vm")
	}
	switch obj["state"] {
	case "Paused":
		s.paused = true
	case "Resumed":
		s.paused = false
	default:
		return 0, nil, violation("Invalid VM state %v: want Paused or Resumed", obj["state"])
	}
	return http.StatusNoContent, nil, nil
}

// createSnapshot handles PUT /snapshot/create (post-boot only, checked by
// the caller from the spec). s.mu held.
func (s *Server) createSnapshot(obj map[string]any) (int, any, *fault) {
	if !s.paused {
		return 0, nil, violation("Cannot create a snapshot: the microVM is not paused (PATCH /vm Paused first)")
	}
	if t, ok := obj["snapshot_type"]; ok && t != "Full" {
		return 0, nil, &fault{verdict: VerdictUnsimulated, msg: fmt.Sprintf("fakefc: snapshot_type %v is not simulated", t)}
	}
	mib, _ := num(s.machine, "mem_size_mib")
	st := savedState{
		Magic: snapshotMagic, ID: s.opts.ID, Machine: s.machine, Boot: s.boot, Drives: s.drives,
		NetIfs: s.netIfs, Vsock: s.vsock, MemSizeMi: mib, SavedAt: time.Now(),
	}
	b, err := json.Marshal(st)
	if err != nil {
		return 0, nil, violation("Cannot create a snapshot: %v", err)
	}
	statePath, memPath := s.resolve(str(obj, "snapshot_path")), s.resolve(str(obj, "mem_file_path"))
	if err := os.WriteFile(statePath, b, 0o600); err != nil {
		return 0, nil, violation("Cannot create a snapshot: write the microVM state: %v", err)
	}
	// Guest memory: mostly zero pages, so a sparse file with a little data.
	f, err := os.OpenFile(memPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, nil, violation("Cannot create a snapshot: write the guest memory: %v", err)
	}
	defer f.Close()
	if _, err := f.Write([]byte(snapshotMagic + " memory of " + s.opts.ID + "\n")); err != nil {
		return 0, nil, violation("Cannot create a snapshot: write the guest memory: %v", err)
	}
	if err := f.Truncate(mib << 20); err != nil {
		return 0, nil, violation("Cannot create a snapshot: write the guest memory: %v", err)
	}
	s.log("Info", "Snapshot created")
	s.rec.add(Record{Kind: KindEvent, Verdict: VerdictOK, Fault: "snapshot created"})
	return http.StatusNoContent, nil, nil
}

// loadSnapshot handles PUT /snapshot/load on a fresh process. Like
// Firecracker, a failed load ends the process. s.mu held.
func (s *Server) loadSnapshot(obj map[string]any) (int, any, *fault) {
	if s.other || s.started {
		return 0, nil, violation("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
	}
	code, body, f := s.load(obj)
	if f != nil && f.verdict != VerdictUnsimulated {
		f.msg = "Load snapshot error: " + f.msg
		s.log("Error", f.msg)
		s.requestExit(1, 50*time.Millisecond)
	}
	return code, body, f
}

func (s *Server) load(obj map[string]any) (int, any, *fault) {
	memPath := str(obj, "mem_file_path")
	backend, hasBackend := obj["mem_backend"].(map[string]any)
	switch {
	case memPath != "" && hasBackend:
		return 0, nil, violation("mem_file_path and mem_backend are mutually exclusive")
	case memPath == "" && !hasBackend:
		return 0, nil, violation("one of mem_file_path and mem_backend is required")
	case hasBackend:
		if backend["backend_type"] != "File" {
			return 0, nil, &fault{verdict: VerdictUnsimulated, msg: fmt.Sprintf("fakefc: memory backend %v is not simulated", backend["backend_type"])}
		}
		memPath = str(backend, "backend_path")
	}
	b, err := os.ReadFile(s.resolve(str(obj, "snapshot_path")))
	if err != nil {
		return 0, nil, violation("Cannot open the snapshot file: %v", err)
	}
	var st savedState
	if err := json.Unmarshal(b, &st); err != nil || st.Magic != snapshotMagic {
		return 0, nil, violation("Cannot deserialize the microVM state: not a snapshot")
	}
	mi, err := os.Stat(s.resolve(memPath))
	if err != nil {
		return 0, nil, violation("Cannot open the memory file: %v", err)
	}
	if mi.Size() != st.MemSizeMi<<20 {
		return 0, nil, violation("The memory file is %d bytes, the snapshot's guest has %d MiB", mi.Size(), st.MemSizeMi)
	}
	// The disks must be where the snapshot says (relative to this process).
	for id, d := range st.Drives {
		if f := s.existingFile("drive "+id+" path_on_host", d.Path, !d.ReadOnly); f != nil {
			return 0, nil, f
		}
	}
	if ovs, ok := obj["network_overrides"].([]any); ok {
		for _, o := range ovs {
			ov, _ := o.(map[string]any)
			id := str(ov, "iface_id")
			iface, ok := st.NetIfs[id]
			if !ok {
				return 0, nil, violation("network override for %q: the snapshot has no such interface", id)
			}
			iface["host_dev_name"] = str(ov, "host_dev_name")
		}
	}
	vsockPath := ""
	if st.Vsock != nil {
		vsockPath = str(st.Vsock, "uds_path")
		if ov, ok := obj["vsock_override"].(map[string]any); ok {
			vsockPath = str(ov, "uds_path")
			st.Vsock["uds_path"] = vsockPath
		}
		hp := s.resolve(vsockPath)
		if len(hp) > MaxUnixPath {
			return 0, nil, violation("Cannot create backend for vsock device: uds_path %q is longer than %d bytes", hp, MaxUnixPath)
		}
		ln, err := net.Listen("unix", hp)
		if err != nil {
			return 0, nil, violation("Cannot create backend for vsock device: Error binding to the host-side Unix socket: %v", err)
		}
		s.vsockPath, s.vsockLn = hp, ln
		go s.serveVsock(ln)
	} else if _, ok := obj["vsock_override"]; ok {
		return 0, nil, violation("vsock_override given, but the snapshot has no vsock device")
	}
	s.machine, s.boot, s.drives, s.netIfs, s.vsock = st.Machine, st.Boot, st.Drives, st.NetIfs, st.Vsock
	s.started = true
	resume, _ := obj["resume_vm"].(bool)
	s.paused = !resume
	s.log("Info", "Loaded the microVM state from a snapshot")
	s.rec.add(Record{Kind: KindEvent, Verdict: VerdictOK, Fault: "snapshot loaded"})
	fmt.Fprintf(s.opts.Console, "fakefc: guest %s restored from a snapshot of %s (%v MiB)\n", s.opts.ID, st.ID, st.MemSizeMi)
	return http.StatusNoContent, nil, nil
}
