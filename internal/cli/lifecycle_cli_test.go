package cli

import (
	"strings"
	"testing"
)

func TestVMRmSeveralAllAndPrune(t *testing.T) {
	f := startFakeVMs(t, testVMs()...)
	if _, errOut, code := runCLI(t, "vm", "rm"); code != 2 {
		t.Fatalf("vm rm with nothing: %d %s", code, errOut)
	}
	if _, errOut, code := runCLI(t, "vm", "rm", "--all", "web"); code != 2 {
		t.Fatalf("vm rm --all NAME: %d %s", code, errOut)
	}
	out, errOut, code := runCLI(t, "vm", "rm", "web-old", "web")
	if code != 1 || !strings.Contains(out, "deleted web-old") || !strings.Contains(errOut, "running") || !strings.Contains(errOut, "1 of 2") {
		t.Fatalf("vm rm web-old web: %d %q %q", code, out, errOut)
	}
	out, errOut, code = runCLI(t, "vm", "prune", "--filter", "name=zzz")
	if code != 0 || !strings.Contains(out, "nothing to prune") {
		t.Fatalf("prune nothing: %d %q %q", code, out, errOut)
	}
	out, errOut, code = runCLI(t, "vm", "prune", "-o", "json")
	if code != 0 || !strings.Contains(out, `"deleted": "db"`) || strings.Contains(out, `"web"`) {
		t.Fatalf("prune: %d %q %q", code, out, errOut)
	}
	if got := strings.Join(f.deleted, " "); got != "web-old db" {
		t.Fatalf("deleted %q", got)
	}
	out, errOut, code = runCLI(t, "vm", "rm", "--all", "--force")
	if code != 0 || out != "deleted web\n" {
		t.Fatalf("rm --all --force: %d %q %q", code, out, errOut)
	}
	if len(f.vms) != 0 {
		t.Fatalf("left: %v", f.vms)
	}
}
