package kernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

const (
	depmodTimeout   = 2 * time.Minute
	aptCacheTimeout = time.Minute
	// aptDownloadTimeout allows for a slow mirror: a kernel package is ~30 MB.
	aptDownloadTimeout = 15 * time.Minute
)

// lookTool finds a program in PATH, then in the sbin directories a normal
// user's PATH often lacks (depmod lives in /usr/sbin on Debian).
func lookTool(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		cand := filepath.Join(dir, name)
		if st, serr := os.Stat(cand); serr == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return cand, nil
		}
	}
	return "", err
}

// runTool runs a program (no shell) and returns its combined output. The
// environment gets LC_ALL=C so that output parsing does not depend on the
// user's locale.
func runTool(ctx context.Context, prog string, args ...string) ([]byte, error) {
	return runToolIn(ctx, "", prog, args...)
}

func runToolIn(ctx context.Context, dir, prog string, args ...string) ([]byte, error) {
	if _, hasDeadline := ctx.Deadline(); !hasDeadline {
		return nil, errors.New("internal error: external command without a deadline")
	}
	cmd := exec.CommandContext(ctx, prog, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil && ctx.Err() != nil {
		return out.Bytes(), fmt.Errorf("%s timed out or was cancelled: %w", filepath.Base(prog), ctx.Err())
	}
	return out.Bytes(), err
}
