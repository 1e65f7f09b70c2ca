package image

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The reproductions of security review item 1: a name in a layer must never
// become a debugfs command. debugfs reads its -f script 8 KiB at a time, so a
// long line used to split, and a piece starting with '!' ran a shell. Each
// payload runs "cd; touch pwned" (no slash, so it fits in one path
// component) with HOME pointing at a fresh directory: the marker appearing
// there means a host command ran.

func requireE2fsprogs(t *testing.T) {
	t.Helper()
	for _, n := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := tool(n); err != nil {
			t.Skipf("e2fsprogs not installed: %v", err)
		}
	}
}

// buildLayer applies es as one layer and builds the image; it returns the
// error of whichever step failed.
func buildLayer(t *testing.T, dir string, es ...entry) error {
	t.Helper()
	tr, err := NewTree(filepath.Join(dir, "stage"))
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.ApplyLayer(bytes.NewReader(layerTar(t, es...))); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = tr.BuildExt4(ctx, filepath.Join(dir, "rootfs.ext4"), BuildOptions{HeadroomMiB: 4})
	return err
}

func assertNoShell(t *testing.T, home string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(home, "pwned")); err == nil {
		t.Fatal("a name in a layer ran a command on the host (marker file created)")
	}
}

// TestLongFifoNameRunsNoCommand: a FIFO (never staged on disk, so its name
// had no length limit) named "A"*8184 + "!cmd;#".
func TestLongFifoNameRunsNoCommand(t *testing.T) {
	requireE2fsprogs(t)
	home := t.TempDir()
	t.Setenv("HOME", home)
	// `mknod "` + 8184 bytes fill fgets' 8191: the next read starts at '!'.
	err := buildLayer(t, t.TempDir(), entry{name: strings.Repeat("A", 8184) + "!cd;touch pwned;#", typ: tar.TypeFifo, mode: 0o644})
	assertNoShell(t, home)
	if err == nil {
		t.Fatal("a FIFO name longer than 255 bytes was accepted")
	}
	t.Logf("refused: %.200v", err)
}

// TestLongXattrNameRunsNoCommand: an xattr name of the same shape (tab
// instead of space, which the old check refused).
func TestLongXattrNameRunsNoCommand(t *testing.T) {
	requireE2fsprogs(t)
	home := t.TempDir()
	t.Setenv("HOME", home)
	dir := t.TempDir()
	// The line was `ea_set -f "<dir>/xattrs/1" "/f" user.BBB…`: pad so that
	// fgets' 8191 bytes end just before the '!'.
	prefix := len(`ea_set -f "` + filepath.Join(dir, "xattrs", "1") + `" "/f" user.`)
	name := "user." + strings.Repeat("B", 8191-prefix) + "!cd;touch\tpwned;#"
	err := buildLayer(t, dir, entry{name: "f", body: "x", xattrs: map[string]string{name: "v"}})
	assertNoShell(t, home)
	if err == nil {
		t.Fatal("an xattr name longer than 255 bytes was accepted")
	}
	t.Logf("refused: %.200v", err)
}

// TestHostileNamesBuildExactly: names that are legal in an image but mean
// something to debugfs or a shell land in the image as themselves, and run
// nothing.
func TestHostileNamesBuildExactly(t *testing.T) {
	requireE2fsprogs(t)
	home := t.TempDir()
	t.Setenv("HOME", home)
	quotes := strings.Repeat(`"`, maxNameLen)
	long := strings.Repeat("d", maxNameLen)
	deep := strings.Repeat(long+"/", 10) // 2560 bytes of directories
	es := []entry{
		{name: "!cd;touch pwned;#", typ: tar.TypeFifo, mode: 0o600},
		{name: "#comment", body: "c"},
		{name: "-f", typ: tar.TypeFifo, mode: 0o640},
		{name: "<2>", typ: tar.TypeChar, major: 1, minor: 3, mode: 0o666, uid: 7},
		{name: quotes, typ: tar.TypeFifo, mode: 0o604},
		{name: `a "b" c`, typ: tar.TypeDir, mode: 0o700, uid: 5},
		{name: `a "b" c/!x`, body: "y", mode: 0o4711, uid: 3, xattrs: map[string]string{"user.a-b_c:d@e+fg,h~i": "v", "security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
		{name: deep + "fifo", typ: tar.TypeFifo, mode: 0o622, gid: 9},
		{name: "-link", typ: tar.TypeLink, link: deep + "fifo"},
		{name: deep + long, typ: tar.TypeBlock, major: 8, minor: 65535, mode: 0o660},
	}
	dir := t.TempDir()
	if err := buildLayer(t, dir, es...); err != nil {
		t.Fatal(err)
	}
	assertNoShell(t, home)
	img := filepath.Join(dir, "rootfs.ext4")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	cases := []struct{ path, want string }{
		{"/!cd;touch pwned;#", `Type: FIFO\s+Mode:\s+0600`},
		{"/#comment", `Type: regular`},
		{"/-f", `Type: FIFO\s+Mode:\s+0640`},
		{"/<2>", `Type: character special\s+Mode:\s+0666`},
		{"/<2>", `User:\s+7\b`},
		{"/" + quotes, `Type: FIFO\s+Mode:\s+0604`},
		{`/a "b" c`, `Type: directory\s+Mode:\s+0700`},
		{`/a "b" c/!x`, `Mode:\s+04711`},
		{`/a "b" c/!x`, `user.a-b_c:d@e\+fg,h~i \(1\) = "v"`},
		{`/a "b" c/!x`, `security.capability \(20\)`},
		{"/" + deep + "fifo", `Type: FIFO\s+Mode:\s+0622\s.*Links: 2`},
		{"/-link", `Type: FIFO\s+Mode:\s+0622\s.*Links: 2`},
		{"/" + deep + long, `Type: block special\s+Mode:\s+0660`},
		{"/" + deep + long, `major/minor number: 08:ffff|major/minor number: 08:65535`},
	}
	for _, c := range cases {
		st := debugfsStat(t, img, c.path)
		if !regexp.MustCompile(`(?s)` + c.want).MatchString(st) {
			t.Errorf("%.60s: want %s in\n%s", c.path, c.want, st)
		}
	}
	// The root (inode 2) was not touched through "<2>".
	if st := debugfsStat(t, img, "/"); !regexp.MustCompile(`User:\s+0\s`).MatchString(st) {
		t.Errorf("root changed owner:\n%s", st)
	}
}

// TestApplyLayerRefusesUnrepresentableNames: names and xattrs that could
// change a command, or that ext4/Linux cannot hold, refuse the layer with a
// clear error before anything is built.
func TestApplyLayerRefusesUnrepresentableNames(t *testing.T) {
	cases := []struct {
		name string
		e    entry
		want string
	}{
		{"newline", entry{name: "a\nb", body: "x"}, "control byte"},
		{"carriage return", entry{name: "a\rsif", body: "x"}, "control byte"},
		{"tab", entry{name: "a\tb", typ: tar.TypeFifo}, "control byte"},
		{"escape", entry{name: "a\x1b[2J", body: "x"}, "control byte"},
		{"del", entry{name: "a\x7f", body: "x"}, "control byte"},
		{"long fifo name", entry{name: strings.Repeat("A", 256), typ: tar.TypeFifo}, "at most 255"},
		{"long dir name", entry{name: strings.Repeat("A", 256) + "/f", body: "x"}, "at most 255"},
		{"long path", entry{name: strings.Repeat(strings.Repeat("a", 200)+"/", 21) + "f", typ: tar.TypeFifo}, "at most 4096"},
		{"long hard link target", entry{name: "x", typ: tar.TypeLink, link: strings.Repeat("A", 300)}, "bad hard link target"},
		{"long symlink target", entry{name: "x", typ: tar.TypeSymlink, link: strings.Repeat("A", 4096)}, "symlink target"},
		{"xattr namespace", entry{name: "f", body: "x", xattrs: map[string]string{"system.data": "x"}}, "namespace not supported"},
		{"xattr no namespace", entry{name: "f", body: "x", xattrs: map[string]string{"!cd;touch pwned": "x"}}, "namespace not supported"},
		{"xattr bang", entry{name: "f", body: "x", xattrs: map[string]string{"user.a!b": "x"}}, "not supported"},
		{"xattr space", entry{name: "f", body: "x", xattrs: map[string]string{"user.a b": "x"}}, "not supported"},
		{"xattr quote", entry{name: "f", body: "x", xattrs: map[string]string{`user.a"`: "x"}}, "not supported"},
		{"xattr tab", entry{name: "f", body: "x", xattrs: map[string]string{"user.a\tb": "x"}}, "not supported"},
		{"xattr long name", entry{name: "f", body: "x", xattrs: map[string]string{"user." + strings.Repeat("B", 251): "x"}}, "at most 255"},
		{"xattr long value", entry{name: "f", body: "x", xattrs: map[string]string{"user.big": strings.Repeat("v", maxXattrValue+1)}}, "at most 65536"},
		{"xattrs too big", entry{name: "f", body: "x", xattrs: map[string]string{"user.a": strings.Repeat("v", 40000), "user.b": strings.Repeat("v", 40000)}}, "bytes of xattrs"},
		{"minor", entry{name: "d", typ: tar.TypeChar, major: 1, minor: 70000}, "minor at most 65535"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr, err := NewTree(filepath.Join(t.TempDir(), "s"))
			if err != nil {
				t.Fatal(err)
			}
			err = tr.ApplyLayer(bytes.NewReader(layerTar(t, c.e)))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error with %q", err, c.want)
			}
		})
	}
	// A directory created through a symlink's target gets the same checks.
	tr, _ := NewTree(filepath.Join(t.TempDir(), "s"))
	err := tr.ApplyLayer(bytes.NewReader(layerTar(t,
		entry{name: "l", typ: tar.TypeSymlink, link: "a\nb"},
		entry{name: "l/f", body: "x"})))
	if err == nil || !strings.Contains(err.Error(), "control byte") {
		t.Fatalf("a directory named by a symlink target: got %v", err)
	}
}
