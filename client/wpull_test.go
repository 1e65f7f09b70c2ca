package client

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/workspace"
)

// receiveBuilt runs receiveTree (1 MiB, 100 entries, offered) into a new
// directory dst on the stream build writes, ended by FrameEOF.
func receiveBuilt(t *testing.T, build func(*bytes.Buffer), offered map[string]workspace.HostFile) (dst string, got map[string]workspace.HostFile, err error) {
	t.Helper()
	var b bytes.Buffer
	build(&b)
	bulk.WriteFrame(&b, bulk.FrameEOF, nil)
	dst = filepath.Join(t.TempDir(), "copy")
	os.Mkdir(dst, 0o700)
	got, err = receiveTree(&b, dst, 1<<20, 100, offered)
	return dst, got, err
}

func TestPackRoundTrip(t *testing.T) {
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "d/e"), 0o755)
	os.WriteFile(filepath.Join(src, "d/e/f"), bytes.Repeat([]byte("x"), 300<<10), 0o640)
	os.WriteFile(filepath.Join(src, "top"), []byte("t"), 0o755)
	os.Symlink("../../etc/passwd", filepath.Join(src, "d/link"))
	var haves, b bytes.Buffer
	bulk.WriteHaves(&haves, nil)
	if err := bulk.ServePull(&b, &haves, src, 0); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "copy")
	os.Mkdir(dst, 0o700)
	if _, err := receiveTree(&b, dst, 1<<30, 100, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(dst, "d/e/f")); len(got) != 300<<10 {
		t.Fatalf("d/e/f: %d bytes", len(got))
	}
	if fi, _ := os.Stat(filepath.Join(dst, "top")); fi.Mode().Perm() != 0o755 {
		t.Fatalf("top mode %v", fi.Mode())
	}
	if l, _ := os.Readlink(filepath.Join(dst, "d/link")); l != "../../etc/passwd" {
		t.Fatalf("link: %q", l)
	}
}

// TestReceiveTreeHostile plays a guest sending its workspace: bad names,
// a link then a directory (or file) below it, oversized frames, more data
// than announced, a file over the bound. Each is refused and nothing
// outside the destination changes.
func TestReceiveTreeHostile(t *testing.T) {
	req := func(b *bytes.Buffer, kind string, e bulk.SyncEntry) {
		bulk.WriteFrame(b, bulk.FrameRequest, ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(&e)}))
	}
	root := t.TempDir()
	outside := filepath.Join(root, "outside")
	os.Mkdir(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "keep"), []byte("keep"), 0o644)
	cases := map[string]func(b *bytes.Buffer){
		"dot-dot": func(b *bytes.Buffer) {
			req(b, bulk.PackFile, bulk.SyncEntry{Rel: "../outside/keep", Size: 1})
			bulk.WriteFrame(b, bulk.FrameData, []byte("x"))
		},
		"absolute":      func(b *bytes.Buffer) { req(b, bulk.PackDir, bulk.SyncEntry{Rel: outside + "/d"}) },
		"inner dot-dot": func(b *bytes.Buffer) { req(b, bulk.PackDir, bulk.SyncEntry{Rel: "a/../../outside/d"}) },
		"link then dir": func(b *bytes.Buffer) {
			req(b, bulk.PackLink, bulk.SyncEntry{Rel: "l", Target: outside})
			req(b, bulk.PackDir, bulk.SyncEntry{Rel: "l"})
		},
		"link then file below": func(b *bytes.Buffer) {
			req(b, bulk.PackLink, bulk.SyncEntry{Rel: "l", Target: outside})
			req(b, bulk.PackFile, bulk.SyncEntry{Rel: "l/keep", Size: 4})
			bulk.WriteFrame(b, bulk.FrameData, []byte("evil"))
		},
		"link over a file": func(b *bytes.Buffer) {
			req(b, bulk.PackFile, bulk.SyncEntry{Rel: "f", Size: 0})
			req(b, bulk.PackLink, bulk.SyncEntry{Rel: "f", Target: outside + "/keep"})
		},
		"more data than announced": func(b *bytes.Buffer) {
			req(b, bulk.PackFile, bulk.SyncEntry{Rel: "f", Size: 2})
			bulk.WriteFrame(b, bulk.FrameData, []byte("xyz"))
		},
		"over the bound": func(b *bytes.Buffer) { req(b, bulk.PackFile, bulk.SyncEntry{Rel: "f", Size: 1 << 40}) },
		"oversized frame": func(b *bytes.Buffer) {
			var h [5]byte
			h[0] = bulk.FrameRequest
			binary.BigEndian.PutUint32(h[1:], bulk.MaxFrame+1)
			b.Write(h[:])
		},
		"unknown type": func(b *bytes.Buffer) { req(b, "c", bulk.SyncEntry{Rel: "dev"}) },
		"truncated":    func(b *bytes.Buffer) { req(b, bulk.PackFile, bulk.SyncEntry{Rel: "f", Size: 10}) },
	}
	for name, build := range cases {
		t.Run(name, func(t *testing.T) {
			if _, _, err := receiveBuilt(t, build, nil); err == nil {
				t.Fatal("accepted")
			}
			if got, _ := os.ReadFile(filepath.Join(outside, "keep")); string(got) != "keep" {
				t.Fatalf("outside/keep changed: %q", got)
			}
			if ents, _ := os.ReadDir(outside); len(ents) != 1 {
				t.Fatalf("outside has %d entries", len(ents))
			}
		})
	}
	_ = strings.Repeat
}

func gitT(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", append([]string{"-c", "user.name=t", "-c", "user.email=t@example.invalid"}, args...)...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %v: %v: %s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestPullAfterPushSendsLittle: after a push (the guest's copy has the
// host's files with their mtimes and modes, and the host's .git), a pull
// moves only what the host lacks: the guest's commit and its objects, the
// files it changed, a few refs; the files and objects the host has stay in
// the guest. The commit it makes is the one a pull of the whole tree makes.
func TestPullAfterPushSendsLittle(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	ctx := context.Background()
	host := filepath.Join(t.TempDir(), "repo")
	buf := make([]byte, 64<<10)
	const files = 20
	for i := range files {
		rand.Read(buf)
		p := filepath.Join(host, fmt.Sprintf("d%d", i%3), fmt.Sprintf("f%02d", i))
		os.MkdirAll(filepath.Dir(p), 0o755)
		mode := os.FileMode(0o644)
		if i == 1 {
			mode = 0o755
		}
		if err := os.WriteFile(p, buf, mode); err != nil {
			t.Fatal(err)
		}
	}
	gitT(t, host, "init", "-q", "-b", "main")
	gitT(t, host, "add", "-A")
	gitT(t, host, "commit", "-q", "-m", "host")
	guest := filepath.Join(t.TempDir(), "ws")
	if out, err := exec.Command("cp", "-a", host, guest).CombinedOutput(); err != nil {
		t.Fatalf("cp -a: %v: %s", err, out)
	}
	pull := func(vm string) (*workspace.PullResult, map[string]workspace.HostFile) {
		t.Helper()
		haves, err := workspace.PullHaves(ctx, host)
		if err != nil {
			t.Fatal(err)
		}
		var in, out bytes.Buffer
		if err := bulk.WriteHaves(&in, haves.List); err != nil {
			t.Fatal(err)
		}
		if err := bulk.ServePull(&out, &in, guest, 0); err != nil {
			t.Fatal(err)
		}
		t.Logf("the guest sent %d bytes", out.Len())
		if sent := out.Len(); sent > 32<<10 {
			t.Fatalf("the guest sent %d bytes after a push; want at most 32 KiB (its files alone are %d)", sent, files*len(buf))
		}
		cp := filepath.Join(t.TempDir(), "copy")
		os.Mkdir(cp, 0o700)
		same, err := receiveTree(&out, cp, 1<<30, 1<<20, haves.Files)
		if err != nil {
			t.Fatal(err)
		}
		res, err := workspace.PullTreeSame(ctx, cp, host, vm, t.TempDir(), same)
		if err != nil {
			t.Fatal(err)
		}
		return res, same
	}
	// nothing changed in the guest: every file stays there, and the
	// branch is the host's own commit
	res, same := pull("vm0")
	if head := gitT(t, host, "rev-parse", "HEAD"); res.Commit != head || res.Uncommitted || len(same) != files {
		t.Fatalf("a pull of an unchanged guest: %+v, %d files the host's; want HEAD %s, all %d", res, len(same), head, files)
	}

	// the guest commits one change, leaves another uncommitted, adds a
	// file, and holds a nested repository the host must never receive
	os.WriteFile(filepath.Join(guest, "d0", "f00"), []byte("guest commit\n"), 0o644)
	gitT(t, guest, "commit", "-q", "-am", "guest")
	os.WriteFile(filepath.Join(guest, "d1", "f01"), []byte("guest edit\n"), 0o755)
	os.WriteFile(filepath.Join(guest, "new"), []byte("new\n"), 0o644)
	os.MkdirAll(filepath.Join(guest, "sub", ".git"), 0o755)
	os.WriteFile(filepath.Join(guest, "sub", ".git", "config"), bytes.Repeat([]byte("x"), 64<<10), 0o644)
	full := filepath.Join(t.TempDir(), "full")
	if out, err := exec.Command("cp", "-a", guest, full).CombinedOutput(); err != nil {
		t.Fatalf("cp -a: %v: %s", err, out)
	}
	res, same = pull("vm")
	if len(same) != files-2 {
		t.Fatalf("%d files left in the guest as the host's, want %d", len(same), files-2)
	}
	ref, err := workspace.PullTree(ctx, full, host, "ref", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if a, b := gitT(t, host, "rev-parse", res.Commit+"^{tree}"), gitT(t, host, "rev-parse", ref.Commit+"^{tree}"); a != b || res.GuestHead != ref.GuestHead || !res.Uncommitted {
		t.Fatalf("pull made tree %s on %s, a pull of the whole tree %s on %s", a, res.GuestHead, b, ref.GuestHead)
	}
	if got := gitT(t, host, "show", "banger/vm~1:d0/f00"); got != "guest commit" {
		t.Fatalf("d0/f00 in the guest's commit: %q", got)
	}
	if got := gitT(t, host, "ls-tree", "banger/vm", "d1/f01", "new"); !strings.Contains(got, "100755") || !strings.Contains(got, "new") {
		t.Fatalf("uncommitted work: %s", got)
	}

	// status streams the guest's .git alone, without the host's objects
	haves, err := workspace.ObjectHaves(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	var in, out bytes.Buffer
	bulk.WriteHaves(&in, haves.List)
	if err := bulk.ServePull(&out, &in, guest, bulk.PullGitOnly); err != nil {
		t.Fatal(err)
	}
	if out.Len() > 16<<10 {
		t.Fatalf("a status stream of %d bytes; want at most 16 KiB", out.Len())
	}
	cp := filepath.Join(t.TempDir(), "copy")
	os.Mkdir(cp, 0o700)
	if _, err := receiveTree(&out, cp, 1<<30, 1<<20, haves.Files); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(cp); len(ents) != 1 || ents[0].Name() != ".git" {
		t.Fatalf("a status stream brought %v", ents)
	}
	st, err := workspace.GetStatusTree(ctx, cp, host, "vm", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if st.GuestHead != res.GuestHead || st.NotInHost != 0 || st.GuestBranch != "main" || !st.BranchMatches {
		t.Fatalf("status %+v; the pull brought %s", st, res.GuestHead)
	}
}

// TestReceiveTreeHostileSame plays a guest abusing "the host has this
// file" (bulk.PackSame): naming a file the host never offered, twice, one
// it also sent, something at or below it, or one without its directory.
// Each is refused; an honest stream is accepted.
func TestReceiveTreeHostileSame(t *testing.T) {
	req := func(b *bytes.Buffer, kind string, e bulk.SyncEntry) {
		bulk.WriteFrame(b, bulk.FrameRequest, ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(&e)}))
	}
	oid := strings.Repeat("a", 40)
	offered := map[string]workspace.HostFile{"f": {Mode: "100644", OID: oid}, "d/g": {Mode: "100755", OID: oid}}
	outside := t.TempDir()
	same := func(rel string) func(b *bytes.Buffer) {
		return func(b *bytes.Buffer) { req(b, bulk.PackSame, bulk.SyncEntry{Rel: rel}) }
	}
	seq := func(fs ...func(b *bytes.Buffer)) func(b *bytes.Buffer) {
		return func(b *bytes.Buffer) {
			for _, f := range fs {
				f(b)
			}
		}
	}
	file := func(rel string) func(b *bytes.Buffer) {
		return func(b *bytes.Buffer) { req(b, bulk.PackFile, bulk.SyncEntry{Rel: rel}) }
	}
	dir := func(rel string) func(b *bytes.Buffer) {
		return func(b *bytes.Buffer) { req(b, bulk.PackDir, bulk.SyncEntry{Rel: rel, Mode: 0o755}) }
	}
	link := func(rel, to string) func(b *bytes.Buffer) {
		return func(b *bytes.Buffer) { req(b, bulk.PackLink, bulk.SyncEntry{Rel: rel, Target: to}) }
	}
	cases := map[string]func(b *bytes.Buffer){
		"not offered":       same("x"),
		"bad name":          same("../f"),
		"twice":             seq(same("f"), same("f")),
		"sent, then same":   seq(file("f"), same("f")),
		"same, then sent":   seq(same("f"), file("f")),
		"same, then a link": seq(same("f"), link("f", outside)),
		"dir below it":      seq(same("f"), dir("f/x")),
		"no directory":      same("d/g"),
		"under a link":      seq(link("d", outside), same("d/g")),
		"a dir, then same":  seq(dir("d"), dir("d/g"), same("d/g")),
	}
	for name, build := range cases {
		t.Run(name, func(t *testing.T) {
			if _, got, err := receiveBuilt(t, build, offered); err == nil {
				t.Fatalf("accepted: %v", got)
			}
			if ents, _ := os.ReadDir(outside); len(ents) != 0 {
				t.Fatalf("outside has %d entries", len(ents))
			}
		})
	}
	dst, got, err := receiveBuilt(t, seq(dir("d"), same("d/g"), same("f")), offered)
	if err != nil || len(got) != 2 || got["d/g"].Mode != "100755" {
		t.Fatalf("an honest stream: %v %v", got, err)
	}
	if _, err := os.Lstat(filepath.Join(dst, "f")); err == nil {
		t.Fatal("a file the guest left out was written")
	}
}

// FuzzReceiveTree: whatever a guest streams, receiveTree writes nothing
// outside its root, and every file it takes as the host's is one the host
// offered.
func FuzzReceiveTree(f *testing.F) {
	req := func(b *bytes.Buffer, kind string, e bulk.SyncEntry) {
		bulk.WriteFrame(b, bulk.FrameRequest, ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(&e)}))
	}
	var b bytes.Buffer
	req(&b, bulk.PackDir, bulk.SyncEntry{Rel: "d", Mode: 0o755})
	req(&b, bulk.PackSame, bulk.SyncEntry{Rel: "d/g"})
	req(&b, bulk.PackFile, bulk.SyncEntry{Rel: "d/f", Size: 3})
	bulk.WriteFrame(&b, bulk.FrameData, []byte("abc"))
	req(&b, bulk.PackLink, bulk.SyncEntry{Rel: "l", Target: "../outside"})
	req(&b, bulk.PackSame, bulk.SyncEntry{Rel: "f"})
	bulk.WriteFrame(&b, bulk.FrameEOF, nil)
	f.Add(b.Bytes())
	b.Reset()
	req(&b, bulk.PackLink, bulk.SyncEntry{Rel: "d", Target: "../outside"})
	req(&b, bulk.PackFile, bulk.SyncEntry{Rel: "d/g", Size: 1})
	bulk.WriteFrame(&b, bulk.FrameData, []byte("x"))
	req(&b, bulk.PackSame, bulk.SyncEntry{Rel: "d/g"})
	bulk.WriteFrame(&b, bulk.FrameEOF, nil)
	f.Add(b.Bytes())
	offered := map[string]workspace.HostFile{"f": {Mode: "100644"}, "d/g": {Mode: "100755"}}
	f.Fuzz(func(t *testing.T, stream []byte) {
		tmp := t.TempDir()
		root, outside := filepath.Join(tmp, "root"), filepath.Join(tmp, "outside")
		os.Mkdir(root, 0o700)
		os.Mkdir(outside, 0o755)
		same, err := receiveTree(bytes.NewReader(stream), root, 1<<20, 64, offered)
		if err == nil {
			for rel := range same {
				if _, ok := offered[rel]; !ok {
					t.Fatalf("took %q as the host's file, never offered", rel)
				}
			}
		}
		if ents, _ := os.ReadDir(outside); len(ents) != 0 {
			t.Fatalf("wrote %s outside the root", ents[0].Name())
		}
		if ents, _ := os.ReadDir(tmp); len(ents) != 2 {
			t.Fatalf("the temp dir holds %d entries", len(ents))
		}
	})
}
