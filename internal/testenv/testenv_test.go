package testenv

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"
)

func debugfsOut(t *testing.T, img, request string) string {
	t.Helper()
	debugfs, err := lookTool("debugfs")
	if err != nil {
		t.Skipf("debugfs not installed (Debian package e2fsprogs): %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, debugfs, "-R", request, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs -R %q: %v\n%s", request, err, out)
	}
	return string(out)
}

func TestBusyboxRootfs(t *testing.T) {
	t.Setenv(CacheEnv, t.TempDir())
	img := BusyboxRootfs(t, 16)
	st, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != 16<<20 {
		t.Errorf("image is %d bytes, want 16 MiB", st.Size())
	}

	bin := debugfsOut(t, img, "ls -l /bin")
	for _, want := range []string{"busybox", " sh", "ash"} {
		if !strings.Contains(bin, want) {
			t.Errorf("ls -l /bin lacks %q:\n%s", want, bin)
		}
	}
	if got := debugfsOut(t, img, "cat /etc/passwd"); !strings.Contains(got, "root:x:0:0:root:/root:/bin/sh") {
		t.Errorf("/etc/passwd = %q", got)
	}
	if got := debugfsOut(t, img, "stat /sbin/init"); !strings.Contains(got, "File not found") {
		t.Errorf("/sbin/init exists:\n%s", got)
	}
	for _, p := range []string{"/bin/busybox", "/bin/sh", "/etc/passwd", "/tmp", "/root", "/"} {
		got := debugfsOut(t, img, "stat "+p)
		if !strings.Contains(got, "User:     0   Group:     0") {
			t.Errorf("%s is not owned by root:\n%s", p, got)
		}
	}
	if got := debugfsOut(t, img, "stat /bin/busybox"); !strings.Contains(got, "Mode:  0755") {
		t.Errorf("/bin/busybox mode:\n%s", got)
	}
	if got := debugfsOut(t, img, "stat /tmp"); !strings.Contains(got, "Mode:  01777") {
		t.Errorf("/tmp mode:\n%s", got)
	}
	for _, d := range []string{"/proc", "/sys", "/dev", "/run"} {
		if got := debugfsOut(t, img, "stat "+d); !strings.Contains(got, "Type: directory") {
			t.Errorf("%s is not a directory:\n%s", d, got)
		}
	}
	if got := debugfsOut(t, img, "stat /bin/sh"); !strings.Contains(got, "Type: symlink") || !strings.Contains(got, `"/bin/busybox"`) {
		t.Errorf("/bin/sh is not a symlink to /bin/busybox:\n%s", got)
	}

	// The second call reuses the cache and hands out an independent copy.
	start := time.Now()
	img2 := BusyboxRootfs(t, 16)
	if img2 == img {
		t.Fatal("second call returned the same path")
	}
	a, _ := os.ReadFile(img)
	b, _ := os.ReadFile(img2)
	if !bytes.Equal(a, b) {
		t.Error("cached copy differs from the first image")
	}
	t.Logf("cached copy in %v", time.Since(start))
}

func TestCopySparse(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	data := make([]byte, 5<<20+123)
	copy(data[1<<20:], "hello")
	copy(data[len(data)-3:], "end")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "dst")
	if err := copySparse(src, dst); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("copy differs (err=%v)", err)
	}
	// All-zero tail.
	data = make([]byte, 3<<20)
	data[0] = 1
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	dst2 := filepath.Join(dir, "dst2")
	if err := copySparse(src, dst2); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(dst2); !bytes.Equal(got, data) {
		t.Fatal("copy with zero tail differs")
	}
}

func TestInitrdFixture(t *testing.T) {
	agent := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(agent, []byte("\x7fELF stand-in agent"), 0o755); err != nil {
		t.Fatal(err)
	}
	p := Initrd(t, agent)
	if again := Initrd(t, agent); again != p {
		t.Errorf("same inputs gave another initrd: %s vs %s", again, p)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	cr := cpio.NewReader(zr)
	found := map[string]bool{}
	for {
		hdr, err := cr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		found[hdr.Name] = true
		if hdr.Name == "init" {
			b, _ := io.ReadAll(cr)
			if string(b) != "\x7fELF stand-in agent" {
				t.Errorf("/init = %q", b)
			}
		}
	}
	if !found["init"] || !found["banger/modules.load"] {
		t.Errorf("initrd lacks /init or /banger/modules.load: %v", found)
	}
}

func TestAgentBinary(t *testing.T) {
	root := RepoRoot(t)
	if m, _ := filepath.Glob(filepath.Join(root, "cmd", "banger-agent", "*.go")); len(m) == 0 {
		t.Skip("cmd/banger-agent has no Go files yet")
	}
	p := AgentBinary(t)
	if p2 := AgentBinary(t); p2 != p {
		t.Errorf("second call built again: %s vs %s", p2, p)
	}
	st, err := os.Stat(p)
	if err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("agent binary %s: %v, mode %v", p, err, st.Mode())
	}
	f, err := elf.Open(p)
	if err != nil {
		t.Fatalf("agent binary is not an ELF: %v", err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		t.Errorf("agent binary is for %v, want x86-64", f.Machine)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Error("agent binary is dynamically linked, want static")
		}
	}
}

// TestCommandStatic: the banger and bangerd the tests and scripts/bench run
// are static, as scripts/quickstart builds them (the CLI's start is part of
// every figure the bench takes); banger-helper keeps cgo.
func TestCommandStatic(t *testing.T) {
	for _, tc := range []struct {
		name   string
		static bool
	}{{"banger", true}, {"bangerd", true}, {"banger-helper", false}} {
		f, err := elf.Open(Command(t, tc.name))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		interp := false
		for _, prog := range f.Progs {
			interp = interp || prog.Type == elf.PT_INTERP
		}
		f.Close()
		if cgo := os.Getenv("CGO_ENABLED"); !tc.static && (cgo == "0" || exec.Command("gcc", "--version").Run() != nil) {
			continue // no cgo to be had here: the helper is static too
		}
		if interp == tc.static {
			t.Errorf("%s: dynamically linked %v, want %v", tc.name, interp, !tc.static)
		}
	}
}

func TestRequireQEMU(t *testing.T) {
	p := RequireQEMU(t)
	if !filepath.IsAbs(p) {
		t.Errorf("RequireQEMU = %q, want an absolute path", p)
	}
}
