package workspace

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestRunGitBoundsStdout: a git that prints more than its bound on stdout is
// stopped and fails clearly, with nothing of its output returned; within the
// bound the output comes back whole.
func TestRunGitBoundsStdout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	if _, err := git(ctx, dir, nil, nil, "init", "-q", "--template=", "."); err != nil {
		t.Fatal(err)
	}
	blob := bytes.Repeat([]byte("0123456789abcdef"), 2<<20/16) // 2 MiB
	id, err := git(ctx, dir, nil, bytes.NewReader(blob), "hash-object", "-w", "--stdin")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		max     int
		wantErr bool
	}{
		{"under the bound", 4 << 20, false},
		{"exactly the bound", len(blob), false},
		{"over the bound", 1 << 20, true},
		{"one byte over", len(blob) - 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runGit(ctx, gitOpts{Dir: dir, MaxStdout: tc.max}, "cat-file", "blob", id)
			if !tc.wantErr {
				if err != nil || out != string(blob) {
					t.Fatalf("got %d bytes, %v; want the whole blob", len(out), err)
				}
				return
			}
			if !errors.Is(err, errGitOutputTooLarge) {
				t.Fatalf("err = %v, want errGitOutputTooLarge", err)
			}
			if out != "" {
				t.Errorf("returned %d bytes of an output that passed its bound", len(out))
			}
			if !strings.Contains(err.Error(), "cat-file") {
				t.Errorf("error does not say which git: %v", err)
			}
		})
	}
}

// TestRunGitKeepsStderrTail: a git that floods stderr (here 3000 failing
// patches, about 120 KiB) fails with only the end of what it said.
func TestRunGitKeepsStderrTail(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	if _, err := git(ctx, dir, nil, nil, "init", "-q", "--template=", "."); err != nil {
		t.Fatal(err)
	}
	var patch strings.Builder
	for i := 1; i <= 3000; i++ {
		fmt.Fprintf(&patch, "diff --git a/f%d b/f%d\n--- a/f%d\n+++ b/f%d\n@@ -1 +1 @@\n-a\n+b\n", i, i, i, i)
	}
	_, err := git(ctx, dir, nil, strings.NewReader(patch.String()), "apply", "--check")
	if err == nil {
		t.Fatal("git apply --check of patches to missing files succeeded")
	}
	msg := err.Error()
	if len(msg) > gitStderrTail+200 {
		t.Errorf("error is %d bytes, want at most the %d-byte tail of stderr and a prefix", len(msg), gitStderrTail)
	}
	if !strings.Contains(msg, "f3000: No such file") || strings.Contains(msg, "f1: No such file") {
		t.Errorf("error does not hold the end of stderr only: ...%s", msg[max(0, len(msg)-200):])
	}
}

func TestTailBuffer(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []string
		want   string
	}{
		{"empty", nil, ""},
		{"fits", []string{"ab", "cd"}, "abcd"},
		{"exactly full", []string{"abcd", "efgh"}, "abcdefgh"},
		{"drops the start", []string{"abcdef", "ghij"}, "...cdefghij"},
		{"one write past", []string{"0123456789"}, "...23456789"},
		{"one full write after data", []string{"x", "abcdefgh"}, "...abcdefgh"},
		{"many small", []string{"a", "b", "c", "d", "e", "f", "g", "h", "i"}, "...bcdefghi"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &tailBuffer{max: 8}
			for _, w := range tc.writes {
				if n, err := b.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("Write(%q) = %d, %v", w, n, err)
				}
			}
			if got := b.String(); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}
