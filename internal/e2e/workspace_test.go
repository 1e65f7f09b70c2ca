package e2e

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// hostGit runs git in dir with a fixed identity.
func hostGit(t *testing.T, dir string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@t", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@t")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

func writeFile(t *testing.T, p, data string, mode os.FileMode) {
	t.Helper()
	os.MkdirAll(filepath.Dir(p), 0o755)
	if err := os.WriteFile(p, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	os.Chmod(p, mode)
}

// TestWorkspaceRealGuest: vm create --workspace copies a repository in
// (history, modes, symlinks, no ignored files); the guest edits files without
// git; workspace pull brings them back as banger/<vm> on top of the host's
// HEAD and leaves the host's tree and branch alone. One VM boot.
func TestWorkspaceRealGuest(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skipf("git not installed: %v", err)
	}
	h, d, _ := realHome(t)
	repo := filepath.Join(t.TempDir(), "proj")
	os.Mkdir(repo, 0o755)
	hostGit(t, repo, "init", "-q", "-b", "main")
	writeFile(t, filepath.Join(repo, "README"), "host\n", 0o644)
	writeFile(t, filepath.Join(repo, ".gitignore"), "*.log\n", 0o644)
	hostGit(t, repo, "add", "-A")
	hostGit(t, repo, "commit", "-q", "-m", "first")
	writeFile(t, filepath.Join(repo, "bin", "run.sh"), "#!/bin/sh\necho ran\n", 0o755)
	if err := os.Symlink("bin/run.sh", filepath.Join(repo, "link")); err != nil {
		t.Fatal(err)
	}
	hostGit(t, repo, "add", "-A")
	hostGit(t, repo, "commit", "-q", "-m", "second")
	writeFile(t, filepath.Join(repo, "untracked.txt"), "untracked\n", 0o644)
	writeFile(t, filepath.Join(repo, "debug.log"), "ignored\n", 0o644)
	hostHead := hostGit(t, repo, "rev-parse", "HEAD")

	t0 := time.Now()
	if _, errOut, code := banger(t, h, "vm", "create", "w", "--memory", "256M", "--disk", "512M", "--workspace", filepath.Join(repo, "bin")); code != 0 {
		t.Fatalf("create --workspace: exit %d: %s\n%s", code, errOut, d.logs.String())
	} else {
		t.Logf("MEASURE vm create --workspace (boot + push): %v; %s", time.Since(t0).Round(time.Millisecond), strings.TrimSpace(errOut))
	}
	t.Cleanup(func() { banger(t, h, "vm", "delete", "w", "--force") })
	if v := mustBanger(t, h, "vm", "show", "w", "-o", "json"); !strings.Contains(v, `"workspace":"`+repo+`"`) && !strings.Contains(v, `"workspace": "`+repo+`"`) {
		t.Errorf("the VM record does not keep the workspace %s: %s", repo, v)
	}

	// in the guest, with the same argv banger run --workspace uses
	check := `test "$(pwd)" = /root/proj && test -x bin/run.sh && test ! -x README && test -L link && ` +
		`test "$(cat link)" = "$(cat bin/run.sh)" && test -f untracked.txt && test ! -e debug.log && ` +
		`test -f .git/HEAD && test -d .git/objects && ./link`
	out, errOut, code := banger(t, h, "exec", "w", "--", "sh", "-c", `cd "$1" && shift && exec "$@"`, "sh", "/root/proj", "sh", "-c", check)
	if code != 0 || out != "ran\n" {
		t.Fatalf("workspace in the guest: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	// status: the guest's HEAD is the host's, no branch yet
	st := mustBanger(t, h, "workspace", "status", "w", "-o", "json")
	if !strings.Contains(st, hostHead) || !strings.Contains(st, `"not_in_host": 0`) && !strings.Contains(st, `"not_in_host":0`) {
		t.Errorf("status before pull: %s", st)
	}

	// the guest edits without git; the host moves to another branch with its own edits
	mustBanger(t, h, "exec", "w", "--", "sh", "-c", "cd /root/proj && echo guest > README && echo new > new.txt && echo noise > guest.log")
	hostGit(t, repo, "checkout", "-q", "-b", "feature")
	writeFile(t, filepath.Join(repo, "README"), "host edit\n", 0o644)
	statusBefore := hostGit(t, repo, "status", "--porcelain")

	t0 = time.Now()
	out = mustBanger(t, h, "workspace", "pull", "w")
	t.Logf("MEASURE workspace pull: %v", time.Since(t0).Round(time.Millisecond))
	if !strings.Contains(out, "banger/w") {
		t.Errorf("pull output: %q", out)
	}
	if p := hostGit(t, repo, "rev-parse", "banger/w^"); p != hostHead {
		t.Errorf("banger/w's parent %s, want the host HEAD %s", p, hostHead)
	}
	if s := hostGit(t, repo, "show", "banger/w:README"); s != "guest" {
		t.Errorf("README on banger/w: %q", s)
	}
	if s := hostGit(t, repo, "show", "banger/w:new.txt"); s != "new" {
		t.Errorf("new.txt on banger/w: %q", s)
	}
	files := hostGit(t, repo, "ls-tree", "-r", "--name-only", "banger/w")
	if strings.Contains(files, "guest.log") || strings.Contains(files, "debug.log") {
		t.Errorf("ignored files on banger/w: %s", files)
	}
	if b := hostGit(t, repo, "symbolic-ref", "--short", "HEAD"); b != "feature" {
		t.Errorf("host branch is now %s", b)
	}
	if hh := hostGit(t, repo, "rev-parse", "HEAD"); hh != hostHead {
		t.Errorf("host HEAD moved to %s", hh)
	}
	if s := hostGit(t, repo, "status", "--porcelain"); s != statusBefore {
		t.Errorf("host status %q, was %q", s, statusBefore)
	}
	if b, _ := os.ReadFile(filepath.Join(repo, "README")); string(b) != "host edit\n" {
		t.Errorf("host README changed: %q", b)
	}
	st = mustBanger(t, h, "workspace", "status", "w", "-o", "json")
	if !strings.Contains(st, `"branch_matches": true`) && !strings.Contains(st, `"branch_matches":true`) {
		t.Errorf("status after pull: %s", st)
	}

	// a hostile guest: its .git asks host git to run a filter (through
	// extensions.worktreeConfig + config.worktree) and its config is a link
	// to a host file; pull runs nothing, writes nothing there, and still
	// brings the guest's edit back
	marker := filepath.Join(t.TempDir(), "ran")
	victim := filepath.Join(t.TempDir(), "victim")
	writeFile(t, victim, "precious\n", 0o644)
	os.Chmod(filepath.Dir(marker), 0o777)
	hostile := fmt.Sprintf(`cd /root/proj && printf '[core]\n\trepositoryformatversion = 1\n[extensions]\n\tworktreeConfig = true\n' > .git/config.real && `+
		`printf '[filter "x"]\n\tclean = touch %[1]s\n[core]\n\tfsmonitor = touch %[1]s\n' > .git/config.worktree && `+
		`echo '* filter=x' > .gitattributes && rm .git/config && ln -s %[2]s .git/config && echo hostile > README`, marker, victim)
	mustBanger(t, h, "exec", "w", "--", "sh", "-c", hostile)
	mustBanger(t, h, "workspace", "status", "w")
	mustBanger(t, h, "workspace", "pull", "w")
	if _, err := os.Lstat(marker); err == nil {
		t.Error("workspace pull ran a command the guest's .git chose")
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious\n" {
		t.Errorf("workspace pull wrote through the guest's .git/config link: %q", b)
	}
	if s := hostGit(t, repo, "show", "banger/w:README"); s != "hostile" {
		t.Errorf("README on banger/w after the hostile guest: %q", s)
	}

	// a bigger tree, pushed again by hand to another directory: measured
	big := filepath.Join(t.TempDir(), "big")
	os.Mkdir(big, 0o755)
	hostGit(t, big, "init", "-q", "-b", "main")
	for i := range 500 {
		writeFile(t, filepath.Join(big, "src", fmt.Sprintf("d%02d", i%20), fmt.Sprintf("f%03d.txt", i)), strings.Repeat(fmt.Sprintf("line %d\n", i), 200), 0o644)
	}
	blob := make([]byte, 16<<20)
	rand.Read(blob)
	if err := os.WriteFile(filepath.Join(big, "blob.bin"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	hostGit(t, big, "add", "-A")
	hostGit(t, big, "commit", "-q", "-m", "big")
	t0 = time.Now()
	_, errOut, code = banger(t, h, "workspace", "push", "w", big, "--dest", "/root/elsewhere")
	if code != 0 {
		t.Fatalf("workspace push --dest: exit %d: %s", code, errOut)
	}
	t.Logf("MEASURE workspace push of 500 small files + 16 MiB file (+ .git): %v; %s", time.Since(t0).Round(time.Millisecond), strings.TrimSpace(errOut))
	if out := mustBanger(t, h, "exec", "w", "--", "sh", "-c", "cd /root/elsewhere && ls src/d07 | wc -l && wc -c < blob.bin"); strings.Fields(out)[0] != "25" || strings.Fields(out)[1] != fmt.Sprint(16<<20) {
		t.Errorf("pushed tree in the guest: %q", out)
	}
	t0 = time.Now()
	out = mustBanger(t, h, "workspace", "pull", "w", "--repo", big, "--dest", "/root/elsewhere")
	t.Logf("MEASURE workspace pull of the same (no changes): %v: %s", time.Since(t0).Round(time.Millisecond), strings.TrimSpace(out))
	if hostGit(t, big, "rev-parse", "banger/w") != hostGit(t, big, "rev-parse", "main") {
		t.Error("a guest without changes should pull as the host's own HEAD")
	}
	t0 = time.Now()
	out = mustBanger(t, h, "workspace", "status", "w", "--repo", big, "--dest", "/root/elsewhere", "-o", "json")
	t.Logf("MEASURE workspace status of the same: %v", time.Since(t0).Round(time.Millisecond))
	if !strings.Contains(out, `"branch_matches": true`) || !strings.Contains(out, `"not_in_host": 0`) {
		t.Errorf("status after the pull: %s", out)
	}
}
