package paths

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A home whose directories came out with the wrong mode (a 0177 umask made
// ssh/ 0600, without its search bit) is reported and repaired.
func TestRepairFixesModes(t *testing.T) {
	home := filepath.Join(t.TempDir(), "h")
	l, err := Resolve(home)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Ensure(); err != nil {
		t.Fatal(err)
	}
	for _, d := range l.Dirs() {
		if fi, _ := os.Stat(d); fi.Mode().Perm() != DirMode {
			t.Fatalf("%s made with %v", d, fi.Mode().Perm())
		}
	}
	os.Chmod(l.SSHDir(), 0o600)
	os.Chmod(l.VMsDir(), 0o755)
	probs := l.CheckModes()
	if len(probs) != 2 || !strings.Contains(strings.Join(probs, "\n"), "chmod 700 "+l.SSHDir()) {
		t.Fatalf("problems: %q", probs)
	}
	fixed, err := l.Repair()
	if err != nil || len(fixed) != 2 {
		t.Fatalf("repair: %v %v", fixed, err)
	}
	if probs := l.CheckModes(); len(probs) != 0 {
		t.Fatalf("after repair: %q", probs)
	}
}
