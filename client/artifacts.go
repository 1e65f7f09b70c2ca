package client

import (
	"context"
	"time"

	"github.com/bangerdev/banger/api"
)

// ListImages lists the images.
func (c *Client) ListImages(ctx context.Context) ([]*api.Image, error) {
	var r []*api.Image
	if err := c.Call(ctx, api.MethodImageList, nil, &r); err != nil {
		return nil, err
	}
	if r == nil {
		r = []*api.Image{}
	}
	return r, nil
}

// ListKernels lists the kernels.
func (c *Client) ListKernels(ctx context.Context) ([]*api.Kernel, error) {
	var r []*api.Kernel
	if err := c.Call(ctx, api.MethodKernelList, nil, &r); err != nil {
		return nil, err
	}
	if r == nil {
		r = []*api.Kernel{}
	}
	return r, nil
}

// ImageConfig returns the env, workdir, user, entrypoint and cmd an image
// was recorded with.
func (c *Client) ImageConfig(ctx context.Context, ref string) (api.ImageConfig, error) {
	var r api.ImageConfig
	err := c.Call(ctx, api.MethodImageConfig, api.NameRef{Name: ref}, &r)
	return r, err
}

// DeleteImage deletes an image no VM uses.
func (c *Client) DeleteImage(ctx context.Context, ref string) (api.DeleteResult, error) {
	var r api.DeleteResult
	err := c.Call(ctx, api.MethodImageDelete, api.NameRef{Name: ref}, &r)
	return r, err
}

// DeleteKernel deletes a kernel no VM uses.
func (c *Client) DeleteKernel(ctx context.Context, ref string) (api.DeleteResult, error) {
	var r api.DeleteResult
	err := c.Call(ctx, api.MethodKernelDelete, api.NameRef{Name: ref}, &r)
	return r, err
}

// ImportKernel imports a kernel (paths on the host must be absolute).
func (c *Client) ImportKernel(ctx context.Context, p api.KernelImportParams) (*api.Kernel, error) {
	var k api.Kernel
	if err := c.Call(ctx, api.MethodKernelImport, p, &k); err != nil {
		return nil, err
	}
	return &k, nil
}

// BeginImageOp starts an image operation: method is api.MethodImagePullBegin,
// api.MethodImageImportBegin or api.MethodImageBuildBegin.
func (c *Client) BeginImageOp(ctx context.Context, method string, p api.ImageOpParams) (api.ImageOpStatus, error) {
	var st api.ImageOpStatus
	err := c.Call(ctx, method, p, &st)
	return st, err
}

// ImageOpStatus returns an image operation's progress.
func (c *Client) ImageOpStatus(ctx context.Context, opID string) (api.ImageOpStatus, error) {
	var st api.ImageOpStatus
	err := c.Call(WithOpID(ctx, opID), api.MethodImageOpStatus, api.ImageOpStatusParams{OpID: opID}, &st)
	return st, err
}

// WaitImageOp polls an image operation every interval (0: 300 ms) until it
// finishes, reporting progress to onProgress (may be nil).
func (c *Client) WaitImageOp(ctx context.Context, st api.ImageOpStatus, interval time.Duration, onProgress func(api.ImageOpStatus)) (*api.Image, error) {
	if interval <= 0 {
		interval = 300 * time.Millisecond
	}
	for !st.Done {
		if onProgress != nil {
			onProgress(st)
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		var err error
		if st, err = c.ImageOpStatus(ctx, st.OpID); err != nil {
			return nil, err
		}
	}
	if st.Error != "" {
		return nil, &Error{Code: CodeInternal, Message: "image " + st.Kind + " failed: " + st.Error, OpID: st.OpID}
	}
	return st.Image, nil
}

// ImportImage imports an ext4 root filesystem, a docker save tarball or an
// OCI layout at an absolute host path, and waits for it.
func (c *Client) ImportImage(ctx context.Context, p api.ImageImportParams) (*api.Image, error) {
	var im api.Image
	if err := c.Call(ctx, api.MethodImageImport, p, &im); err != nil {
		return nil, err
	}
	return &im, nil
}
