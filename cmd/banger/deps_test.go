package main

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestCLIDoesNotLinkTheDaemon proves the wire types live outside bangerd:
// the banger binary links neither the store (SQLite) nor the VMM drivers.
// Nor cobra/doc's markdown, roff and YAML engines: every package linked in
// runs its initialisers at each start, which `banger exec` pays every time
// (the reference is written by internal/cli's own generator). Nor the MCP
// SDK: `banger mcp` runs bangerd's server (bangerd mcp).
func TestCLIDoesNotLinkTheDaemon(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go toolchain on PATH to list dependencies")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps printed too little: %q", out)
	}
	forbidden := []string{
		"modernc.org/sqlite",
		"github.com/bangerdev/banger/internal/daemon",
		"github.com/bangerdev/banger/internal/store",
		"github.com/bangerdev/banger/internal/vmm/qemu",
		"github.com/bangerdev/banger/internal/vmm/firecracker",
		"github.com/spf13/cobra/doc",
		"github.com/russross/blackfriday/v2",
		"github.com/cpuguy83/go-md2man/v2",
		"go.yaml.in/yaml/v3",
		"gopkg.in/yaml.v3",
		"github.com/modelcontextprotocol/go-sdk",
		"github.com/bangerdev/banger/internal/mcpserver",
	}
	for _, d := range deps {
		for _, f := range forbidden {
			if d == f || strings.HasPrefix(d, f+"/") {
				t.Errorf("cmd/banger depends on %s", d)
			}
		}
	}
}
