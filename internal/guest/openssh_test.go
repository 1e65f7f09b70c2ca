package guest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestOpenSSHClient drives the agent's server with the real OpenSSH client
// (ssh, scp) through a ProxyCommand, as banger ssh-config sets it up.
func TestOpenSSHClient(t *testing.T) {
	sshBin, err := exec.LookPath("ssh")
	if err != nil {
		t.Skipf("OpenSSH client not installed: %v", err)
	}
	e := startAgent(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	kh := filepath.Join(e.dir, "known_hosts")
	if err := os.WriteFile(kh, []byte("banger-test "+e.hostKey.AuthorizedLine()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// OpenSSH takes the first value of an option: build the list per known_hosts.
	withKnownHosts := func(kh string) []string {
		return []string{
			"-F", "/dev/null",
			"-o", "BatchMode=yes",
			"-o", "StrictHostKeyChecking=yes",
			"-o", "UserKnownHostsFile=" + kh,
			"-o", "GlobalKnownHostsFile=/dev/null",
			"-o", "IdentitiesOnly=yes",
			"-o", "IdentityFile=" + e.userKey.Path,
			"-o", "ProxyCommand=" + self + " proxy-unix " + string(e.dialer),
			"-o", "User=tester",
		}
	}
	common := withKnownHosts(kh)
	run := func(bin string, args ...string) (string, string, int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		cmd.Stdin = strings.NewReader("")
		err := cmd.Run()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("%s: %v", bin, err)
		}
		return out.String(), errb.String(), cmd.ProcessState.ExitCode()
	}

	out, errs, code := run(sshBin, append(common, "banger-test", "echo hi; echo oops >&2; exit 5")...)
	if out != "hi\n" || !strings.Contains(errs, "oops") || code != 5 {
		t.Fatalf("ssh exec: out %q err %q code %d", out, errs, code)
	}
	out, errs, code = run(sshBin, append(common, "-tt", "banger-test", "test -t 0 && echo tty:$TERM")...)
	if !strings.Contains(out, "tty:") || code != 0 {
		t.Fatalf("ssh -tt: out %q err %q code %d", out, errs, code)
	}
	// A wrong pinned key makes OpenSSH refuse.
	other, _ := GenerateHostKey()
	bad := filepath.Join(e.dir, "bad_known_hosts")
	_ = os.WriteFile(bad, []byte("banger-test "+other.AuthorizedLine()+"\n"), 0o600)
	badArgs := append(withKnownHosts(bad), "banger-test", "true")
	if _, errs, code := run(sshBin, badArgs...); code == 0 || !strings.Contains(errs, "HOST IDENTIFICATION HAS CHANGED") && !strings.Contains(strings.ToLower(errs), "host key") {
		t.Fatalf("ssh with a wrong host key: code %d err %q", code, errs)
	}
	if scpBin, err := exec.LookPath("scp"); err == nil {
		src := filepath.Join(e.dir, "scp-src")
		if err := os.WriteFile(src, []byte("via scp\n"), 0o640); err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(e.dir, "scp-dst")
		if _, errs, code := run(scpBin, append(append([]string{}, common...), "-p", src, "banger-test:"+dst)...); code != 0 {
			t.Fatalf("scp: code %d err %q", code, errs)
		}
		b, err := os.ReadFile(dst)
		fi, _ := os.Stat(dst)
		if err != nil || string(b) != "via scp\n" || fi.Mode().Perm() != 0o640 {
			t.Fatalf("scp result %q mode %v err %v", b, fi.Mode(), err)
		}
	}
}
