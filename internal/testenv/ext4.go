package testenv

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// RequireCleanExt4 fails t unless the ext4 image at p was left with no
// journal to replay (no needs_recovery: the guest unmounted it or
// remounted it read-only before it ended) and, as it is, passes e2fsck -fn
// (checked on a sparse copy, so p is not touched). It skips when
// e2fsprogs is not installed (.ci/run installs it).
func RequireCleanExt4(t testing.TB, p string) {
	t.Helper()
	for _, tool := range []string{"dumpe2fs", "e2fsck"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (e2fsprogs): %v", tool, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "dumpe2fs", "-h", p).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs -h %s: %v\n%s", p, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "Filesystem features:") && strings.Contains(l, "needs_recovery") {
			t.Fatalf("%s: the journal needs recovery after the guest ended: %s", p, l)
		}
	}
	c := filepath.Join(t.TempDir(), "copy.ext4")
	if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", p, c).CombinedOutput(); err != nil {
		t.Fatalf("copy %s: %v\n%s", p, err, out)
	}
	if out, err := exec.CommandContext(ctx, "e2fsck", "-fn", c).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn of %s as the guest left it: %v\n%s", p, err, out)
	}
}
