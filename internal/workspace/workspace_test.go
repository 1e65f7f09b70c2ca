package workspace

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func requireGit(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skipf("git not installed: %v", err)
	}
}

func run(t *testing.T, dir string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := git(ctx, dir, []string{"GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@t", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@t"}, nil, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func write(t *testing.T, p, data string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

// hostRepo: 2 commits, a tracked file deleted in the work tree, an untracked
// file, an ignored file and directory, an executable and a relative symlink.
func hostRepo(t *testing.T) string {
	t.Helper()
	requireGit(t)
	r := filepath.Join(t.TempDir(), "proj")
	os.Mkdir(r, 0o755)
	run(t, r, "init", "-q", "-b", "main")
	write(t, filepath.Join(r, "README"), "one\n", 0o644)
	write(t, filepath.Join(r, ".gitignore"), "*.log\nbuild/\n", 0o644)
	write(t, filepath.Join(r, "gone.txt"), "x\n", 0o644)
	run(t, r, "add", "-A")
	run(t, r, "commit", "-q", "-m", "first")
	write(t, filepath.Join(r, "bin", "run.sh"), "#!/bin/sh\necho hi\n", 0o755)
	if err := os.Symlink("bin/run.sh", filepath.Join(r, "link")); err != nil {
		t.Fatal(err)
	}
	run(t, r, "add", "-A")
	run(t, r, "commit", "-q", "-m", "second")
	os.Remove(filepath.Join(r, "gone.txt"))
	write(t, filepath.Join(r, "notes", "untracked.txt"), "u\n", 0o600)
	write(t, filepath.Join(r, "debug.log"), "ignored\n", 0o644)
	write(t, filepath.Join(r, "build", "out.o"), "ignored\n", 0o644)
	return r
}

func TestPlanPush(t *testing.T) {
	r := hostRepo(t)
	ctx := context.Background()
	p, err := PlanPush(ctx, filepath.Join(r, "bin")) // any directory inside the repo
	if err != nil {
		t.Fatal(err)
	}
	items := map[string]Item{}
	for _, it := range p.Items {
		items[it.Rel] = it
	}
	tests := []struct {
		rel  string
		want bool
		mode os.FileMode
		link string
	}{
		{"README", true, 0o644, ""},
		{".gitignore", true, 0o644, ""},
		{"bin", true, os.ModeDir | 0o755, ""},
		{"bin/run.sh", true, 0o755, ""},
		{"link", true, os.ModeSymlink | 0o777, "bin/run.sh"},
		{"notes/untracked.txt", true, 0o600, ""},
		{".git", true, os.ModeDir, ""},
		{".git/HEAD", true, 0, ""},
		{"gone.txt", false, 0, ""},
		{"debug.log", false, 0, ""},
		{"build/out.o", false, 0, ""},
		{"build", false, 0, ""},
	}
	for _, tc := range tests {
		it, ok := items[tc.rel]
		if ok != tc.want {
			t.Errorf("%s in plan = %v, want %v", tc.rel, ok, tc.want)
			continue
		}
		if !ok {
			continue
		}
		if tc.mode != 0 && it.Mode&(os.ModeType|os.ModePerm) != tc.mode && tc.rel != ".git" {
			t.Errorf("%s mode = %v, want %v", tc.rel, it.Mode, tc.mode)
		}
		if it.Link != tc.link {
			t.Errorf("%s link = %q, want %q", tc.rel, it.Link, tc.link)
		}
	}
	// directories come before what is in them
	pos := map[string]int{}
	for i, it := range p.Items {
		pos[it.Rel] = i
	}
	if pos["bin"] > pos["bin/run.sh"] || pos[".git"] > pos[".git/HEAD"] {
		t.Errorf("directories must come first: %v", pos)
	}
	if _, err := PlanPush(ctx, t.TempDir()); err == nil || !strings.Contains(err.Error(), "not inside a git work tree") {
		t.Errorf("plan outside a repository: %v", err)
	}
}

// pushed uploads the host repository into a local directory standing in for
// the guest.
func pushed(t *testing.T, r string) string {
	t.Helper()
	ctx := context.Background()
	p, err := PlanPush(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	guest := filepath.Join(t.TempDir(), "guest", DefaultDest(r)[1:])
	os.MkdirAll(filepath.Dir(guest), 0o755)
	var n int64
	if err := Upload(ctx, p, LocalFS{}, guest, func(b int64) { n += b }); err != nil {
		t.Fatal(err)
	}
	if n != p.Bytes {
		t.Errorf("progress counted %d bytes, plan has %d", n, p.Bytes)
	}
	return guest
}

func TestUploadKeepsModesAndLinks(t *testing.T) {
	r := hostRepo(t)
	g := pushed(t, r)
	if fi, err := os.Stat(filepath.Join(g, "bin/run.sh")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("run.sh: %v %v", fi, err)
	}
	if l, err := os.Readlink(filepath.Join(g, "link")); err != nil || l != "bin/run.sh" {
		t.Errorf("link: %q %v", l, err)
	}
	for _, gone := range []string{"debug.log", "build", "gone.txt"} {
		if _, err := os.Lstat(filepath.Join(g, gone)); err == nil {
			t.Errorf("%s should not be pushed", gone)
		}
	}
	// the copy is a working repository with the host's history
	if got, want := run(t, g, "rev-parse", "HEAD"), run(t, r, "rev-parse", "HEAD"); got != want {
		t.Errorf("guest HEAD %s, host HEAD %s", got, want)
	}
	// pushing again overwrites
	write(t, filepath.Join(r, "README"), "two\n", 0o644)
	p, _ := PlanPush(context.Background(), r)
	if err := Upload(context.Background(), p, LocalFS{}, g, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(g, "README")); string(b) != "two\n" {
		t.Errorf("README after second push: %q", b)
	}
}

func TestPull(t *testing.T) {
	r := hostRepo(t)
	g := pushed(t, r)
	ctx := context.Background()
	// the host goes on: a branch checked out, uncommitted changes
	run(t, r, "checkout", "-q", "-b", "feature")
	write(t, filepath.Join(r, "README"), "host edit\n", 0o644)
	hostHead := run(t, r, "rev-parse", "HEAD")
	statusBefore := run(t, r, "status", "--porcelain")
	indexBefore, _ := os.ReadFile(filepath.Join(r, ".git", "index"))

	// no changes in the guest beyond the host's own untracked file
	st, err := GetStatus(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if st.GuestHead != hostHead || st.NotInHost != 0 || st.BranchCommit != "" || st.GuestBranch != "main" {
		t.Errorf("status before pull: %+v", st)
	}

	// the guest edits (no git there)
	write(t, filepath.Join(g, "README"), "guest edit\n", 0o644)
	write(t, filepath.Join(g, "new.txt"), "new\n", 0o644)
	write(t, filepath.Join(g, "guest.log"), "ignored by .gitignore\n", 0o644)
	os.Remove(filepath.Join(g, "bin/run.sh"))

	run(t, r, "config", "user.name", "Host User")
	run(t, r, "config", "user.email", "host@example.com")
	res, err := Pull(ctx, LocalFS{}, g, filepath.Join(r, "notes"), "w", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if who := run(t, r, "log", "-1", "--format=%an <%ae> / %cn", "banger/w"); who != "Host User <host@example.com> / Host User" {
		t.Errorf("pulled commit made by %q, want the host repository's user", who)
	}
	if res.Branch != "banger/w" || !res.Uncommitted || res.GuestHead != hostHead {
		t.Errorf("pull result %+v", res)
	}
	if got := run(t, r, "rev-parse", "banger/w"); got != res.Commit {
		t.Errorf("banger/w = %s, pull said %s", got, res.Commit)
	}
	if p := run(t, r, "rev-parse", "banger/w^"); p != hostHead {
		t.Errorf("parent %s, want host HEAD %s", p, hostHead)
	}
	files := run(t, r, "ls-tree", "-r", "--name-only", "banger/w")
	for _, want := range []string{"README", "new.txt", "notes/untracked.txt", "link"} {
		if !strings.Contains(files+"\n", want+"\n") {
			t.Errorf("banger/w lacks %s: %s", want, files)
		}
	}
	for _, not := range []string{"guest.log", "bin/run.sh", "gone.txt"} {
		if strings.Contains(files+"\n", not+"\n") {
			t.Errorf("banger/w has %s: %s", not, files)
		}
	}
	if b := run(t, r, "show", "banger/w:README"); b != "guest edit" {
		t.Errorf("README on banger/w: %q", b)
	}
	// the host is untouched
	if b := run(t, r, "symbolic-ref", "--short", "HEAD"); b != "feature" {
		t.Errorf("host branch now %s", b)
	}
	if h := run(t, r, "rev-parse", "HEAD"); h != hostHead {
		t.Errorf("host HEAD moved to %s", h)
	}
	if s := run(t, r, "status", "--porcelain"); s != statusBefore {
		t.Errorf("host status %q, was %q", s, statusBefore)
	}
	if b, _ := os.ReadFile(filepath.Join(r, "README")); string(b) != "host edit\n" {
		t.Errorf("host README %q", b)
	}
	if idx, _ := os.ReadFile(filepath.Join(r, ".git", "index")); string(idx) != string(indexBefore) {
		t.Error("host index changed")
	}
	st, err = GetStatus(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if !st.BranchMatches || st.BranchCommit != res.Commit {
		t.Errorf("status after pull: %+v", st)
	}

	// pulling again with nothing new gives the same tree; a second pull
	// force-updates the branch
	res2, err := Pull(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if run(t, r, "rev-parse", res2.Commit+"^{tree}") != run(t, r, "rev-parse", res.Commit+"^{tree}") {
		t.Error("second pull has a different tree")
	}
}

func TestPullGuestCommits(t *testing.T) {
	r := hostRepo(t)
	g := pushed(t, r)
	ctx := context.Background()
	// a guest with git (or a copied-in commit): commit in the copy with host git
	write(t, filepath.Join(g, "feature.go"), "package x\n", 0o644)
	run(t, g, "add", "-A")
	run(t, g, "commit", "-q", "-m", "guest commit")
	guestHead := run(t, g, "rev-parse", "HEAD")
	st, err := GetStatus(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if st.NotInHost != 1 || st.GuestHead != guestHead {
		t.Errorf("status: %+v", st)
	}
	res, err := Pull(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if res.Uncommitted || res.Commit != guestHead {
		t.Errorf("clean guest: pull %+v, want the guest's commit %s", res, guestHead)
	}
	if run(t, r, "rev-parse", "banger/w") != guestHead {
		t.Error("banger/w is not the guest commit")
	}
}

func TestPullRefusesCheckedOutBranchAndIgnoresGuestConfig(t *testing.T) {
	r := hostRepo(t)
	g := pushed(t, r)
	ctx := context.Background()
	// the guest asks host git to run a command; it must not run
	marker := filepath.Join(t.TempDir(), "ran")
	write(t, filepath.Join(g, ".git", "config"), "[core]\n\trepositoryformatversion = 0\n\tfsmonitor = touch "+marker+"\n[filter \"x\"]\n\tclean = touch "+marker+"\n", 0o644)
	write(t, filepath.Join(g, ".gitattributes"), "* filter=x\n", 0o644)
	write(t, filepath.Join(g, "README"), "changed\n", 0o644)
	if _, err := Pull(ctx, LocalFS{}, g, r, "w", t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("host git ran a command from the guest's config")
	}
	run(t, r, "checkout", "-q", "-f", "banger/w")
	if _, err := Pull(ctx, LocalFS{}, g, r, "w", t.TempDir()); err == nil || !strings.Contains(err.Error(), "checked out") {
		t.Errorf("pull into the checked-out branch: %v", err)
	}
	if _, err := Pull(ctx, LocalFS{}, g, r, "bad..name", t.TempDir()); err == nil {
		t.Error("pull accepted a VM name that is no branch name")
	}
}

// badNames is a guest whose directory listing tries to escape.
type badNames struct {
	LocalFS
	name string
}

type namedInfo struct {
	os.FileInfo
	name string
}

func (n namedInfo) Name() string { return n.name }

func (b badNames) ReadDir(p string) ([]os.FileInfo, error) {
	fis, err := b.LocalFS.ReadDir(p)
	if err != nil || len(fis) == 0 {
		return fis, err
	}
	fis[0] = namedInfo{fis[0], b.name}
	return fis, nil
}

func TestDownloadRefusesEscapingNames(t *testing.T) {
	g := t.TempDir()
	write(t, filepath.Join(g, "a"), "x", 0o644)
	for _, name := range []string{"..", "../evil", "a/b", ".", ""} {
		dst := filepath.Join(t.TempDir(), "copy")
		err := Download(context.Background(), badNames{name: name}, g, dst, nil)
		if err == nil || !strings.Contains(err.Error(), "bad name") {
			t.Errorf("name %q: %v", name, err)
		}
	}
}

func TestParallelFirstError(t *testing.T) {
	tests := []struct {
		n, failAt int
	}{{0, -1}, {1, -1}, {100, -1}, {100, 0}, {100, 57}}
	for _, tc := range tests {
		items := make([]int, tc.n)
		for i := range items {
			items[i] = i
		}
		var mu sync.Mutex
		done := 0
		err := parallel(context.Background(), items, func(i int) error {
			mu.Lock()
			done++
			mu.Unlock()
			if i == tc.failAt {
				return errors.New("boom")
			}
			return nil
		})
		if (err != nil) != (tc.failAt >= 0) {
			t.Errorf("n=%d failAt=%d: err %v", tc.n, tc.failAt, err)
		}
		if tc.failAt < 0 && done != tc.n {
			t.Errorf("n=%d: ran %d", tc.n, done)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := parallel(ctx, []int{1, 2, 3}, func(int) error { return nil }); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
}

// endless is a guest whose files serve far more bytes than they listed
// (4 MiB each here, so a regression fails rather than fills the disk).
type endless struct{ LocalFS }

func (endless) Open(p string) (io.ReadCloser, error) {
	return io.NopCloser(io.LimitReader(zeroReader{}, 4<<20)), nil
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// TestDownloadBounded plays a guest that lists more entries, or serves more
// bytes, than a download accepts: the copy stops with an error instead of
// filling the host's disk.
func TestDownloadBounded(t *testing.T) {
	g := t.TempDir()
	for i := range 5 {
		write(t, filepath.Join(g, fmt.Sprint("f", i)), "0123456789", 0o644)
	}
	tests := []struct {
		name    string
		guest   FS
		lim     downloadLimits
		wantErr string
	}{
		{"within bounds", LocalFS{}, downloadLimits{50, 5}, ""},
		{"too many entries", LocalFS{}, downloadLimits{1 << 20, 4}, "more than 4 entries"},
		{"too many bytes", LocalFS{}, downloadLimits{49, 5}, "more bytes"},
		{"endless file", endless{}, downloadLimits{1 << 20, 5}, "more bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			err := download(ctx, tt.guest, g, filepath.Join(t.TempDir(), "copy"), nil, tt.lim)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("got %v, want an error with %q", err, tt.wantErr)
			}
		})
	}
}
