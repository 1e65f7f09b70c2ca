package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	cmdMu    sync.Mutex
	cmdMemos = map[string]*memo[string]{}
	cmdDir   string
)

// Command builds ./cmd/<name> of the banger module once per test process
// and returns the binary's path, in os.TempDir()/banger-test-bin-<pid>-*.
// A test process cannot remove that directory when its tests end, so each
// new one sweeps the directories of test processes that are gone.
func Command(t testing.TB, name string) string {
	t.Helper()
	cmdMu.Lock()
	m := cmdMemos[name]
	if m == nil {
		m = &memo[string]{}
		cmdMemos[name] = m
	}
	cmdMu.Unlock()
	return m.get(t, func(s *step) string {
		cmdMu.Lock()
		if cmdDir == "" {
			sweepBinDirs(os.TempDir())
			d, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", binDirPrefix, os.Getpid()))
			if err != nil {
				cmdMu.Unlock()
				s.Fatalf("temporary directory: %v", err)
			}
			cmdDir = d
		}
		dir := cmdDir
		cmdMu.Unlock()
		gobin, err := goTool()
		if err != nil {
			s.Fatalf("build %s: %v", name, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		root, err := repoRoot(ctx)
		if err != nil {
			s.Fatalf("find the banger module root: %v", err)
		}
		cmd := exec.CommandContext(ctx, gobin, "build", "-o", dir+"/", "./cmd/"+name)
		cmd.Dir = root
		if staticCommands[name] {
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		}
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			s.Fatalf("go build ./cmd/%s: %v\n%s", name, err, out.String())
		}
		return filepath.Join(dir, name)
	})
}

// staticCommands are built without cgo, as scripts/quickstart builds them:
// a static banger starts ~1 ms sooner than one the dynamic loader has to
// link against libc first (docs/BENCHMARKS.md), and every CLI call pays
// its start. banger-helper keeps cgo: it looks groups up through NSS.
var staticCommands = map[string]bool{"banger": true, "bangerd": true}

const binDirPrefix = "banger-test-bin-"

// sweepBinDirs removes dir's banger-test-bin-<pid>-* directories whose test
// process no longer exists.
func sweepBinDirs(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), binDirPrefix)
		if !ok || !e.IsDir() {
			continue
		}
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}

// Bangerd is a bangerd a test started in the foreground, on its own home.
type Bangerd struct {
	Home   string
	Socket string
	cmd    *exec.Cmd
	logs   *LockedBuffer
	done   chan struct{}
}

// LockedBuffer is a bytes.Buffer safe for concurrent writers and readers
// (a process's stderr written while the test reads it).
type LockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Logs returns what bangerd logged so far.
func (b *Bangerd) Logs() string { return b.logs.String() }

// StartBangerd builds bangerd and starts it with a fresh short home (unix
// socket paths are short), the test's banger-agent and the extra
// environment, waits for its socket, and stops it when the test ends.
func StartBangerd(t testing.TB, extraEnv ...string) *Bangerd {
	t.Helper()
	bin := Command(t, "bangerd")
	agent := AgentBinary(t)
	h, err := os.MkdirTemp("", "bh-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// VMMs outlive bangerd by design: end those this home started
		// before removing it, or they run on with their home gone.
		if _, err := KillVMMsUnder(h); err != nil {
			t.Error(err)
		}
		RemoveMemoryDirs(h)
		os.RemoveAll(h)
	})
	cmd := exec.Command(bin, "--debug")
	cmd.Env = append(append(os.Environ(), "BANGER_HOME="+h, "BANGER_AGENT="+agent), extraEnv...)
	return RunBangerd(t, cmd, h)
}

// RunBangerd starts the prepared bangerd command on home, its stderr
// collected, waits (up to 20 s) until its socket accepts a connection, and
// stops it when the test ends. It fails the test if bangerd exits first.
func RunBangerd(t testing.TB, cmd *exec.Cmd, home string) *Bangerd {
	t.Helper()
	b := &Bangerd{Home: home, Socket: filepath.Join(home, "run", "bangerd.sock"), cmd: cmd, logs: &LockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = b.logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(b.done) }()
	t.Cleanup(func() { b.Stop(t) })
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-b.done:
			t.Fatalf("bangerd exited early:\n%s", b.Logs())
		default:
		}
		if c, err := net.Dial("unix", b.Socket); err == nil {
			c.Close()
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("bangerd did not answer on its socket within 20s:\n%s", b.Logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Cmd is bangerd's command (its Process while it runs).
func (b *Bangerd) Cmd() *exec.Cmd { return b.cmd }

// Done is closed when bangerd has exited.
func (b *Bangerd) Done() <-chan struct{} { return b.done }

// LogBuffer is where bangerd's stderr goes.
func (b *Bangerd) LogBuffer() *LockedBuffer { return b.logs }

// Stop stops bangerd (SIGINT, then SIGKILL after 20 s).
func (b *Bangerd) Stop(t testing.TB) {
	select {
	case <-b.done:
		return
	default:
	}
	b.cmd.Process.Signal(os.Interrupt)
	select {
	case <-b.done:
	case <-time.After(20 * time.Second):
		b.cmd.Process.Kill()
		<-b.done
		t.Errorf("bangerd did not stop on SIGINT within 20s")
	}
}
