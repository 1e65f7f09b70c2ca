package fcspec

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// EnvSpec names the environment variable that overrides where the spec is found.
const EnvSpec = "BANGER_FIRECRACKER_SPEC"

// PinnedDir is the directory, beside the repository clone, that holds the
// pinned Firecracker API description.
const PinnedDir = "shared/firecracker-v1.16.1"

// Locate finds firecracker.yaml for tests and tools: $BANGER_FIRECRACKER_SPEC
// when set, else <repo root>/../shared/firecracker-v1.16.1/firecracker.yaml,
// the repo root being the directory of `go env GOMOD`.
//
// It returns a non-empty skip reason (and no error) only when the variable is
// unset and the pinned directory does not exist at all; every other failure
// (variable set but file missing, directory present but file missing, no go
// toolchain) is an error.
func Locate(ctx context.Context) (path, skip string, err error) {
	if p := os.Getenv(EnvSpec); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", "", fmt.Errorf("%s=%s: %w", EnvSpec, p, err)
		}
		return p, "", nil
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", "", fmt.Errorf("locate the repository root: go toolchain not on PATH (set %s to the spec instead): %w", EnvSpec, err)
	}
	out, err := exec.CommandContext(ctx, goBin, "env", "GOMOD").Output()
	if err != nil {
		return "", "", fmt.Errorf("locate the repository root with `go env GOMOD`: %w", err)
	}
	return locateFrom(strings.TrimSpace(string(out)))
}

// locateFrom finds the pinned spec beside the module whose go.mod is gomod.
func locateFrom(gomod string) (path, skip string, err error) {
	if gomod == "" || gomod == os.DevNull {
		return "", "", fmt.Errorf("locate the repository root: not inside a Go module (set %s)", EnvSpec)
	}
	dir := filepath.Join(filepath.Dir(gomod), "..", PinnedDir)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Sprintf("pinned Firecracker API not found: %s does not exist and %s is unset", filepath.Clean(dir), EnvSpec), nil
	}
	p := filepath.Join(dir, "firecracker.yaml")
	if _, err := os.Stat(p); err != nil {
		return "", "", fmt.Errorf("pinned Firecracker API spec missing: %w", err)
	}
	return filepath.Clean(p), "", nil
}
