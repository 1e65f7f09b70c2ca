package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/api"
)

func TestParseCpArg(t *testing.T) {
	tests := []struct {
		in   string
		want cpArg
	}{
		{"alpha:/etc/hosts", cpArg{"alpha", "/etc/hosts"}},
		{"alpha:", cpArg{"alpha", "."}},
		{"alpha:rel/x", cpArg{"alpha", "rel/x"}},
		{"./a:b", cpArg{"", "./a:b"}},
		{"/abs/a:b", cpArg{"", "/abs/a:b"}},
		{":x", cpArg{"", ":x"}},
		{"plain", cpArg{"", "plain"}},
	}
	for _, tt := range tests {
		if got := parseCpArg(tt.in); got != tt.want {
			t.Errorf("parseCpArg(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
	}
}

func TestRenderSSHConfig(t *testing.T) {
	res := api.SSHConfigResult{
		Hosts: []api.SSHHost{{Name: "alpha"}, {Name: "beta"}}, User: "root",
		IdentityFile: "/home/u/my keys/id_ed25519", KnownHosts: "/data/100%/known_hosts",
	}
	out := renderSSHConfig(res, "/opt/my bin/banger", "/h", "banger-")
	for _, want := range []string{
		"Host banger-alpha\n  HostName alpha\n  User root\n",
		"Host banger-beta\n",
		`  IdentityFile "/home/u/my keys/id_ed25519"`,
		"  IdentitiesOnly yes\n",
		"  StrictHostKeyChecking yes\n",
		"  UserKnownHostsFile /data/100%%/known_hosts\n",
		"  ProxyCommand env BANGER_HOME=/h '/opt/my bin/banger' ssh-proxy %h\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("ssh config lacks %q:\n%s", want, out)
		}
	}
	if out := renderSSHConfig(res, "/usr/bin/banger", "", ""); strings.Contains(out, "BANGER_HOME") || !strings.Contains(out, "ProxyCommand /usr/bin/banger ssh-proxy %h") {
		t.Errorf("without BANGER_HOME:\n%s", out)
	}
}

// TestCopyPlanLocal runs the copy logic with the host filesystem on both sides.
func TestCopyPlanLocal(t *testing.T) {
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "sub"), 0o755)
	os.WriteFile(filepath.Join(tree, "run.sh"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(tree, "sub", "secret"), []byte("s"), 0o600)
	os.Symlink("run.sh", filepath.Join(tree, "link"))
	os.Chmod(filepath.Join(tree, "sub"), 0o750)
	fs := osFS{}
	copyTo := func(src, dst string, recursive bool) error {
		plan, err := planCopy(fs, fs, cpArg{Path: src}, cpArg{VM: "vm", Path: dst}, recursive)
		if err != nil {
			return err
		}
		return runCopy(fs, fs, plan, nil, cpArg{Path: src}, cpArg{VM: "vm", Path: dst})
	}
	mode := func(p string) os.FileMode {
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Mode()
	}

	tests := []struct {
		name, src, dst string
		recursive      bool
		errHas         string
		check          func(t *testing.T)
	}{
		{"directory needs -r", tree, filepath.Join(dir, "x"), false, "use cp -r", nil},
		{"missing source", filepath.Join(dir, "nope"), filepath.Join(dir, "x"), false, "no such file", nil},
		{"file into a missing directory", filepath.Join(tree, "run.sh"), filepath.Join(dir, "missing") + "/", false, "no such directory", nil},
		{"file as a new name", filepath.Join(tree, "run.sh"), filepath.Join(dir, "copy.sh"), false, "", func(t *testing.T) {
			if m := mode(filepath.Join(dir, "copy.sh")); m.Perm() != 0o755 {
				t.Fatalf("mode %v", m)
			}
		}},
		{"tree as a new name", tree, filepath.Join(dir, "t2"), true, "", func(t *testing.T) {
			if m := mode(filepath.Join(dir, "t2", "sub")); !m.IsDir() || m.Perm() != 0o750 {
				t.Fatalf("sub mode %v", m)
			}
			if m := mode(filepath.Join(dir, "t2", "sub", "secret")); m.Perm() != 0o600 {
				t.Fatalf("secret mode %v", m)
			}
			if l, err := os.Readlink(filepath.Join(dir, "t2", "link")); err != nil || l != "run.sh" {
				t.Fatalf("link %q %v", l, err)
			}
		}},
		{"tree into an existing directory", tree, filepath.Join(dir, "t2"), true, "", func(t *testing.T) {
			if b, err := os.ReadFile(filepath.Join(dir, "t2", "tree", "sub", "secret")); err != nil || string(b) != "s" {
				t.Fatalf("nested copy: %q %v", b, err)
			}
		}},
		{"tree over a file", tree, filepath.Join(dir, "copy.sh"), true, "not a directory", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := copyTo(tt.src, tt.dst, tt.recursive)
			if tt.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("err = %v, want one saying %q", err, tt.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t)
		})
	}
}
