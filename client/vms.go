package client

import (
	"context"
	"time"

	"github.com/bangerdev/banger/api"
)

// ListVMs lists every VM.
func (c *Client) ListVMs(ctx context.Context) ([]*api.VM, error) {
	var vms []*api.VM
	if err := c.Call(ctx, api.MethodVMList, nil, &vms); err != nil {
		return nil, err
	}
	if vms == nil {
		vms = []*api.VM{}
	}
	return vms, nil
}

// GetVM returns the VM named by ref (name, id or unambiguous id prefix).
func (c *Client) GetVM(ctx context.Context, ref string) (*api.VM, error) {
	var v api.VM
	if err := c.Call(ctx, api.MethodVMGet, api.VMRef{VM: ref}, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// CreateVM creates and boots a VM and waits until it runs. onStage, when
// not nil, is called as each stage of the create finishes (image, disk,
// network, boot, agent…). The returned error of a failed create carries the
// create's operation id.
func (c *Client) CreateVM(ctx context.Context, p api.CreateParams, onStage func(api.Stage)) (*api.VM, error) {
	st, err := c.BeginCreate(ctx, p)
	if err != nil {
		return nil, err
	}
	return c.WaitCreate(ctx, st, onStage)
}

// BeginCreate starts a create and returns at once; bangerd goes on with it
// even if this client goes away. Follow it with WaitCreate or CreateStatus.
func (c *Client) BeginCreate(ctx context.Context, p api.CreateParams) (api.CreateStatus, error) {
	var st api.CreateStatus
	err := c.Call(ctx, api.MethodVMCreateBegin, p, &st)
	return st, err
}

// CreateStatus returns a create's progress; with wait, bangerd answers when
// it finishes or after about two seconds.
func (c *Client) CreateStatus(ctx context.Context, opID string, wait bool) (api.CreateStatus, error) {
	var st api.CreateStatus
	err := c.Call(WithOpID(ctx, opID), api.MethodVMCreateStatus, api.CreateStatusParams{OpID: opID, Wait: wait}, &st)
	return st, err
}

// WaitCreate follows a create begun with BeginCreate until it finishes,
// reporting finished stages to onStage.
func (c *Client) WaitCreate(ctx context.Context, st api.CreateStatus, onStage func(api.Stage)) (*api.VM, error) {
	reported := 0
	for {
		for ; reported < len(st.Stages); reported++ {
			s := st.Stages[reported]
			if s.FinishedAt == nil {
				break
			}
			if onStage != nil {
				onStage(s)
			}
		}
		if st.Done {
			break
		}
		var err error
		if st, err = c.CreateStatus(ctx, st.OpID, true); err != nil {
			return nil, err
		}
	}
	if st.Error != "" {
		return nil, &Error{Code: CodeInternal, Message: "create " + st.Name + " failed: " + st.Error, OpID: st.OpID}
	}
	return st.VM, nil
}

// StartVM starts a stopped VM.
func (c *Client) StartVM(ctx context.Context, ref string) (*api.VM, error) {
	return c.vmCall(ctx, api.MethodVMStart, api.VMRef{VM: ref})
}

// StopVM shuts a VM down, killing it after timeout (0: bangerd's 30 s).
func (c *Client) StopVM(ctx context.Context, ref string, timeout time.Duration) (*api.VM, error) {
	return c.vmCall(ctx, api.MethodVMStop, api.StopParams{VM: ref, TimeoutSeconds: timeout.Seconds()})
}

// RestartVM stops and starts a VM.
func (c *Client) RestartVM(ctx context.Context, ref string, timeout time.Duration) (*api.VM, error) {
	return c.vmCall(ctx, api.MethodVMRestart, api.StopParams{VM: ref, TimeoutSeconds: timeout.Seconds()})
}

// KillVM stops a VM at once.
func (c *Client) KillVM(ctx context.Context, ref string) (*api.VM, error) {
	return c.vmCall(ctx, api.MethodVMKill, api.VMRef{VM: ref})
}

// DeleteVM deletes a VM and its disks; force kills a running one first.
func (c *Client) DeleteVM(ctx context.Context, ref string, force bool) (api.DeleteResult, error) {
	var r api.DeleteResult
	err := c.Call(ctx, api.MethodVMDelete, api.DeleteParams{VM: ref, Force: force}, &r)
	return r, err
}

// SetVM changes a VM's cpus or memory (next start) or grows its disk.
func (c *Client) SetVM(ctx context.Context, p api.SetParams) (api.SetResult, error) {
	var r api.SetResult
	err := c.Call(ctx, api.MethodVMSet, p, &r)
	return r, err
}

func (c *Client) vmCall(ctx context.Context, method string, params any) (*api.VM, error) {
	var v api.VM
	if err := c.Call(ctx, method, params, &v); err != nil {
		return nil, err
	}
	return &v, nil
}
