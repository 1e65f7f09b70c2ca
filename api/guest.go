package api

import (
	"time"

	agentapi "github.com/bangerdev/banger/internal/agent/api"
)

// Port is one listening socket in the guest.
type Port = agentapi.Port

// GuestStats is the guest's own view of its resources.
type GuestStats = agentapi.Stats

// PortsResult is vm.ports's result: the guest's listening sockets.
type PortsResult struct {
	VM    string `json:"vm"`
	Ports []Port `json:"ports"`
}

// HostStats is the host's view of a VM: its VMM process.
type HostStats struct {
	PID int `json:"pid"`
	// CPUPercent is the VMM's CPU use since the previous sample, in percent
	// of one core (200 = two cores busy). Absent on a VM's first sample.
	CPUPercent *float64 `json:"cpu_percent,omitempty"`
	RSSBytes   uint64   `json:"rss_bytes"`
}

// StatsSample is one observation of a running VM.
type StatsSample struct {
	Time       time.Time   `json:"time"`
	Host       *HostStats  `json:"host,omitempty"`
	HostError  string      `json:"host_error,omitempty"`
	Guest      *GuestStats `json:"guest,omitempty"`
	GuestError string      `json:"guest_error,omitempty"`
}

// StatsParams is vm.stats.
type StatsParams struct {
	VM      string `json:"vm"`
	History bool   `json:"history,omitempty"` // include the kept history, oldest first
}

// StatsResult is vm.stats's result.
type StatsResult struct {
	VM              string        `json:"vm"`
	ID              string        `json:"id"`
	VCPUs           int           `json:"vcpus"`
	MemoryMiB       int           `json:"memory_mib"`
	IntervalSeconds float64       `json:"interval_seconds"`
	Kept            int           `json:"kept"` // samples in the history now
	Latest          *StatsSample  `json:"latest,omitempty"`
	History         []StatsSample `json:"history,omitempty"`
}

// SSHConfigParams is vm.ssh_config; an empty VM means every running VM.
type SSHConfigParams struct {
	VM string `json:"vm,omitempty"`
}

// SSHHost is one VM reachable by OpenSSH through `banger ssh-proxy`.
type SSHHost struct {
	Name  string `json:"name"`
	ID    string `json:"id"`
	State string `json:"state"`
}

// SSHConfigResult is vm.ssh_config's result: what a client needs to write
// OpenSSH Host entries. KnownHosts is up to date when the call returns.
type SSHConfigResult struct {
	Hosts        []SSHHost `json:"hosts"`
	User         string    `json:"user"`
	IdentityFile string    `json:"identity_file"`
	KnownHosts   string    `json:"known_hosts"`
	// ConfigFile is the OpenSSH config bangerd keeps current, with a Host
	// banger-<name> entry per VM (`banger ssh-config --install` includes it).
	ConfigFile string `json:"config_file,omitempty"`
}
