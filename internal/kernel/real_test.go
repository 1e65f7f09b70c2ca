package kernel_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cavaliergopher/cpio"

	"github.com/bangerdev/banger/internal/kernel"
	"github.com/bangerdev/banger/internal/testenv"
)

// These tests use Debian's real cloud kernel (downloaded once into the test
// cache by testenv).

func TestRealKernelIsELFWithPVHNote(t *testing.T) {
	k := testenv.GuestKernel(t)
	f, err := elf.Open(k.VmlinuxPath)
	if err != nil {
		t.Fatalf("vmlinux from %s is not an ELF: %v", k.Package, err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		t.Errorf("vmlinux is %v %v %v", f.Class, f.Machine, f.Type)
	}
	f.Close()
	b, err := os.ReadFile(k.VmlinuxPath)
	if err != nil {
		t.Fatal(err)
	}
	entry, ok, err := kernel.PVHEntry(b)
	if err != nil || !ok || entry == 0 {
		t.Fatalf("PVH entry note (Xen ELFNOTE 18): entry=%#x ok=%v err=%v", entry, ok, err)
	}
	t.Logf("%s: vmlinux %d bytes, PVH entry %#x", k.Version, len(b), entry)
}

// TestRealDebImport checks what ImportDeb made of Debian's real package. The
// import itself runs inside testenv.GuestKernel, once per package and version
// of internal/kernel (it takes over a minute under -race, so it is not
// repeated here).
func TestRealDebImport(t *testing.T) {
	deb := testenv.KernelPackage(t)
	k := testenv.GuestKernel(t)
	if !strings.HasPrefix(filepath.Base(deb), "linux-image-"+k.Version) || k.Package != "linux-image-"+k.Version+"-unsigned" {
		t.Errorf("version %q / package %q do not match %s", k.Version, k.Package, filepath.Base(deb))
	}
	dir := filepath.Dir(k.VmlinuxPath)
	if k.ModulesDir != filepath.Join(dir, "lib", "modules", k.Version) {
		t.Errorf("modules dir %s, want %s", k.ModulesDir, filepath.Join(dir, "lib", "modules", k.Version))
	}
	for _, p := range []string{k.VmlinuxPath, filepath.Join(k.ModulesDir, "modules.dep"), filepath.Join(k.ModulesDir, "modules.builtin"), filepath.Join(dir, "config")} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("missing after import: %v", err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, ".vmlinuz-"+k.Version)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("compressed vmlinuz left behind (err=%v)", err)
	}
	ents, err := os.ReadDir(filepath.Join(dir, "lib", "modules"))
	if err != nil || len(ents) != 1 {
		t.Errorf("lib/modules holds %v (err=%v), want only %s", ents, err, k.Version)
	}
	loaded, err := kernel.Load(dir)
	if err != nil || *loaded != *k {
		t.Errorf("Load = %+v, %v; want %+v", loaded, err, k)
	}
}

func TestRealInitrdLoadOrder(t *testing.T) {
	k := testenv.GuestKernel(t)
	agent := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(agent, []byte("\x7fELF not really"), 0o755); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := kernel.BuildInitrd(context.Background(), &buf, kernel.InitrdOptions{Kernel: k, AgentPath: agent}); err != nil {
		t.Fatalf("BuildInitrd: %v", err)
	}
	files := map[string][]byte{}
	zr, err := gzip.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	cr := cpio.NewReader(zr)
	for {
		hdr, err := cr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(cr)
		files[hdr.Name] = b
	}
	load := strings.Fields(string(files[kernel.ModulesLoadPath]))

	deps := readModulesDep(t, filepath.Join(k.ModulesDir, "modules.dep"))
	pos := map[string]int{}
	for i, m := range load {
		if _, dup := pos[m]; dup {
			t.Errorf("%s listed twice", m)
		}
		pos[m] = i
		if _, ok := files["lib/modules/"+k.Version+"/"+m]; !ok {
			t.Errorf("%s listed but not in the initrd", m)
		}
	}
	for _, m := range load {
		for _, d := range deps[m] {
			if p, ok := pos[d]; !ok || p > pos[m] {
				t.Errorf("%s needs %s, which is not loaded before it", m, d)
			}
		}
	}
	names := map[string]bool{}
	for _, m := range load {
		names[strings.ReplaceAll(strings.TrimSuffix(filepath.Base(m), ".ko"), "-", "_")] = true
	}
	for _, want := range kernel.DefaultModules() {
		if !names[want] {
			t.Errorf("default module %s not in the initrd (built in?)", want)
		}
	}
	t.Logf("initrd: %d modules, load order %v", len(load), load)
}

func readModulesDep(t *testing.T, p string) map[string][]string {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if ok {
			out[mod] = strings.Fields(rest)
		}
	}
	return out
}
