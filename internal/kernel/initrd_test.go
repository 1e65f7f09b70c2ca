package kernel

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cavaliergopher/cpio"
)

// fakeModulesDir writes a modules tree with a hand-made modules.dep:
//
//	a            (no deps)
//	b -> a
//	c -> b, a    (depmod lists the closure)
//	d -> c, b, a, e
//	e -> a
//	x-y (file x-y.ko, name x_y) -> a
//	z.ko.xz -> a (compressed module)
//	cyc1 -> cyc2 -> cyc1
//	ext4 is built in
func fakeModulesDir(t *testing.T) *Kernel {
	t.Helper()
	dir := t.TempDir()
	md := filepath.Join(dir, "lib", "modules", testVersion)
	files := map[string]string{
		"kernel/a/a.ko":    "module a",
		"kernel/b/b.ko":    "module b",
		"kernel/c/c.ko":    "module c",
		"kernel/d/d.ko":    "module d",
		"kernel/e/e.ko":    "module e",
		"kernel/x/x-y.ko":  "module x_y",
		"kernel/z/z.ko.xz": string(xzBytes(t, []byte("module z"))),
		"kernel/q/cyc1.ko": "cyc1",
		"kernel/q/cyc2.ko": "cyc2",
		"modules.builtin":  "kernel/fs/ext4/ext4.ko\nkernel/fs/vfat.ko\n",
		"modules.dep": strings.Join([]string{
			"kernel/a/a.ko:",
			"kernel/b/b.ko: kernel/a/a.ko",
			"kernel/c/c.ko: kernel/b/b.ko kernel/a/a.ko",
			"kernel/d/d.ko: kernel/c/c.ko kernel/e/e.ko kernel/b/b.ko kernel/a/a.ko",
			"kernel/e/e.ko: kernel/a/a.ko",
			"kernel/x/x-y.ko: kernel/a/a.ko",
			"kernel/z/z.ko.xz: kernel/a/a.ko",
			"kernel/q/cyc1.ko: kernel/q/cyc2.ko",
			"kernel/q/cyc2.ko: kernel/q/cyc1.ko",
			"",
		}, "\n"),
	}
	for name, body := range files {
		p := filepath.Join(md, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &Kernel{Version: testVersion, ModulesDir: md}
}

func TestModuleLoadOrder(t *testing.T) {
	k := fakeModulesDir(t)
	tests := []struct {
		names []string
		want  []string
		err   string
	}{
		{names: []string{"a"}, want: []string{"kernel/a/a.ko"}},
		{names: []string{"c"}, want: []string{"kernel/a/a.ko", "kernel/b/b.ko", "kernel/c/c.ko"}},
		{names: []string{"d", "c", "a"}, want: []string{"kernel/a/a.ko", "kernel/b/b.ko", "kernel/e/e.ko", "kernel/c/c.ko", "kernel/d/d.ko"}},
		{names: []string{"x-y", "x_y"}, want: []string{"kernel/a/a.ko", "kernel/x/x-y.ko"}},
		{names: []string{"z"}, want: []string{"kernel/a/a.ko", "kernel/z/z.ko.xz"}},
		{names: []string{"ext4", "vfat", "b"}, want: []string{"kernel/a/a.ko", "kernel/b/b.ko"}},
		{names: []string{}, want: nil},
		{names: []string{"nope"}, err: "neither in modules.dep nor built into the kernel"},
		{names: []string{"cyc1"}, err: "dependency cycle"},
		{names: []string{"../a"}, err: "invalid module name"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.names, ","), func(t *testing.T) {
			got, err := ModuleLoadOrder(k.ModulesDir, tt.names)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("ModuleLoadOrder = %v, %v; want error %q", got, err, tt.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("ModuleLoadOrder = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
	if _, err := ModuleLoadOrder(t.TempDir(), []string{"a"}); err == nil || !strings.Contains(err.Error(), "depmod") {
		t.Errorf("missing modules.dep: err = %v", err)
	}
}

func TestParseModulesDepRejectsEscapes(t *testing.T) {
	for _, dep := range []string{
		"/abs/a.ko:\n",
		"../a.ko:\n",
		"kernel/a.ko: ../../b.ko\n",
		"kernel/a.txt:\n",
		"no colon here\n",
	} {
		if _, _, err := parseModulesDep(strings.NewReader(dep)); err == nil {
			t.Errorf("parseModulesDep(%q) accepted it", dep)
		}
	}
}

type cpioFile struct {
	mode cpio.FileMode
	data []byte
}

func readInitrd(t *testing.T, b []byte) ([]string, map[string]cpioFile) {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	cr := cpio.NewReader(zr)
	var names []string
	files := map[string]cpioFile{}
	for {
		hdr, err := cr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(cr)
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Uid != 0 || hdr.Guid != 0 || !hdr.ModTime.Equal(hdr.ModTime.Truncate(0)) || hdr.ModTime.Unix() != 0 {
			t.Errorf("%s: owner %d:%d mtime %v, want 0:0 and the epoch", hdr.Name, hdr.Uid, hdr.Guid, hdr.ModTime)
		}
		names = append(names, hdr.Name)
		files[hdr.Name] = cpioFile{mode: hdr.Mode, data: data}
	}
	return names, files
}

func TestBuildInitrd(t *testing.T) {
	k := fakeModulesDir(t)
	agent := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(agent, []byte("\x7fELF fake agent"), 0o700); err != nil {
		t.Fatal(err)
	}
	opts := InitrdOptions{Kernel: k, AgentPath: agent, Modules: []string{"d", "z", "ext4"}}
	var first bytes.Buffer
	if err := BuildInitrd(context.Background(), &first, opts); err != nil {
		t.Fatalf("BuildInitrd: %v", err)
	}
	names, files := readInitrd(t, first.Bytes())

	init, ok := files["init"]
	if !ok || string(init.data) != "\x7fELF fake agent" || init.mode != cpio.TypeReg|0o755 {
		t.Errorf("/init = %+v", init)
	}
	for _, d := range []string{"dev", "proc", "sys", "run", "newroot", "tmp", "banger", "lib/modules/" + testVersion} {
		if f, ok := files[d]; !ok || !f.mode.IsDir() {
			t.Errorf("directory /%s missing (%+v)", d, f)
		}
	}
	if files["tmp"].mode&cpio.ModeSticky == 0 {
		t.Errorf("/tmp mode %o lacks the sticky bit", files["tmp"].mode)
	}
	wantLoad := "kernel/a/a.ko\nkernel/b/b.ko\nkernel/e/e.ko\nkernel/c/c.ko\nkernel/d/d.ko\nkernel/z/z.ko\n"
	if got := string(files[ModulesLoadPath].data); got != wantLoad {
		t.Errorf("modules.load =\n%s\nwant\n%s", got, wantLoad)
	}
	for _, rel := range strings.Fields(wantLoad) {
		f, ok := files[path.Join("lib/modules", testVersion, rel)]
		if !ok || f.mode != cpio.TypeReg|0o644 {
			t.Errorf("module %s missing or wrong mode (%+v)", rel, f)
		}
	}
	if got := string(files[path.Join("lib/modules", testVersion, "kernel/z/z.ko")].data); got != "module z" {
		t.Errorf("compressed module stored as %q, want it decompressed", got)
	}
	// Every entry's parent directory comes before it.
	seen := map[string]bool{}
	for _, n := range names {
		if d := path.Dir(n); d != "." && !seen[d] {
			t.Errorf("%s comes before its directory %s", n, d)
		}
		seen[n] = true
	}

	// Same inputs, same bytes.
	var second bytes.Buffer
	if err := BuildInitrd(context.Background(), &second, opts); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first.Bytes(), second.Bytes()) {
		t.Error("two builds from the same inputs differ")
	}

	// WriteInitrd writes the same bytes to a file.
	p := filepath.Join(t.TempDir(), "initrd.gz")
	if err := WriteInitrd(context.Background(), p, opts); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || !bytes.Equal(b, first.Bytes()) {
		t.Errorf("WriteInitrd output differs (err=%v)", err)
	}
}

func TestBuildInitrdErrors(t *testing.T) {
	k := fakeModulesDir(t)
	agent := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(agent, []byte("agent"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		opts InitrdOptions
		want string
	}{
		{"no kernel", InitrdOptions{AgentPath: agent}, "no kernel"},
		{"no agent", InitrdOptions{Kernel: k, Modules: []string{"a"}}, "no agent"},
		{"agent is a dir", InitrdOptions{Kernel: k, AgentPath: t.TempDir(), Modules: []string{"a"}}, "not a regular"},
		{"missing module", InitrdOptions{Kernel: k, AgentPath: agent, Modules: []string{"virtio_blk"}}, "virtio_blk"},
		{"default modules absent", InitrdOptions{Kernel: k, AgentPath: agent}, "virtio_ring"},
		{"bad version", InitrdOptions{Kernel: &Kernel{Version: "../x", ModulesDir: k.ModulesDir}, AgentPath: agent}, "version"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := BuildInitrd(context.Background(), io.Discard, tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("BuildInitrd = %v, want an error containing %q", err, tt.want)
			}
		})
	}
	// A failed WriteInitrd leaves nothing behind.
	dir := t.TempDir()
	if err := WriteInitrd(context.Background(), filepath.Join(dir, "i.gz"), InitrdOptions{Kernel: k, AgentPath: agent, Modules: []string{"nope"}}); err == nil {
		t.Fatal("WriteInitrd succeeded")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("WriteInitrd left %v behind", ents)
	}
}

func TestDefaultModulesIsACopy(t *testing.T) {
	m := DefaultModules()
	m[0] = "changed"
	if DefaultModules()[0] != "virtio_ring" {
		t.Fatal("DefaultModules exposes the package's slice")
	}
}

func TestBuildInitrdWithoutModules(t *testing.T) {
	agent := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(agent, []byte("\x7fELF agent"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A plain vmlinux has no version and no modules directory.
	var b bytes.Buffer
	if err := BuildInitrd(context.Background(), &b, InitrdOptions{Kernel: &Kernel{}, AgentPath: agent, Modules: []string{}}); err != nil {
		t.Fatalf("BuildInitrd: %v", err)
	}
	_, files := readInitrd(t, b.Bytes())
	if string(files["init"].data) != "\x7fELF agent" {
		t.Fatal("no agent as /init")
	}
	if got := files[ModulesLoadPath].data; len(got) != 0 {
		t.Fatalf("modules.load = %q, want empty", got)
	}
	for n := range files {
		if strings.HasPrefix(n, "lib/modules") {
			t.Fatalf("unexpected %s", n)
		}
	}
}
