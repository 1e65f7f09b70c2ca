package image

import (
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

const nobodyEnv = "BANGER_TEST_DEBUGFS_AS_NOBODY"

// TestImageBuilderAsNobody: under root (CI), run the builder's tests again
// as nobody, the way bangerd runs: RLIMIT_NPROC binds only unprivileged
// users, and the whole build must work under it.
func TestImageBuilderAsNobody(t *testing.T) {
	requireE2fsprogs(t)
	if os.Geteuid() != 0 {
		t.Skip("not root: these tests already ran unprivileged")
	}
	if os.Getenv(nobodyEnv) != "" {
		return
	}
	tests := []string{"TestDebugfsCannotStartProcesses", "TestBuildExt4Exact", "TestHostileNamesBuildExactly",
		"TestLongFifoNameRunsNoCommand", "TestLongXattrNameRunsNoCommand"}
	out := rerunAsNobody(t, "^("+strings.Join(tests, "|")+")$")
	for _, name := range tests {
		if !strings.Contains(out, "--- PASS: "+name+" ") {
			t.Errorf("%s did not pass as nobody", name)
		}
	}
}

// TestDebugfsCannotStartProcesses: even a batch with a shell escape (which
// the writer never makes) runs nothing, because runDebugfs forbids debugfs
// to fork.
func TestDebugfsCannotStartProcesses(t *testing.T) {
	requireE2fsprogs(t)
	if os.Geteuid() == 0 {
		t.Skip("root ignores RLIMIT_NPROC; TestImageBuilderAsNobody runs this test as nobody")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.ext4")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mkfs, _ := tool("mkfs.ext4")
	if out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", img, "4M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	debugfs, _ := tool("debugfs")
	marker := filepath.Join(dir, "pwned")
	script := "mkdir x\n!touch " + marker + "\n  !touch " + marker + "\nmkdir y\n"
	var stderr bytes.Buffer
	err := runDebugfs(ctx, debugfs, dir, img, []byte(script), io.Discard, &stderr)
	if _, serr := os.Stat(marker); serr == nil {
		t.Fatal("debugfs ran a shell command")
	}
	if err != nil {
		t.Fatal(err)
	}
	// The escape failed loudly, and the commands around it ran.
	if stderr.Len() == 0 {
		t.Error("the refused shell escape left no message on stderr")
	}
	out, _ := exec.CommandContext(ctx, debugfs, "-R", "ls -l /", img).CombinedOutput()
	if !strings.Contains(string(out), " x") || !strings.Contains(string(out), " y") {
		t.Errorf("the batch did not run around the escape:\n%s", out)
	}
}

// rerunAsNobody runs the named tests of this test binary again as nobody and
// returns their output.
func rerunAsNobody(t *testing.T, run string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := testenv.AsNobody(ctx, t, run, "-test.v")
	cmd.Env = append(os.Environ(), nobodyEnv+"=1", "TMPDIR="+os.TempDir(), "HOME="+cmd.Dir)
	out, err := cmd.CombinedOutput()
	t.Logf("as nobody:\n%s", out)
	if err != nil {
		t.Fatalf("as nobody: %v", err)
	}
	return string(out)
}
