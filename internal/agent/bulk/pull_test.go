package bulk

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// TestServePullLeavesOut: the agent sends no object or pack the host
// named, nothing of the top .git the host never reads, no nested
// repository, and a file that matches the host's exactly (size, mtime,
// executable bit) as PackSame without its data; everything else whole.
func TestServePullLeavesOut(t *testing.T) {
	dir := t.TempDir()
	mk := func(rel, body string, mode os.FileMode) {
		p := filepath.Join(dir, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
	}
	loose := strings.Repeat("b", 38)
	for _, f := range []string{"HEAD", "config", "index", "hooks/post-checkout", "refs/heads/main", "info/attributes",
		"objects/info/alternates", "objects/aa/" + loose, "objects/ab/" + loose,
		"objects/pack/pack-1.pack", "objects/pack/pack-1.idx", "objects/pack/pack-2.pack", "objects/pack/pack-2.idx"} {
		mk(".git/"+f, "x", 0o644)
	}
	mk("sub/.git/config", "x", 0o644)
	mk("a/.GIT", "x", 0o644)
	mk("same", "12345", 0o644)
	mk("size", "12345", 0o644)
	mk("mtime", "12345", 0o644)
	mk("exec", "12345", 0o755)
	mk("new", "12345", 0o644)
	mt := time.Unix(1700000000, 123456789)
	for _, f := range []string{"same", "size", "mtime", "exec"} {
		os.Chtimes(filepath.Join(dir, f), mt, mt)
	}
	n := mt.UnixNano()
	haves := []PullHave{
		{K: HaveObject, P: "aa" + loose}, {K: HavePack, P: "pack-1"},
		{K: HaveFile, P: "same", S: 5, N: n}, {K: HaveFile, P: "size", S: 4, N: n},
		{K: HaveFile, P: "mtime", S: 5, N: n + 1}, {K: HaveFile, P: "exec", S: 5, N: n},
	}
	var in, out bytes.Buffer
	if err := WriteHaves(&in, haves); err != nil {
		t.Fatal(err)
	}
	if err := ServePull(&out, &in, dir, 0); err != nil {
		t.Fatal(err)
	}
	got := readEntries(t, &out)
	want := []string{
		"d .git", "d .git/objects", "d .git/objects/aa", "d .git/objects/ab", "d .git/objects/pack", "d .git/refs", "d .git/refs/heads", "d a", "d sub",
		"f .git/HEAD", "f .git/objects/ab/" + loose, "f .git/objects/pack/pack-2.idx", "f .git/objects/pack/pack-2.pack", "f .git/refs/heads/main",
		"f exec", "f mtime", "f new", "f size", "s same",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("sent:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// PullGitOnly (status): the same .git, nothing else
	in.Reset()
	WriteHaves(&in, haves)
	if err := ServePull(&out, &in, dir, PullGitOnly); err != nil {
		t.Fatal(err)
	}
	got = readEntries(t, &out)
	var gitWant []string
	for _, w := range want {
		if strings.Contains(w, " .git") {
			gitWant = append(gitWant, w)
		}
	}
	if !slices.Equal(got, gitWant) {
		t.Fatalf("git only, sent:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(gitWant, "\n"))
	}
}

// readEntries reads a pull's stream to FrameEOF: "<type> <name>", sorted.
func readEntries(t *testing.T, out *bytes.Buffer) []string {
	t.Helper()
	var got []string
	var buf []byte
	for {
		typ, p, err := ReadFrame(out, buf)
		if err != nil {
			t.Fatal(err)
		}
		if typ == FrameEOF {
			break
		}
		if typ != FrameRequest {
			continue
		}
		var r Request
		var e SyncEntry
		ssh.Unmarshal(p, &r)
		ssh.Unmarshal(r.Payload, &e)
		got = append(got, r.Type+" "+e.Rel)
	}
	slices.Sort(got)
	return got
}

// TestServePullBadHaves: haves that are not FrameData JSON, or a bad
// directory, end the stream with a FrameReply, not a tree.
func TestServePullBadHaves(t *testing.T) {
	dir := t.TempDir()
	for name, c := range map[string]struct {
		haves func(b *bytes.Buffer)
		dir   string
	}{
		"not json":     {func(b *bytes.Buffer) { WriteFrame(b, FrameData, []byte("{")) }, dir},
		"wrong frame":  {func(b *bytes.Buffer) { WriteFrame(b, FrameRequest, nil) }, dir},
		"cut short":    {func(b *bytes.Buffer) {}, dir},
		"relative dir": {func(b *bytes.Buffer) { WriteFrame(b, FrameEOF, nil) }, "rel"},
		"not a dir":    {func(b *bytes.Buffer) { WriteFrame(b, FrameEOF, nil) }, filepath.Join(dir, "none")},
		"unclean dir":  {func(b *bytes.Buffer) { WriteFrame(b, FrameEOF, nil) }, dir + "/../x"},
	} {
		t.Run(name, func(t *testing.T) {
			var in, out bytes.Buffer
			c.haves(&in)
			if err := ServePull(&out, &in, c.dir, 0); err == nil {
				t.Fatal("served")
			}
			if typ, _, err := ReadFrame(&out, nil); err != nil || typ != FrameReply {
				t.Fatalf("first frame %d, %v: want a reply", typ, err)
			}
		})
	}
}
