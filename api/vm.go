package api

import "time"

// VM states.
const (
	StateCreating = "creating"
	StateStopped  = "stopped"
	StateStarting = "starting"
	StateRunning  = "running"
	StateStopping = "stopping"
	StateError    = "error"
)

// VM is one VM as bangerd reports it. Image and Kernel are names.
type VM struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	ImageID   string `json:"image_id"`
	Image     string `json:"image"`
	KernelID  string `json:"kernel_id"`
	Kernel    string `json:"kernel"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	DiskMiB   int    `json:"disk_mib"`
	State     string `json:"state"`
	Driver    string `json:"driver,omitempty"`
	IP        string `json:"ip"`
	MAC       string `json:"mac,omitempty"`
	Tap       string `json:"tap,omitempty"`
	Workspace string `json:"workspace,omitempty"`
	// WorkspaceDest is where the last `workspace push` put the workspace in
	// the guest; pull and status use it when not told otherwise.
	WorkspaceDest string `json:"workspace_dest,omitempty"`
	LastError     string `json:"last_error,omitempty"`
	// Paused: running, with its vCPUs stopped (vm pause); not stored.
	Paused bool `json:"paused,omitempty"`
	// Pool: an unclaimed VM of the ready pool (vm ls --all shows them).
	Pool      bool      `json:"pool,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`

	// ExpiresAt is when bangerd deletes the VM (created with a TTL); not
	// stored in the VM record.
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	// Forwards are the host ports bangerd publishes for the VM (-p); Port is
	// the one listening (chosen when the spec said 0), 0 while stopped.
	Forwards []Forward `json:"forwards,omitempty"`
}

// Forward is one published port: Host:Port on the host to GuestPort in the VM.
type Forward struct {
	Spec      string `json:"spec"`
	Host      string `json:"host"`
	Port      int    `json:"port"`
	GuestPort int    `json:"guest_port"`
	Error     string `json:"error,omitempty"`
}

// VMRef names a VM by id, name or unambiguous prefix.
type VMRef struct {
	VM string `json:"vm"`
}

// CreateParams is vm.create.begin. Zero fields take bangerd's defaults
// (1 vCPU, 512 MiB, 4096 MiB disk, the configured or newest image/kernel).
type CreateParams struct {
	Name      string `json:"name"`
	Image     string `json:"image,omitempty"`
	Kernel    string `json:"kernel,omitempty"`
	VCPUs     int    `json:"vcpus,omitempty"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	DiskMiB   int    `json:"disk_mib,omitempty"`
	Driver    string `json:"driver,omitempty"`
	Workspace string `json:"workspace,omitempty"`
	// Snapshot makes the VM from a snapshot: it resumes where the snapshot
	// was taken, with its own identity. Image, kernel, sizes and driver are
	// the snapshot's; setting them is an error.
	Snapshot string `json:"snapshot,omitempty"`
	// Base (banger run): restore from this spec's base snapshot when there
	// is one (image, kernel, cpus, memory, disk, driver and agent); else
	// boot cold and save the base snapshot right after the agent answers.
	Base bool `json:"base,omitempty"`

	// TTLSeconds, when set, has bangerd stop and delete the VM that long
	// after the create began (at most 30 days).
	TTLSeconds float64 `json:"ttl_seconds,omitempty"`
	// Ports are published while the VM runs: [HOST:]PORT:GUEST_PORT (HOST
	// defaults to 127.0.0.1; PORT 0 picks a free one, see VM.Forwards).
	Ports []string `json:"ports,omitempty"`
}

// Stage is one visible step of a create, with its timings.
type Stage struct {
	Name       string     `json:"name"`
	StartedAt  time.Time  `json:"started_at"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
	DurationMS float64    `json:"duration_ms,omitempty"`
	Error      string     `json:"error,omitempty"`
}

// CreateStatus is vm.create.status's result (and vm.create.begin's).
type CreateStatus struct {
	OpID   string  `json:"op_id"`
	VMID   string  `json:"vm_id"`
	Name   string  `json:"name"`
	Done   bool    `json:"done"`
	Error  string  `json:"error,omitempty"`
	Stages []Stage `json:"stages"`
	VM     *VM     `json:"vm,omitempty"`
}

// CreateStatusParams is vm.create.status. With Wait, bangerd answers when
// the create finishes or after about two seconds, whichever is first.
type CreateStatusParams struct {
	OpID string `json:"op_id"`
	Wait bool   `json:"wait,omitempty"`
}

// StopParams is vm.stop and vm.restart.
type StopParams struct {
	VM             string  `json:"vm"`
	TimeoutSeconds float64 `json:"timeout_seconds,omitempty"`
}

// DeleteParams is vm.delete.
type DeleteParams struct {
	VM    string `json:"vm"`
	Force bool   `json:"force,omitempty"`
}

// DeleteResult is the result of vm.delete, image.delete and kernel.delete.
type DeleteResult struct {
	Deleted string `json:"deleted"`      // the name
	ID      string `json:"id,omitempty"` // set by vm.delete
}

// SetParams is vm.set; zero fields are unchanged.
type SetParams struct {
	VM        string `json:"vm"`
	VCPUs     int    `json:"vcpus,omitempty"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	DiskMiB   int    `json:"disk_mib,omitempty"`
}

// SetResult is vm.set's result.
type SetResult struct {
	VM   *VM    `json:"vm"`
	Note string `json:"note,omitempty"`
}

// ConnectResult is vm.connect's result; the connection then carries the
// guest agent's SSH protocol.
type ConnectResult struct {
	VM      string `json:"vm"`
	HostKey string `json:"host_key"` // authorized_keys line to pin
	User    string `json:"user"`
	KeyPath string `json:"key_path"` // the user's banger key
}

// BulkParams is vm.bulk's parameters.
type BulkParams struct {
	VM string `json:"vm"`
	// Workspace holds the VM's workspace lock for the stream's life: bangerd
	// runs one workspace operation per VM at a time (others wait). Stop and
	// delete do not wait for it: they end the stream.
	Workspace bool `json:"workspace,omitempty"`
	// Dest (with Workspace) is recorded as the VM's WorkspaceDest.
	Dest string `json:"dest,omitempty"`
	// Spool says the stream is one file's put or get (bulk.OpPut, OpGet,
	// OpPutFile, OpGetFile), a workspace push (OpSync) or a session with a
	// lot of stdin (OpSession: a file or a pipe, not a terminal): bangerd
	// may carry its data through the VM's spool device instead of the
	// channel. The client speaks the same protocol either way.
	Spool bool `json:"spool,omitempty"`
}

// BulkResult is vm.bulk's result; the connection then carries a bulk
// stream whose hello bangerd has done.
type BulkResult struct {
	VM string `json:"vm"`
}

// LogsParams is vm.logs.
type LogsParams struct {
	VM     string `json:"vm"`
	Offset int64  `json:"offset,omitempty"`
	Max    int64  `json:"max,omitempty"`
}

// LogsResult is a chunk of the console log.
type LogsResult struct {
	Data       string `json:"data"`
	NextOffset int64  `json:"next_offset"`
	Running    bool   `json:"running"`
}
