package client

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv/gittest"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/workspace"
)

// looseIn lists the loose objects below dir's .git/objects.
func looseIn(t *testing.T, dir string) []string {
	t.Helper()
	var ids []string
	ents, _ := os.ReadDir(filepath.Join(dir, ".git/objects"))
	for _, e := range ents {
		if len(e.Name()) != 2 {
			continue
		}
		objs, _ := os.ReadDir(filepath.Join(dir, ".git/objects", e.Name()))
		for _, o := range objs {
			ids = append(ids, e.Name()+o.Name())
		}
	}
	sort.Strings(ids)
	return ids
}

// packsIn lists the packs (base names) below dir's .git/objects/pack, and
// fails on anything else there (a temporary file left behind).
func packsIn(t *testing.T, dir string) []string {
	t.Helper()
	var packs []string
	ents, _ := os.ReadDir(filepath.Join(dir, packDir))
	for _, e := range ents {
		base, ok := strings.CutSuffix(e.Name(), ".pack")
		if !ok {
			if !strings.HasSuffix(e.Name(), ".idx") {
				t.Fatalf("%s in the guest's pack directory", e.Name())
			}
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, packDir, base+".idx")); err != nil {
			t.Fatalf("pack %s without its index", base)
		}
		packs = append(packs, base)
	}
	sort.Strings(packs)
	return packs
}

// TestPushPacksObjects: with bulk.CapPack every loose object the guest
// lacks lands in one pack (none as a loose file), the work tree files
// carrying their blobs; the guest's repository is whole (fsck --strict,
// status, log). A re-push after one changed file sends that file alone
// and keeps the pack; a commit adds a second pack and keeps the first;
// after git gc on the host the pushed packs, now redundant, are deleted.
func TestPushPacksObjects(t *testing.T) {
	repo := gitRepo(t)
	hostLoose := looseIn(t, repo)
	dest := filepath.Join(t.TempDir(), "ws")
	state := t.TempDir()
	st := push(t, repo, dest, state)
	if st.Packs != 1 || st.Packed != len(hostLoose) || st.Objects != 4 {
		t.Fatalf("first push: %+v; want one pack of the host's %d loose objects, 4 of them from file data", st, len(hostLoose))
	}
	if l := looseIn(t, dest); len(l) != 0 {
		t.Fatalf("loose objects in the guest: %v", l)
	}
	if dirs, _ := filepath.Glob(filepath.Join(dest, ".git/objects/??")); len(dirs) != 0 {
		t.Fatalf("loose object directories made in the guest: %v", dirs)
	}
	packs := packsIn(t, dest)
	if len(packs) != 1 {
		t.Fatalf("packs in the guest: %v", packs)
	}

	// unchanged: nothing at all
	if st := push(t, repo, dest, state); st.Files != 0 || st.Packs != 0 || st.Deleted != 0 {
		t.Fatalf("push of an unchanged repository: %+v", st)
	}
	// one file changed, not committed: that file alone, the pack stays
	later := time.Now().Add(time.Hour)
	os.WriteFile(filepath.Join(repo, "a.txt"), []byte("alpha two"), 0o644)
	os.Chtimes(filepath.Join(repo, "a.txt"), later, later)
	if st := push(t, repo, dest, state); st.Files != 1 || st.Bytes != 9 || st.Packs != 0 || st.Deleted != 0 {
		t.Fatalf("re-push after one change: %+v, want a.txt alone", st)
	}
	if p := packsIn(t, dest); len(p) != 1 || p[0] != packs[0] {
		t.Fatalf("packs after a re-push: %v, want %v", p, packs)
	}
	// (git in the guest refreshes its index: checked after the re-pushes)
	gittest.Run(t, dest, "fsck", "--strict", "--no-dangling")
	gittest.Run(t, dest, "verify-pack", filepath.Join(dest, packDir, packs[0]+".idx"))
	if out := gittest.Run(t, dest, "status", "--porcelain"); out != " M a.txt\n" {
		t.Fatalf("git status in the guest: %q", out)
	}
	if out := gittest.Run(t, dest, "log", "--format=%s"); out != "init\n" {
		t.Fatalf("git log in the guest: %q", out)
	}
	// committed: a second pack with the new objects; the first stays
	gittest.Run(t, repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")
	st = push(t, repo, dest, state)
	if st.Packs != 1 || st.Packed != 3 || st.Deleted != 0 {
		t.Fatalf("push after a commit: %+v; want a pack of blob, tree and commit", st)
	}
	if p := packsIn(t, dest); len(p) != 2 {
		t.Fatalf("packs after a commit: %v", p)
	}
	gittest.Run(t, dest, "fsck", "--strict", "--no-dangling")
	if out := gittest.Run(t, dest, "log", "--format=%s"); out != "two\ninit\n" {
		t.Fatalf("git log in the guest: %q", out)
	}
	if out := gittest.Run(t, dest, "status", "--porcelain"); out != "" {
		t.Fatalf("git status in the guest: %q", out)
	}
	// git gc on the host: its own pack goes, the pushed ones are deleted
	gittest.Run(t, repo, "gc", "-q", "--prune=now")
	st = push(t, repo, dest, state)
	if st.Packs != 0 || st.Deleted < 4 {
		t.Fatalf("push after git gc: %+v; want the 2 pushed packs (4 files) deleted, with the emptied object directories", st)
	}
	hostPacks := packsIn(t, repo)
	if p := packsIn(t, dest); len(p) != 1 || p[0] != hostPacks[0] {
		t.Fatalf("packs after git gc: %v, want the host's %v", p, hostPacks)
	}
	gittest.Run(t, dest, "fsck", "--strict", "--no-dangling")
}

// TestPushPacksSHA256: a SHA-256 repository's objects go into a SHA-256
// pack git reads; a temporary pack a dead push left is removed.
func TestPushPacksSHA256(t *testing.T) {
	repo := gitRepo(t)
	os.RemoveAll(filepath.Join(repo, ".git"))
	gittest.Run(t, repo, "init", "-q", "--object-format=sha256")
	gittest.Run(t, repo, "add", "-A")
	gittest.Run(t, repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
	dest := filepath.Join(t.TempDir(), "ws")
	stale := filepath.Join(dest, packDir, "tmp_pack_banger_0123456789abcdef")
	os.MkdirAll(filepath.Dir(stale), 0o755)
	os.WriteFile(stale, []byte("PACK"), 0o444)
	st := push(t, repo, dest, t.TempDir())
	if st.Packs != 1 || st.Packed != len(looseIn(t, repo)) {
		t.Fatalf("push: %+v", st)
	}
	p := packsIn(t, dest)
	if len(p) != 1 || len(p[0]) != len("pack-")+64 {
		t.Fatalf("packs %v: want one SHA-256 pack", p)
	}
	gittest.Run(t, dest, "fsck", "--strict", "--no-dangling")
	if out := gittest.Run(t, dest, "status", "--porcelain"); out != "" {
		t.Fatalf("git status in the guest: %q", out)
	}
}

// relayCaps connects a host and an agent through a relay that replaces the
// capabilities the agent announces with caps (an older agent).
func relayCaps(t *testing.T, caps string) (host net.Conn, agent net.Conn) {
	h, hr := net.Pipe()
	a, ar := net.Pipe()
	go func() { io.Copy(ar, hr); ar.Close() }()
	go func() {
		defer hr.Close()
		var buf []byte
		for {
			typ, d, err := bulk.ReadFrame(ar, buf)
			buf = d
			if err != nil {
				return
			}
			if typ == bulk.FrameEOF {
				d = []byte(caps)
			}
			if bulk.WriteFrame(hr, typ, d) != nil {
				return
			}
		}
	}()
	return h, a
}

// TestPushWithoutPackCapability: an agent that announces bulk.CapObjects
// but not bulk.CapPack gets the loose path (objects written from file
// data as loose files), and the repository is whole.
func TestPushWithoutPackCapability(t *testing.T) {
	repo := gitRepo(t)
	dest := filepath.Join(t.TempDir(), "ws")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := workspace.PlanPush(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	host, agent := relayCaps(t, bulk.CapObjects)
	defer host.Close()
	done := make(chan error, 1)
	go func() {
		done <- (&bulk.Syncer{Dest: dest, StateDir: t.TempDir()}).Serve(agent, agent)
		agent.Close()
	}()
	st, err := pushStream(ctx, host, p, nil)
	if err != nil || <-done != nil {
		t.Fatalf("push: %v", err)
	}
	if st.Packs != 0 || st.Objects != 4 {
		t.Fatalf("push to an agent without packs: %+v", st)
	}
	if got, want := looseIn(t, dest), looseIn(t, repo); !equalStrings(got, want) {
		t.Fatalf("loose objects in the guest %v, want the host's %v", got, want)
	}
	if p := packsIn(t, dest); len(p) != 0 {
		t.Fatalf("packs in the guest: %v", p)
	}
	gittest.Run(t, dest, "fsck", "--strict", "--no-dangling")
}

// TestPushTooManyObjectsForAPack: past maxPackObjects the push takes the
// loose path, and the repository is whole.
func TestPushTooManyObjectsForAPack(t *testing.T) {
	defer func(n int) { maxPackObjects = n }(maxPackObjects)
	maxPackObjects = 3
	repo := gitRepo(t)
	dest := filepath.Join(t.TempDir(), "ws")
	st := push(t, repo, dest, t.TempDir())
	if st.Packs != 0 || st.Objects != 4 {
		t.Fatalf("push: %+v, want the loose path", st)
	}
	if got, want := looseIn(t, dest), looseIn(t, repo); !equalStrings(got, want) {
		t.Fatalf("loose objects in the guest %v, want the host's %v", got, want)
	}
	gittest.Run(t, dest, "fsck", "--strict", "--no-dangling")
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestPushedPackNotPulledBack: a pull after a packed push leaves the
// pushed pack in the guest (the host has every object in it, loose), and
// still brings back the guest's new commit.
func TestPushedPackNotPulledBack(t *testing.T) {
	repo := gitRepo(t)
	dest := filepath.Join(t.TempDir(), "ws")
	if st := push(t, repo, dest, t.TempDir()); st.Packs != 1 {
		t.Fatalf("push: %+v", st)
	}
	os.WriteFile(filepath.Join(dest, "new.txt"), []byte("made in the guest"), 0o644)
	gittest.Run(t, dest, "add", "new.txt")
	gittest.Run(t, dest, "-c", "user.name=g", "-c", "user.email=g@g", "commit", "-qm", "guest")
	ctx := context.Background()
	haves, err := workspace.PullHaves(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	var in, out bytes.Buffer
	if err := bulk.WriteHaves(&in, haves.List); err != nil {
		t.Fatal(err)
	}
	if err := bulk.ServePull(&out, &in, dest, 0); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(out.Bytes(), []byte("PACK\x00\x00\x00\x02")) || bytes.Contains(out.Bytes(), []byte(".pack")) {
		t.Fatal("the pushed pack was pulled back")
	}
	cp := filepath.Join(t.TempDir(), "copy")
	os.Mkdir(cp, 0o700)
	same, err := receiveTree(&out, cp, 1<<30, 1<<20, haves.Files)
	if err != nil {
		t.Fatal(err)
	}
	res, err := workspace.PullTreeSame(ctx, cp, repo, "vm0", t.TempDir(), same)
	if err != nil {
		t.Fatal(err)
	}
	if got := gittest.Run(t, repo, "show", res.Commit+":new.txt"); got != "made in the guest" {
		t.Fatalf("pulled commit's new.txt: %q", got)
	}
}

// TestPushPackEndHostile plays a host (or a stream) that ends a pack
// wrongly: each push fails, and no temporary pack or index is left.
func TestPushPackEndHostile(t *testing.T) {
	for _, tc := range []struct {
		name string
		reqs []func(w io.Writer)
	}{
		{"end without a pack", []func(io.Writer){packEnd(bulk.PackEnd{Count: 0, Name: strings.Repeat("a", 40), IdxSize: 2000})}},
		{"done inside a pack", []func(io.Writer){packObj(3, "abc", true)}},
		{"count differs", []func(io.Writer){packObj(3, "abc", true), packEnd(bulk.PackEnd{Count: 2, Name: strings.Repeat("a", 40), IdxSize: 2000})}},
		{"bad name", []func(io.Writer){packObj(3, "abc", true), packEnd(bulk.PackEnd{Count: 1, Name: "../../x", IdxSize: 2000})}},
		{"index too big", []func(io.Writer){packObj(3, "abc", true), packEnd(bulk.PackEnd{Count: 1, Name: strings.Repeat("a", 40), IdxSize: 1 << 40})}},
		{"bad type", []func(io.Writer){packObj(7, "abc", true)}},
		{"more data than announced", []func(io.Writer){func(w io.Writer) {
			req(w, bulk.SyncPackObj, &bulk.PackObj{Type: 3, Size: 2})
			bulk.WriteFrame(w, bulk.FrameData, []byte("abc"))
		}}},
		{"no end after the data", []func(io.Writer){func(w io.Writer) {
			req(w, bulk.SyncPackObj, &bulk.PackObj{Type: 3, Size: 3})
			bulk.WriteFrame(w, bulk.FrameData, []byte("abc"))
			req(w, bulk.SyncDone, &bulk.SyncEntry{})
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dest := filepath.Join(t.TempDir(), "ws")
			host, agent := net.Pipe()
			done := make(chan error, 1)
			go func() {
				done <- (&bulk.Syncer{Dest: dest, StateDir: t.TempDir()}).Serve(agent, agent)
				agent.Close()
			}()
			if _, caps, err := bulk.ReadManifestCaps(host); err != nil || !caps[bulk.CapPack] {
				t.Fatalf("manifest: %v %v", caps, err)
			}
			go func() {
				for _, f := range tc.reqs {
					f(host)
				}
				req(host, bulk.SyncDone, &bulk.SyncEntry{})
			}()
			_, err := bulk.ReadSyncReply(host)
			host.Close()
			if err == nil || <-done == nil {
				t.Fatal("the push did not fail")
			}
			ents, _ := os.ReadDir(filepath.Join(dest, packDir))
			if len(ents) != 0 {
				t.Fatalf("left in the pack directory: %v", ents[0].Name())
			}
		})
	}
}

func req(w io.Writer, kind string, payload any) {
	bulk.WriteFrame(w, bulk.FrameRequest, ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(payload)}))
}

func packObj(typ uint32, data string, ok bool) func(io.Writer) {
	return func(w io.Writer) {
		req(w, bulk.SyncPackObj, &bulk.PackObj{Type: typ, Size: uint64(len(data))})
		bulk.WriteFrame(w, bulk.FrameData, []byte(data))
		req(w, bulk.SyncObjEnd, &bulk.ObjEnd{OK: ok})
	}
}

func packEnd(pe bulk.PackEnd) func(io.Writer) {
	return func(w io.Writer) { req(w, bulk.SyncPackEnd, &pe) }
}
