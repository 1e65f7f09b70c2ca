package client

import (
	"context"

	"github.com/bangerdev/banger/api"
)

// PauseVM stops a running VM's vCPUs; its memory and processes stay.
func (c *Client) PauseVM(ctx context.Context, ref string) (*api.VM, error) {
	return c.vmCall(ctx, api.MethodVMPause, api.VMRef{VM: ref})
}

// ResumeVM lets a paused VM run again.
func (c *Client) ResumeVM(ctx context.Context, ref string) (*api.VM, error) {
	return c.vmCall(ctx, api.MethodVMResume, api.VMRef{VM: ref})
}

// ForkVM snapshots a running VM and makes clones of it that keep its memory
// (running processes included), each with its own identity; it returns once
// every clone answers.
func (c *Client) ForkVM(ctx context.Context, p api.ForkParams) (api.ForkResult, error) {
	var r api.ForkResult
	err := c.Call(ctx, api.MethodVMFork, p, &r)
	return r, err
}

// CreateSnapshot saves a running VM (memory, devices, writable disk).
func (c *Client) CreateSnapshot(ctx context.Context, p api.SnapshotCreateParams) (*api.Snapshot, error) {
	var s api.Snapshot
	if err := c.Call(ctx, api.MethodSnapshotCreate, p, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// ListSnapshots lists the snapshots, newest first.
func (c *Client) ListSnapshots(ctx context.Context) ([]*api.Snapshot, error) {
	var l []*api.Snapshot
	if err := c.Call(ctx, api.MethodSnapshotList, nil, &l); err != nil {
		return nil, err
	}
	if l == nil {
		l = []*api.Snapshot{}
	}
	return l, nil
}

// DeleteSnapshot deletes a snapshot (VMs made from it keep running).
func (c *Client) DeleteSnapshot(ctx context.Context, ref string) (api.DeleteResult, error) {
	var r api.DeleteResult
	err := c.Call(ctx, api.MethodSnapshotDelete, api.NameRef{Name: ref}, &r)
	return r, err
}

// ListPools lists the ready pools and their VMs.
func (c *Client) ListPools(ctx context.Context) ([]*api.Pool, error) {
	var l []*api.Pool
	if err := c.Call(ctx, api.MethodPoolList, nil, &l); err != nil {
		return nil, err
	}
	if l == nil {
		l = []*api.Pool{}
	}
	return l, nil
}

// SetPool keeps Size ready VMs of a spec for `banger run` (0 empties it).
func (c *Client) SetPool(ctx context.Context, spec api.PoolSpec) (*api.Pool, error) {
	var p api.Pool
	if err := c.Call(ctx, api.MethodPoolSet, spec, &p); err != nil {
		return nil, err
	}
	return &p, nil
}
