package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
)

func TestEveryCommandHasAnExample(t *testing.T) {
	a := &App{}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if !c.Hidden && c.Name() != "help" && strings.TrimSpace(c.Example) == "" {
			t.Errorf("%q has no Example (add one to the command or to examples in help.go)", c.CommandPath())
		}
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(a.newRoot())
}

func TestUnknownSubcommandFails(t *testing.T) {
	t.Setenv("BANGER_HOME", t.TempDir())
	for _, tc := range []struct {
		args    []string
		suggest string
	}{
		{[]string{"vm", "lss"}, "did you mean ls"},
		{[]string{"vm", "shwo", "x"}, "did you mean show"},
		{[]string{"image", "lst"}, "did you mean ls"},
		{[]string{"lss"}, ""},
	} {
		out, errOut, code := runCLI(t, tc.args...)
		if code == 0 || !strings.Contains(errOut, "unknown command") || !strings.Contains(errOut, tc.suggest) {
			t.Errorf("banger %s: exit %d stdout %q stderr %q", strings.Join(tc.args, " "), code, out, errOut)
		}
	}
	if out, _, code := runCLI(t, "vm"); code != 0 || !strings.Contains(out, "Available Commands") {
		t.Errorf("banger vm (no subcommand) should print help: %d %q", code, out)
	}
}

func completions(t *testing.T, args ...string) []string {
	t.Helper()
	out, errOut, code := runCLI(t, append([]string{"__complete"}, args...)...)
	if code != 0 {
		t.Fatalf("__complete %q: %d %s", args, code, errOut)
	}
	var names []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasPrefix(l, ":") || l == "" {
			continue
		}
		n, _, _ := strings.Cut(l, "\t")
		names = append(names, n)
	}
	return names
}

func TestDynamicCompletion(t *testing.T) {
	startFakeVMs(t, testVMs()...)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"vm", "show", ""}, "web web-old db"},
		{[]string{"vm", "show", "we"}, "web web-old"},
		{[]string{"exec", ""}, "web"},
		{[]string{"cp", ""}, "web:"},
		{[]string{"vm", "create", "x", "--vmm", ""}, "qemu firecracker"},
		{[]string{"vm", "ls", "-o", ""}, "table json"},
		{[]string{"vm", "ls", "--filter", "state=r"}, "state=running state=stopped state=error name= image= id="},
	} {
		if got := strings.Join(completions(t, tc.args...), " "); got != tc.want {
			t.Errorf("__complete %q: %q, want %q", tc.args, got, tc.want)
		}
	}
}

// TestCompletionNeverStartsBangerd: with nothing listening, completion
// answers at once with nothing, and no daemon (no socket) appears.
func TestCompletionNeverStartsBangerd(t *testing.T) {
	h := t.TempDir()
	t.Setenv("BANGER_HOME", h)
	start := time.Now()
	if got := completions(t, "vm", "show", ""); len(got) != 0 {
		t.Fatalf("completions without bangerd: %q", got)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("completion took %v without bangerd", d)
	}
	if _, err := os.Stat(filepath.Join(h, "run", "bangerd.sock")); err == nil {
		t.Fatal("completion started bangerd")
	}
}

func TestDocsCommand(t *testing.T) {
	md, man := t.TempDir(), t.TempDir()
	if _, errOut, code := runCLI(t, "docs", "--markdown", md, "--man", man); code != 0 {
		t.Fatalf("docs: %d %s", code, errOut)
	}
	for _, p := range []string{filepath.Join(md, "banger.md"), filepath.Join(md, "banger_vm_ls.md"), filepath.Join(md, "banger_exec.md"), filepath.Join(man, "banger-vm-ls.1")} {
		b, err := os.ReadFile(p)
		if err != nil || len(b) == 0 {
			t.Errorf("%s: %v", p, err)
		}
	}
	b, _ := os.ReadFile(filepath.Join(md, "banger_vm_ls.md"))
	if !strings.Contains(string(b), "--format") || !strings.Contains(string(b), "Examples") {
		t.Errorf("banger_vm_ls.md lacks flags or examples:\n%s", b)
	}
}

// TestEveryListingHasFormat: every ls (and show) takes --format.
func TestEveryListingHasFormat(t *testing.T) {
	a := &App{}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if (c.Name() == "ls" || c.Name() == "show") && c.Flags().Lookup("format") == nil {
			t.Errorf("%q has no --format", c.CommandPath())
		}
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(a.newRoot())
}
