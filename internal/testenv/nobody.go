package testenv

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// NobodyUID is the uid (and gid) tests play another user with.
const NobodyUID = 65534

// AsNobody returns a command that runs the tests matching run of this test
// binary again as nobody (uid and gid 65534), with the extra arguments. The
// binary is copied into a fresh directory nobody can enter and run (the
// test's own build directory may not be), removed when the test ends; the
// command's Dir is that directory. The caller sets Env (empty means this
// process's environment) and runs it. The caller must be root.
func AsNobody(ctx context.Context, t testing.TB, run string, args ...string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "banger-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, filepath.Base(self))
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, bin, append([]string{"-test.run=" + run, "-test.count=1"}, args...)...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: NobodyUID, Gid: NobodyUID}}
	return cmd
}
