package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestDocsCLIUpToDate: docs/cli is what `banger docs --markdown` writes
// now, so a changed command or flag cannot land with a stale reference
// (regenerate with go generate ./cmd/banger).
func TestDocsCLIUpToDate(t *testing.T) {
	t.Setenv("BANGER_HOME", t.TempDir())
	dir := t.TempDir()
	if _, errOut, code := runCLI(t, "docs", "--markdown", dir); code != 0 {
		t.Fatalf("banger docs: exit %d: %s", code, errOut)
	}
	const committed = "../../docs/cli"
	want, err := filepath.Glob(filepath.Join(dir, "*.md"))
	if err != nil || len(want) < 10 {
		t.Fatalf("banger docs wrote %d files: %v", len(want), err)
	}
	have, _ := filepath.Glob(filepath.Join(committed, "*.md"))
	names := map[string]bool{}
	for _, p := range have {
		names[filepath.Base(p)] = true
	}
	for _, p := range want {
		name := filepath.Base(p)
		delete(names, name)
		gen, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		old, err := os.ReadFile(filepath.Join(committed, name))
		if err != nil {
			t.Errorf("docs/cli/%s is missing (go generate ./cmd/banger)", name)
			continue
		}
		if !bytes.Equal(gen, old) {
			t.Errorf("docs/cli/%s is stale (go generate ./cmd/banger)", name)
		}
	}
	for name := range names {
		t.Errorf("docs/cli/%s documents no command (go generate ./cmd/banger, then remove it)", name)
	}
}
