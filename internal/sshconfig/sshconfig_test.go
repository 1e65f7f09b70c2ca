package sshconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRender(t *testing.T) {
	out := Render(Params{Prefix: Prefix, User: "root", IdentityFile: "/k/id", KnownHosts: "/k/known_hosts", Banger: "/opt/b in/banger", BangerHome: "/h"}, []string{"dev", "web"})
	for _, want := range []string{
		"Host banger-dev\n  HostName dev\n", "Host banger-web\n  HostName web\n", "StrictHostKeyChecking yes",
		"ProxyCommand env BANGER_HOME=/h '/opt/b in/banger' ssh-proxy %h\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("lacks %q:\n%s", want, out)
		}
	}
	if out := Render(Params{User: "root", Banger: "/b"}, nil); strings.Contains(out, "Host ") {
		t.Errorf("no VMs, yet hosts:\n%s", out)
	}
}

func TestInstall(t *testing.T) {
	dir := t.TempDir()
	inc := filepath.Join(dir, "data dir", "ssh", "config")
	cfg := filepath.Join(dir, "home", ".ssh", "config")

	// a missing ~/.ssh/config is created, 0600 in a 0700 directory
	changed, err := Install(cfg, inc)
	if err != nil || !changed {
		t.Fatalf("Install new: %v %v", changed, err)
	}
	st, _ := os.Stat(cfg)
	dst, _ := os.Stat(filepath.Dir(cfg))
	if st.Mode().Perm() != 0o600 || dst.Mode().Perm() != 0o700 {
		t.Fatalf("modes %v %v", st.Mode(), dst.Mode())
	}
	b, _ := os.ReadFile(cfg)
	if !strings.Contains(string(b), `Include "`+inc+`"`) {
		t.Fatalf("no Include:\n%s", b)
	}
	// idempotent
	if changed, err := Install(cfg, inc); err != nil || changed {
		t.Fatalf("Install again: %v %v", changed, err)
	}
	if b2, _ := os.ReadFile(cfg); string(b2) != string(b) {
		t.Fatalf("second install changed the file")
	}

	// an existing config keeps its content (after the Include) and mode
	cfg2 := filepath.Join(dir, "other", "config")
	os.MkdirAll(filepath.Dir(cfg2), 0o700)
	orig := "Host work\n  HostName work.example\n"
	os.WriteFile(cfg2, []byte(orig), 0o644)
	if changed, err := Install(cfg2, "/x/config"); err != nil || !changed {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(cfg2)
	if !strings.HasSuffix(string(b), "\n"+orig) || strings.Index(string(b), "Include /x/config") > strings.Index(string(b), "Host work") {
		t.Fatalf("content:\n%s", b)
	}
	if st, _ := os.Stat(cfg2); st.Mode().Perm() != 0o644 {
		t.Fatalf("mode changed to %v", st.Mode())
	}
	// an Include the user wrote counts too
	cfg3 := filepath.Join(dir, "c3")
	os.WriteFile(cfg3, []byte("include /x/config\n"), 0o600)
	if changed, err := Install(cfg3, "/x/config"); err != nil || changed {
		t.Fatalf("existing include: %v %v", changed, err)
	}
	// a symlinked config is written through its target, the link kept
	target := filepath.Join(dir, "dotfiles", "ssh_config")
	os.MkdirAll(filepath.Dir(target), 0o700)
	os.WriteFile(target, []byte(orig), 0o600)
	link := filepath.Join(dir, "linkhome", "config")
	os.MkdirAll(filepath.Dir(link), 0o700)
	os.Symlink(target, link)
	if _, err := Install(link, "/x/config"); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Lstat(link); fi.Mode()&os.ModeSymlink == 0 {
		t.Fatal("the symlink was replaced")
	}
	if b, _ := os.ReadFile(target); !strings.Contains(string(b), "Include /x/config") {
		t.Fatalf("target not updated:\n%s", b)
	}
	// a directory in the way is refused
	d := filepath.Join(dir, "isdir")
	os.MkdirAll(d, 0o700)
	if _, err := Install(d, "/x/config"); err == nil {
		t.Fatal("Install over a directory succeeded")
	}
}
