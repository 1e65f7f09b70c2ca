package api

import "time"

// Snapshot and pause methods.
const (
	// MethodVMPause takes VMRef and returns *VM: the guest's vCPUs stop, its
	// memory and processes stay.
	MethodVMPause = "vm.pause"
	// MethodVMResume takes VMRef and returns *VM.
	MethodVMResume = "vm.resume"
	// MethodSnapshotCreate takes SnapshotCreateParams and returns *Snapshot.
	MethodSnapshotCreate = "snapshot.create"
	// MethodSnapshotList takes no params and returns []*Snapshot, newest first.
	MethodSnapshotList = "snapshot.list"
	// MethodSnapshotDelete takes NameRef and returns DeleteResult.
	MethodSnapshotDelete = "snapshot.delete"
	// MethodVMFork takes ForkParams and returns ForkResult once every clone
	// answers (it waits).
	MethodVMFork = "vm.fork"
)

// ForkParams is vm.fork: snapshot the running VM, then make Count clones
// (default 1) named Name (default "<vm>-fork"), or Name-1..Name-Count.
// Each clone keeps the VM's memory (processes, files in tmpfs) and gets its
// own identity: name, hostname, MAC, address, tap, SSH host key,
// machine-id, a reseeded RNG and the current time.
type ForkParams struct {
	VM    string `json:"vm"`
	Name  string `json:"name,omitempty"`
	Count int    `json:"count,omitempty"`
}

// ForkResult lists the clones, with how long the snapshot and each clone took.
type ForkResult struct {
	VMs        []*VM     `json:"vms"`
	SnapshotMS float64   `json:"snapshot_ms"`
	CloneMS    []float64 `json:"clone_ms"`
}

// Snapshot is a saved running VM: its memory and device state, and a copy of
// its writable disk. It depends on the image and kernel the VM ran (they
// cannot be deleted while it exists), not on the VM.
type Snapshot struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	SourceVM  string `json:"source_vm"` // the VM's name when the snapshot was taken
	ImageID   string `json:"image_id"`
	Image     string `json:"image"`
	KernelID  string `json:"kernel_id"`
	Kernel    string `json:"kernel"`
	Driver    string `json:"driver"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	DiskMiB   int    `json:"disk_mib"`
	// StateBytes and DiskBytes are the space the saved state and the disk
	// copy take on the host (the guest memory actually used, the data
	// actually written).
	StateBytes int64     `json:"state_bytes"`
	DiskBytes  int64     `json:"disk_bytes"`
	CreatedAt  time.Time `json:"created_at"`
}

// SnapshotCreateParams is snapshot.create. Name defaults to "<vm>-<time>".
// The VM is paused while its state is saved and then resumed, unless Stop.
type SnapshotCreateParams struct {
	VM   string `json:"vm"`
	Name string `json:"name,omitempty"`
	Stop bool   `json:"stop,omitempty"`
}
