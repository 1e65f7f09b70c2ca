package image

import (
	"archive/tar"
	"bytes"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// readerBufs are the BUFSIZ values debugfs may be built with (musl, glibc).
var readerBufs = []int{1024, 8192}

// TestParseScriptModelSeesTheOldSplit: the model of debugfs's reader used by
// the checks below finds the shell escape in the line the old writer made.
func TestParseScriptModelSeesTheOldSplit(t *testing.T) {
	old := `mknod "` + strings.Repeat("A", 8184) + `!cd;touch pwned;#" p` + "\n"
	if _, err := parseScript([]byte(old), 8192); err == nil || !strings.Contains(err.Error(), "shell escape") {
		t.Fatalf("model missed the shell escape: %v", err)
	}
	cases := []struct {
		in   string
		want [][]string
	}{
		{"sif \"./a \"\"b\"\"\" mode 0644\n", [][]string{{"sif", "./a \"b\"", "mode", "0644"}}},
		{"# comment\n  cd \"..\"\r junk\n\n", [][]string{{"cd", ".."}}},
		{"a\"b c\"d e\n", [][]string{{"ab cd", "e"}}},
	}
	for _, c := range cases {
		got, err := parseScript([]byte(c.in), 8192)
		if err != nil || !equalCmds(got, c.want) {
			t.Errorf("parseScript(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	if _, err := parseScript([]byte("sif \"a\n"), 8192); err == nil {
		t.Error("unbalanced quote accepted")
	}
}

func equalCmds(a, b [][]string) bool {
	return slices.EqualFunc(a, b, func(x, y []string) bool { return slices.Equal(x, y) })
}

// TestScriptWriterRefuses: the writer itself refuses arguments that could
// change the command, whatever checked them before.
func TestScriptWriterRefuses(t *testing.T) {
	for _, arg := range []string{"a\nb", "a\rb", "a\x00b", "a\tb", strings.Repeat("A", maxScriptLine), strings.Repeat(`"`, maxScriptLine/2)} {
		var s debugfsScript
		if err := s.cmd("sif", arg, "mode", "0644"); !errors.Is(err, ErrScript) {
			t.Errorf("cmd(%.20q…) = %v, want ErrScript", arg, err)
		}
		if s.b.Len() != 0 || s.n != 0 {
			t.Errorf("cmd(%.20q…) wrote %q", arg, s.b.String())
		}
	}
	var s debugfsScript
	if err := s.cmd("sif", "./"+strings.Repeat(`"`, maxNameLen), "mode", "0644"); err != nil {
		t.Errorf("longest name of quotes refused: %v", err)
	}
}

// TestScriptVerify: a batch holding anything but the commands written (as a
// writer bug would make) is refused before debugfs runs.
func TestScriptVerify(t *testing.T) {
	good := func() *debugfsScript {
		s := &debugfsScript{}
		if err := s.cmd("sif", "./a", "mode", "0644"); err != nil {
			t.Fatal(err)
		}
		return s
	}
	if err := good().verify(); err != nil {
		t.Fatal(err)
	}
	for name, extra := range map[string]string{
		"shell escape":  "!touch x\n",
		"extra command": "sif \"./b\" uid 0\n",
		"split line":    "sif \"./" + strings.Repeat("A", 1100) + "\" uid 0\n",
		"no newline":    "sif \"./c\" uid 0",
	} {
		s := good()
		s.b.WriteString(extra)
		if err := s.verify(); !errors.Is(err, ErrScript) {
			t.Errorf("%s: verify = %v, want ErrScript", name, err)
		}
	}
}

// checkScript parses s as debugfs would and compares it with the commands the
// writer meant, and checks the shape of every argument.
func checkScript(t *testing.T, s *debugfsScript) {
	t.Helper()
	for _, l := range strings.Split(strings.TrimSuffix(s.b.String(), "\n"), "\n") {
		if len(l) > maxScriptLine {
			t.Fatalf("line of %d bytes: %.80q", len(l), l)
		}
	}
	for _, bs := range readerBufs {
		got, err := parseScript(s.b.Bytes(), bs)
		if err != nil {
			t.Fatalf("BUFSIZ %d: %v", bs, err)
		}
		if !equalCmds(got, s.cmds) {
			t.Fatalf("BUFSIZ %d: the script does not parse back into the intended commands:\n got %q\nwant %q", bs, got, s.cmds)
		}
	}
	isPath := func(a string) bool {
		return a == "/" || a == ".." || strings.HasPrefix(a, "/") || strings.HasPrefix(a, "./") || strings.HasPrefix(a, "../")
	}
	for _, c := range s.cmds {
		var paths []string
		switch c[0] {
		case "sif":
			paths = c[1:2]
		case "cd":
			paths = c[1:]
		case "ln":
			paths = c[1:]
		case "ea_set":
			if c[1] != "-f" || !strings.HasPrefix(c[2], "xattrs/") || len(c) != 5 {
				t.Fatalf("bad ea_set %q", c)
			}
			paths = c[3:4]
		case "mknod":
		default:
			t.Fatalf("unexpected command %q", c)
		}
		for _, p := range paths {
			if !isPath(p) {
				t.Fatalf("%s argument %q is not a path from / or the current directory", c[0], p)
			}
		}
	}
}

// fuzzKinds maps a byte to an inode kind.
var fuzzKinds = []byte{kindReg, kindFifo, kindChar, kindBlock, kindSymlink}

// FuzzDebugfsScript feeds adversarial names and xattrs straight into the
// script writer (bypassing the tree's own checks) and checks that the batch
// either is refused or parses back into exactly the intended commands, naming
// exactly the given names.
func FuzzDebugfsScript(f *testing.F) {
	f.Add("d", "f", "user.x", "v", byte(1))
	f.Add("d", strings.Repeat("A", 8184)+"!cd;touch pwned;#", "user.x", "v", byte(1))
	f.Add("d", "f", "user."+strings.Repeat("B", 8100)+"!cd;touch\tpwned;#", "v", byte(0))
	f.Add(`a "b"`, `!x"`, "security.capability", "\x01\x00", byte(2))
	f.Add("<2>", "-f", "user.-f", "v", byte(3))
	f.Add("d\r", "f\n!id", "user.x\n!id", "v", byte(1))
	f.Add(strings.Repeat(`"`, 255), strings.Repeat(`"`, 255), "user."+strings.Repeat("z", 250), "v", byte(1))
	f.Add("..", ".", "system.data", "", byte(4))
	f.Fuzz(func(t *testing.T, dirName, name, xname, xval string, k byte) {
		if dirName == "zz-second-name" {
			return // the test's own second name would replace the directory
		}
		kind := fuzzKinds[int(k)%len(fuzzKinds)]
		tr := &Tree{root: &inode{kind: kindDir, mode: 0o755, children: map[string]*dirent{}}}
		d := &inode{kind: kindDir, mode: 0o700, uid: 1, children: map[string]*dirent{}}
		n := &inode{kind: kind, mode: 0o644, uid: 2, gid: 3, mtime: time.Unix(1, 0), major: 1, minor: 2, link: "t",
			xattrs: map[string]string{xname: xval}}
		tr.root.children[dirName] = &dirent{ino: d}
		d.children[name] = &dirent{ino: n}
		tr.root.children["zz-second-name"] = &dirent{ino: n}
		s := &debugfsScript{record: true}
		if _, _, err := tr.fixupScript(s, t.TempDir()); err != nil {
			return // refused
		}
		if checkName(dirName) != nil || checkName(name) != nil || checkXattr(xname, xval) != nil {
			t.Fatalf("accepted dir %q name %q xattr %q", dirName, name, xname)
		}
		checkScript(t, s)
		// Exactly the intended operations: the root (3 sif), the directory
		// (3 sif, cd, cd ..), the file's first name and its second name.
		want := 3 + 5
		special := kind == kindFifo || kind == kindChar || kind == kindBlock
		if special {
			want += 1 + 3 + 1 + 3 + 1 + 1 // mknod, times, links_count, owner/mode, xattr, ln
		} else {
			want += 3 + 1
		}
		if len(s.cmds) != want {
			t.Fatalf("%d commands, want %d: %q", len(s.cmds), want, s.cmds)
		}
		// The first name in walk order is created; the other is linked.
		firstName, otherName := name, "zz-second-name"
		if dirName > "zz-second-name" {
			firstName, otherName = otherName, name
		}
		var mknods, lns, xattrs int
		for _, c := range s.cmds {
			switch c[0] {
			case "mknod":
				mknods++
				if c[1] != firstName {
					t.Fatalf("mknod names %q, want %q", c[1], firstName)
				}
			case "ln":
				lns++
				if c[2] != "./"+otherName {
					t.Fatalf("ln to %q, want ./%s", c[2], otherName)
				}
			case "ea_set":
				xattrs++
				if c[4] != xname {
					t.Fatalf("ea_set names %q, want %q", c[4], xname)
				}
			}
		}
		if special && (mknods != 1 || lns != 1) || !special && (mknods != 0 || lns != 0) || xattrs != 1 {
			t.Fatalf("mknod %d, ln %d, ea_set %d for kind %c", mknods, lns, xattrs, kind)
		}
	})
}

// TestFixupScriptOfTestLayers: the real layers' batch passes the same checks.
func TestFixupScriptOfTestLayers(t *testing.T) {
	tr, err := NewTree(filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range testLayers(t) {
		if err := tr.ApplyLayer(bytes.NewReader(l)); err != nil {
			t.Fatal(err)
		}
	}
	s := &debugfsScript{record: true}
	if _, _, err := tr.fixupScript(s, t.TempDir()); err != nil {
		t.Fatal(err)
	}
	checkScript(t, s)
	_ = tar.TypeReg
}

// TestDebugfsStdoutCheck: on stdout only debugfs's command echo and mknod's
// inode number are expected; anything else (ea_set prints its usage there)
// fails the build.
func TestDebugfsStdoutCheck(t *testing.T) {
	var w stdoutCheck
	for _, chunk := range []string{"debugfs: sif \"./a\" mode 0644\nAlloc", "ated inode: 12\n\n", "Usage:\tea_set [-r] <file> <attr> <value>\n", "debugfs: cd \"..\"\n"} {
		w.Write([]byte(chunk))
	}
	if len(w.bad) != 1 || !strings.HasPrefix(w.bad[0], "Usage:") {
		t.Fatalf("unexpected lines %q", w.bad)
	}
}
