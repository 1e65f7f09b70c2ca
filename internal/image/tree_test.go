package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// entry describes one tar entry for test layers.
type entry struct {
	name, link string
	typ        byte
	mode       int64
	uid, gid   int
	body       string
	major      int64
	minor      int64
	xattrs     map[string]string
}

func layerTar(t testing.TB, es ...entry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			ModTime: time.Unix(1700000000, 0), Devmajor: e.major, Devminor: e.minor, Format: tar.FormatPAX}
		if e.typ == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			tw.Write([]byte(e.body))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestLayers are the property layers shared by the tests of this package.
func testLayers(t testing.TB) [][]byte {
	l1 := layerTar(t,
		entry{name: "etc/", typ: tar.TypeDir},
		entry{name: "etc/gone", body: "lower"},
		entry{name: "etc/keep", body: "keep"},
		entry{name: "opq/", typ: tar.TypeDir},
		entry{name: "opq/lower", body: "hidden"},
		entry{name: "usr/bin/", typ: tar.TypeDir},
		entry{name: "usr/bin/su", body: "setuid", mode: 0o4755},
		entry{name: "usr/bin/wall", body: "setgid", mode: 0o2755, gid: 5},
		entry{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
		entry{name: "home/u/", typ: tar.TypeDir, mode: 0o750, uid: 1000, gid: 1000},
		entry{name: "home/u/file", body: "mine", uid: 1000, gid: 1000, mode: 0o600},
		entry{name: "dev/", typ: tar.TypeDir},
		entry{name: "dev/null", typ: tar.TypeChar, major: 1, minor: 3, mode: 0o666},
		entry{name: "dev/sda", typ: tar.TypeBlock, major: 8, minor: 0, mode: 0o660, gid: 6},
		entry{name: "run/fifo", typ: tar.TypeFifo, mode: 0o620},
		entry{name: "lib", typ: tar.TypeSymlink, link: "usr/lib"},
		entry{name: "usr/lib/", typ: tar.TypeDir},
		entry{name: "bin/ping", body: "ping", mode: 0o755, xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", "user.note": "hello world"}},
		entry{name: "sp ace\"q", body: "odd name"},
	)
	l2 := layerTar(t,
		entry{name: "etc/.wh.gone", body: ""},
		entry{name: "opq/", typ: tar.TypeDir},
		entry{name: "opq/.wh..wh..opq"},
		entry{name: "opq/upper", body: "visible"},
		entry{name: "usr/bin/sudo", typ: tar.TypeLink, link: "usr/bin/su"},
		entry{name: "lib/libc.so", body: "libc"}, // through the symlink
	)
	return [][]byte{l1, l2}
}

func buildTestImage(t *testing.T) string {
	t.Helper()
	if _, err := tool("mkfs.ext4"); err != nil {
		t.Skipf("e2fsprogs not installed: %v", err)
	}
	dir := t.TempDir()
	tr, err := NewTree(filepath.Join(dir, "stage"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range testLayers(t) {
		if err := tr.ApplyLayer(bytes.NewReader(l)); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(dir, "rootfs.ext4")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := tr.BuildExt4(ctx, out, BuildOptions{HeadroomMiB: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built %d inodes, %d fixups, mkfs %v, fixup %v", res.Inodes, res.FixupCmds, res.MkfsTime, res.FixupTime)
	return out
}

func debugfsStat(t *testing.T, img, p string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "debugfs", "-R", "stat "+quote(p), img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs stat %s: %v: %s", p, err, out)
	}
	return string(out)
}

func TestBuildExt4Exact(t *testing.T) {
	img := buildTestImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	re := func(s string) *regexp.Regexp { return regexp.MustCompile(s) }
	cases := []struct {
		path string
		want []*regexp.Regexp
	}{
		{"/usr/bin/su", []*regexp.Regexp{re(`Type: regular\s+Mode:\s+04755`), re(`User:\s+0\s+Group:\s+0`), re(`Links: 2`)}},
		{"/usr/bin/sudo", []*regexp.Regexp{re(`Mode:\s+04755`), re(`Links: 2`)}},
		{"/usr/bin/wall", []*regexp.Regexp{re(`Mode:\s+02755`), re(`Group:\s+5\b`)}},
		{"/tmp", []*regexp.Regexp{re(`Type: directory\s+Mode:\s+01777`)}},
		{"/home/u", []*regexp.Regexp{re(`Mode:\s+0750`), re(`User:\s+1000\s+Group:\s+1000`)}},
		{"/home/u/file", []*regexp.Regexp{re(`Mode:\s+0600`), re(`User:\s+1000\s+Group:\s+1000`), re(`Size: 4\b`)}},
		{"/dev/null", []*regexp.Regexp{re(`Type: character special\s+Mode:\s+0666`), re(`major/minor number: 01:03`)}},
		{"/dev/sda", []*regexp.Regexp{re(`Type: block special\s+Mode:\s+0660`), re(`Group:\s+6\b`), re(`major/minor number: 08:00`)}},
		{"/run/fifo", []*regexp.Regexp{re(`Type: FIFO\s+Mode:\s+0620`)}},
		{"/lib", []*regexp.Regexp{re(`Type: symlink`), re(`Fast link dest: "usr/lib"`)}},
		{"/usr/lib/libc.so", []*regexp.Regexp{re(`Type: regular`)}},
		{"/bin/ping", []*regexp.Regexp{re(`security.capability \(20\)`), re(`user.note \(11\) = "hello world"`)}},
		{"/opq/upper", []*regexp.Regexp{re(`Type: regular`)}},
		{"/etc/keep", []*regexp.Regexp{re(`mtime: 0x6553f100`)}},
		{`/sp ace"q`, []*regexp.Regexp{re(`Type: regular`)}},
	}
	for _, c := range cases {
		t.Run(c.path, func(t *testing.T) {
			st := debugfsStat(t, img, c.path)
			for _, w := range c.want {
				if !w.MatchString(st) {
					t.Errorf("%s: want %s in\n%s", c.path, w, st)
				}
			}
		})
	}
	for _, gone := range []string{"/etc/gone", "/opq/lower", "/etc/.wh.gone", "/opq/.wh..wh..opq"} {
		if st := debugfsStat(t, img, gone); !strings.Contains(st, "not found") {
			t.Errorf("%s should not exist: %s", gone, st)
		}
	}
}

func TestApplyLayerRefusesEscapes(t *testing.T) {
	cases := []struct {
		name string
		es   []entry
	}{
		{"dotdot", []entry{{name: "../evil", body: "x"}}},
		{"dotdot inside", []entry{{name: "a/../../evil", body: "x"}}},
		{"hardlink out", []entry{{name: "x", typ: tar.TypeLink, link: "../../etc/passwd"}}},
		{"bad whiteout", []entry{{name: ".wh..."}}},
		{"through file", []entry{{name: "f", body: "x"}, {name: "f/g", body: "y"}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr, err := NewTree(filepath.Join(t.TempDir(), "s"))
			if err != nil {
				t.Fatal(err)
			}
			if err := tr.ApplyLayer(bytes.NewReader(layerTar(t, c.es...))); err == nil {
				t.Fatalf("layer accepted")
			}
		})
	}
	// A symlink pointing outside resolves inside the root.
	dir := t.TempDir()
	tr, _ := NewTree(filepath.Join(dir, "s"))
	err := tr.ApplyLayer(bytes.NewReader(layerTar(t,
		entry{name: "esc", typ: tar.TypeSymlink, link: "../../../../tmp"},
		entry{name: "esc/x", body: "inside"})))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := tr.lookupParent("tmp/x", false); err != nil {
		t.Fatalf("symlinked write did not land in the root: %v", err)
	}
	if !errors.Is(nil, nil) {
		t.Fatal()
	}
}

func FuzzApplyLayer(f *testing.F) {
	for _, l := range testLayers(f) {
		f.Add(l)
	}
	f.Add(layerTar(f, entry{name: "../x", body: "a"}))
	f.Add(layerTar(f, entry{name: "a", typ: tar.TypeSymlink, link: "/"}, entry{name: "a/b/c", body: "z"}))
	// The reproductions of security review item 1, and names that mean
	// something to debugfs.
	f.Add(layerTar(f, entry{name: strings.Repeat("A", 8184) + "!cd;touch pwned;#", typ: tar.TypeFifo}))
	f.Add(layerTar(f, entry{name: "f", body: "x", xattrs: map[string]string{"user." + strings.Repeat("B", 8100) + "!cd;touch\tpwned;#": "v"}}))
	f.Add(layerTar(f, entry{name: "!x", typ: tar.TypeFifo}, entry{name: "<2>", typ: tar.TypeChar, major: 1, minor: 3},
		entry{name: `q"q/-f`, typ: tar.TypeBlock, major: 8}, entry{name: "#/l", typ: tar.TypeLink, link: "!x"},
		entry{name: "l", typ: tar.TypeSymlink, link: "a\nb"}, entry{name: "l/c", body: "x"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		stage := filepath.Join(dir, "s")
		tr, err := NewTree(stage)
		if err != nil {
			t.Fatal(err)
		}
		_ = tr.ApplyLayer(bytes.NewReader(data))
		// Nothing may be written outside the staging directory.
		ents, _ := filepath.Glob(filepath.Join(dir, "*"))
		if len(ents) != 1 || ents[0] != stage {
			t.Fatalf("files outside staging: %v", ents)
		}
		tr.walk(func(p string, n *inode, _, _ string) error {
			if strings.Contains(p, "..") && strings.Contains("/"+p+"/", "/../") {
				t.Fatalf("tree path escapes: %q", p)
			}
			return nil
		})
		// Whatever the tree holds, the debugfs batch is refused or says
		// exactly what the writer meant.
		s := &debugfsScript{record: true}
		if _, _, err := tr.fixupScript(s, filepath.Join(dir, "w")); err == nil {
			checkScript(t, s)
		}
	})
}

// TestBuildFromTarBench builds an image from the tar named by
// BANGER_BENCH_TAR (a benchmark for docs/BENCHMARKS.md; skipped otherwise).
func TestBuildFromTarBench(t *testing.T) {
	src := os.Getenv("BANGER_BENCH_TAR")
	if src == "" {
		t.Skip("set BANGER_BENCH_TAR to a large tar to measure the builder")
	}
	f, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	work := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	res, err := FromTar(ctx, f, work, filepath.Join(work, "rootfs.ext4"), BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("uid %d: %d inodes, %d MiB content, total %v (mkfs %v, debugfs %v, %d commands), fs %d MiB",
		os.Geteuid(), res.Inodes, res.ContentBytes>>20, time.Since(start).Round(time.Millisecond),
		res.MkfsTime.Round(time.Millisecond), res.FixupTime.Round(time.Millisecond), res.FixupCmds, res.SizeBytes>>20)
}
