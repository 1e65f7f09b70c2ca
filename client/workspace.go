package client

import (
	"context"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/workspace"
)

// WorkspacePlan is what a workspace push copies.
type WorkspacePlan = workspace.Plan

// PullResult says what a workspace pull did.
type PullResult = workspace.PullResult

// WorkspaceStatus compares a guest workspace with the host repository.
type WorkspaceStatus = workspace.Status

// WorkspaceRoot returns the root of the git repository holding dir.
func WorkspaceRoot(ctx context.Context, dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return workspace.Toplevel(ctx, abs)
}

// WorkspaceDest is where a repository goes in a guest by default: /root/<name>.
func WorkspaceDest(repoRoot string) string { return workspace.DefaultDest(repoRoot) }

// PushOptions tune WorkspacePush.
type PushOptions struct {
	Dest     string               // directory in the guest (default WorkspaceDest)
	Progress func(bytes int64)    // called as bytes are sent
	Planned  func(*WorkspacePlan) // called once the push is planned
	Pushed   func(PushStats)      // called with what a streamed push sent
}

// WorkspacePush copies the git repository holding dir (tracked files,
// untracked files not ignored, and .git) into a running VM and returns the
// directory it went to.
func (c *Client) WorkspacePush(ctx context.Context, vm, dir string, o PushOptions) (string, error) {
	p, err := workspace.PlanPush(ctx, dir)
	if err != nil {
		return "", err
	}
	if o.Planned != nil {
		o.Planned(p)
	}
	dest := o.Dest
	if dest == "" {
		dest = workspace.DefaultDest(p.Root)
	}
	// One stream that sends only what changed (bulk path); per-file SFTP
	// when the VM has no bulk path.
	st, err := c.syncPush(ctx, vm, p, dest, o.Progress)
	if err == nil {
		if o.Pushed != nil {
			o.Pushed(st)
		}
		return dest, nil
	}
	if !noBulk(err) {
		return "", err
	}
	g, err := c.OpenFS(ctx, vm)
	if err != nil {
		return "", err
	}
	defer g.Close()
	if err := workspace.Upload(ctx, p, g, dest, o.Progress); err != nil {
		return "", err
	}
	return dest, nil
}

// WorkspacePull brings a VM's workspace at dest (default: where its last push went, else WorkspaceDest(repo))
// back into the host repository repo as branch banger/<vm>: the guest's HEAD
// plus one commit of its uncommitted changes. vmName names the branch.
func (c *Client) WorkspacePull(ctx context.Context, vm, vmName, repo, dest string) (*PullResult, error) {
	if dest == "" {
		dest = c.recordedDest(ctx, vm)
	}
	if dest == "" {
		dest = workspace.DefaultDest(repo)
	}
	res, err := c.streamedPull(ctx, vm, vmName, repo, dest)
	if err == nil || !noBulk(err) {
		return res, err
	}
	g, err := c.OpenFS(ctx, vm)
	if err != nil {
		return nil, err
	}
	defer g.Close()
	tmp, err := os.MkdirTemp("", "banger-pull-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	return workspace.Pull(ctx, g, dest, repo, vmName, tmp)
}

// GetWorkspaceStatus reads a guest workspace's HEAD and compares it with the
// host repository.
func (c *Client) GetWorkspaceStatus(ctx context.Context, vm, vmName, repo, dest string) (*WorkspaceStatus, error) {
	if dest == "" {
		dest = c.recordedDest(ctx, vm)
	}
	if dest == "" {
		dest = workspace.DefaultDest(repo)
	}
	// One stream of the guest's .git (bulk path), else SFTP.
	st, err := c.streamedStatus(ctx, vm, vmName, repo, dest)
	if err == nil || !noBulk(err) {
		return st, err
	}
	g, err := c.OpenFS(ctx, vm)
	if err != nil {
		return nil, err
	}
	defer g.Close()
	tmp, err := os.MkdirTemp("", "banger-status-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	return workspace.GetStatus(ctx, g, dest, repo, vmName, tmp)
}

// recordedDest is where the VM's last workspace push went ("" if unknown).
func (c *Client) recordedDest(ctx context.Context, vm string) string {
	v, err := c.GetVM(ctx, vm)
	if err != nil {
		return ""
	}
	return v.WorkspaceDest
}
