package workspace

import (
	"context"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// BranchFor is the host branch a VM's work comes back to.
func BranchFor(vm string) string { return "banger/" + vm }

// PullResult says what a pull did.
type PullResult struct {
	Branch      string // banger/<vm>
	Commit      string // the branch's new commit
	GuestHead   string // the guest's HEAD commit
	Uncommitted bool   // the guest had uncommitted changes, committed on top of GuestHead
}

// sanitize replaces the downloaded repository's config (which the guest could
// have written) with one that keeps only the repository format, so host git
// never runs a command the guest chose (core.fsmonitor, filters, hooks).
func sanitize(ctx context.Context, gitDir string) error {
	cfg := filepath.Join(gitDir, "config")
	keep := []string{"[core]", "\trepositoryformatversion = 0", "\tbare = false"}
	if out, err := git(ctx, filepath.Dir(filepath.Dir(gitDir)), nil, nil, "config", "--file", cfg, "--get-regexp", `^extensions\.`); err == nil && out != "" {
		keep[1] = "\trepositoryformatversion = 1"
		keep = append(keep, "[extensions]")
		for _, l := range strings.Split(out, "\n") {
			k, v, _ := strings.Cut(l, " ")
			k = strings.TrimPrefix(k, "extensions.")
			if k == "" || strings.ContainsAny(k+v, "\n\"\\[]") {
				continue
			}
			keep = append(keep, "\t"+k+" = "+v)
		}
	}
	os.RemoveAll(filepath.Join(gitDir, "hooks"))
	return os.WriteFile(cfg, []byte(strings.Join(keep, "\n")+"\n"), 0o600)
}

// repoEnv points git at a downloaded copy, with a private index.
func repoEnv(copyDir string) []string {
	return []string{
		"GIT_DIR=" + filepath.Join(copyDir, ".git"),
		"GIT_WORK_TREE=" + copyDir,
		"GIT_INDEX_FILE=" + filepath.Join(filepath.Dir(copyDir), "banger-index"),
		"GIT_CONFIG_NOSYSTEM=1",
	}
}

// CommitWork makes the commit a pull brings back from a downloaded copy of a
// guest workspace (work tree and .git at copyDir): the copy's HEAD when its
// tree matches HEAD, else a new commit of the whole tree (git add -A, so the
// repository's .gitignore applies) whose parent is HEAD. Only the copy's
// object store changes. The commit is made as hostRepo's git user.
func CommitWork(ctx context.Context, copyDir, hostRepo, message string) (head, commit string, changed bool, err error) {
	if err := sanitize(ctx, filepath.Join(copyDir, ".git")); err != nil {
		return "", "", false, fmt.Errorf("prepare the downloaded repository: %w", err)
	}
	env := repoEnv(copyDir)
	head, herr := git(ctx, copyDir, env, nil, "rev-parse", "--verify", "-q", "HEAD^{commit}")
	if herr != nil {
		head = "" // no commit yet
	}
	os.Remove(filepath.Join(filepath.Dir(copyDir), "banger-index"))
	if head != "" {
		if _, err := git(ctx, copyDir, env, nil, "read-tree", head); err != nil {
			return "", "", false, err
		}
	}
	if _, err := git(ctx, copyDir, env, nil, "add", "-A", "."); err != nil {
		return "", "", false, err
	}
	tree, err := git(ctx, copyDir, env, nil, "write-tree")
	if err != nil {
		return "", "", false, err
	}
	if head != "" {
		headTree, err := git(ctx, copyDir, env, nil, "rev-parse", head+"^{tree}")
		if err != nil {
			return "", "", false, err
		}
		if headTree == tree {
			return head, head, false, nil
		}
	}
	args := []string{"commit-tree", tree, "-m", message}
	if head != "" {
		args = append(args, "-p", head)
	}
	commit, err = git(ctx, copyDir, append(env, identity(ctx, hostRepo)...), nil, args...)
	if err != nil {
		return "", "", false, err
	}
	return head, commit, true, nil
}

// identity is the host repository's committer (its local, global and system
// config, which the copy's sanitised config no longer reaches), falling back
// to a banger identity when the host user has none.
func identity(ctx context.Context, hostRepo string) []string {
	name, _ := git(ctx, hostRepo, nil, nil, "config", "user.name")
	email, _ := git(ctx, hostRepo, nil, nil, "config", "user.email")
	if name == "" || email == "" {
		name, email = "banger", "banger@localhost"
	}
	return []string{"GIT_AUTHOR_NAME=" + name, "GIT_AUTHOR_EMAIL=" + email, "GIT_COMMITTER_NAME=" + name, "GIT_COMMITTER_EMAIL=" + email}
}

// FetchBranch force-updates branch in the host repository to commit from the
// repository copyDir, without touching the host's work tree, index or HEAD.
func FetchBranch(ctx context.Context, hostRepo, copyDir, commit, branch string) error {
	if _, err := git(ctx, hostRepo, nil, nil, "check-ref-format", "--branch", branch); err != nil {
		return fmt.Errorf("%q cannot be a git branch name: %w", branch, err)
	}
	env := repoEnv(copyDir)
	if _, err := git(ctx, copyDir, env, nil, "update-ref", "refs/banger/pull", commit); err != nil {
		return err
	}
	if cur, err := git(ctx, hostRepo, nil, nil, "symbolic-ref", "-q", "HEAD"); err == nil && cur == "refs/heads/"+branch {
		return fmt.Errorf("branch %s is checked out in %s: switch to another branch first (pull never touches your working tree)", branch, hostRepo)
	}
	_, err := git(ctx, hostRepo, nil, nil, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
		filepath.Join(copyDir, ".git"), "+refs/banger/pull:refs/heads/"+branch)
	return err
}

// Pull brings the guest workspace at dest back to hostRepo as branch
// banger/<vm>: the guest's commits, plus its uncommitted changes as one more
// commit. tmp is a scratch directory the caller removes.
func Pull(ctx context.Context, guest FS, dest, hostRepo, vm, tmp string) (*PullResult, error) {
	top, err := Toplevel(ctx, hostRepo)
	if err != nil {
		return nil, err
	}
	copyDir := filepath.Join(tmp, "ws")
	if err := Download(ctx, guest, dest, copyDir); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(filepath.Join(copyDir, ".git")); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("the guest's %s has no .git directory: it is not a pushed workspace", dest)
	}
	head, commit, changed, err := CommitWork(ctx, copyDir, top, "banger: uncommitted work from VM "+vm)
	if err != nil {
		return nil, err
	}
	if commit == "" {
		return nil, fmt.Errorf("the guest's workspace %s has no commits and no files", dest)
	}
	br := BranchFor(vm)
	if err := FetchBranch(ctx, top, copyDir, commit, br); err != nil {
		return nil, err
	}
	return &PullResult{Branch: br, Commit: commit, GuestHead: head, Uncommitted: changed}, nil
}

// Status compares a guest workspace with the host repository.
type Status struct {
	GuestHead    string `json:"guest_head"`             // "" when the guest repository has no commit
	GuestBranch  string `json:"guest_branch,omitempty"` // checked-out branch in the guest, "" when detached
	NotInHost    int    `json:"not_in_host"`            // guest commits no host ref reaches
	Branch       string `json:"branch"`                 // banger/<vm>
	BranchCommit string `json:"branch_commit,omitempty"`
	// BranchMatches: banger/<vm> is the guest HEAD, or a pulled commit of
	// uncommitted work on top of it.
	BranchMatches bool `json:"branch_matches"`
}

// GetStatus reads the guest's HEAD and history (only .git is downloaded).
func GetStatus(ctx context.Context, guest FS, dest, hostRepo, vm, tmp string) (*Status, error) {
	top, err := Toplevel(ctx, hostRepo)
	if err != nil {
		return nil, err
	}
	copyDir := filepath.Join(tmp, "ws")
	if err := Download(ctx, guest, dest, copyDir, ".git"); err != nil {
		return nil, err
	}
	gd := filepath.Join(copyDir, ".git")
	if err := sanitize(ctx, gd); err != nil {
		return nil, err
	}
	st := &Status{Branch: BranchFor(vm)}
	env := repoEnv(copyDir)
	if b, err := git(ctx, copyDir, env, nil, "symbolic-ref", "-q", "--short", "HEAD"); err == nil {
		st.GuestBranch = b
	}
	st.GuestHead, _ = git(ctx, copyDir, env, nil, "rev-parse", "--verify", "-q", "HEAD^{commit}")
	hostObjects, err := git(ctx, top, nil, nil, "rev-parse", "--path-format=absolute", "--git-path", "objects")
	if err != nil {
		return nil, err
	}
	if st.GuestHead != "" {
		// let the copy see the host's objects, then count what no host ref reaches
		alt := filepath.Join(gd, "objects", "info", "alternates")
		if err := os.MkdirAll(filepath.Dir(alt), 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(alt, []byte(hostObjects+"\n"), 0o600); err != nil {
			return nil, err
		}
		refs, err := git(ctx, top, nil, nil, "for-each-ref", "--format=%(objectname)")
		if err != nil {
			return nil, err
		}
		in := st.GuestHead + "\n"
		for _, r := range strings.Fields(refs) {
			in += "^" + r + "\n"
		}
		n, err := git(ctx, copyDir, env, strings.NewReader(in), "rev-list", "--count", "--stdin")
		if err != nil {
			return nil, err
		}
		if st.NotInHost, err = strconv.Atoi(n); err != nil {
			return nil, fmt.Errorf("git rev-list --count said %q", n)
		}
	}
	bc, err := git(ctx, top, nil, nil, "rev-parse", "--verify", "-q", "refs/heads/"+st.Branch)
	if err == nil {
		st.BranchCommit = bc
		if bc == st.GuestHead {
			st.BranchMatches = true
		} else if p, err := git(ctx, top, nil, nil, "rev-parse", "--verify", "-q", bc+"^1"); err == nil && p == st.GuestHead {
			msg, _ := git(ctx, top, nil, nil, "log", "-1", "--format=%s", bc)
			st.BranchMatches = strings.HasPrefix(msg, "banger: uncommitted work")
		}
	}
	return st, nil
}

// DefaultDest is the guest directory a host repository goes to.
func DefaultDest(hostTop string) string {
	return path.Join("/root", filepath.Base(hostTop))
}
