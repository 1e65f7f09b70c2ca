package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pkg/sftp"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/guestfs"
	"github.com/bangerdev/banger/internal/testenv"
)

// TestBulkRealGuest measures the bulk path against one real guest: the raw
// channel (the physical limit), then cp 100 MiB both ways and exec stdin
// 50 MiB over the bulk path, each next to the same transfer over SSH (the
// path they took before) in the same run. It checks every byte.
func TestBulkRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	bangerBin := filepath.Join(bins(t), "banger")
	env := []string{"BANGER_HOME=" + h}
	const vmName = "bulk"
	if _, errOut, code := banger(t, h, "vm", "create", vmName, "--memory", "512M", "--disk", "1G"); code != 0 {
		t.Fatalf("create: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "delete", vmName, "--force") })
	c, err := client.New(client.WithHome(h))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const mib = 1 << 20
	measure := func(what string, n int64, f func() error) float64 {
		t.Helper()
		t0 := time.Now()
		if err := f(); err != nil {
			t.Fatalf("%s: %v\n%s", what, err, d.logs.String())
		}
		r := mibPerSec(n, time.Since(t0))
		t.Logf("MEASURE %s: %d MiB in %v (%.1f MiB/s)", what, n/mib, time.Since(t0).Round(time.Millisecond), r)
		return r
	}

	// The raw channel: unframed, unencrypted bytes through bangerd's splice.
	var rawIn, rawOut float64
	for _, toGuest := range []bool{false, true} {
		dir := "guest→host"
		if toGuest {
			dir = "host→guest"
		}
		n := int64(100 * mib)
		dur, err := c.ChannelThroughput(ctx, vmName, toGuest, n)
		if err != nil {
			t.Fatalf("raw channel %s: %v", dir, err)
		}
		r := mibPerSec(n, dur)
		t.Logf("MEASURE raw channel %s: 100 MiB in %v (%.1f MiB/s)", dir, dur.Round(time.Millisecond), r)
		if toGuest {
			rawIn = r
		} else {
			rawOut = r
		}
	}

	work := t.TempDir()
	src := filepath.Join(work, "big.bin")
	randomFile(t, src, 100*mib, 0o640)
	want := testenv.FileSHA256(t, src)
	guestSum := func(p string) string {
		t.Helper()
		out := mustBanger(t, h, "exec", vmName, "--", "sha256sum", p)
		return strings.Fields(out)[0]
	}

	// cp over the bulk path (the CLI), both ways.
	up := measure("banger cp host→guest (bulk)", 100*mib, func() error {
		if _, errOut, code := runBin(t, 5*time.Minute, env, nil, bangerBin, "cp", src, vmName+":/root/big.bin"); code != 0 {
			return fmt.Errorf("exit %d: %s", code, errOut)
		}
		return nil
	})
	if got := guestSum("/root/big.bin"); got != want {
		t.Fatalf("cp to the guest: sha256 %s, want %s", got, want)
	}
	back := filepath.Join(work, "back.bin")
	down := measure("banger cp guest→host (bulk)", 100*mib, func() error {
		if _, errOut, code := runBin(t, 5*time.Minute, env, nil, bangerBin, "cp", vmName+":/root/big.bin", back); code != 0 {
			return fmt.Errorf("exit %d: %s", code, errOut)
		}
		return nil
	})
	if got := testenv.FileSHA256(t, back); got != want {
		t.Fatalf("cp from the guest: sha256 %s, want %s", got, want)
	}
	// Both went through the VM's spool device, not the channel.
	if n := strings.Count(d.logs.String(), `"msg":"bulk stream through the spool"`); n != 2 {
		t.Fatalf("%d copies through the spool, want 2\n%s", n, d.logs.String())
	}
	// Two at once, both ways: one holds the spool, the others take the
	// channel; every byte arrives either way.
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := range 2 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			if _, errOut, code := runBin(t, 5*time.Minute, env, nil, bangerBin, "cp", src, fmt.Sprintf("%s:/root/c%d.bin", vmName, i)); code != 0 {
				errs <- fmt.Errorf("cp in %d: exit %d: %s", i, code, errOut)
			}
		}()
		go func() {
			defer wg.Done()
			if _, errOut, code := runBin(t, 5*time.Minute, env, nil, bangerBin, "cp", vmName+":/root/big.bin", filepath.Join(work, fmt.Sprintf("c%d.bin", i))); code != 0 {
				errs <- fmt.Errorf("cp out %d: exit %d: %s", i, code, errOut)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i := range 2 {
		if got := guestSum(fmt.Sprintf("/root/c%d.bin", i)); got != want {
			t.Fatalf("concurrent cp %d to the guest: sha256 %s, want %s", i, got, want)
		}
		if got := testenv.FileSHA256(t, filepath.Join(work, fmt.Sprintf("c%d.bin", i))); got != want {
			t.Fatalf("concurrent cp %d from the guest: sha256 %s, want %s", i, got, want)
		}
	}
	mustBanger(t, h, "exec", vmName, "--", "rm", "-f", "/root/big.bin", "/root/c0.bin", "/root/c1.bin")

	// The same copies over SSH+SFTP, the path cp took before.
	cl, err := c.SSH(ctx, vmName, "")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	sc, err := sftp.NewClient(cl, sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(64))
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	sshUp := measure("SFTP over SSH host→guest (before)", 100*mib, func() error {
		in, err := os.Open(src)
		if err != nil {
			return err
		}
		defer in.Close()
		f, err := sc.Create("/root/ssh.bin")
		if err != nil {
			return err
		}
		if _, err := f.ReadFromWithConcurrency(in, 0); err != nil {
			return err
		}
		return f.Close()
	})
	sshDown := measure("SFTP over SSH guest→host (before)", 100*mib, func() error {
		f, err := sc.Open("/root/ssh.bin")
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.WriteTo(io.Discard)
		return err
	})
	mustBanger(t, h, "exec", vmName, "--", "rm", "-f", "/root/ssh.bin")

	// exec stdin, 50 MiB into a file, over the bulk path (the CLI) and over SSH.
	in := make([]byte, 50*mib)
	rand.Read(in)
	sum := sha256.Sum256(in)
	inPath := filepath.Join(work, "in.bin")
	if err := os.WriteFile(inPath, in, 0o600); err != nil {
		t.Fatal(err)
	}
	execIn := measure("banger exec -i … cat > f (bulk)", 50*mib, func() error {
		inFile, err := os.Open(inPath) // a file: the CLI asks for the spool by its size
		if err != nil {
			return err
		}
		defer inFile.Close()
		if _, errOut, code := runBin(t, 5*time.Minute, env, inFile, bangerBin, "exec", "-i", vmName, "--", "sh", "-c", "cat > /root/in.bin"); code != 0 {
			return fmt.Errorf("exit %d: %s", code, errOut)
		}
		return nil
	})
	if got := guestSum("/root/in.bin"); got != hex.EncodeToString(sum[:]) {
		t.Fatalf("exec stdin: sha256 %s, want %x", got, sum)
	}
	// The session's stdin went through the spool.
	if n := strings.Count(d.logs.String(), `"msg":"bulk stream through the spool","vm":"`+vmName+`","op":"session"`); n != 1 {
		t.Fatalf("%d sessions through the spool, want 1", n)
	}
	sshIn := measure("exec stdin over SSH … cat > f (before)", 50*mib, func() error {
		s, err := cl.NewSession()
		if err != nil {
			return err
		}
		defer s.Close()
		s.Stdin = bytes.NewReader(in)
		return s.Run(guestfs.ShellJoin([]string{"sh", "-c", "cat > /root/in.bin"}))
	})
	// stdout the other way: 50 MiB out of the guest.
	var out bytes.Buffer
	execOut := measure("banger exec … cat f > stdout (bulk)", 50*mib, func() error {
		code, err := c.Exec(ctx, vmName, []string{"cat", "/root/in.bin"}, client.ExecOptions{Stdout: &out})
		if err == nil && code != 0 {
			err = fmt.Errorf("exit %d", code)
		}
		return err
	})
	if got := sha256.Sum256(out.Bytes()); got != sum {
		t.Fatalf("exec stdout: sha256 %x, want %x", got, sum)
	}
	t.Logf("MEASURE summary MiB/s: raw channel out %.1f in %.1f | cp up %.1f (ssh %.1f, %.0f%% of raw) down %.1f (ssh %.1f, %.0f%% of raw) | exec stdin %.1f (ssh %.1f, %.0f%% of raw) stdout %.1f",
		rawOut, rawIn, up, sshUp, 100*up/rawIn, down, sshDown, 100*down/rawOut, execIn, sshIn, 100*execIn/rawIn, execOut)
	// Timings are figures, not failures (this machine is shared); that the
	// CLI took the bulk path is checked on bangerd's log.
	if n := strings.Count(d.logs.String(), `"vm.bulk"`); n < 4 {
		t.Errorf("bangerd served vm.bulk %d times; cp and exec should have used it", n)
	}
}

// TestSpoolRefusedRealGuest: a guest that has wiped its spool device's
// header (so its agent finds none) gets its copies over the channel
// instead: bangerd takes the agent's refusal, opens a new stream for the
// same request, and remembers the VM has no spool; every byte arrives.
func TestSpoolRefusedRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	const vmName = "nospool"
	if _, errOut, code := banger(t, h, "vm", "create", vmName, "--memory", "256M"); code != 0 {
		t.Fatalf("create: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "delete", vmName, "--force") })
	// the guest overwrites the first block of the device holding the magic
	out := mustBanger(t, h, "exec", vmName, "--", "sh", "-c",
		`for s in /sys/block/vd*; do n=${s##*/}; if head -c 12 /dev/$n | grep -q BANGERSPOOL1; then dd if=/dev/zero of=/dev/$n bs=4096 count=1 conv=notrunc 2>/dev/null && sync && echo wiped $n; fi; done`)
	if !strings.HasPrefix(out, "wiped vd") {
		t.Fatalf("no spool device found in the guest: %q", out)
	}
	work := t.TempDir()
	src := filepath.Join(work, "f.bin")
	randomFile(t, src, 5<<20, 0o644)
	want := testenv.FileSHA256(t, src)
	for i := range 2 { // the first is refused and redone; the second goes straight to the channel
		mustBanger(t, h, "cp", src, fmt.Sprintf("%s:/root/f%d.bin", vmName, i))
		if got := strings.Fields(mustBanger(t, h, "exec", vmName, "--", "sha256sum", fmt.Sprintf("/root/f%d.bin", i)))[0]; got != want {
			t.Fatalf("cp %d into the guest: sha256 %s, want %s", i, got, want)
		}
	}
	back := filepath.Join(work, "back.bin")
	mustBanger(t, h, "cp", vmName+":/root/f0.bin", back)
	if got := testenv.FileSHA256(t, back); got != want {
		t.Fatalf("cp out of the guest: sha256 %s, want %s", got, want)
	}
	logs := d.logs.String()
	if strings.Contains(logs, `"msg":"bulk stream through the spool"`) {
		t.Fatal("a copy went through a spool the guest had wiped")
	}
	if n := strings.Count(logs, `"msg":"bulk stream not through the spool"`); n != 1 {
		t.Fatalf("%d refusals taken, want 1 (the VM then remembered it has no spool)\n%s", n, logs)
	}
}

// TestWorkspaceSyncRealGuest: workspace push is one stream applied by the
// agent; a re-push after one change sends one file, a file deleted on the
// host disappears in the guest (one the guest made stays), and modes and
// symlinks survive. Times the push and the re-push.
func TestWorkspaceSyncRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	const vmName = "wsync"
	if _, errOut, code := banger(t, h, "vm", "create", vmName, "--memory", "256M"); code != 0 {
		t.Fatalf("create: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "delete", vmName, "--force") })
	repo := t.TempDir()
	writeFile(t, filepath.Join(repo, "a.txt"), "alpha\n", 0o644)
	writeFile(t, filepath.Join(repo, "bin/run.sh"), "#!/bin/sh\necho ran\n", 0o755)
	writeFile(t, filepath.Join(repo, "gone.txt"), "bye\n", 0o644)
	for i := range 200 {
		writeFile(t, filepath.Join(repo, "src", fmt.Sprintf("f%03d.go", i)), strings.Repeat("x", 1000+i), 0o644)
	}
	if err := os.Symlink("a.txt", filepath.Join(repo, "link")); err != nil {
		t.Fatal(err)
	}
	hostGit(t, repo, "init", "-q")
	hostGit(t, repo, "add", "-A")
	hostGit(t, repo, "commit", "-qm", "init")
	pushed := func() (string, time.Duration) {
		t.Helper()
		t0 := time.Now()
		_, errOut, code := banger(t, h, "workspace", "push", vmName, repo, "--dest", "/root/ws")
		if code != 0 {
			t.Fatalf("push: exit %d: %s", code, errOut)
		}
		return errOut, time.Since(t0)
	}
	out, d1 := pushed()
	if !strings.Contains(out, "deleted 0") {
		t.Fatalf("first push did not stream: %q", out)
	}
	got := mustBanger(t, h, "exec", vmName, "--", "sh", "-c", "stat -c '%a %n' /root/ws/a.txt /root/ws/bin/run.sh; readlink /root/ws/link; /root/ws/bin/run.sh; ls /root/ws/src | wc -l")
	if want := "644 /root/ws/a.txt\n755 /root/ws/bin/run.sh\na.txt\nran\n200\n"; got != want {
		t.Fatalf("guest tree:\n%s\nwant:\n%s", got, want)
	}
	// The guest's .git (no git in the guest image): its objects came as one
	// pack (bulk.CapPack), none loose, and git on the host finds the copy
	// whole and its work tree clean.
	back := filepath.Join(t.TempDir(), "back")
	mustBanger(t, h, "cp", "-r", vmName+":/root/ws", back)
	if loose, _ := filepath.Glob(filepath.Join(back, ".git/objects/??/*")); len(loose) != 0 {
		t.Fatalf("loose objects in the guest after a push: %v", loose)
	}
	if packs, _ := filepath.Glob(filepath.Join(back, ".git/objects/pack/pack-*.pack")); len(packs) != 1 {
		t.Fatalf("packs in the guest after a push: %v", packs)
	}
	hostGit(t, back, "fsck", "--strict", "--no-dangling")
	if st := hostGit(t, back, "status", "--porcelain"); st != "" {
		t.Fatalf("git status of the guest's copy: %q", st)
	}
	mustBanger(t, h, "exec", vmName, "--", "sh", "-c", "echo mine > /root/ws/guest-made.txt")
	later := time.Now().Add(time.Hour)
	writeFile(t, filepath.Join(repo, "src/f007.go"), "changed", 0o644)
	os.Chtimes(filepath.Join(repo, "src/f007.go"), later, later)
	out, d2 := pushed()
	if !strings.Contains(out, "sent 1 files") {
		t.Fatalf("re-push after one change: %q, want 1 file sent", out)
	}
	os.Remove(filepath.Join(repo, "gone.txt"))
	out, _ = pushed()
	if !strings.Contains(out, "deleted 1") {
		t.Fatalf("re-push after a deletion: %q", out)
	}
	got = mustBanger(t, h, "exec", vmName, "--", "sh", "-c", "cat /root/ws/src/f007.go; echo; ls /root/ws/gone.txt 2>&1 || true; cat /root/ws/guest-made.txt")
	if !strings.HasPrefix(got, "changed\n") || !strings.Contains(got, "No such file") || !strings.HasSuffix(got, "mine\n") {
		t.Fatalf("after re-pushes:\n%s", got)
	}
	t.Logf("MEASURE workspace push of %d files: %v; re-push after one change: %v (CLI wall time)", 205, d1.Round(time.Millisecond), d2.Round(time.Millisecond))
	// Each push's stream came through the VM's spool.
	if n := strings.Count(d.logs.String(), `"msg":"bulk stream through the spool","vm":"wsync","op":"sync"`); n != 3 {
		t.Fatalf("%d pushes through the spool, want 3", n)
	}

	// --dest is recorded per VM: status and pull find /root/ws themselves.
	if v := showVM(t, h, vmName); !strings.Contains(mustBanger(t, h, "vm", "show", vmName, "-o", "json"), `"workspace_dest": "/root/ws"`) && !strings.Contains(mustBanger(t, h, "vm", "show", vmName, "-o", "json"), `"workspace_dest":"/root/ws"`) {
		t.Fatalf("vm show lacks workspace_dest /root/ws: %+v", v)
	}
	if out, errOut, code := banger(t, h, "workspace", "status", vmName, "--repo", repo); code != 0 {
		t.Fatalf("status without --dest: exit %d: %s %s", code, out, errOut)
	}
	if out, errOut, code := banger(t, h, "workspace", "pull", vmName, "--repo", repo); code != 0 || !strings.Contains(out, "banger/"+vmName) {
		t.Fatalf("pull without --dest: exit %d: %s %s", code, out, errOut)
	}

	// Workspace operations on one VM are serialised by bangerd's lock: two
	// pushes at once both succeed, the second after the first.
	randomFile(t, filepath.Join(repo, "big.bin"), 24<<20, 0o644)
	bangerBin := filepath.Join(bins(t), "banger")
	env := []string{"BANGER_HOME=" + h}
	start := func(dest string) (*exec.Cmd, *bytes.Buffer) {
		cmd := exec.Command(bangerBin, "workspace", "push", vmName, repo, "--dest", dest)
		cmd.Env = append(os.Environ(), env...)
		var errb bytes.Buffer
		cmd.Stderr = &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd, &errb
	}
	c1, e1 := start("/root/p1")
	c2, e2 := start("/root/p2")
	if err1, err2 := c1.Wait(), c2.Wait(); err1 != nil || err2 != nil {
		t.Fatalf("concurrent pushes: %v %s / %v %s", err1, e1, err2, e2)
	}
	if !strings.Contains(d.logs.String(), "waited for the VM's workspace lock") {
		t.Errorf("two concurrent pushes did not wait for each other:\n%s\n%s", e1, e2)
	}
	mustBanger(t, h, "exec", vmName, "--", "rm", "-rf", "/root/p1", "/root/p2")

	// The lock does not hold up stop: stop ends a running push, which fails
	// with an error; the VM starts again.
	before := strings.Count(d.logs.String(), `"vm.bulk"`)
	c3, e3 := start("/root/p3")
	testenv.WaitFor(t, time.Minute, "the push's bulk stream", func() bool { return strings.Count(d.logs.String(), `"vm.bulk"`) > before })
	t0 := time.Now()
	if _, errOut, code := banger(t, h, "vm", "stop", vmName); code != 0 {
		t.Fatalf("stop during a push: exit %d: %s", code, errOut)
	}
	stopTook := time.Since(t0)
	err3 := c3.Wait()
	if err3 == nil {
		t.Fatalf("a push survived its VM's stop: %s", e3)
	}
	t.Logf("stop during a push took %v; the push said: %s", stopTook.Round(time.Millisecond), strings.TrimSpace(e3.String()))
	mustBanger(t, h, "vm", "start", vmName)
	mustBanger(t, h, "exec", vmName, "--", "true")
}

// TestCopyOneFileRealGuest: banger cp of one regular file each way goes
// through a real agent and bangerd in one stream (bulk putfile/getfile):
// into an existing directory, to a new name relative to root's home, mode
// (setuid too, host→guest) and mtime kept, setuid dropped guest→host; a
// directory without -r and a missing source get cp's usual errors (from
// the SFTP path), and -r of a directory still works.
func TestCopyOneFileRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	const vmName = "cpone"
	if _, errOut, code := banger(t, h, "vm", "create", vmName, "--memory", "256M"); code != 0 {
		t.Fatalf("create: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "delete", vmName, "--force") })
	work := t.TempDir()
	src := filepath.Join(work, "one.txt")
	writeFile(t, src, "x", 0o644)
	os.Chmod(src, 0o751|os.ModeSetuid)
	mtime := time.Unix(1600000000, 0)
	os.Chtimes(src, mtime, mtime)
	mustBanger(t, h, "exec", vmName, "--", "mkdir", "-p", "/root/dir")
	mustBanger(t, h, "cp", src, vmName+":/root/dir")
	mustBanger(t, h, "cp", src, vmName+":new.txt")
	got := mustBanger(t, h, "exec", vmName, "--", "stat", "-c", "%a %Y %s %n", "/root/dir/one.txt", "/root/new.txt")
	if want := "4751 1600000000 1 /root/dir/one.txt\n4751 1600000000 1 /root/new.txt\n"; got != want {
		t.Fatalf("in the guest:\n%s\nwant:\n%s", got, want)
	}
	back := filepath.Join(work, "back")
	mustBanger(t, h, "cp", vmName+":new.txt", back)
	fi, err := os.Stat(back)
	if b, _ := os.ReadFile(back); err != nil || string(b) != "x" || fi.Mode() != 0o751 || !fi.ModTime().Equal(mtime) {
		t.Fatalf("back on the host: %q %v %v", b, fi, err)
	}
	_, errOut, code := banger(t, h, "cp", vmName+":/root/dir", filepath.Join(work, "d"))
	if code == 0 || !strings.Contains(errOut, "is a directory (use cp -r)") {
		t.Fatalf("a directory without -r: exit %d: %s", code, errOut)
	}
	mustBanger(t, h, "cp", "-r", vmName+":/root/dir", filepath.Join(work, "d"))
	if b, err := os.ReadFile(filepath.Join(work, "d", "one.txt")); err != nil || string(b) != "x" {
		t.Fatalf("cp -r of a directory: %q %v", b, err)
	}
	_, errOut, code = banger(t, h, "cp", vmName+":/root/nope", work)
	if code == 0 || !strings.Contains(errOut, "no such file") {
		t.Fatalf("a missing source: exit %d: %s", code, errOut)
	}
}
