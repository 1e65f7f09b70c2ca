package examples

import (
	"context"
	"os/exec"
	"testing"
	"time"
)

// TestExamplesBuild builds every example program.
func TestExamplesBuild(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go toolchain on PATH")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", t.TempDir()+"/", "./listvms", "./sandbox")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build examples: %v\n%s", err, out)
	}
}
