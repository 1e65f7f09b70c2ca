package e2e

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testenv"
)

// TestRunPreparesDefaults: `banger run` on an empty home imports Debian's
// cloud kernel with apt and builds a Debian image with debootstrap from the
// host's mirror, then runs the command in a VM of that image.
func TestRunPreparesDefaults(t *testing.T) {
	testenv.RequireQEMU(t)
	if os.Geteuid() != 0 {
		t.Skip("debootstrap without root needs fakechroot; this test runs the root path (CI is root)")
	}
	for _, tool := range []string{"debootstrap", "apt-get"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
	h := home(t)
	startDaemon(t, h, "BANGER_VMM=qemu")
	out, errOut, code := banger(t, h, "run", "--rm", "--memory", "256M", "--disk", "512M", "--", "cat", "/etc/debian_version")
	if code != 0 {
		t.Fatalf("run: exit %d\n%s\n%s", code, out, errOut)
	}
	if !regexp.MustCompile(`(?m)^12\.\d+$`).MatchString(strings.TrimSpace(out)) {
		t.Fatalf("not a Debian 12 guest: %q", out)
	}
	for _, want := range []string{"importing Debian's cloud kernel", "building Debian bookworm"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("run did not say it was %q: %s", want, errOut)
		}
	}
	// --rm removed the VM; the defaults stay for the next run
	if ls := mustBanger(t, h, "vm", "ls", "-o", "json"); strings.TrimSpace(ls) != "[]" {
		t.Fatalf("VM left after run --rm: %s", ls)
	}
	if ims := mustBanger(t, h, "image", "ls"); !strings.Contains(ims, "debian-bookworm") {
		t.Fatalf("default image not kept: %s", ims)
	}
}
