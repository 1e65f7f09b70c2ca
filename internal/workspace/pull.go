package workspace

import (
	"context"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// phase logs at Debug level how long one step of a pull took.
func phase(ctx context.Context, what string, start time.Time) {
	slog.DebugContext(ctx, "workspace pull phase", "phase", what, "ms", float64(time.Since(start).Microseconds())/1000)
}

// BranchFor is the host branch a VM's work comes back to.
func BranchFor(vm string) string { return "banger/" + vm }

// PullResult says what a pull did.
type PullResult struct {
	Branch      string // banger/<vm>
	Commit      string // the branch's new commit
	GuestHead   string // the guest's HEAD commit
	Uncommitted bool   // the guest had uncommitted changes, committed on top of GuestHead
	Received    int64  // bytes the guest sent (a streamed pull); 0 over SFTP
}

// workTreeKeep is the Download filter for a guest's work tree: everything
// but the top-level .git (imported separately, as data) and any nested .git,
// which git would otherwise open as an embedded repository.
func workTreeKeep(rel string, _ fs.FileInfo) bool {
	return !strings.EqualFold(path.Base(rel), ".git")
}

// ObjectFormat is the hash the repository holding dir uses (sha1, sha256).
func ObjectFormat(ctx context.Context, dir string) (string, error) {
	f, err := git(ctx, dir, nil, nil, "rev-parse", "--show-object-format")
	if err != nil {
		return "", err
	}
	if _, err := hexLen(f); err != nil {
		return "", err
	}
	return f, nil
}

// downloadGuestGit downloads only what importGuestGit reads of the guest's
// dest/.git into tmp and imports it, in the host repository top's object
// format, into a repository it makes in tmp that may also read top's
// objects.
func downloadGuestGit(ctx context.Context, guest FS, dest, top, tmp string) (*guestRepo, error) {
	gd := path.Join(dest, ".git")
	if fi, err := guest.Lstat(gd); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("the guest's %s has no .git directory: it is not a pushed workspace (see --dest)", dest)
	}
	format, hostObjects, err := hostRepoFacts(ctx, top)
	if err != nil {
		return nil, err
	}
	raw := filepath.Join(tmp, "guest-git")
	t := time.Now()
	if err := Download(ctx, guest, gd, raw, guestGitKeep); err != nil {
		return nil, err
	}
	phase(ctx, "copy .git", t)
	t = time.Now()
	defer phase(ctx, "import .git", t)
	return importGuestGit(ctx, raw, filepath.Join(tmp, "import.git"), format, hostObjects, false)
}

// hostRepoFacts is the host repository top's object format and object
// directory (which the imported repository may read).
func hostRepoFacts(ctx context.Context, top string) (format, objects string, err error) {
	if format, err = ObjectFormat(ctx, top); err != nil {
		return "", "", err
	}
	objects, err = git(ctx, top, nil, nil, "rev-parse", "--path-format=absolute", "--git-path", "objects")
	return format, objects, err
}

// commitWork makes the commit a pull brings back: the guest's HEAD when the
// work tree (downloaded at workTree) matches it, else a new commit of the
// whole tree (git add -A, so the repository's .gitignore applies) whose
// parent is HEAD. It runs in the imported repository r with a private index
// (idx); only r's object store changes. ident is the committer.
//
// same are files the work tree leaves out because the host has them (a
// streamed pull's bulk.PackSame): they enter the index by the host's own
// object id and mode, marked skip-worktree so git add -A keeps them.
func commitWork(ctx context.Context, r *guestRepo, workTree, idx, message string, ident []string, same map[string]HostFile) (commit string, changed bool, err error) {
	env := []string{"GIT_DIR=" + r.GitDir, "GIT_WORK_TREE=" + workTree, "GIT_INDEX_FILE=" + idx}
	// no attribute from the guest's work tree selects a filter, diff or
	// merge driver (none is configured; this makes sure of it)
	if err := os.MkdirAll(filepath.Join(r.GitDir, "info"), 0o755); err != nil {
		return "", false, err
	}
	if err := writeNew(filepath.Join(r.GitDir, "info", "attributes"), []byte("* -filter -diff -merge\n")); err != nil {
		return "", false, err
	}
	t := time.Now()
	if r.Head != "" {
		if _, err := git(ctx, workTree, env, nil, "read-tree", r.Head); err != nil {
			return "", false, err
		}
	}
	phase(ctx, "git read-tree", t)
	if len(same) > 0 {
		t = time.Now()
		var info, names strings.Builder
		for _, rel := range slices.Sorted(maps.Keys(same)) {
			f := same[rel]
			fmt.Fprintf(&info, "%s %s\t%s\x00", f.Mode, f.OID, rel)
			names.WriteString(rel + "\x00")
		}
		if _, err := git(ctx, workTree, env, strings.NewReader(info.String()), "update-index", "-z", "--index-info"); err != nil {
			return "", false, err
		}
		if _, err := git(ctx, workTree, env, strings.NewReader(names.String()), "update-index", "-z", "--skip-worktree", "--stdin"); err != nil {
			return "", false, err
		}
		phase(ctx, "git update-index (files the host has)", t)
	}
	t = time.Now()
	// the whole tree without a pathspec: "." would match only
	// skip-worktree entries when every file is the host's, which git add
	// refuses
	if _, err := git(ctx, workTree, env, nil, "add", "-A"); err != nil {
		return "", false, err
	}
	phase(ctx, "git add -A", t)
	t = time.Now()
	tree, err := git(ctx, workTree, env, nil, "write-tree")
	if err != nil {
		return "", false, err
	}
	phase(ctx, "git write-tree", t)
	if r.Head != "" {
		headTree, err := git(ctx, workTree, env, nil, "rev-parse", r.Head+"^{tree}")
		if err != nil {
			return "", false, err
		}
		if headTree == tree {
			return r.Head, false, nil
		}
	}
	args := []string{"commit-tree", tree, "-m", message}
	if r.Head != "" {
		args = append(args, "-p", r.Head)
	}
	commit, err = git(ctx, workTree, append(env, ident...), nil, args...)
	if err != nil {
		return "", false, err
	}
	return commit, true, nil
}

// identity is the host repository's committer (its own and the user's
// global config: a value read from the user's repository, never from guest
// data), falling back to a banger identity when the host user has none.
func identity(ctx context.Context, hostRepo string) []string {
	name, _ := runGit(ctx, gitOpts{Dir: hostRepo, UserConfig: true}, "config", "user.name")
	email, _ := runGit(ctx, gitOpts{Dir: hostRepo, UserConfig: true}, "config", "user.email")
	if name == "" || email == "" {
		name, email = "banger", "banger@localhost"
	}
	return []string{"GIT_AUTHOR_NAME=" + name, "GIT_AUTHOR_EMAIL=" + email, "GIT_COMMITTER_NAME=" + name, "GIT_COMMITTER_EMAIL=" + email}
}

// fetchBranch force-updates branch in the host repository to commit from the
// host-made repository gitDir, without touching the host's work tree, index
// or HEAD. The objects arrive through git's own transfer, which hashes every
// one of them.
func fetchBranch(ctx context.Context, hostRepo, gitDir, commit, branch string) error {
	if !CheckRefName("refs/heads/" + branch) {
		return fmt.Errorf("%q cannot be a git branch name", branch)
	}
	if _, err := git(ctx, gitDir, []string{"GIT_DIR=" + gitDir}, nil, "update-ref", "refs/banger/pull", commit); err != nil {
		return err
	}
	if cur, err := git(ctx, hostRepo, nil, nil, "symbolic-ref", "-q", "HEAD"); err == nil && cur == "refs/heads/"+branch {
		return fmt.Errorf("branch %s is checked out in %s: switch to another branch first (pull never touches your working tree)", branch, hostRepo)
	}
	_, err := git(ctx, hostRepo, nil, nil, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules",
		gitDir, "+refs/banger/pull:refs/heads/"+branch)
	return err
}

// pullTarget returns the top of hostRepo's work tree, after checking that
// vm's branch (BranchFor) is a valid git branch name.
func pullTarget(ctx context.Context, hostRepo, vm string) (string, error) {
	top, err := Toplevel(ctx, hostRepo)
	if err != nil {
		return "", err
	}
	if br := BranchFor(vm); !CheckRefName("refs/heads/" + br) {
		return "", fmt.Errorf("%q cannot be a git branch name", br)
	}
	return top, nil
}

// Pull brings the guest workspace at dest back to hostRepo as branch
// banger/<vm>: the guest's commits, plus its uncommitted changes as one more
// commit. tmp is a private scratch directory the caller removes.
func Pull(ctx context.Context, guest FS, dest, hostRepo, vm, tmp string) (*PullResult, error) {
	top, err := pullTarget(ctx, hostRepo, vm)
	if err != nil {
		return nil, err
	}
	r, err := downloadGuestGit(ctx, guest, dest, top, tmp)
	if err != nil {
		return nil, err
	}
	workTree := filepath.Join(tmp, "ws")
	t := time.Now()
	if err := Download(ctx, guest, dest, workTree, workTreeKeep); err != nil {
		return nil, err
	}
	phase(ctx, "copy work tree", t)
	return finishPull(ctx, r, top, workTree, vm, dest, tmp, nil)
}

// PullTree is Pull from copy, a private host copy of the guest's workspace
// that was written through a HostDir (a streamed pull's): nothing is copied
// again. Its .git is imported as data in place (the same checks as Pull; the
// checked object files are moved into the host-made repository, not
// copied), then every directory named .git in copy is removed, so git never
// sees one, and what is left is the work tree. copy is consumed; its
// directories must be writable by the host user.
func PullTree(ctx context.Context, copy, hostRepo, vm, tmp string) (*PullResult, error) {
	return PullTreeSame(ctx, copy, hostRepo, vm, tmp, nil)
}

// PullTreeSame is PullTree where copy leaves out the files in same (the
// host's own clean files the guest said it has unchanged, bulk.PackSame):
// they are committed by the host's object ids. Only names the host offered
// (Haves.Files) may be in same; the caller checks that.
func PullTreeSame(ctx context.Context, copy, hostRepo, vm, tmp string, same map[string]HostFile) (*PullResult, error) {
	top, err := pullTarget(ctx, hostRepo, vm)
	if err != nil {
		return nil, err
	}
	t := time.Now()
	r, err := importCopyGit(ctx, copy, top, tmp)
	if err != nil {
		return nil, err
	}
	phase(ctx, "import .git", t)
	t = time.Now()
	if err := removeGitDirs(copy); err != nil {
		return nil, err
	}
	phase(ctx, "remove .git dirs", t)
	return finishPull(ctx, r, top, copy, vm, copy, tmp, same)
}

// removeGitDirs removes every entry named .git (any case) under root, which
// git would otherwise open as a repository. The walk never follows a link
// (WalkDir lstats; RemoveAll never follows one either).
func removeGitDirs(root string) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root && strings.EqualFold(d.Name(), ".git") {
			if err := os.RemoveAll(p); err != nil {
				return err
			}
			if d.IsDir() {
				return filepath.SkipDir
			}
		}
		return nil
	})
}

// finishPull commits the work tree on top of the imported repository r's
// HEAD and fetches the result into the host repository top.
func finishPull(ctx context.Context, r *guestRepo, top, workTree, vm, dest, tmp string, same map[string]HostFile) (*PullResult, error) {
	br := BranchFor(vm)
	commit, changed, err := commitWork(ctx, r, workTree, filepath.Join(tmp, "index"), "banger: uncommitted work from VM "+vm, identity(ctx, top), same)
	if err != nil {
		return nil, err
	}
	if commit == "" {
		return nil, fmt.Errorf("the guest's workspace %s has no commits and no files", dest)
	}
	t := time.Now()
	if err := fetchBranch(ctx, top, r.GitDir, commit, br); err != nil {
		return nil, err
	}
	phase(ctx, "git fetch", t)
	return &PullResult{Branch: br, Commit: commit, GuestHead: r.Head, Uncommitted: changed}, nil
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

// GetStatus reads the guest's HEAD and history (only the parts of .git
// importGuestGit reads are downloaded).
func GetStatus(ctx context.Context, guest FS, dest, hostRepo, vm, tmp string) (*Status, error) {
	top, err := Toplevel(ctx, hostRepo)
	if err != nil {
		return nil, err
	}
	r, err := downloadGuestGit(ctx, guest, dest, top, tmp)
	if err != nil {
		return nil, err
	}
	return statusOf(ctx, r, top, vm)
}

// GetStatusTree is GetStatus from copy, a private host copy of the guest's
// workspace written through a HostDir (a streamed status's, which holds
// only the parts of .git the import reads): its .git is imported as data
// in place, as PullTree does. copy is consumed.
func GetStatusTree(ctx context.Context, copy, hostRepo, vm, tmp string) (*Status, error) {
	top, err := Toplevel(ctx, hostRepo)
	if err != nil {
		return nil, err
	}
	r, err := importCopyGit(ctx, copy, top, tmp)
	if err != nil {
		return nil, err
	}
	return statusOf(ctx, r, top, vm)
}

// importCopyGit imports the .git of copy (a private host copy of the
// guest's workspace) in place, as data, into tmp/import.git, borrowing the
// objects of the host repository at top.
func importCopyGit(ctx context.Context, copy, top, tmp string) (*guestRepo, error) {
	gd := filepath.Join(copy, ".git")
	if fi, err := os.Lstat(gd); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("the guest's workspace has no .git directory: it is not a pushed workspace (see --dest)")
	}
	format, hostObjects, err := hostRepoFacts(ctx, top)
	if err != nil {
		return nil, err
	}
	return importGuestGit(ctx, gd, filepath.Join(tmp, "import.git"), format, hostObjects, true)
}

// statusOf compares the imported guest repository r with the host
// repository top.
func statusOf(ctx context.Context, r *guestRepo, top, vm string) (*Status, error) {
	st := &Status{Branch: BranchFor(vm), GuestHead: r.Head}
	st.GuestBranch = strings.TrimPrefix(r.Branch, "refs/heads/")
	if st.GuestHead != "" {
		// the imported repository reads the host's objects (its
		// alternates): count what no host ref reaches
		refs, err := git(ctx, top, nil, nil, "for-each-ref", "--format=%(objectname)")
		if err != nil {
			return nil, err
		}
		var in strings.Builder
		in.WriteString(st.GuestHead + "\n")
		for _, r := range strings.Fields(refs) {
			in.WriteString("^" + r + "\n")
		}
		n, err := git(ctx, r.GitDir, []string{"GIT_DIR=" + r.GitDir}, strings.NewReader(in.String()), "rev-list", "--count", "--stdin")
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
