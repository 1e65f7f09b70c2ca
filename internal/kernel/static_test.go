package kernel

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckStaticAgent(t *testing.T) {
	// /bin/sh (dash or bash) is dynamically linked on every Debian host.
	sh, err := filepath.EvalSymlinks("/bin/sh")
	if err != nil {
		t.Skipf("no /bin/sh: %v", err)
	}
	if err := CheckStaticAgent(sh); err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Fatalf("dynamic %s accepted or no fix given: %v", sh, err)
	}
	notELF := filepath.Join(t.TempDir(), "agent")
	os.WriteFile(notELF, []byte("#!/bin/sh\n"), 0o755)
	if err := CheckStaticAgent(notELF); err == nil {
		t.Fatal("a script accepted")
	}
	// a static Go binary passes
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "main.go"), []byte("package main\nfunc main() {}\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module x\n"), 0o644)
	bin := filepath.Join(dir, "x")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("cannot build a test binary: %v: %s", err, out)
	}
	if err := CheckStaticAgent(bin); err != nil {
		t.Fatalf("static binary refused: %v", err)
	}
}
