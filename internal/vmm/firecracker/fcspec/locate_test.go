package fcspec

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLocateFrom(t *testing.T) {
	base := t.TempDir()
	repo := filepath.Join(base, "main")
	if err := os.MkdirAll(repo, 0o755); err != nil {
		t.Fatal(err)
	}
	gomod := filepath.Join(repo, "go.mod")
	if _, skip, err := locateFrom(gomod); err != nil || !strings.Contains(skip, "does not exist") {
		t.Errorf("no shared dir: skip %q, err %v; want a skip", skip, err)
	}
	pinned := filepath.Join(base, PinnedDir)
	if err := os.MkdirAll(pinned, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, skip, err := locateFrom(gomod); err == nil || skip != "" {
		t.Errorf("shared dir without the spec: skip %q, err %v; want an error", skip, err)
	}
	spec := filepath.Join(pinned, "firecracker.yaml")
	if err := os.WriteFile(spec, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if p, skip, err := locateFrom(gomod); p != spec || skip != "" || err != nil {
		t.Errorf("locateFrom = %q, %q, %v; want %q", p, skip, err, spec)
	}
	if _, _, err := locateFrom(os.DevNull); err == nil {
		t.Error("no module: want an error")
	}
}
