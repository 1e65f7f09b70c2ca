package guest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agent/sshd"
)

// TestMain lets this test binary act as banger-agent's sftp-server child,
// which the SSH server starts (as /proc/self/exe) for users other than its own.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == sshd.SFTPServerArg {
		os.Exit(agent.Main(os.Args))
	}
	// "proxy-unix SOCKET": an OpenSSH ProxyCommand splicing stdio to SOCKET
	// (what bangerd does for banger ssh-config).
	if len(os.Args) == 3 && os.Args[1] == "proxy-unix" {
		c, err := net.Dial("unix", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go func() {
			_, _ = io.Copy(c, os.Stdin)
			c.(*net.UnixConn).CloseWrite()
		}()
		_, _ = io.Copy(os.Stdout, c)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestOtherUser logs in as an unprivileged user: commands and sftp run with
// that user's credentials.
func TestOtherUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("switching users needs root (the agent runs as root in guests)")
	}
	const uid, gid = 65534, 65534
	dir := t.TempDir()
	// The unprivileged user must reach its home inside the test's directory.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	home := filepath.Join(dir, "home")
	if err := os.Mkdir(home, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(home, uid, gid); err != nil {
		t.Fatal(err)
	}
	passwd := filepath.Join(dir, "passwd")
	if err := os.WriteFile(passwd, []byte(fmt.Sprintf("root:x:0:0::/root:/bin/sh\nplain:x:%d:%d::%s:/bin/sh\n", uid, gid, home)), 0o644); err != nil {
		t.Fatal(err)
	}
	group := filepath.Join(dir, "group")
	if err := os.WriteFile(group, []byte("extra:x:4242:plain\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	hk, _ := GenerateHostKey()
	uk, err := LoadOrCreateUserKey(filepath.Join(dir, "key"))
	if err != nil {
		t.Fatal(err)
	}
	signer, _ := ssh.ParsePrivateKey(hk.PrivatePEM)
	srv, err := sshd.New(sshd.Config{HostKey: signer, AuthorizedKeys: []ssh.PublicKey{uk.Signer.PublicKey()}, PasswdFile: passwd, GroupFile: group, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx, l) }()
	defer func() { cancel(); <-done; srv.Wait() }()

	c, err := NewClient(ClientConfig{Dialer: unixDialer(sock), HostKey: hk.Public, UserKey: uk.Signer, User: "plain", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var out bytes.Buffer
	var errb bytes.Buffer
	code, err := c.Exec(testCtx(t), []string{"sh", "-c", "id -u; id -g; id -G; echo $HOME; pwd"}, nil, &out, &errb, ExecOptions{})
	if err != nil || code != 0 {
		t.Fatalf("exec: %d %v %s", code, err, errb.String())
	}
	want := fmt.Sprintf("%d\n%d\n%d 4242\n%s\n%s\n", uid, gid, gid, home, home)
	if out.String() != want {
		t.Fatalf("identity %q, want %q", out.String(), want)
	}
	sc, err := c.SFTP(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	f, err := sc.Create("made-by-plain")
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("x"))
	f.Close()
	fi, err := os.Stat(filepath.Join(home, "made-by-plain"))
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Uid != uid {
		t.Fatalf("sftp file owned by %d, want %d", st.Uid, uid)
	}
	// The unprivileged user cannot write where root can.
	if _, err := sc.Create(filepath.Join(dir, "not-allowed")); err == nil || !strings.Contains(strings.ToLower(err.Error()), "permission") {
		t.Fatalf("sftp create in a root-owned dir: %v", err)
	}
}
