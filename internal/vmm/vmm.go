// Package vmm defines the small interface every virtual machine monitor driver
// implements (firecracker, qemu). A driver launches one VMM process per VM,
// detached from bangerd, and can re-adopt it from its persisted Handles after a
// bangerd restart. Drivers know nothing of the store, networking policy or the
// guest agent protocol: they turn a MachineConfig into a running VMM.
package vmm

import (
	"context"
	"errors"
	"time"
)

// Drive is one virtio block device, in the order the guest should see them.
type Drive struct {
	ID       string // short identifier, [a-z0-9_]+
	Path     string // host file backing the drive
	ReadOnly bool
}

// NetInterface attaches the guest to an existing tap device on the host.
type NetInterface struct {
	Tap string // host tap device name (already created, owned by the user)
	MAC string // guest MAC, e.g. 06:00:ac:1e:00:05
}

// MachineConfig is everything a driver needs to boot one VM.
type MachineConfig struct {
	VMID      string // banger VM id; drivers put it on the VMM's command line so /proc shows it
	Dir       string // per-VM directory; drivers keep sockets and logs here
	VCPUs     int
	MemoryMiB int

	KernelPath string // uncompressed vmlinux (ELF) or bzImage
	InitrdPath string // optional
	Cmdline    string // kernel command line (drivers may append what they need, e.g. console=)

	Drives []Drive
	Net    *NetInterface // nil: no network

	// GuestPort is the vsock port (or serial channel name suffix) the agent listens on.
	GuestPort uint32

	// Spawned, when set, is called with the VMM's handles the moment its
	// process exists, before Start waits for the machine, so the caller can
	// record its identity durably (a caller killed during the wait can then
	// find the VMM again).
	Spawned func(Handles) `json:"-"`
}

// ChannelKind says how the host reaches the guest agent.
type ChannelKind string

const (
	// ChannelVsockUDS: Firecracker's hybrid vsock. Connect to Path (a unix
	// socket), write "CONNECT <port>\n", read "OK <hostport>\n", then stream.
	ChannelVsockUDS ChannelKind = "vsock-uds"
	// ChannelVsock: a real AF_VSOCK connection to CID:Port.
	ChannelVsock ChannelKind = "vsock"
	// ChannelSerial: one virtio-serial byte stream exposed by the VMM as a unix
	// socket at Path. Only one host connection at a time; callers multiplex.
	ChannelSerial ChannelKind = "serial"
)

// GuestChannel describes how to reach the agent inside the guest.
type GuestChannel struct {
	Kind ChannelKind `json:"kind"`
	Path string      `json:"path,omitempty"`
	CID  uint32      `json:"cid,omitempty"`
	Port uint32      `json:"port,omitempty"`
	// Name is the virtio-serial port name the guest sees (ChannelSerial only).
	Name string `json:"name,omitempty"`
}

// Handles is what a driver needs to re-adopt a running VMM. It is persisted by
// bangerd as handles.json in the VM directory.
type Handles struct {
	Driver     string       `json:"driver"`
	VMID       string       `json:"vm_id,omitempty"` // the VM the VMM was started for; Adopt checks it when set
	PID        int          `json:"pid"`
	StartTime  uint64       `json:"start_time"` // /proc/<pid>/stat field 22, guards against PID reuse
	APISocket  string       `json:"api_socket,omitempty"`
	Channel    GuestChannel `json:"channel"`
	Tap        string       `json:"tap,omitempty"`
	ConsoleLog string       `json:"console_log,omitempty"`
	VMMLog     string       `json:"vmm_log,omitempty"`
	// MemFile is the file on a tmpfs that holds the guest's memory while
	// the VMM runs (QEMU's memory-backend-file, share=on); empty when the
	// guest's memory is anonymous or a private mapping of a snapshot. The
	// driver removes it once the VMM has exited; bangerd reclaims one left
	// by a VMM that exited while no bangerd was watching.
	MemFile string `json:"mem_file,omitempty"`
}

// Capabilities says what a driver can do on this host.
type Capabilities struct {
	Vsock        bool // guest channel is vsock (else virtio-serial)
	GracefulStop bool // Shutdown asks the guest to power off
	Initrd       bool
	Network      bool
}

// ExitStatus reports how a VMM process ended.
type ExitStatus struct {
	Code   int    // exit code, -1 when killed by a signal or unknown
	Signal string // e.g. "killed" when ended by a signal
	Reason string // human readable reason, including a VMM fault message when known
	At     time.Time
}

// State is the VMM's own view of the machine.
type State string

const (
	StateRunning State = "running"
	StatePaused  State = "paused"
	StateExited  State = "exited"
	StateUnknown State = "unknown"
)

// Driver launches and adopts VMMs. Implementations must be safe for
// concurrent use by different VMs.
type Driver interface {
	Name() string
	// Preflight checks the host can run this driver (binary found, acceleration
	// usable) and returns a user-facing error with a hint otherwise.
	Preflight(ctx context.Context) error
	Capabilities() Capabilities
	// Start launches a VMM detached from the caller's process group, configures
	// and boots the machine, and returns once the VMM reports the guest running.
	// On error nothing is left running.
	Start(ctx context.Context, cfg MachineConfig) (Instance, error)
	// Adopt re-attaches to a VMM started earlier (possibly by another bangerd).
	// It returns ErrGone when the process no longer exists or is not the same one.
	Adopt(ctx context.Context, h Handles) (Instance, error)
}

// Describer is implemented by a Driver that can say, in a few short lines,
// what it found on this host and chose (binary, acceleration, guest channel),
// for `banger doctor`.
type Describer interface {
	DescribeHost(ctx context.Context) []string
}

// Instance is one running VMM.
type Instance interface {
	Handles() Handles
	// Shutdown asks the guest to power off (ACPI, Ctrl-Alt-Del). It does not wait.
	Shutdown(ctx context.Context) error
	// Kill ends the VMM process now.
	Kill(ctx context.Context) error
	// Wait blocks until the VMM has exited or ctx is done.
	Wait(ctx context.Context) (ExitStatus, error)
	// Exited is closed once the VMM process has exited.
	Exited() <-chan struct{}
	State(ctx context.Context) (State, error)
}

// Snapshotter is implemented by an Instance whose VMM can pause the machine
// and save its state for a later Restore.
//
// A snapshot is taken in this order: Pause, SaveState, copy the writable
// disks while still paused (vmmproc.CopySparse), then Resume (or Kill). The
// saved state holds the guest's memory and device state, not its disks.
type Snapshotter interface {
	// Pause stops the vCPUs; I/O in flight is drained and flushed to the
	// disk files.
	Pause(ctx context.Context) error
	// Resume runs a paused machine again.
	Resume(ctx context.Context) error
	// SaveState writes the paused machine's state into dir (an existing,
	// empty directory of its own). The machine stays paused. The files are
	// not synced: a caller that keeps the snapshot syncs them
	// (vmmproc.SyncTree), after Resume so the guest does not wait for it.
	SaveState(ctx context.Context, dir string) (SavedState, error)
}

// SavedState describes a machine state saved by SaveState.
type SavedState struct {
	Driver string   `json:"driver"`
	Files  []string `json:"files"` // names inside the state directory
	Bytes  int64    `json:"bytes"` // disk space the files use (sparse files count their data only)
}

// Restorer is implemented by a Driver that can start a VMM from a saved state.
type Restorer interface {
	// Restore launches a VMM for cfg, loads the state saved in dir and
	// resumes the guest where it was paused. cfg must have the saved
	// machine's shape (vCPUs, memory, drives in the same order with the same
	// ids, a network interface if it had one); its VM id, directory, disk
	// paths and tap may differ. The guest keeps everything it had in memory,
	// its MAC address included, until it is told otherwise. The guest
	// channel is new: the host connects again.
	Restore(ctx context.Context, cfg MachineConfig, dir string) (Instance, error)
}

// ErrGone means the VMM process no longer exists.
var ErrGone = errors.New("vmm process is gone")
