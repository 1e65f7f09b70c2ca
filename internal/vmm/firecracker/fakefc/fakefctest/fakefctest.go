// Package fakefctest gives tests a built fake firecracker (and fake jailer),
// wired to the pinned API spec and a per-test record file, and fails the test
// when the fake saw any request that breaks the spec.
//
//	func TestMain(m *testing.M) { os.Exit(fakefctest.RunTests(m)) } // optional: one build per package
//
//	func TestX(t *testing.T) {
//		fc := fakefctest.Setup(t)              // skips only when the pinned spec is absent
//		d := firecracker.New(firecracker.Options{Binary: fc.Binary})
//		...                                     // violations fail the test at cleanup
//	}
package fakefctest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fcspec"
)

// Package is the import path of the fake's main package.
const Package = "github.com/bangerdev/banger/internal/vmm/firecracker/fakefc/cmd/fakefirecracker"

var (
	sharedDir string // set by RunTests

	buildMu    sync.Mutex
	builtBin   string
	builtInDir string
)

// RunTests runs m with one build of the fake shared by all tests of the
// package, removed afterwards. Use from TestMain; Setup works without it
// (building into each test's temp dir).
func RunTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "banger-fakefc-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakefctest:", err)
		return 1
	}
	sharedDir = dir
	defer os.RemoveAll(dir)
	return m.Run()
}

// Build compiles the fake into dir as "firecracker" with a "jailer" link to
// it, and returns the path of "firecracker".
func Build(ctx context.Context, dir string) (string, error) {
	// go test puts its own GOROOT/bin first in PATH.
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("build fake firecracker: go toolchain not found: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	out := filepath.Join(dir, "firecracker")
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, Package)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build fake firecracker: %w\n%s", err, b)
	}
	jailer := filepath.Join(dir, "jailer")
	_ = os.Remove(jailer)
	if err := os.Link(out, jailer); err != nil {
		return "", fmt.Errorf("link fake jailer: %w", err)
	}
	return out, nil
}

// Env is a fake firecracker set up for one test.
type Env struct {
	Binary string // the fake firecracker
	Jailer string // the same program under the name "jailer"
	Spec   string // firecracker.yaml in use
	Record string // this test's record file

	spec            *fcspec.Spec
	allowViolations bool
}

var (
	specOnce sync.Once
	specPath string
	specSkip string
	specErr  error
	specDoc  *fcspec.Spec
)

// Setup builds the fake (once), finds the pinned spec and points FAKEFC_SPEC
// and FAKEFC_RECORD at it and at a fresh record file with t.Setenv (so the
// test must not be parallel). It skips the test only when the spec directory
// is absent and BANGER_FIRECRACKER_SPEC is unset; any other problem fails it.
// At cleanup the test fails if the fake recorded a violation, unless
// AllowViolations was called.
func Setup(t testing.TB) *Env {
	t.Helper()
	specOnce.Do(func() {
		specPath, specSkip, specErr = fcspec.Locate(context.Background())
		if specErr == nil && specSkip == "" {
			specDoc, specErr = fcspec.Load(specPath)
		}
	})
	if specErr != nil {
		t.Fatalf("firecracker API spec: %v", specErr)
	}
	if specSkip != "" {
		t.Skip(specSkip)
	}
	bin, err := binary(t)
	if err != nil {
		t.Fatal(err)
	}
	e := &Env{
		Binary: bin,
		Jailer: filepath.Join(filepath.Dir(bin), "jailer"),
		Spec:   specPath,
		Record: filepath.Join(t.TempDir(), "fakefc-record.jsonl"),
		spec:   specDoc,
	}
	t.Setenv(fakefc.EnvSpec, e.Spec)
	t.Setenv(fakefc.EnvRecord, e.Record)
	t.Setenv(fakefc.EnvFail, "")
	t.Setenv(fakefc.EnvMaxLifetime, "2m")
	t.Cleanup(func() {
		if e.allowViolations {
			return
		}
		for _, v := range e.Violations(t) {
			t.Errorf("fake firecracker saw a spec violation: %s %s %s: %s", v.Method, v.Path, string(v.Body), v.Fault)
		}
	})
	return e
}

func binary(t testing.TB) (string, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	if sharedDir != "" {
		if builtBin != "" && builtInDir == sharedDir {
			return builtBin, nil
		}
		bin, err := Build(context.Background(), sharedDir)
		if err != nil {
			return "", err
		}
		builtBin, builtInDir = bin, sharedDir
		return bin, nil
	}
	return Build(context.Background(), t.TempDir())
}

// Fail sets FAKEFC_FAIL for VMMs started from now on (see fakefc.ParseFailures).
func (e *Env) Fail(t testing.TB, spec string) { t.Setenv(fakefc.EnvFail, spec) }

// AllowViolations stops the cleanup check (for tests that provoke them).
func (e *Env) AllowViolations() { e.allowViolations = true }

// Records returns everything recorded so far.
func (e *Env) Records(t testing.TB) []fakefc.Record {
	t.Helper()
	recs, err := fakefc.ReadRecords(e.Record)
	if err != nil {
		t.Fatalf("read fake firecracker records: %v", err)
	}
	return recs
}

// APIRequests returns the recorded API requests, in order.
func (e *Env) APIRequests(t testing.TB) []fakefc.Record {
	t.Helper()
	var out []fakefc.Record
	for _, r := range e.Records(t) {
		if r.Kind == fakefc.KindAPI {
			out = append(out, r)
		}
	}
	return out
}

// Violations returns the records whose verdict is a violation.
func (e *Env) Violations(t testing.TB) []fakefc.Record {
	t.Helper()
	var out []fakefc.Record
	for _, r := range e.Records(t) {
		if r.Verdict == fakefc.VerdictViolation {
			out = append(out, r)
		}
	}
	return out
}

// Sequence renders API requests as "METHOD /path" lines, for comparisons.
func Sequence(recs []fakefc.Record) []string {
	out := make([]string, 0, len(recs))
	for _, r := range recs {
		s := r.Method + " " + r.Path
		if r.Path == "/actions" && len(r.Body) > 0 {
			var a struct {
				ActionType string `json:"action_type"`
			}
			if err := json.Unmarshal(r.Body, &a); err == nil {
				s += " " + a.ActionType
			}
		}
		out = append(out, s)
	}
	return out
}

// Contains reports whether any line of the file at path contains sub.
func Contains(path, sub string) bool {
	b, err := os.ReadFile(path)
	return err == nil && strings.Contains(string(b), sub)
}
