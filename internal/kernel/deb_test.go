package kernel

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/blakesmith/ar"
)

const testVersion = "1.0.0-test-amd64"

type tarEntry struct {
	name     string
	typ      byte
	body     string
	linkname string
}

func makeTar(t testing.TB, entries []tarEntry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: 0o644, Size: int64(len(e.body)), Linkname: e.linkname, ModTime: time.Unix(0, 0)}
		if e.typ == tar.TypeDir {
			hdr.Mode, hdr.Size = 0o755, 0
		}
		if e.typ == tar.TypeSymlink {
			hdr.Size = 0
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if hdr.Size > 0 {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// makeDeb writes a Debian binary package with the given data.tar member name
// (its suffix picks the compression) and entries.
func makeDeb(t testing.TB, path, dataMember string, entries []tarEntry) {
	t.Helper()
	control := makeTar(t, []tarEntry{{name: "./", typ: tar.TypeDir}, {name: "./control", typ: tar.TypeReg, body: "Package: linux-image-test\nVersion: 1.0\n"}})
	data := makeTar(t, entries)
	switch filepath.Ext(dataMember) {
	case ".gz":
		data = gzipBytes(t, data)
	case ".xz":
		data = xzBytes(t, data)
	case ".zst":
		data = zstdBytes(t, data)
	}
	var buf bytes.Buffer
	w := ar.NewWriter(&buf)
	if err := w.WriteGlobalHeader(); err != nil {
		t.Fatal(err)
	}
	for _, m := range []struct {
		name string
		body []byte
	}{{"debian-binary", []byte("2.0\n")}, {"control.tar.gz", gzipBytes(t, control)}, {dataMember, data}} {
		if err := w.WriteHeader(&ar.Header{Name: m.name, Size: int64(len(m.body)), Mode: 0o644, ModTime: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(m.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func goodEntries(t testing.TB, modulesRoot string) []tarEntry {
	raw := fakeELF(8<<10, uint16(elf.EM_X86_64))
	md := modulesRoot + testVersion
	return []tarEntry{
		{name: "./", typ: tar.TypeDir},
		{name: "./boot/", typ: tar.TypeDir},
		{name: "./boot/vmlinuz-" + testVersion, typ: tar.TypeReg, body: string(fakeBzImage(gzipBytes(t, raw), len(raw), true))},
		{name: "./boot/config-" + testVersion, typ: tar.TypeReg, body: "CONFIG_VIRTIO=m\n"},
		{name: "./" + md + "/", typ: tar.TypeDir},
		{name: "./" + md + "/kernel/", typ: tar.TypeDir},
		{name: "./" + md + "/modules.builtin", typ: tar.TypeReg, body: "kernel/fs/ext4/ext4.ko\n"},
		{name: "./" + md + "/build", typ: tar.TypeSymlink, linkname: "/usr/src/linux-headers-" + testVersion},
		{name: "./usr/share/doc/linux-image-test/copyright", typ: tar.TypeReg, body: "GPL-2\n"},
	}
}

func requireDepmod(t *testing.T) {
	t.Helper()
	if _, err := lookTool("depmod"); err != nil {
		t.Skipf("depmod not installed (Debian package kmod): %v", err)
	}
}

func TestImportDeb(t *testing.T) {
	requireDepmod(t)
	tests := []struct {
		member, modulesRoot string
	}{
		{"data.tar.xz", "lib/modules/"},
		{"data.tar.gz", "lib/modules/"},
		{"data.tar.zst", "usr/lib/modules/"},
		{"data.tar", "lib/modules/"},
	}
	for _, tt := range tests {
		t.Run(tt.member+" "+tt.modulesRoot, func(t *testing.T) {
			dir := t.TempDir()
			deb := filepath.Join(dir, "k.deb")
			makeDeb(t, deb, tt.member, goodEntries(t, tt.modulesRoot))
			dest := filepath.Join(dir, "kernel")
			k, err := ImportDeb(context.Background(), deb, dest, ImportOptions{})
			if err != nil {
				t.Fatalf("ImportDeb: %v", err)
			}
			if k.Version != testVersion || k.Package != "linux-image-test" {
				t.Errorf("kernel = %+v", k)
			}
			if k.VmlinuxPath != filepath.Join(dest, "vmlinux") || k.ModulesDir != filepath.Join(dest, "lib", "modules", testVersion) {
				t.Errorf("paths = %s, %s", k.VmlinuxPath, k.ModulesDir)
			}
			vm, err := os.ReadFile(k.VmlinuxPath)
			if err != nil {
				t.Fatal(err)
			}
			if err := checkELF(vm); err != nil {
				t.Errorf("vmlinux: %v", err)
			}
			for _, f := range []string{"modules.dep", "modules.builtin"} {
				if _, err := os.Stat(filepath.Join(k.ModulesDir, f)); err != nil {
					t.Errorf("missing %s: %v", f, err)
				}
			}
			if _, err := os.Lstat(filepath.Join(k.ModulesDir, "build")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("symlink from the package was created (err=%v)", err)
			}
			if _, err := os.Stat(filepath.Join(dest, "usr", "share")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("files outside boot/ and lib/modules/ were extracted (err=%v)", err)
			}
			if _, err := os.Stat(filepath.Join(dest, ".vmlinuz-"+testVersion)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("compressed vmlinuz left behind (err=%v)", err)
			}
			loaded, err := Load(dest)
			if err != nil || *loaded != *k {
				t.Errorf("Load = %+v, %v; want %+v", loaded, err, k)
			}
			// Import refuses a non-empty destination.
			if _, err := ImportDeb(context.Background(), deb, dest, ImportOptions{}); err == nil {
				t.Error("import into a non-empty directory succeeded")
			}
		})
	}
}

func TestImportDebRejectsTraversal(t *testing.T) {
	requireDepmod(t)
	evil := []tarEntry{
		{name: "./../escaped", typ: tar.TypeReg, body: "x"},
		{name: "/etc/escaped", typ: tar.TypeReg, body: "x"},
		{name: "./lib/modules/" + testVersion + "/../../../../escaped", typ: tar.TypeReg, body: "x"},
		{name: "lib/modules/" + testVersion + "/kernel/../../../../../escaped", typ: tar.TypeDir},
		{name: "./usr/share/doc/../../../escaped", typ: tar.TypeReg, body: "x"},
	}
	for _, e := range evil {
		t.Run(e.name, func(t *testing.T) {
			dir := t.TempDir()
			deb := filepath.Join(dir, "k.deb")
			entries := append(goodEntries(t, "lib/modules/"), e)
			makeDeb(t, deb, "data.tar.gz", entries)
			dest := filepath.Join(dir, "a", "b", "kernel")
			_, err := ImportDeb(context.Background(), deb, dest, ImportOptions{})
			if !errors.Is(err, ErrUnsafePath) {
				t.Fatalf("ImportDeb = %v, want ErrUnsafePath", err)
			}
			if _, err := os.Stat(dest); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("destination left behind after a failed import (err=%v)", err)
			}
			for _, p := range []string{filepath.Join(dir, "escaped"), filepath.Join(dir, "a", "escaped"), filepath.Join(dir, "a", "b", "escaped")} {
				if _, err := os.Stat(p); err == nil {
					t.Errorf("%s was written", p)
				}
			}
		})
	}
}

func TestImportDebErrors(t *testing.T) {
	requireDepmod(t)
	raw := fakeELF(1<<10, uint16(elf.EM_X86_64))
	vmlinuz := string(fakeBzImage(gzipBytes(t, raw), len(raw), true))
	tests := []struct {
		name    string
		entries []tarEntry
		want    string
	}{
		{"no kernel", []tarEntry{{name: "./lib/modules/" + testVersion + "/modules.builtin", typ: tar.TypeReg}}, "no boot/vmlinuz"},
		{"no modules", []tarEntry{{name: "./boot/vmlinuz-" + testVersion, typ: tar.TypeReg, body: vmlinuz}}, "no lib/modules"},
		{"version mismatch", []tarEntry{
			{name: "./boot/vmlinuz-" + testVersion, typ: tar.TypeReg, body: vmlinuz},
			{name: "./lib/modules/9.9/modules.builtin", typ: tar.TypeReg},
		}, "modules are for"},
		{"option-like version", []tarEntry{{name: "./boot/vmlinuz--rf", typ: tar.TypeReg, body: vmlinuz}}, "unusable kernel version"},
		{"not a kernel", []tarEntry{
			{name: "./boot/vmlinuz-" + testVersion, typ: tar.TypeReg, body: "hello"},
			{name: "./lib/modules/" + testVersion + "/modules.builtin", typ: tar.TypeReg},
		}, "not an x86-64 ELF vmlinux"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			deb := filepath.Join(dir, "k.deb")
			makeDeb(t, deb, "data.tar.gz", tt.entries)
			dest := filepath.Join(dir, "kernel")
			_, err := ImportDeb(context.Background(), deb, dest, ImportOptions{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("ImportDeb = %v, want an error containing %q", err, tt.want)
			}
			if _, err := os.Stat(dest); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("destination left behind (err=%v)", err)
			}
		})
	}
	t.Run("not a deb", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "x.deb")
		if err := os.WriteFile(p, []byte("hello world"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ImportDeb(context.Background(), p, filepath.Join(t.TempDir(), "k"), ImportOptions{}); err == nil || !strings.Contains(err.Error(), "not a Debian package") {
			t.Fatalf("ImportDeb = %v", err)
		}
	})
}

func TestCleanEntryName(t *testing.T) {
	tests := []struct {
		in, want string
		unsafe   bool
	}{
		{"./", "", false},
		{".", "", false},
		{"./boot/vmlinuz-1", "boot/vmlinuz-1", false},
		{"lib//modules/./x", "lib/modules/x", false},
		{"../x", "", true},
		{"./a/../../x", "", true},
		{"a/b/../c", "", true}, // harmless after cleaning, still refused
		{"/etc/passwd", "", true},
		{"a/\x00b", "", true},
	}
	for _, tt := range tests {
		got, err := cleanEntryName(tt.in)
		if tt.unsafe {
			if !errors.Is(err, ErrUnsafePath) {
				t.Errorf("cleanEntryName(%q) = %q, %v; want ErrUnsafePath", tt.in, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("cleanEntryName(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

// FuzzCleanEntryName checks that no archive entry name (untrusted: users
// import their own packages) is turned into a path leaving the destination.
func FuzzCleanEntryName(f *testing.F) {
	for _, s := range []string{"./boot/vmlinuz-1", "../x", "./a/../../x", "/etc/passwd", "a//b/./c", ".", "", "a/..", "..."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		got, err := cleanEntryName(name)
		if err != nil {
			if !errors.Is(err, ErrUnsafePath) {
				t.Fatalf("cleanEntryName(%q): unexpected error %v", name, err)
			}
			return
		}
		if got == "" {
			return
		}
		if !fs.ValidPath(got) || strings.HasPrefix(got, "/") || slices.Contains(strings.Split(got, "/"), "..") {
			t.Fatalf("cleanEntryName(%q) = %q escapes", name, got)
		}
		if rel, err := filepath.Rel("/dest", filepath.Join("/dest", got)); err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
			t.Fatalf("cleanEntryName(%q) = %q resolves outside /dest", name, got)
		}
	})
}
