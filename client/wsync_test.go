package client

import (
	"context"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv/gittest"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/workspace"
)

func gitRepo(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git not installed")
	}
	dir := t.TempDir()
	write := func(rel, data string, mode os.FileMode) {
		p := filepath.Join(dir, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
	}
	write("a.txt", "alpha", 0o644)
	write("bin/run.sh", "#!/bin/sh\necho hi\n", 0o755)
	write("sub/dir/deep.txt", "deep", 0o600)
	write("gone.txt", "to be deleted", 0o644)
	if err := os.Symlink("a.txt", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"init", "-q"}, {"add", "-A"}, {"-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"}} {
		gittest.Run(t, dir, args...)
	}
	return dir
}

// push runs one streamed push of repo into dest against an in-process
// agent side (bulk.Syncer).
func push(t *testing.T, repo, dest, state string) PushStats {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := workspace.PlanPush(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	host, agent := net.Pipe()
	defer host.Close()
	done := make(chan error, 1)
	go func() {
		done <- (&bulk.Syncer{Dest: dest, StateDir: state}).Serve(agent, agent)
		agent.Close()
	}()
	st, err := pushStream(ctx, host, p, nil)
	if err != nil {
		t.Fatalf("push: %v (agent: %v)", err, <-done)
	}
	if err := <-done; err != nil {
		t.Fatalf("agent: %v", err)
	}
	return st
}

func TestStreamedPushSyncs(t *testing.T) {
	repo := gitRepo(t)
	dest := filepath.Join(t.TempDir(), "ws")
	state := t.TempDir()
	st := push(t, repo, dest, state)
	if st.Files < 4 || st.Links != 1 {
		t.Fatalf("first push: %+v", st)
	}
	check := func(rel, data string, mode fs.FileMode) {
		t.Helper()
		p := filepath.Join(dest, rel)
		b, err := os.ReadFile(p)
		fi, _ := os.Lstat(p)
		if err != nil || string(b) != data || fi.Mode().Perm() != mode {
			t.Fatalf("%s: %q %v mode %v, want %q %v", rel, b, err, fi.Mode(), data, mode)
		}
		hfi, _ := os.Lstat(filepath.Join(repo, rel))
		if !fi.ModTime().Equal(hfi.ModTime()) {
			t.Fatalf("%s: mtime %v, want %v", rel, fi.ModTime(), hfi.ModTime())
		}
	}
	check("a.txt", "alpha", 0o644)
	check("bin/run.sh", "#!/bin/sh\necho hi\n", 0o755)
	check("sub/dir/deep.txt", "deep", 0o600)
	if l, err := os.Readlink(filepath.Join(dest, "link")); err != nil || l != "a.txt" {
		t.Fatalf("link: %q %v", l, err)
	}
	if _, err := os.Stat(filepath.Join(dest, ".git", "HEAD")); err != nil {
		t.Fatalf(".git not pushed: %v", err)
	}

	// unchanged: nothing is sent
	if st := push(t, repo, dest, state); st.Files != 0 || st.Links != 0 || st.Deleted != 0 {
		t.Fatalf("push of an unchanged repository sent %+v", st)
	}
	// a file the guest made is not the host's to delete
	os.WriteFile(filepath.Join(dest, "guest-made.txt"), []byte("mine"), 0o644)
	// one change, one deletion, one mode change
	later := time.Now().Add(time.Hour)
	os.WriteFile(filepath.Join(repo, "a.txt"), []byte("alpha two"), 0o644)
	os.Chtimes(filepath.Join(repo, "a.txt"), later, later)
	os.Remove(filepath.Join(repo, "gone.txt"))
	exec.Command("git", "-C", repo, "rm", "-q", "--cached", "gone.txt").Run()
	st = push(t, repo, dest, state)
	// a.txt, and the index git rm rewrote
	if st.Files != 2 || st.Deleted != 1 {
		t.Fatalf("re-push after one change and one deletion: %+v", st)
	}
	check("a.txt", "alpha two", 0o644)
	if _, err := os.Lstat(filepath.Join(dest, "gone.txt")); !os.IsNotExist(err) {
		t.Fatalf("a file deleted on the host is still in the guest: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dest, "guest-made.txt")); err != nil {
		t.Fatalf("a guest-made file was deleted: %v", err)
	}
	// exactly one file: change its content keeping the size, new mtime
	os.WriteFile(filepath.Join(repo, "sub/dir/deep.txt"), []byte("DEEP"), 0o600)
	os.Chtimes(filepath.Join(repo, "sub/dir/deep.txt"), later, later)
	if st := push(t, repo, dest, state); st.Files != 1 || st.Bytes != 4 {
		t.Fatalf("re-push after one change: %+v, want one file of 4 bytes", st)
	}
	check("sub/dir/deep.txt", "DEEP", 0o600)
}

// TestSyncerStaysInDest plays a host (or a stream) naming paths outside the
// destination, and a guest tree with a link where a directory should be:
// nothing outside the destination changes.
func TestSyncerStaysInDest(t *testing.T) {
	root := t.TempDir()
	dest := filepath.Join(root, "ws")
	outside := filepath.Join(root, "outside")
	os.MkdirAll(dest, 0o755)
	os.MkdirAll(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "keep"), []byte("keep"), 0o644)
	os.Symlink(outside, filepath.Join(dest, "escape"))
	for _, tc := range []struct{ kind, rel string }{
		{bulk.SyncFile, "../outside/keep"},
		{bulk.SyncDelete, "../outside"},
		{bulk.SyncFile, "/etc/passwd"},
		{bulk.SyncDelete, "escape/keep"},
		{bulk.SyncFile, "escape/new"},
		{bulk.SyncDir, "escape/d"},
		{bulk.SyncLink, "escape/l"},
		{bulk.SyncDelete, "."},
		{bulk.SyncFile, "a/../../outside/keep"},
	} {
		host, done := serveSyncer(t, dest)
		go func() {
			e := bulk.SyncEntry{Rel: tc.rel, Size: 4, Mode: 0o644, Target: "/"}
			writeReq(host, tc.kind, e)
			bulk.WriteFrame(host, bulk.FrameData, []byte("evil"))
			writeReq(host, bulk.SyncDone, bulk.SyncEntry{})
		}()
		_, err := bulk.ReadSyncReply(host)
		host.Close()
		if err == nil || <-done == nil {
			t.Errorf("%s %q was applied", tc.kind, tc.rel)
		}
	}
	if b, err := os.ReadFile(filepath.Join(outside, "keep")); err != nil || string(b) != "keep" {
		t.Fatalf("outside/keep: %q %v", b, err)
	}
	ents, _ := os.ReadDir(outside)
	if len(ents) != 1 {
		t.Fatalf("outside has %d entries, want 1", len(ents))
	}
}

func writeReq(c net.Conn, kind string, e bulk.SyncEntry) {
	bulk.WriteFrame(c, bulk.FrameRequest, sshMarshalReq(kind, e))
}

// serveSyncer runs a Syncer of dest, with a state directory of its own, as
// the agent on one end of a pipe; it returns the other end, the agent's
// manifest read, and the channel of the agent's result.
func serveSyncer(t *testing.T, dest string) (net.Conn, <-chan error) {
	t.Helper()
	s := &bulk.Syncer{Dest: dest, StateDir: t.TempDir()}
	host, agent := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.Serve(agent, agent); agent.Close() }()
	if _, err := bulk.ReadManifest(host); err != nil {
		t.Fatal(err)
	}
	return host, done
}

// TestSyncerReplacesWhatTheGuestPut: a file pushed where the guest has a
// symlink (to a file outside the destination), a directory or an older
// file replaces it without following the link; modes (setuid, sticky,
// a umask-cleared bit) and the mtime to the nanosecond are kept.
func TestSyncerReplacesWhatTheGuestPut(t *testing.T) {
	root := t.TempDir()
	dest := filepath.Join(root, "ws")
	outside := filepath.Join(root, "outside")
	os.MkdirAll(filepath.Join(dest, "dir", "sub"), 0o755)
	os.WriteFile(outside, []byte("keep"), 0o644)
	os.Symlink(outside, filepath.Join(dest, "link"))
	os.WriteFile(filepath.Join(dest, "old"), []byte("older content"), 0o644)
	mtime := time.Date(2020, 1, 2, 3, 4, 5, 123456789, time.UTC)
	files := []struct {
		rel  string
		mode fs.FileMode
	}{
		{"link", 0o644},
		{"dir", 0o755},
		{"old", 0o600},
		{"suid", 0o755 | fs.ModeSetuid},
		{"sticky", 0o700 | fs.ModeSticky},
		{"groupw", 0o666},
	}
	host, done := serveSyncer(t, dest)
	go func() {
		for _, f := range files {
			writeReq(host, bulk.SyncFile, bulk.SyncEntry{Rel: f.rel, Size: 3, Mode: bulk.KeptMode(f.mode), MTime: uint64(mtime.UnixNano())})
			bulk.WriteFrame(host, bulk.FrameData, []byte("new"))
		}
		writeReq(host, bulk.SyncDone, bulk.SyncEntry{})
	}()
	st, err := bulk.ReadSyncReply(host)
	host.Close()
	if err != nil || <-done != nil {
		t.Fatalf("push: %v", err)
	}
	if st.Files != len(files) {
		t.Fatalf("stats %+v", st)
	}
	if b, _ := os.ReadFile(outside); string(b) != "keep" {
		t.Fatalf("the link's target was written: %q", b)
	}
	for _, f := range files {
		p := filepath.Join(dest, f.rel)
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() {
			t.Fatalf("%s: %v %v", f.rel, fi, err)
		}
		if got := bulk.KeptMode(fi.Mode()); got != bulk.KeptMode(f.mode) {
			t.Errorf("%s: mode %v, want %v", f.rel, fs.FileMode(got), f.mode)
		}
		if !fi.ModTime().Equal(mtime) {
			t.Errorf("%s: mtime %v, want %v", f.rel, fi.ModTime(), mtime)
		}
		if b, _ := os.ReadFile(p); string(b) != "new" {
			t.Errorf("%s: %q", f.rel, b)
		}
	}
	// directories: new ones with their modes (one the umask would clip),
	// and one that exists gets its mode changed
	os.MkdirAll(filepath.Join(dest, "d0"), 0o700)
	dirs := []struct {
		rel  string
		mode fs.FileMode
	}{{"d0", 0o755}, {"d1", 0o777}, {"d1/d2", 0o750}, {"d3", 0o700 | fs.ModeSticky}}
	host2, done2 := serveSyncer(t, dest)
	go func() {
		for _, d := range dirs {
			writeReq(host2, bulk.SyncDir, bulk.SyncEntry{Rel: d.rel, Mode: bulk.KeptMode(d.mode)})
		}
		writeReq(host2, bulk.SyncDone, bulk.SyncEntry{})
	}()
	if _, err := bulk.ReadSyncReply(host2); err != nil || <-done2 != nil {
		t.Fatalf("push of directories: %v", err)
	}
	host2.Close()
	for _, d := range dirs {
		fi, err := os.Lstat(filepath.Join(dest, d.rel))
		if err != nil || !fi.IsDir() || bulk.KeptMode(fi.Mode()) != bulk.KeptMode(d.mode) {
			t.Errorf("%s: %v %v, want a directory %v", d.rel, fi.Mode(), err, d.mode)
		}
	}
	files = append(files, dirs[0], dirs[1], dirs[3])
	if ents, _ := os.ReadDir(dest); len(ents) != len(files) {
		t.Fatalf("dest has %d entries (a temporary file left?), want %d", len(ents), len(files))
	}
}

// TestPushWritesObjectsFromFileData: the loose objects of the work tree's
// files are written in the guest from the files' data (not sent twice),
// and the guest's repository is whole and clean; a file whose content is
// not its index blob (changed, same size) carries no object, and its loose
// object still arrives.
func TestPushWritesObjectsFromFileData(t *testing.T) {
	repo := gitRepo(t)
	// changed after git add, same size: the index blob is "alpha"
	os.WriteFile(filepath.Join(repo, "a.txt"), []byte("ALPHA"), 0o644)
	dest := filepath.Join(t.TempDir(), "ws")
	state := t.TempDir()
	st := push(t, repo, dest, state)
	// run.sh, deep.txt, gone.txt: not a.txt (its data is not its blob)
	if st.Objects != 3 {
		t.Fatalf("objects written from file data: %d, want 3 (%+v)", st.Objects, st)
	}
	// a.txt's entry ("ALPHA") was cut off again: the pack holds exactly
	// the host's objects (alpha's blob from the host's loose file)
	if n := len(looseIn(t, repo)); st.Packed != n {
		t.Fatalf("pack of %d objects, want the host's %d", st.Packed, n)
	}
	// an object the guest has is never sent again, whatever its size
	if st := push(t, repo, dest, state); st.Files != 0 || st.Objects != 0 {
		t.Fatalf("second push sent %+v", st)
	}
	gittest.Run(t, dest, "fsck", "--strict", "--no-dangling")
	if out := gittest.Run(t, dest, "status", "--porcelain"); out != " M a.txt\n" {
		t.Fatalf("git status in the guest copy: %q", out)
	}
	if got := gittest.Run(t, dest, "cat-file", "-p", "HEAD:a.txt"); got != "alpha" {
		t.Fatalf("HEAD:a.txt is %q", got)
	}
}

// TestPushWithoutObjectsCapability: an agent that does not announce
// bulk.CapObjects (an older one) gets no SyncFileObj: every loose object
// goes as a plain file.
func TestPushWithoutObjectsCapability(t *testing.T) {
	repo := gitRepo(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := workspace.PlanPush(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	host, agent := net.Pipe()
	defer host.Close()
	kinds := make(chan map[string]int, 1)
	go func() {
		defer agent.Close()
		bulk.WriteFrame(agent, bulk.FrameEOF, nil) // an empty manifest, no capabilities
		seen := map[string]int{}
		var buf []byte
		for {
			typ, d, err := bulk.ReadFrame(agent, buf)
			buf = d
			if err != nil {
				kinds <- seen
				return
			}
			if typ != bulk.FrameRequest {
				continue
			}
			var r bulk.Request
			ssh.Unmarshal(d, &r)
			seen[r.Type]++
			if r.Type == bulk.SyncDone {
				bulk.WriteFrame(agent, bulk.FrameReply, ssh.Marshal(&bulk.Reply{OK: true, Payload: []byte("{}")}))
				kinds <- seen
				return
			}
		}
	}()
	if _, err := pushStream(ctx, host, p, nil); err != nil {
		t.Fatal(err)
	}
	seen := <-kinds
	if seen[bulk.SyncFileObj] != 0 || seen[bulk.SyncFile] < 8 {
		t.Fatalf("requests %v: want only plain files", seen)
	}
}
