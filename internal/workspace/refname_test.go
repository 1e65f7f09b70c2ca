package workspace

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

var refNameCases = []struct {
	name string
	ok   bool
}{
	{"refs/heads/main", true},
	{"refs/heads/feature/x-1_2", true},
	{"refs/tags/v1.0", true},
	{"refs/heads/ünïcode", true},
	{"refs/heads/a@b", true},
	{"refs/heads/a{b}", true},
	{"refs/heads/-dash", true},
	{"a/b", true},
	{"", false},
	{"@", false},
	{"main", false}, // one level
	{"refs/heads/", false},
	{"/refs/heads/x", false},
	{"refs//heads", false},
	{"refs/heads/x.", false},
	{"refs/heads/.x", false},
	{"refs/.heads/x", false},
	{"refs/heads/x.lock", false},
	{"refs/heads.lock/x", false},
	{"refs/heads/a..b", false},
	{"refs/heads/../x", false},
	{"refs/heads/a@{b", false},
	{"refs/heads/a b", false},
	{"refs/heads/a\tb", false},
	{"refs/heads/a\x7fb", false},
	{"refs/heads/a~1", false},
	{"refs/heads/a^", false},
	{"refs/heads/a:b", false},
	{"refs/heads/a?", false},
	{"refs/heads/a*", false},
	{"refs/heads/a[b", false},
	{"refs/heads/a\\b", false},
	{"refs/heads/a\x00b", false},
	{"refs/heads/" + strings.Repeat("a", maxRefName), false},
}

func TestCheckRefName(t *testing.T) {
	for _, tc := range refNameCases {
		if got := CheckRefName(tc.name); got != tc.ok {
			t.Errorf("CheckRefName(%q) = %v, want %v", tc.name, got, tc.ok)
		}
	}
}

// gitCheckRefFormat is git's own answer, or ok=false when it cannot be asked
// (git missing, or a name no command line can carry).
func gitCheckRefFormat(t testing.TB, name string) (valid, ok bool) {
	if strings.ContainsRune(name, 0) || name == "" || len(name) > maxRefName || strings.HasPrefix(name, "-") {
		return false, false
	}
	if _, err := exec.LookPath("git"); err != nil {
		return false, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := exec.CommandContext(ctx, "git", "check-ref-format", name).Run()
	if _, exit := err.(*exec.ExitError); err != nil && !exit {
		t.Fatalf("git check-ref-format: %v", err)
	}
	return err == nil, true
}

func TestCheckRefNameAgreesWithGit(t *testing.T) {
	requireGit(t)
	for _, tc := range refNameCases {
		if want, ok := gitCheckRefFormat(t, tc.name); ok && want != CheckRefName(tc.name) {
			t.Errorf("%q: git says %v, CheckRefName %v", tc.name, want, !want)
		}
	}
}

// FuzzCheckRefName checks CheckRefName's invariants on any input, and that
// it agrees with git check-ref-format where git can be asked. Seeds are in
// testdata/fuzz/FuzzCheckRefName.
func FuzzCheckRefName(f *testing.F) {
	for _, tc := range refNameCases {
		f.Add(tc.name)
	}
	f.Fuzz(func(t *testing.T, name string) {
		ok := CheckRefName(name)
		if ok {
			comps := strings.Split(name, "/")
			switch {
			case len(comps) < 2,
				strings.Contains(name, ".."), strings.Contains(name, "@{"),
				strings.ContainsAny(name, " ~^:?*[\\\x7f"),
				strings.HasSuffix(name, "."), len(name) > maxRefName:
				t.Fatalf("CheckRefName accepted %q", name)
			}
			for _, c := range comps {
				if c == "" || c[0] == '.' || strings.HasSuffix(c, ".lock") || c == ".." {
					t.Fatalf("CheckRefName accepted %q (component %q)", name, c)
				}
			}
			for _, r := range []byte(name) {
				if r < 0x20 {
					t.Fatalf("CheckRefName accepted a control character in %q", name)
				}
			}
		}
		if want, asked := gitCheckRefFormat(t, name); asked && want != ok {
			t.Fatalf("%q: git check-ref-format says %v, CheckRefName %v", name, want, ok)
		}
	})
}
