package sshd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/bulk"
)

// TestBulkFileOps: OpPut and OpGet through the agent's dispatcher: a
// relative path is relative to the user's home (as SFTP resolves it), an
// absolute one is used as is, and another user than the agent's own is
// refused (as "unsupported" when the agent could act as them: the host
// then uses SFTP, which runs as that user).
func TestBulkFileOps(t *testing.T) {
	srv := bulkServer(t)
	acct, err := srv.userFor("")
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("banger"), 100000)
	put := func(user, p string) error {
		c := openBulk(t, srv, bulk.Open{Op: bulk.OpPut, User: user, Arg: p})
		w, err := bulk.StartPut(c)
		if err != nil {
			return err
		}
		if _, err := w.Write(data); err != nil {
			return err
		}
		return w.Finish()
	}
	get := func(p string) ([]byte, error) {
		c := openBulk(t, srv, bulk.Open{Op: bulk.OpGet, Arg: p})
		g, err := bulk.StartGet(c)
		if err != nil {
			return nil, err
		}
		return io.ReadAll(g)
	}
	if err := put("", "rel"); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(acct.Home, "rel")); err != nil || !bytes.Equal(b, data) {
		t.Fatalf("relative put: %d bytes, %v", len(b), err)
	}
	abs := filepath.Join(t.TempDir(), "abs")
	if err := put("", abs); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"rel", abs} {
		if b, err := get(p); err != nil || !bytes.Equal(b, data) {
			t.Fatalf("get %s: %d bytes, %v", p, len(b), err)
		}
	}
	if err := put("", ""); err == nil {
		t.Fatal("an empty path was accepted")
	}

	// another user
	passwd := srv.cfg.PasswdFile
	f, _ := os.OpenFile(passwd, os.O_APPEND|os.O_WRONLY, 0)
	fmt.Fprintf(f, "other:x:%d:%d::/:/bin/sh\n", os.Getuid()+4242, os.Getgid())
	f.Close()
	err = put("other", filepath.Join(t.TempDir(), "x"))
	switch {
	case err == nil:
		t.Fatal("a put as another user was served by the agent itself")
	case os.Getuid() == 0 && !errors.Is(err, bulk.ErrUnsupported):
		t.Fatalf("put as another user: %v, want ErrUnsupported (use SFTP)", err)
	}
}

// TestStdinPipeGrown: a command's stdin pipe holds several bulk frames, so
// the agent and the command switch less often.
func TestStdinPipeGrown(t *testing.T) {
	// the pipe runPipes grows: exec's StdinPipe
	cmd := exec.Command("true")
	w, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	growPipe(w)
	rc, err := w.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	rc.Control(func(fd uintptr) { n, err = unix.FcntlInt(fd, unix.F_GETPIPE_SZ, 0) })
	if err != nil {
		t.Fatal(err)
	}
	if n < stdinPipeSize {
		t.Fatalf("pipe of %d bytes, want %d", n, stdinPipeSize)
	}
}

// TestBulkFileMetaOps: OpPutFile and OpGetFile through the agent's
// dispatcher resolve a relative path in the user's home as OpPut does
// (".": the home itself, a directory, so the file goes in it by its base
// name), keep a trailing '/' as "must be a directory", and refuse another
// user than the agent's own.
func TestBulkFileMetaOps(t *testing.T) {
	srv := bulkServer(t)
	acct, err := srv.userFor("")
	if err != nil {
		t.Fatal(err)
	}
	mtime := time.Unix(1700000000, 5)
	put := func(user, dest string) (string, error) {
		c := openBulk(t, srv, bulk.Open{Op: bulk.OpPutFile, User: user, Arg: dest})
		var b bulk.Batch
		b.Request(bulk.PutFileRequest, ssh.Marshal(&bulk.PutFile{Base: "base.txt", Mode: 0o640, MTime: uint64(mtime.UnixNano()), Inline: true}))
		b.Data([]byte("hello"))
		b.EOF()
		p, _ := b.Bytes()
		go c.Write(p)
		w, err := bulk.StartPutFile(c, true)
		if err != nil {
			return "", err
		}
		return w.Target, w.Finish()
	}
	for _, tc := range []struct{ dest, want string }{
		{".", filepath.Join(acct.Home, "base.txt")},
		{"rel.txt", filepath.Join(acct.Home, "rel.txt")},
	} {
		target, err := put("", tc.dest)
		if err != nil || target != tc.want {
			t.Fatalf("put %q: %q %v, want %q", tc.dest, target, err, tc.want)
		}
		fi, err := os.Stat(tc.want)
		if err != nil || fi.Mode().Perm() != 0o640 || !fi.ModTime().Equal(mtime) {
			t.Fatalf("%s: %v %v", tc.want, fi, err)
		}
		c := openBulk(t, srv, bulk.Open{Op: bulk.OpGetFile, Arg: filepath.Base(tc.want)})
		g, m, err := bulk.StartGetFile(c)
		if err != nil || m.Size != 5 || m.Mode != 0o640 || m.MTime != uint64(mtime.UnixNano()) {
			t.Fatalf("get %s: %+v %v", tc.want, m, err)
		}
		if b, err := io.ReadAll(g); err != nil || string(b) != "hello" {
			t.Fatalf("get %s: %q %v", tc.want, b, err)
		}
	}
	if _, err := put("", "nodir/"); !errors.Is(err, bulk.ErrOpenRefused) {
		t.Fatalf("put into a missing directory named with '/': %v", err)
	}
	passwd := srv.cfg.PasswdFile
	f, _ := os.OpenFile(passwd, os.O_APPEND|os.O_WRONLY, 0)
	fmt.Fprintf(f, "other:x:%d:%d::/:/bin/sh\n", os.Getuid()+4242, os.Getgid())
	f.Close()
	_, err = put("other", filepath.Join(t.TempDir(), "x"))
	switch {
	case err == nil:
		t.Fatal("a put as another user was served by the agent itself")
	case os.Getuid() == 0 && !errors.Is(err, bulk.ErrUnsupported):
		t.Fatalf("put as another user: %v, want ErrUnsupported (use SFTP)", err)
	}
}
