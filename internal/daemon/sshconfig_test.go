package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/store"
)

// TestSSHConfigFollowsVMs: the config bangerd keeps has a banger-<name>
// host for every VM with a pinned key, and loses it when the VM goes.
func TestSSHConfigFollowsVMs(t *testing.T) {
	t.Setenv("BANGER_CLI", "/opt/banger/bin/banger")
	t.Setenv("BANGER_HOME", "")
	dir := t.TempDir()
	l := paths.Layout{ConfigDir: dir, DataDir: dir, RunDir: filepath.Join(dir, "run")}
	s := &vmService{layout: l}
	sp := &statsPoller{s: s, hostKeys: map[string]string{}}
	for _, id := range []string{"id1", "id2"} {
		os.MkdirAll(s.vmDir(id), 0o700)
		os.WriteFile(filepath.Join(s.vmDir(id), hostKeyName+".pub"), []byte("ssh-ed25519 AAAA"+id+"\n"), 0o644)
	}
	vms := []*store.VM{{ID: "id1", Name: "dev"}, {ID: "id2", Name: "web"}}
	if err := sp.writeKnownHosts(vms); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(s.sshConfigPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Host banger-dev\n  HostName dev\n", "Host banger-web\n", "ProxyCommand /opt/banger/bin/banger ssh-proxy %h",
		"UserKnownHostsFile " + s.knownHostsPath()} {
		if !strings.Contains(string(b), want) {
			t.Errorf("config lacks %q:\n%s", want, b)
		}
	}
	if fi, _ := os.Stat(s.sshConfigPath()); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	if err := sp.writeKnownHosts(vms[:1]); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(s.sshConfigPath())
	if strings.Contains(string(b), "banger-web") || !strings.Contains(string(b), "banger-dev") {
		t.Errorf("after web went:\n%s", b)
	}
}
