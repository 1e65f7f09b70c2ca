package e2e

import (
	"strings"
	"testing"
	"time"
)

// TestAgentLifecycleRealGuest: vm ls -q, --format, --filter and completion
// see real VMs; a VM created with --ttl 5s is gone within 10 s of its
// create; vm prune deletes the stopped one.
func TestAgentLifecycleRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	if _, errOut, code := banger(t, h, "vm", "create", "keep", "--memory", "256M", "--disk", "512M"); code != 0 {
		t.Fatalf("create: %d %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "rm", "-f", "keep") })
	if out := mustBanger(t, h, "vm", "ls", "--format", "{{.Name}} {{.State}}"); out != "keep running\n" {
		t.Errorf("vm ls --format: %q", out)
	}
	if out := mustBanger(t, h, "vm", "ls", "-q"); len(strings.TrimSpace(out)) < 12 || strings.Contains(out, "keep") {
		t.Errorf("vm ls -q: %q", out)
	}
	if out := mustBanger(t, h, "__complete", "vm", "show", ""); !strings.Contains(out, "keep") {
		t.Errorf("__complete vm show: %q", out)
	}

	t0 := time.Now()
	if _, errOut, code := banger(t, h, "vm", "create", "brief", "--ttl", "5s", "--memory", "256M", "--disk", "512M"); code != 0 {
		t.Fatalf("create --ttl: %d %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "rm", "-f", "brief") })
	created := time.Since(t0)
	waitFor(t, 10*time.Second-time.Since(t0), "the VM with --ttl 5s to be deleted", func() bool {
		return strings.TrimSpace(mustBanger(t, h, "vm", "ls", "-q", "--filter", "name=brief")) == ""
	})
	t.Logf("MEASURE --ttl 5s: created in %v, gone %v after the create began", created.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	if !strings.Contains(d.logs.String(), "ttl expired") {
		t.Errorf("bangerd did not log the expiry")
	}

	mustBanger(t, h, "vm", "stop", "keep")
	if out := mustBanger(t, h, "vm", "prune"); out != "deleted keep\n" {
		t.Errorf("vm prune: %q", out)
	}
	if out := mustBanger(t, h, "vm", "ls", "-q"); out != "" {
		t.Errorf("VMs left: %q", out)
	}
}
