// Package e2e holds end-to-end tests that run the real binaries.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func repoRoot(t testing.TB) string {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// bins builds banger, bangerd and banger-agent once per test process.
func bins(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "banger-e2e-bin-")
		if buildErr != nil {
			return
		}
		// static, as scripts/quickstart builds them (testenv.staticCommands)
		if buildErr = goBuild(t, binDir, []string{"CGO_ENABLED=0"}, "./cmd/banger", "./cmd/bangerd"); buildErr != nil {
			return
		}
		// The agent goes next to bangerd, where bangerd looks for it.
		if _, err := os.Stat(filepath.Join(repoRoot(t), "cmd", "banger-agent")); err == nil {
			buildErr = goBuild(t, binDir, []string{"CGO_ENABLED=0"}, "-trimpath", "-ldflags=-s -w", "./cmd/banger-agent")
		}
	})
	if buildErr != nil {
		t.Fatalf("build binaries: %v", buildErr)
	}
	return binDir
}

// goBuild runs go build with args (flags, then packages) from the module
// root into dir, with the extra environment, under a 5-minute deadline.
func goBuild(t testing.TB, dir string, env []string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-o", dir + "/"}, args...)...)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return &buildError{err, string(out)}
	}
	return nil
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + e.out }

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// home is a temporary BANGER_HOME with a short path (unix sockets).
func home(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "bh-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// VMMs outlive bangerd by design: end those this home started
		// before removing it, or they run on with their home gone.
		if _, err := testenv.KillVMMsUnder(d); err != nil {
			t.Error(err)
		}
		testenv.RemoveMemoryDirs(d)
		os.RemoveAll(d)
	})
	return d
}

// daemon runs bangerd in the foreground for the test; logs are collected.
// (bangerd through testenv.RunBangerd, or another long-running binary).
type daemonProc struct {
	cmd  *exec.Cmd
	logs *lockedBuf
	done <-chan struct{}
}

type lockedBuf = testenv.LockedBuffer

func startDaemon(t *testing.T, h string, extraEnv ...string) *daemonProc {
	t.Helper()
	return startDaemonWith(t, h, func(*exec.Cmd) {}, extraEnv...)
}

// startDaemonWith is startDaemon with a hook to adjust the command (e.g. its
// binary or credentials) before it starts (testenv.RunBangerd: it returns
// once the socket accepts a connection and stops bangerd at cleanup).
func startDaemonWith(t *testing.T, h string, adjust func(*exec.Cmd), extraEnv ...string) *daemonProc {
	t.Helper()
	cmd := exec.Command(filepath.Join(bins(t), "bangerd"), "--debug")
	cmd.Env = append(append(os.Environ(), "BANGER_HOME="+h), extraEnv...)
	adjust(cmd)
	b := testenv.RunBangerd(t, cmd, h)
	return &daemonProc{cmd: b.Cmd(), logs: b.LogBuffer(), done: b.Done()}
}

func (d *daemonProc) stop(t *testing.T) {
	select {
	case <-d.done:
		return
	default:
	}
	d.cmd.Process.Signal(os.Interrupt)
	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
		t.Errorf("bangerd did not stop on SIGINT within 20s")
	}
}

// banger runs the CLI and returns stdout, stderr and the exit status.
func banger(t *testing.T, h string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bins(t), "banger"), args...)
	cmd.Env = append(os.Environ(), "BANGER_HOME="+h)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run banger %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// rawCall sends raw lines to a socket and returns the decoded responses.
func rawCall(t *testing.T, sock string, lines ...string) []map[string]any {
	t.Helper()
	c, err := dialUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReaderSize(c, 1<<20)
	var out []map[string]any
	for _, l := range lines {
		if _, err := c.Write([]byte(l + "\n")); err != nil {
			t.Fatal(err)
		}
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read response to %.80q: %v", l, err)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("response %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

// nobodyUID is the unprivileged user bangerd runs as in the end-to-end tests.
const nobodyUID = testenv.NobodyUID

// daemonUID is the user the VM tests run bangerd as: nobody when the tests
// run as root (as CI does), so that they see what a user's own bangerd sees
// (permission bits count); BANGER_E2E_DAEMON_USER=root keeps it root.
func daemonUID() uint32 {
	if os.Geteuid() != 0 || os.Getenv("BANGER_E2E_DAEMON_USER") == "root" {
		return 0
	}
	return nobodyUID
}

// startUserDaemon runs bangerd as daemonUID over home h (chowned to it);
// the root helper, when a test has one, stays root.
func startUserDaemon(t *testing.T, h string, extraEnv ...string) *daemonProc {
	t.Helper()
	uid := daemonUID()
	if uid == 0 {
		return startDaemon(t, h, extraEnv...)
	}
	os.Chmod(bins(t), 0o755)
	chownTree(t, h, int(uid))
	os.Chmod(h, 0o700)
	return startDaemonWith(t, h, func(cmd *exec.Cmd) {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	}, append([]string{"HOME=" + h}, extraEnv...)...)
}

// copyIntoHome copies src into home h (where bangerd, whichever user it
// runs as, can read it) and returns the copy's path.
func copyIntoHome(t *testing.T, h, src string) string {
	t.Helper()
	dst := filepath.Join(h, "in-"+filepath.Base(src))
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if uid := daemonUID(); uid != 0 {
		os.Chown(dst, int(uid), int(uid))
	}
	return dst
}
