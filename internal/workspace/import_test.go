package workspace

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// guestGitCopy is a copy of a real repository's .git (two commits, loose
// and packed objects, packed and loose refs, an annotated tag) to corrupt.
func guestGitCopy(t *testing.T) (gitDir, head string) {
	t.Helper()
	r := hostRepo(t)
	run(t, r, "tag", "-a", "-m", "tag", "v1")
	run(t, r, "branch", "other", "HEAD^")
	run(t, r, "gc", "-q")
	write(t, filepath.Join(r, "late.txt"), "late\n", 0o644)
	run(t, r, "add", "late.txt")
	run(t, r, "commit", "-q", "-m", "third (loose objects)")
	d := filepath.Join(t.TempDir(), "git")
	copyTree(t, filepath.Join(r, ".git"), d)
	return d, run(t, r, "rev-parse", "HEAD")
}

func TestImportGuestGit(t *testing.T) {
	ctx := context.Background()
	gd, head := guestGitCopy(t)
	into := filepath.Join(t.TempDir(), "import.git")
	r, err := importGuestGit(ctx, gd, into, "sha1", "", false)
	if err != nil {
		t.Fatal(err)
	}
	if r.Head != head || r.Branch != "refs/heads/main" {
		t.Errorf("imported %+v, want HEAD %s on refs/heads/main", r, head)
	}
	env := []string{"GIT_DIR=" + into}
	if out, err := git(ctx, into, env, nil, "for-each-ref", "--format=%(refname)"); err != nil || out != "refs/heads/main\nrefs/heads/other\nrefs/tags/v1" {
		t.Errorf("refs %q %v", out, err)
	}
	if _, err := git(ctx, into, env, nil, "fsck", "--no-dangling", "--strict"); err != nil {
		t.Errorf("imported repository: %v", err)
	}
	for _, never := range []string{"config.worktree", "hooks", "info", "logs", "index", "objects/info/alternates"} {
		if _, err := os.Lstat(filepath.Join(into, never)); err == nil {
			t.Errorf("%s was imported", never)
		}
	}
}

func TestImportGuestGitRefuses(t *testing.T) {
	ctx := context.Background()
	loose := func(gd string) string { // one loose object's path
		var p string
		filepath.WalkDir(filepath.Join(gd, "objects"), func(q string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() && len(filepath.Base(filepath.Dir(q))) == 2 {
				p = q
			}
			return nil
		})
		return p
	}
	pack := func(gd string, ext string) string {
		m, _ := filepath.Glob(filepath.Join(gd, "objects", "pack", "pack-*"+ext))
		return m[0]
	}
	replace := func(t *testing.T, p string, f func(p string)) {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		f(p)
	}
	tests := []struct {
		name    string
		corrupt func(t *testing.T, gd string)
		want    string // in the error
	}{
		{"loose object is a symlink", func(t *testing.T, gd string) {
			replace(t, loose(gd), func(p string) { symlink(t, "/etc/passwd", p) })
		}, "symbolic link"},
		{"loose object is not an object", func(t *testing.T, gd string) {
			replace(t, loose(gd), func(p string) { write(t, p, "[core]\n", 0o444) })
		}, "not a git object"},
		{"loose object directory is a symlink", func(t *testing.T, gd string) {
			d := filepath.Dir(loose(gd))
			os.RemoveAll(d)
			symlink(t, "/tmp", d)
		}, "symbolic link"},
		{"pack is a symlink", func(t *testing.T, gd string) {
			replace(t, pack(gd, ".pack"), func(p string) { symlink(t, "/etc/passwd", p) })
		}, "symbolic link"},
		{"pack index is not an index", func(t *testing.T, gd string) {
			replace(t, pack(gd, ".idx"), func(p string) { write(t, p, "nope", 0o444) })
		}, "not a git pack index"},
		{"pack is not a pack", func(t *testing.T, gd string) {
			replace(t, pack(gd, ".pack"), func(p string) { write(t, p, "PACK\x00\x00\x00\x09", 0o444) })
		}, "not a git pack"},
		{"objects is a symlink", func(t *testing.T, gd string) {
			os.RemoveAll(filepath.Join(gd, "objects"))
			symlink(t, "/tmp", filepath.Join(gd, "objects"))
		}, "not a directory"},
		{"HEAD names a bad ref", func(t *testing.T, gd string) {
			write(t, filepath.Join(gd, "HEAD"), "ref: refs/heads/../../config\n", 0o644)
		}, "no valid ref name"},
		{"HEAD points outside refs/", func(t *testing.T, gd string) {
			write(t, filepath.Join(gd, "HEAD"), "ref: config/x\n", 0o644)
		}, "no valid ref name"},
		{"HEAD is garbage", func(t *testing.T, gd string) {
			write(t, filepath.Join(gd, "HEAD"), "gitdir: /etc\n", 0o644)
		}, "neither"},
		{"HEAD is missing", func(t *testing.T, gd string) {
			os.Remove(filepath.Join(gd, "HEAD"))
		}, "missing"},
		{"HEAD is too large", func(t *testing.T, gd string) {
			write(t, filepath.Join(gd, "HEAD"), strings.Repeat("a", maxRefFile+1), 0o644)
		}, "larger than"},
		{"HEAD is a commit the repository lacks", func(t *testing.T, gd string) {
			write(t, filepath.Join(gd, "HEAD"), strings.Repeat("ab", 20)+"\n", 0o644)
		}, "not a commit"},
		{"HEAD is a SHA-256 id in a SHA-1 repository", func(t *testing.T, gd string) {
			write(t, filepath.Join(gd, "HEAD"), strings.Repeat("ab", 32)+"\n", 0o644)
		}, "neither"},
		{"packed-refs has a bad line", func(t *testing.T, gd string) {
			write(t, filepath.Join(gd, "packed-refs"), "# pack-refs with: peeled\n"+"[include]\n", 0o644)
		}, "packed-refs"},
		{"packed-refs is a symlink", func(t *testing.T, gd string) {
			replace(t, filepath.Join(gd, "packed-refs"), func(p string) { symlink(t, "/etc/passwd", p) })
		}, "symbolic link"},
		{"a ref is a symlink", func(t *testing.T, gd string) {
			symlink(t, "/etc/passwd", filepath.Join(gd, "refs", "heads", "evil"))
		}, "symbolic link"},
		{"a ref is a fifo", func(t *testing.T, gd string) {
			if err := syscall.Mkfifo(filepath.Join(gd, "refs", "heads", "fifo"), 0o644); err != nil {
				t.Fatal(err)
			}
		}, "special file"},
		{"shallow is not a list of ids", func(t *testing.T, gd string) {
			write(t, filepath.Join(gd, "shallow"), "/etc/passwd\n", 0o644)
		}, "shallow"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			gd, _ := guestGitCopy(t)
			tc.corrupt(t, gd)
			_, err := importGuestGit(ctx, gd, filepath.Join(t.TempDir(), "import.git"), "sha1", "", false)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("import: %v, want an error with %q", err, tc.want)
			}
		})
	}
}

// Refs git would ignore are skipped, not fatal.
func TestImportGuestGitSkipsBadRefs(t *testing.T) {
	ctx := context.Background()
	gd, head := guestGitCopy(t)
	for _, n := range []string{"bad..name", "x.lock", ".hidden", "sym", "broken"} {
		write(t, filepath.Join(gd, "refs", "heads", n), head+"\n", 0o644)
	}
	write(t, filepath.Join(gd, "refs", "heads", "sym"), "ref: refs/heads/main\n", 0o644)
	write(t, filepath.Join(gd, "refs", "heads", "broken"), "not an id\n", 0o644)
	write(t, filepath.Join(gd, "refs", "replace", head), strings.Repeat("ab", 20)+"\n", 0o644)
	b, _ := os.ReadFile(filepath.Join(gd, "packed-refs"))
	write(t, filepath.Join(gd, "packed-refs"), string(b)+head+" refs/heads/a b\n"+head+" refs/replace/"+head+"\n"+head+" HEAD\n", 0o644)
	into := filepath.Join(t.TempDir(), "import.git")
	r, err := importGuestGit(ctx, gd, into, "sha1", "", false)
	if err != nil {
		t.Fatal(err)
	}
	out, err := git(ctx, into, []string{"GIT_DIR=" + into}, nil, "for-each-ref", "--format=%(refname)")
	if err != nil || out != "refs/heads/main\nrefs/heads/other\nrefs/tags/v1" || r.Refs != 3 {
		t.Errorf("refs %q (%d) %v", out, r.Refs, err)
	}
}

func TestPullSHA256(t *testing.T) {
	requireGit(t)
	r := filepath.Join(t.TempDir(), "proj")
	os.Mkdir(r, 0o755)
	run(t, r, "init", "-q", "-b", "main", "--object-format=sha256")
	write(t, filepath.Join(r, "a"), "a\n", 0o644)
	run(t, r, "add", "-A")
	run(t, r, "commit", "-q", "-m", "first")
	g := pushed(t, r)
	write(t, filepath.Join(g, "a"), "guest\n", 0o644)
	ctx := context.Background()
	res, err := Pull(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Commit) != 64 || run(t, r, "show", "banger/w:a") != "guest" {
		t.Errorf("pull %+v", res)
	}
	st, err := GetStatus(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil || !st.BranchMatches || st.NotInHost != 0 {
		t.Errorf("status %+v %v", st, err)
	}
}

// FuzzGuestGitParsers feeds arbitrary bytes to the parsers of guest-written
// git files: packed-refs, and the loose object, pack and index headers.
// Whatever they accept is well formed.
func FuzzGuestGitParsers(f *testing.F) {
	id := strings.Repeat("ab", 20)
	f.Add([]byte("# pack-refs with: peeled fully-peeled sorted \n" + id + " refs/heads/main\n^" + id + "\n"))
	f.Add([]byte(id + " refs/heads/a..b\n" + id + " HEAD\n"))
	f.Add([]byte("x\x9c\x4b\xca\xc9\x4f\x52\x30\x60\x00\x00\x0b\x2c\x02\x15"))
	f.Add([]byte("PACK\x00\x00\x00\x02\x00\x00\x00\x01"))
	f.Add([]byte("\xfftOc\x00\x00\x00\x02"))
	f.Fuzz(func(t *testing.T, b []byte) {
		im := &importer{hexLen: 40}
		refs := map[string]string{}
		if err := im.parsePackedRefs(b, refs); err == nil {
			for name, oid := range refs {
				if !CheckRefName(name) || !strings.HasPrefix(name, "refs/") || strings.HasPrefix(name, "refs/replace/") || !checkOID(oid, 40) {
					t.Fatalf("packed-refs %q gave ref %q -> %q", b, name, oid)
				}
				if !strings.Contains(string(b), oid+" "+name+"\n") {
					t.Fatalf("ref %q -> %q is not a line of %q", name, oid, b)
				}
			}
		}
		if checkPack(b) == nil && (len(b) < 8 || string(b[:4]) != "PACK") {
			t.Fatalf("checkPack accepted %q", b)
		}
		if checkIdx(b) == nil && (len(b) < 8 || string(b[:4]) != "\xfftOc") {
			t.Fatalf("checkIdx accepted %q", b)
		}
		checkLoose(b) // must not panic or hang
	})
}

// A host clone made with --shared keeps its objects in another repository;
// the guest's copy of its .git has none of them. Pull and status borrow the
// host repository's own objects (never the guest's alternates).
func TestPullSharedClone(t *testing.T) {
	origin := hostRepo(t)
	r := filepath.Join(t.TempDir(), "shared")
	run(t, filepath.Dir(r), "clone", "-q", "--shared", origin, r)
	g := pushed(t, r)
	if err := os.Remove(filepath.Join(g, ".git", "objects", "info", "alternates")); err != nil {
		t.Fatal(err) // a real guest cannot reach the host's path anyway
	}
	write(t, filepath.Join(g, "README"), "guest\n", 0o644)
	ctx := context.Background()
	res, err := Pull(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if run(t, r, "show", res.Branch+":README") != "guest" || res.GuestHead != run(t, r, "rev-parse", "HEAD") {
		t.Errorf("pull %+v", res)
	}
	st, err := GetStatus(ctx, LocalFS{}, g, r, "w", t.TempDir())
	if err != nil || st.NotInHost != 0 || !st.BranchMatches {
		t.Errorf("status %+v %v", st, err)
	}
}

// git compresses the tree of a directory of 100 files with dynamic Huffman
// codes: their tables come before the first inflated byte, so the check must
// see more than a few dozen compressed bytes (64 were too few: pulls of such
// repositories were refused as "not a git object").
func TestCheckLooseLargeTree(t *testing.T) {
	r := t.TempDir()
	run(t, r, "init", "-q")
	rnd := make([]byte, 32)
	for i := 0; i < 100; i++ {
		rand.Read(rnd)
		write(t, filepath.Join(r, "d", fmt.Sprintf("f%03d.txt", i)), fmt.Sprintf("%x\n", rnd), 0o644)
	}
	run(t, r, "add", "-A")
	run(t, r, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "x")
	tree := strings.TrimSpace(run(t, r, "rev-parse", "HEAD:d"))
	f, err := os.Open(filepath.Join(r, ".git", "objects", tree[:2], tree[2:]))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	head := make([]byte, looseCheckBytes)
	n, _ := io.ReadFull(f, head)
	if err := checkLoose(head[:n]); err != nil {
		t.Fatalf("git's own tree object is refused: %v", err)
	}
}
