package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// requestTimeout bounds one API call when the caller's context has no sooner deadline.
const requestTimeout = 10 * time.Second

// client talks HTTP to Firecracker's API on a unix socket.
type client struct {
	sock string
	http *http.Client
}

func newClient(sock string) *client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		DisableKeepAlives:      true,
		ResponseHeaderTimeout:  requestTimeout,
		MaxResponseHeaderBytes: 64 << 10,
	}
	return &client{sock: sock, http: &http.Client{Transport: tr}}
}

// apiError is a non-2xx answer from Firecracker.
type apiError struct {
	What   string // what was refused, e.g. "boot-source"
	Status int
	Fault  string // Firecracker's fault_message (or the raw body)
}

func (e *apiError) Error() string {
	if e.Fault == "" {
		return fmt.Sprintf("firecracker refused %s: HTTP %d", e.What, e.Status)
	}
	return fmt.Sprintf("firecracker refused %s: %s", e.What, e.Fault)
}

// do sends one request; what names it in errors. out, when non-nil, receives
// the JSON answer of a 200.
func (c *client) do(ctx context.Context, method, path, what string, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode %s request: %w", what, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, body)
	if err != nil {
		return fmt.Errorf("%s request: %w", what, err)
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker API (%s) for %s: %w", c.sock, what, err)
	}
	defer resp.Body.Close()
	rb, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("read firecracker answer to %s: %w", what, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		ae := &apiError{What: what, Status: resp.StatusCode}
		var fe struct {
			FaultMessage string `json:"fault_message"`
		}
		if json.Unmarshal(rb, &fe) == nil && fe.FaultMessage != "" {
			ae.Fault = fe.FaultMessage
		} else {
			ae.Fault = strings.TrimSpace(string(rb))
		}
		return ae
	}
	if out != nil {
		if err := json.Unmarshal(rb, out); err != nil {
			return fmt.Errorf("decode firecracker answer to %s: %w", what, err)
		}
	}
	return nil
}

func (c *client) put(ctx context.Context, path, what string, in any) error {
	return c.do(ctx, http.MethodPut, path, what, in, nil)
}

// API bodies, as named in firecracker.yaml's definitions.

type apiLogger struct {
	LogPath       string `json:"log_path"`
	Level         string `json:"level"`
	ShowLevel     bool   `json:"show_level"`
	ShowLogOrigin bool   `json:"show_log_origin"`
}

type apiMetrics struct {
	MetricsPath string `json:"metrics_path"`
}

type apiMachineConfig struct {
	VCPUCount  int  `json:"vcpu_count"`
	MemSizeMiB int  `json:"mem_size_mib"`
	SMT        bool `json:"smt"`
}

type apiBootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

type apiDrive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
}

type apiNetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

type apiVsock struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

type apiAction struct {
	ActionType string `json:"action_type"`
}

type apiVM struct {
	State string `json:"state"` // Paused, Resumed
}

type apiSnapshotCreate struct {
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
	SnapshotType string `json:"snapshot_type,omitempty"`
}

type apiMemoryBackend struct {
	BackendPath string `json:"backend_path"`
	BackendType string `json:"backend_type"`
}

type apiNetworkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

type apiVsockOverride struct {
	UDSPath string `json:"uds_path"`
}

type apiSnapshotLoad struct {
	SnapshotPath     string               `json:"snapshot_path"`
	MemBackend       apiMemoryBackend     `json:"mem_backend"`
	ResumeVM         bool                 `json:"resume_vm"`
	NetworkOverrides []apiNetworkOverride `json:"network_overrides,omitempty"`
	VsockOverride    *apiVsockOverride    `json:"vsock_override,omitempty"`
}

type apiInstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"`
	VMMVersion string `json:"vmm_version"`
}

func isAPIError(err error) bool {
	var ae *apiError
	return errors.As(err, &ae)
}
