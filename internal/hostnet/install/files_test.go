package install

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerdev/banger/internal/hostnet/helper"
)

// TestInstallBinaryCopiesIntoTrustedDir: the unit's binary is a copy in a
// root-owned directory; swapping the user's binary afterwards changes
// nothing, and unsafe destinations are refused.
func TestInstallBinaryCopiesIntoTrustedDir(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "banger-helper")
	os.WriteFile(src, []byte("genuine"), 0o755)
	dst := filepath.Join(dir, "libexec", "banger", "banger-helper")
	if err := InstallBinary(src, dst); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(src, []byte("swapped by the user"), 0o755)
	b, err := os.ReadFile(dst)
	fi, _ := os.Stat(dst)
	if err != nil || string(b) != "genuine" || fi.Mode().Perm() != 0o755 || int(fi.Sys().(*syscall.Stat_t).Uid) != os.Geteuid() {
		t.Fatalf("installed copy: %q %v %v", b, fi.Mode(), err)
	}

	real := filepath.Join(dir, "real")
	os.Mkdir(real, 0o755)
	link := filepath.Join(dir, "link")
	os.Symlink(real, link)
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o755)
	os.Chmod(open, 0o777)
	cases := map[string]string{
		"symlinked directory":      filepath.Join(link, "banger-helper"),
		"world-writable directory": filepath.Join(open, "banger-helper"),
	}
	if os.Geteuid() == 0 {
		foreign := filepath.Join(dir, "foreign")
		os.Mkdir(foreign, 0o755)
		os.Chown(foreign, 65534, 65534)
		cases["directory owned by nobody"] = filepath.Join(foreign, "banger-helper")
	} else {
		t.Log("not root: the foreign-owner case needs chown and is skipped")
	}
	for name, p := range cases {
		if err := InstallBinary(src, p); err == nil {
			t.Errorf("%s: installed into %s", name, p)
		}
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s: %s was written", name, p)
		}
	}
	if ents, _ := os.ReadDir(real); len(ents) != 0 {
		t.Errorf("wrote through the symlink: %v", ents)
	}
}

// TestWriteHelperConfig: install writes the range the helper reads; an
// existing file is kept unless a pool is given, and then only the pool
// changes.
func TestWriteHelperConfig(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "etc", "banger", "helper.json")
	if err := WriteHelperConfig(p, ""); err != nil {
		t.Fatal(err)
	}
	fc, found, err := helper.LoadConfigFile(p)
	if err != nil || !found || fc.Pool != "172.30.0.0/16" {
		t.Fatalf("new configuration as the helper reads it: %+v %v %v", fc, found, err)
	}
	os.WriteFile(p, []byte(`{"pool":"10.1.0.0/16","max_taps_per_user":3}`), 0o644)
	if err := WriteHelperConfig(p, ""); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); !strings.Contains(string(b), "10.1.0.0/16") {
		t.Fatalf("existing configuration rewritten: %s", b)
	}
	if err := WriteHelperConfig(p, "192.168.40.7/24"); err != nil {
		t.Fatal(err)
	}
	fc, _, err = helper.LoadConfigFile(p)
	if err != nil || fc.Pool != "192.168.40.0/24" || fc.MaxTapsPerUser == nil || *fc.MaxTapsPerUser != 3 {
		t.Fatalf("pool replaced, other settings kept: %+v %v", fc, err)
	}
	for _, bad := range []string{"8.8.8.0/24", "fd00::/64", "10.0.0.0/30", "nonsense"} {
		if err := WriteHelperConfig(p, bad); err == nil {
			t.Errorf("pool %q accepted", bad)
		}
	}
}
