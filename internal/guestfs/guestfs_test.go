package guestfs

import (
	"crypto/ed25519"
	"crypto/rand"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/testenv/sftptest"
)

// hostileSSH is a guest whose every command floods stderr and fails.
func hostileSSH(t *testing.T, stderrBytes int) *ssh.Client {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &ssh.ServerConfig{NoClientAuth: true}
	cfg.AddHostKey(signer)
	// a socket, not net.Pipe: both ends write their version at once
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "ssh.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		sc, err := l.Accept()
		if err != nil {
			return
		}
		defer sc.Close()
		conn, chans, reqs, err := ssh.NewServerConn(sc, cfg)
		if err != nil {
			return
		}
		defer conn.Close()
		go ssh.DiscardRequests(reqs)
		for nc := range chans {
			ch, creqs, err := nc.Accept()
			if err != nil {
				return
			}
			go func() {
				defer ch.Close()
				for r := range creqs {
					r.Reply(r.Type == "exec", nil)
					if r.Type != "exec" {
						continue
					}
					chunk := []byte(strings.Repeat("E", 64<<10))
					for n := 0; n < stderrBytes; n += len(chunk) {
						if _, err := ch.Stderr().Write(chunk); err != nil {
							return
						}
					}
					ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{1}))
					return
				}
			}()
		}
	}()
	cc, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn, chans, reqs, err := ssh.NewClientConn(cc, "guest", &ssh.ClientConfig{User: "root", HostKeyCallback: ssh.InsecureIgnoreHostKey()})
	if err != nil {
		t.Fatal(err)
	}
	c := ssh.NewClient(conn, chans, reqs)
	t.Cleanup(func() { c.Close() })
	return c
}

// localSFTP is an SFTP client of this machine's filesystem, in process.
func localSFTP(t *testing.T) *sftp.Client {
	t.Helper()
	return sftptest.Local(t, nil)
}

// TestSymlinkBoundsTheGuestsStderr: a guest answering `ln` with endless
// stderr cannot grow the host's memory or the error without bound.
func TestSymlinkBoundsTheGuestsStderr(t *testing.T) {
	s := SFTP{C: localSFTP(t), SSH: hostileSSH(t, 8<<20)}
	err := s.Symlink("target", filepath.Join(t.TempDir(), "link"))
	if err == nil {
		t.Fatal("a failing ln returned no error")
	}
	if n := len(err.Error()); n > 8<<10 {
		t.Fatalf("the error holds %d bytes of the guest's stderr; want it bounded", n)
	}
	if !strings.Contains(err.Error(), "EEEE") {
		t.Fatalf("the error lost the guest's stderr: %.200s", err)
	}
}
