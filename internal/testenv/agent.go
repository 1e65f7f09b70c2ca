package testenv

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/kernel"
)

var agentMemo memo[string]

// AgentBinary builds ./cmd/banger-agent (static: CGO_ENABLED=0, -trimpath,
// -ldflags="-s -w", GOOS=linux GOARCH=amd64) once per test process and
// returns its path. The binary is kept in the test cache under its content
// hash (so Initrd can key on it), not in a temporary directory. A build error
// fails the test.
func AgentBinary(t testing.TB) string {
	t.Helper()
	return agentMemo.get(t, func(s *step) string {
		p, err := buildAgent(t)
		if err != nil {
			s.Fatalf("build banger-agent: %v", err)
		}
		return p
	})
}

// RepoRoot returns the root of the banger module (from `go env GOMOD`).
func RepoRoot(t testing.TB) string {
	t.Helper()
	root, err := repoRoot(testCtx(t, time.Minute))
	if err != nil {
		t.Fatalf("find the banger module root: %v", err)
	}
	return root
}

// goTool finds the go command (go test puts its own GOROOT/bin first in PATH).
func goTool() (string, error) {
	p, err := exec.LookPath("go")
	if err != nil {
		return "", errors.New("the go command is not in PATH")
	}
	return p, nil
}

func repoRoot(ctx context.Context) (string, error) {
	gobin, err := goTool()
	if err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, gobin, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside a Go module")
	}
	return filepath.Dir(gomod), nil
}

func buildAgent(t testing.TB) (string, error) {
	ctx := testCtx(t, 10*time.Minute)
	root, err := repoRoot(ctx)
	if err != nil {
		return "", err
	}
	gobin, err := goTool()
	if err != nil {
		return "", err
	}
	agents := filepath.Join(CacheDir(t), "agents")
	if err := os.MkdirAll(agents, 0o755); err != nil {
		return "", err
	}
	prune(agents)
	tmp, err := os.MkdirTemp(agents, ".build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil { // it becomes the cache entry
		return "", err
	}
	out := filepath.Join(tmp, "banger-agent")
	start := time.Now()
	cmd := exec.CommandContext(ctx, gobin, "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./cmd/banger-agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	cmd.WaitDelay = 5 * time.Second
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build ./cmd/banger-agent in %s: %w\n%s", root, err, buf.String())
	}
	sum, err := hashFile(out)
	if err != nil {
		return "", err
	}
	final := filepath.Join(agents, sum[:24])
	if err := os.Rename(tmp, final); err != nil && !errors.Is(err, fs.ErrExist) && !isNotEmpty(err) {
		return "", fmt.Errorf("store banger-agent in the cache: %w", err)
	}
	touch(final)
	t.Logf("testenv: built banger-agent in %v", time.Since(start).Round(time.Millisecond))
	return filepath.Join(final, "banger-agent"), nil
}

func isNotEmpty(err error) bool {
	var le *os.LinkError
	return errors.As(err, &le) && (errors.Is(le.Err, fs.ErrExist) || strings.Contains(le.Err.Error(), "not empty"))
}

var kernelSrcMemo memo[string]

// kernelSourceHash hashes the non-test sources of internal/kernel, so that a
// change to the initrd builder invalidates cached initrds.
func kernelSourceHash(t testing.TB) string {
	t.Helper()
	return kernelSrcMemo.get(t, func(s *step) string {
		root, err := repoRoot(testCtx(t, time.Minute))
		if err != nil {
			s.Fatalf("find the banger module root: %v", err)
		}
		files, err := filepath.Glob(filepath.Join(root, "internal", "kernel", "*.go"))
		if err != nil || len(files) == 0 {
			s.Fatalf("find internal/kernel sources in %s: %v", root, err)
		}
		h := sha256.New()
		for _, f := range files { // Glob sorts
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			sum, err := hashFile(f)
			if err != nil {
				s.Fatalf("hash %s: %v", f, err)
			}
			fmt.Fprintf(h, "%s %s\n", filepath.Base(f), sum)
		}
		return hex.EncodeToString(h.Sum(nil))
	})
}

// initrdVersion changes whenever what Initrd puts into an initrd changes
// outside the kernel package (bump it to invalidate cached initrds).
const initrdVersion = "1"

// Initrd returns an initrd (gzip newc cpio) for GuestKernel with the default
// modules and agentPath as /init. It is cached by the content of its inputs;
// callers must not modify it.
func Initrd(t testing.TB, agentPath string) string {
	t.Helper()
	k := GuestKernel(t)
	agentSum, err := hashFile(agentPath)
	if err != nil {
		t.Fatalf("read agent binary: %v", err)
	}
	manifest, err := os.ReadFile(filepath.Join(filepath.Dir(k.VmlinuxPath), kernel.ManifestName))
	if err != nil {
		t.Fatalf("read kernel manifest: %v", err)
	}
	depSum, err := hashFile(filepath.Join(k.ModulesDir, "modules.dep"))
	if err != nil {
		t.Fatalf("read modules.dep: %v", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "initrd %s\nbuilder %s\nkernel %s\n%s\ndep %s\nagent %s\nmodules %s\n",
		initrdVersion, kernelSourceHash(t), k.Version, manifest, depSum, agentSum, strings.Join(kernel.DefaultModules(), " "))
	key := hex.EncodeToString(h.Sum(nil))[:24]

	dir := filepath.Join(CacheDir(t), "initrd")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("create %s: %v", dir, err)
	}
	p := filepath.Join(dir, key+".cpio.gz")
	if _, err := os.Stat(p); err == nil {
		touch(p)
		return p
	}
	prune(dir)
	// Concurrent builders write the same bytes and rename atomically.
	if err := kernel.WriteInitrd(testCtx(t, 5*time.Minute), p, kernel.InitrdOptions{Kernel: k, AgentPath: agentPath}); err != nil {
		t.Fatalf("build initrd: %v", err)
	}
	return p
}
