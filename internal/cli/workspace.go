package cli

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/termsafe"
	"github.com/bangerdev/banger/internal/workspace"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
)

// workspaceTop resolves a --workspace/push directory to its repository root.
func workspaceTop(ctx context.Context, dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return workspace.Toplevel(ctx, abs)
}

// pushWorkspace uploads the repository holding dir to dest in vm ("" means
// /root/<repository name>) and returns dest.
func (a *App) pushWorkspace(ctx context.Context, vm, dir, dest string) (string, error) {
	start := time.Now()
	c, err := a.client(ctx)
	if err != nil {
		return "", err
	}
	var p *workspace.Plan
	var st *client.PushStats
	var bar *progressbar.ProgressBar
	defer func() {
		if bar != nil {
			bar.Finish()
		}
	}()
	dest, err = c.WorkspacePush(ctx, vm, dir, client.PushOptions{
		Dest: dest,
		Planned: func(pl *workspace.Plan) {
			p = pl
			if a.stderrIsTerminal() && p.Bytes > 8<<20 {
				bar = progressbar.NewOptions64(p.Bytes, progressbar.OptionSetWriter(a.Stderr),
					progressbar.OptionSetDescription("workspace"), progressbar.OptionShowBytes(true),
					progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionClearOnFinish(), progressbar.OptionSetWidth(30))
			}
		},
		Progress: func(n int64) {
			if bar != nil {
				bar.Add64(n)
			}
		},
		Pushed: func(s client.PushStats) { st = &s },
	})
	if err != nil {
		if ctx.Err() != nil {
			return "", fmt.Errorf("workspace push interrupted: %w", ctx.Err())
		}
		return "", err
	}
	sent := ""
	if st != nil {
		sent = fmt.Sprintf("; sent %d files, %s, deleted %d", st.Files, sizeBytes(st.Bytes), st.Deleted)
	}
	fmt.Fprintf(a.Stderr, "pushed %s to %s:%s (%d files, %s%s, %.1f s)\n", p.Root, vm, dest, p.Files, sizeBytes(p.Bytes), sent, time.Since(start).Seconds())
	return dest, nil
}

// workspaceRepo is the host repository a VM's workspace belongs to: --repo,
// else the one it was created with, else the current directory's.
func (a *App) workspaceRepo(ctx context.Context, vm, repo string) (*api.VM, string, error) {
	var v api.VM
	if err := a.call(ctx, api.MethodVMGet, api.VMRef{VM: vm}, &v); err != nil {
		return nil, "", err
	}
	if repo == "" {
		repo = v.Workspace
	}
	if repo == "" {
		repo = "."
	}
	top, err := workspaceTop(ctx, repo)
	if err != nil {
		return nil, "", err
	}
	return &v, top, nil
}

func (a *App) workspaceCommand() *cobra.Command {
	ws := &cobra.Command{Use: "workspace", Short: "Copy a git repository into a VM and bring the work back as a branch"}
	var dest string
	push := &cobra.Command{
		Use:   "push VM [DIR]",
		Short: "Copy the git repository at DIR (default .) into a VM",
		Long: "Copies the repository holding DIR into the VM at /root/<name> (or --dest): tracked\n" +
			"files and untracked files that are not ignored, with modes and symlinks, and the whole\n" +
			".git, in one stream. Pushing again sends only what changed (size, mtime, mode, link\n" +
			"target) and deletes in the guest what an earlier push wrote and the host no longer has.",
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := "."
			if len(args) == 2 {
				dir = args[1]
			}
			top, err := workspaceTop(cmd.Context(), dir)
			if err != nil {
				return err
			}
			d, err := a.pushWorkspace(cmd.Context(), args[0], top, dest)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(map[string]string{"vm": args[0], "repo": top, "dest": d})
			}
			return nil
		},
	}
	push.Flags().StringVar(&dest, "dest", "", "directory in the guest (default /root/<repository name>)")

	var repo, pullDest string
	pull := &cobra.Command{
		Use:   "pull VM",
		Short: "Bring a VM's commits and uncommitted changes back as branch banger/<vm>",
		Long: "Downloads the guest's workspace and makes branch banger/<vm> in the host repository:\n" +
			"the guest's HEAD, plus one commit of its uncommitted changes when it has any. Your\n" +
			"working tree, index and current branch are never touched.",
		Args: exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			v, top, err := a.workspaceRepo(ctx, args[0], repo)
			if err != nil {
				return err
			}
			if pullDest == "" {
				pullDest = v.WorkspaceDest // where the last push put it
			}
			if pullDest == "" {
				pullDest = workspace.DefaultDest(top)
			}
			c, err := a.client(ctx)
			if err != nil {
				return err
			}
			// One stream from the guest (bulk path), else SFTP.
			res, err := c.WorkspacePull(ctx, args[0], v.Name, top, pullDest)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			what := "no uncommitted changes"
			if res.Uncommitted {
				what = "uncommitted changes committed on top of " + short(res.GuestHead)
			}
			fmt.Fprintf(a.Stdout, "branch %s at %s in %s (%s)\n", res.Branch, short(res.Commit), top, what)
			return nil
		},
	}
	pull.Flags().StringVar(&repo, "repo", "", "host repository (default: the VM's --workspace, else .)")
	pull.Flags().StringVar(&pullDest, "dest", "", "workspace directory in the guest (default: where the last push put it, else /root/<repository name>)")

	var stRepo, stDest string
	status := &cobra.Command{
		Use:   "status VM",
		Short: "Show the guest workspace's HEAD and how it compares with the host repository",
		Args:  exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			v, top, err := a.workspaceRepo(ctx, args[0], stRepo)
			if err != nil {
				return err
			}
			if stDest == "" {
				stDest = v.WorkspaceDest
			}
			if stDest == "" {
				stDest = workspace.DefaultDest(top)
			}
			c, err := a.client(ctx)
			if err != nil {
				return err
			}
			// One stream of the guest's .git (bulk path), else SFTP.
			st, err := c.GetWorkspaceStatus(ctx, args[0], v.Name, top, stDest)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(st)
			}
			// the guest's HEAD file names these: stripped before printing
			head := orDash(termsafe.Line(short(st.GuestHead)))
			if st.GuestBranch != "" {
				head += " (" + termsafe.Line(st.GuestBranch) + ")"
			}
			branch := "absent"
			if st.BranchCommit != "" {
				branch = short(st.BranchCommit)
				if st.BranchMatches {
					branch += " (up to date with the guest's HEAD)"
				} else {
					branch += " (differs from the guest's HEAD: banger workspace pull " + v.Name + ")"
				}
			}
			return a.table([]string{"FIELD", "VALUE"}, [][]string{
				{"workspace", v.Name + ":" + stDest},
				{"host repo", top},
				{"guest HEAD", head},
				{"commits not in host", fmt.Sprint(st.NotInHost)},
				{st.Branch, branch},
			})
		},
	}
	status.Flags().StringVar(&stRepo, "repo", "", "host repository (default: the VM's --workspace, else .)")
	status.Flags().StringVar(&stDest, "dest", "", "workspace directory in the guest (default: where the last push put it, else /root/<repository name>)")
	ws.AddCommand(push, pull, status)
	return ws
}

func short(sha string) string {
	if len(sha) > 12 {
		return sha[:12]
	}
	return sha
}
