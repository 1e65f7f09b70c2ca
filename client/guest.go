package client

import (
	"context"

	"github.com/bangerdev/banger/api"
)

// Ports lists the listening TCP and UDP sockets in a running VM.
func (c *Client) Ports(ctx context.Context, vm string) (api.PortsResult, error) {
	var r api.PortsResult
	err := c.Call(ctx, api.MethodVMPorts, api.VMRef{VM: vm}, &r)
	return r, err
}

// Stats returns a running VM's latest resource sample (and, with history,
// the samples bangerd keeps).
func (c *Client) Stats(ctx context.Context, vm string, history bool) (api.StatsResult, error) {
	var r api.StatsResult
	err := c.Call(ctx, api.MethodVMStats, api.StatsParams{VM: vm, History: history}, &r)
	return r, err
}

// Logs returns up to max bytes (0: 1 MiB) of a VM's console log from offset.
// The text is the guest's: strip terminal controls before showing it.
func (c *Client) Logs(ctx context.Context, vm string, offset, max int64) (api.LogsResult, error) {
	var r api.LogsResult
	err := c.Call(ctx, api.MethodVMLogs, api.LogsParams{VM: vm, Offset: offset, Max: max}, &r)
	return r, err
}

// SSHConfig returns what OpenSSH needs to reach the running VMs (or one VM)
// through `banger ssh-proxy`.
func (c *Client) SSHConfig(ctx context.Context, vm string) (api.SSHConfigResult, error) {
	var r api.SSHConfigResult
	err := c.Call(ctx, api.MethodVMSSHConfig, api.SSHConfigParams{VM: vm}, &r)
	return r, err
}
