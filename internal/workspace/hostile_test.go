package workspace

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// treeDigest hashes every name, mode, link target and file content under
// dir, so a test can tell whether anything there changed.
func treeDigest(t *testing.T, dir string) string {
	t.Helper()
	h := sha256.New()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s %v %d\n", p, fi.Mode(), fi.ModTime().UnixNano())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			fmt.Fprintf(h, "-> %s\n", l)
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			h.Write(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// hostile is one way a guest tries to make host git run something or touch
// a host file through the workspace's .git.
type hostile struct {
	name string
	// plant edits the guest workspace g. marker is a path a command the
	// guest asks for would create; victim is a host directory (holding a
	// file "victim" and a repository "secret") nothing may change.
	plant func(t *testing.T, g, marker, victim string)
	// pullFails: the workspace has no usable history left, so pull must
	// fail (cleanly); otherwise it must still bring the guest's edit back.
	pullFails bool
}

func touch(marker string) string { return "touch " + marker }

func gitConfig(t *testing.T, g, extra string) {
	write(t, filepath.Join(g, ".git", "config"), "[core]\n\trepositoryformatversion = 0\n\tbare = false\n"+extra, 0o644)
}

func filterAttrs(t *testing.T, g string) {
	write(t, filepath.Join(g, ".gitattributes"), "* filter=x diff=x merge=x\n", 0o644)
}

var hostiles = []hostile{
	{name: "worktreeConfig extension and config.worktree filter", plant: func(t *testing.T, g, marker, _ string) {
		write(t, filepath.Join(g, ".git", "config"), "[core]\n\trepositoryformatversion = 1\n\tbare = false\n[extensions]\n\tworktreeConfig = true\n", 0o644)
		write(t, filepath.Join(g, ".git", "config.worktree"), "[filter \"x\"]\n\tclean = "+touch(marker)+"\n\tsmudge = "+touch(marker)+"\n\trequired\n[core]\n\tfsmonitor = "+touch(marker)+"\n", 0o644)
		filterAttrs(t, g)
	}},
	{name: "commondir pointing at an unsanitised config", plant: func(t *testing.T, g, marker, _ string) {
		common := filepath.Join(g, ".evil")
		copyTree(t, filepath.Join(g, ".git"), common)
		write(t, filepath.Join(common, "config"), "[core]\n\trepositoryformatversion = 0\n\tbare = false\n\tfsmonitor = "+touch(marker)+"\n[filter \"x\"]\n\tclean = "+touch(marker)+"\n", 0o644)
		write(t, filepath.Join(g, ".git", "commondir"), "../.evil\n", 0o644)
		filterAttrs(t, g)
	}},
	{name: "config is a symlink to a host file", plant: func(t *testing.T, g, _, victim string) {
		os.Remove(filepath.Join(g, ".git", "config"))
		symlink(t, filepath.Join(victim, "victim"), filepath.Join(g, ".git", "config"))
	}},
	{name: "include.path and includeIf", plant: func(t *testing.T, g, marker, _ string) {
		inc := filepath.Join(g, ".git", "evil.cfg")
		write(t, inc, "[core]\n\tfsmonitor = "+touch(marker)+"\n[filter \"x\"]\n\tclean = "+touch(marker)+"\n", 0o644)
		gitConfig(t, g, "[include]\n\tpath = evil.cfg\n[includeIf \"gitdir:/\"]\n\tpath = "+inc+"\n[includeIf \"onbranch:main\"]\n\tpath = "+inc+"\n")
		filterAttrs(t, g)
	}},
	{name: "core.hooksPath and hooks", plant: func(t *testing.T, g, marker, _ string) {
		hooks := filepath.Join(g, ".git", "evil-hooks")
		for _, dir := range []string{hooks, filepath.Join(g, ".git", "hooks")} {
			for _, h := range []string{"post-index-change", "reference-transaction", "pre-auto-gc", "post-checkout", "fsmonitor-watchman"} {
				write(t, filepath.Join(dir, h), "#!/bin/sh\n"+touch(marker)+"\n", 0o755)
			}
		}
		gitConfig(t, g, "\thooksPath = "+hooks+"\n")
	}},
	{name: "core.fsmonitor", plant: func(t *testing.T, g, marker, _ string) {
		gitConfig(t, g, "\tfsmonitor = "+touch(marker)+"\n")
	}},
	{name: "core.sshCommand and remote helpers", plant: func(t *testing.T, g, marker, _ string) {
		gitConfig(t, g, "\tsshCommand = "+touch(marker)+"\n\tgitProxy = "+touch(marker)+"\n\tpager = "+touch(marker)+"\n[remote \"origin\"]\n\turl = ext::sh -c "+touch(marker)+"\n[uploadpack]\n\tpackObjectsHook = "+touch(marker)+"\n")
	}},
	{name: "diff, textconv and merge drivers", plant: func(t *testing.T, g, marker, _ string) {
		gitConfig(t, g, "[diff \"x\"]\n\ttextconv = "+touch(marker)+"\n\tcommand = "+touch(marker)+"\n[merge \"x\"]\n\tdriver = "+touch(marker)+"\n[diff]\n\texternal = "+touch(marker)+"\n")
		filterAttrs(t, g)
	}},
	{name: "objects/info/alternates pointing at a host repository", plant: func(t *testing.T, g, _, victim string) {
		secret := filepath.Join(victim, "secret")
		write(t, filepath.Join(g, ".git", "objects", "info", "alternates"), filepath.Join(secret, ".git", "objects")+"\n", 0o644)
		// a guest ref at a commit only the host's other repository has
		write(t, filepath.Join(g, ".git", "refs", "heads", "leak"), run(t, secret, "rev-parse", "HEAD")+"\n", 0o644)
	}},
	{name: "objects/info/alternates is a symlink to a host file", plant: func(t *testing.T, g, _, victim string) {
		symlink(t, filepath.Join(victim, "victim"), filepath.Join(g, ".git", "objects", "info", "alternates"))
	}},
	{name: "nested .git symlink to a host repository", plant: func(t *testing.T, g, _, victim string) {
		write(t, filepath.Join(g, "sub", "file"), "sub\n", 0o644)
		symlink(t, filepath.Join(victim, "secret", ".git"), filepath.Join(g, "sub", ".git"))
	}},
	{name: "nested .git file", plant: func(t *testing.T, g, _, victim string) {
		write(t, filepath.Join(g, "sub", "file"), "sub\n", 0o644)
		write(t, filepath.Join(g, "sub", ".git"), "gitdir: "+filepath.Join(victim, "secret", ".git")+"\n", 0o644)
	}},
	{name: "info/attributes and info/grafts", plant: func(t *testing.T, g, marker, _ string) {
		write(t, filepath.Join(g, ".git", "info", "attributes"), "* filter=x\n", 0o644)
		write(t, filepath.Join(g, ".git", "info", "grafts"), strings.Repeat("0", 40)+"\n", 0o644)
		gitConfig(t, g, "[filter \"x\"]\n\tclean = "+touch(marker)+"\n")
	}},
	{name: "the workspace's .git is a symlink to a host repository", pullFails: true, plant: func(t *testing.T, g, _, victim string) {
		if err := os.RemoveAll(filepath.Join(g, ".git")); err != nil {
			t.Fatal(err)
		}
		symlink(t, filepath.Join(victim, "secret", ".git"), filepath.Join(g, ".git"))
	}},
	{name: "HEAD is a symlink", pullFails: true, plant: func(t *testing.T, g, _, victim string) {
		os.Remove(filepath.Join(g, ".git", "HEAD"))
		symlink(t, filepath.Join(victim, "secret", ".git", "HEAD"), filepath.Join(g, ".git", "HEAD"))
	}},
	{name: "refs/heads is a symlink to a host repository's refs", pullFails: true, plant: func(t *testing.T, g, _, victim string) {
		os.RemoveAll(filepath.Join(g, ".git", "refs", "heads"))
		symlink(t, filepath.Join(victim, "secret", ".git", "refs", "heads"), filepath.Join(g, ".git", "refs", "heads"))
	}},
}

func symlink(t *testing.T, target, p string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(to, 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(to, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// victimDir is host state outside the pull's temp dir: a file and another
// repository of the user's with a commit the guest's repository lacks.
func victimDir(t *testing.T) string {
	v := t.TempDir()
	write(t, filepath.Join(v, "victim"), "precious host file\n", 0o644)
	s := filepath.Join(v, "secret")
	os.Mkdir(s, 0o755)
	run(t, s, "init", "-q", "-b", "main")
	write(t, filepath.Join(s, "secret.txt"), "secret\n", 0o644)
	run(t, s, "add", "-A")
	run(t, s, "commit", "-q", "-m", "secret")
	return v
}

// TestHostileGuestGit: for every way a guest can dress up its .git, host
// git runs nothing the guest chose, no host file outside the pull's temp
// dir changes, and pull and status still bring the guest's work back. The
// same holds for PullTree (a streamed pull's in-place import), run last on
// the planted workspace itself, which it consumes, and for GetStatusTree
// (a streamed status's), run on a copy of it.
func TestHostileGuestGit(t *testing.T) {
	for _, tc := range hostiles {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			r := hostRepo(t)
			g := pushed(t, r)
			victim := victimDir(t)
			secretHead := run(t, filepath.Join(victim, "secret"), "rev-parse", "HEAD")
			marker := filepath.Join(t.TempDir(), "ran")
			write(t, filepath.Join(g, "README"), "guest edit\n", 0o644)
			tc.plant(t, g, marker, victim)
			before := treeDigest(t, victim)
			hostConfig, _ := os.ReadFile(filepath.Join(r, ".git", "config"))

			st, serr := GetStatus(ctx, LocalFS{}, g, r, "w", t.TempDir())
			res, perr := Pull(ctx, LocalFS{}, g, r, "w", t.TempDir())
			gc := filepath.Join(t.TempDir(), "copy")
			if out, err := exec.Command("cp", "-a", g, gc).CombinedOutput(); err != nil {
				t.Fatalf("cp -a: %v: %s", err, out)
			}
			st2, serr2 := GetStatusTree(ctx, gc, r, "w", t.TempDir())
			res2, perr2 := PullTree(ctx, g, r, "w2", t.TempDir())

			if _, err := os.Lstat(marker); err == nil {
				t.Error("host git ran a command the guest chose")
			}
			if after := treeDigest(t, victim); after != before {
				b, _ := os.ReadFile(filepath.Join(victim, "victim"))
				t.Errorf("a host file outside the pull's temp dir changed (victim now %q)", b)
			}
			if c, _ := os.ReadFile(filepath.Join(r, ".git", "config")); string(c) != string(hostConfig) {
				t.Errorf("the host repository's config changed:\n%s", c)
			}
			if _, err := git(ctx, r, nil, nil, "cat-file", "-e", secretHead); err == nil {
				t.Error("an object of another host repository reached the host repository")
			}
			if tc.pullFails {
				if perr == nil || serr == nil || perr2 == nil || serr2 == nil {
					t.Errorf("pull (%v), PullTree (%v), status (%v) and GetStatusTree (%v) must fail", perr, perr2, serr, serr2)
				}
				return
			}
			if serr != nil || perr != nil || perr2 != nil || serr2 != nil {
				t.Fatalf("status: %v; pull: %v; PullTree: %v; GetStatusTree: %v", serr, perr, perr2, serr2)
			}
			// (Pull ran between the two and made banger/w)
			if st2.GuestHead != st.GuestHead || st2.GuestBranch != st.GuestBranch || st2.NotInHost != st.NotInHost {
				t.Errorf("GetStatusTree %+v, GetStatus %+v", st2, st)
			}
			if t2, t1 := run(t, r, "rev-parse", res2.Commit+"^{tree}"), run(t, r, "rev-parse", res.Commit+"^{tree}"); t2 != t1 || res2.GuestHead != res.GuestHead {
				t.Errorf("PullTree made tree %s on %s, Pull tree %s on %s", t2, res2.GuestHead, t1, res.GuestHead)
			}
			if st.GuestBranch != "main" || st.GuestHead == "" {
				t.Errorf("status %+v", st)
			}
			if b := run(t, r, "show", res.Branch+":README"); b != "guest edit" {
				t.Errorf("README on %s: %q", res.Branch, b)
			}
			for _, br := range []string{res.Branch, res2.Branch} {
				if tree := run(t, r, "ls-tree", "-r", br); strings.Contains(tree, "160000") {
					t.Errorf("a nested repository became a gitlink on %s:\n%s", br, tree)
				}
			}
		})
	}
}
