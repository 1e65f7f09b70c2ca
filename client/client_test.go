package client_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/testenv"
)

func TestDialNothingListening(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, err := client.Dial(context.Background(), client.WithSocket(sock))
	if !errors.Is(err, client.ErrNotRunning) {
		t.Fatalf("Dial with no bangerd: %v, want ErrNotRunning", err)
	}
}

func TestDialHomeAndDefault(t *testing.T) {
	h := t.TempDir()
	c, err := client.New(client.WithHome(h))
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(h, "run", "bangerd.sock"); c.Socket() != want {
		t.Fatalf("socket %s, want %s", c.Socket(), want)
	}
	t.Setenv("BANGER_HOME", h)
	def, err := client.DefaultSocket()
	if err != nil || def != c.Socket() {
		t.Fatalf("DefaultSocket() = %q, %v; want %s", def, err, c.Socket())
	}
}

func TestSignalNumbers(t *testing.T) {
	for name, want := range map[string]int{"INT": 2, "SIGTERM": 15, "KILL": 9, "HUP": 1, "QUIT": 3, "USR1": 10, "SEGV": 11, "PIPE": 13, "nope": 0} {
		if got := client.SignalNumber(name); got != want {
			t.Errorf("SignalNumber(%q) = %d, want %d", name, got, want)
		}
	}
}

// TestClientWithBangerd: calls, typed errors and op ids against a real
// bangerd (no VM).
func TestClientWithBangerd(t *testing.T) {
	b := testenv.StartBangerd(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.Dial(ctx, client.WithSocket(b.Socket))
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil || info.Home != b.Home || info.PID <= 0 {
		t.Fatalf("Info: %+v, %v", info, err)
	}
	vms, err := c.ListVMs(ctx)
	if err != nil || vms == nil || len(vms) != 0 {
		t.Fatalf("ListVMs: %v, %v", vms, err)
	}
	_, err = c.GetVM(client.WithOpID(ctx, "op-client-test1"), "ghost")
	var e *client.Error
	if !errors.As(err, &e) || e.Code != client.CodeNotFound || client.Code(err) != client.CodeNotFound {
		t.Fatalf("GetVM ghost: %v, want a not_found *client.Error", err)
	}
	if client.OpID(err) != "op-client-test1" || !strings.HasSuffix(err.Error(), "(op-client-test1)") {
		t.Fatalf("the error does not carry the op id: %v", err)
	}
	if _, err := c.CreateVM(ctx, api.CreateParams{Name: "bad name!"}, nil); client.Code(err) != client.CodeInvalidArgument {
		t.Fatalf("create with a bad name: %v", err)
	}
	if _, err := c.Exec(ctx, "ghost", []string{"true"}, client.ExecOptions{Env: []string{"1BAD=x"}}); client.Code(err) != client.CodeInvalidArgument {
		t.Fatalf("exec with a bad env name: %v", err)
	}
	if _, err := c.Exec(ctx, "ghost", []string{"true"}, client.ExecOptions{}); client.Code(err) != client.CodeNotFound {
		t.Fatalf("exec in a missing VM: %v", err)
	}
}

// TestClientRealGuest drives one real VM (QEMU) through the client: create
// with stage events, exec (env, workdir, stdin, exit codes, signals,
// timeout), files, ports, stats, logs, workspace, stop/start and delete.
func TestClientRealGuest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	b, c := testenv.BangerdWithGuest(t, ctx)
	var stages []string
	t0 := time.Now()
	vm, err := c.CreateVM(ctx, api.CreateParams{Name: "cl", MemoryMiB: 256, DiskMiB: 512}, func(s api.Stage) {
		stages = append(stages, s.Name)
	})
	if err != nil {
		t.Fatalf("create: %v\n%s", err, b.Logs())
	}
	t.Logf("MEASURE client CreateVM: %v, stages %v", time.Since(t0).Round(time.Millisecond), stages)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c.DeleteVM(ctx, "cl", true)
	})
	if vm.State != api.StateRunning || len(stages) == 0 {
		t.Fatalf("created VM %+v, stages %v", vm, stages)
	}
	if got, err := c.GetVM(ctx, vm.ID[:8]); err != nil || got.Name != "cl" {
		t.Fatalf("GetVM by id prefix: %+v %v", got, err)
	}
	if vms, err := c.ListVMs(ctx); err != nil || len(vms) != 1 {
		t.Fatalf("ListVMs: %v %v", vms, err)
	}

	run := func(argv []string, o client.ExecOptions) (int, string, string) {
		t.Helper()
		var out, errb bytes.Buffer
		o.Stdout, o.Stderr = &out, &errb
		code, err := c.Exec(ctx, "cl", argv, o)
		if err != nil {
			t.Fatalf("exec %q: %v", argv, err)
		}
		return code, out.String(), errb.String()
	}
	if code, out, _ := run([]string{"sh", "-c", "echo $A; pwd"}, client.ExecOptions{Env: []string{"A=1"}, Dir: "/tmp"}); code != 0 || out != "1\n/tmp\n" {
		t.Fatalf("env+dir: exit %d, %q", code, out)
	}
	if code, out, _ := run([]string{"cat"}, client.ExecOptions{Stdin: strings.NewReader("from stdin")}); code != 0 || out != "from stdin" {
		t.Fatalf("stdin: exit %d, %q", code, out)
	}
	if code, _, _ := run([]string{"sh", "-c", "exit 3"}, client.ExecOptions{}); code != 3 {
		t.Fatalf("exit 3: got %d", code)
	}
	if code, _, _ := run([]string{"no-such-command-here"}, client.ExecOptions{}); code != 127 {
		t.Fatalf("missing command: got %d, want 127", code)
	}
	if code, _, _ := run([]string{"/etc/passwd"}, client.ExecOptions{}); code != 126 {
		t.Fatalf("not executable: got %d, want 126", code)
	}
	if code, out, _ := run([]string{"echo", "a b", "$HOME", "it's"}, client.ExecOptions{}); code != 0 || out != "a b $HOME it's\n" {
		t.Fatalf("argv quoting: %d %q", code, out)
	}
	if code, out, _ := run([]string{"tty"}, client.ExecOptions{TTY: true}); code != 0 || !strings.HasPrefix(out, "/dev/pts/") {
		t.Fatalf("tty: %d %q", code, out)
	}
	if _, err := c.Exec(ctx, "cl", []string{"true"}, client.ExecOptions{Dir: "/no/such/dir"}); client.Code(err) != client.CodeInvalidArgument {
		t.Fatalf("missing workdir: %v", err)
	}
	// a forwarded signal ends the command: 128+15
	sigs := make(chan os.Signal, 1)
	started := &readyWriter{ready: make(chan struct{})}
	go func() {
		select {
		case <-started.ready:
		case <-time.After(30 * time.Second):
		}
		sigs <- syscall.SIGTERM
	}()
	code, err := c.Exec(ctx, "cl", []string{"sh", "-c", "echo ready; exec sleep 60"}, client.ExecOptions{Stdout: started, Signals: sigs})
	if err != nil || code != 143 {
		t.Fatalf("SIGTERM: exit %d, %v (want 143)", code, err)
	}
	// a context deadline hangs the command up and returns promptly
	tctx, tcancel := context.WithTimeout(ctx, 2*time.Second)
	t1 := time.Now()
	_, err = c.Exec(tctx, "cl", []string{"sleep", "60"}, client.ExecOptions{})
	tcancel()
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(t1) > 10*time.Second {
		t.Fatalf("exec past its deadline: %v after %v", err, time.Since(t1))
	}

	// files
	if err := c.WriteFile(ctx, "cl", "/root/hello.txt", []byte("hello\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if got, err := c.ReadFile(ctx, "cl", "/root/hello.txt", 0); err != nil || string(got) != "hello\n" {
		t.Fatalf("ReadFile: %q %v", got, err)
	}
	if _, err := c.ReadFile(ctx, "cl", "/root/hello.txt", 3); client.Code(err) != client.CodeInvalidArgument {
		t.Fatalf("ReadFile over its limit: %v", err)
	}
	if _, err := c.ReadFile(ctx, "cl", "/root", 0); client.Code(err) != client.CodeInvalidArgument {
		t.Fatalf("ReadFile of a directory: %v", err)
	}
	local := filepath.Join(t.TempDir(), "up.bin")
	os.WriteFile(local, bytes.Repeat([]byte("x"), 300<<10), 0o755)
	if err := c.Upload(ctx, "cl", local, "/root/up.bin"); err != nil {
		t.Fatal(err)
	}
	back := filepath.Join(t.TempDir(), "down.bin")
	if err := c.Download(ctx, "cl", "/root/up.bin", back); err != nil {
		t.Fatal(err)
	}
	if a, _ := os.ReadFile(local); !bytes.Equal(a, mustRead(t, back)) {
		t.Fatal("download differs from upload")
	}
	if fi, _ := os.Stat(back); fi.Mode().Perm() != 0o755 {
		t.Fatalf("downloaded mode %v", fi.Mode())
	}
	// a symlink at the local path is replaced, not followed
	target := filepath.Join(t.TempDir(), "target")
	os.WriteFile(target, []byte("keep"), 0o600)
	link := filepath.Join(t.TempDir(), "link")
	os.Symlink(target, link)
	if err := c.Download(ctx, "cl", "/root/hello.txt", link); client.Code(err) != client.CodeInvalidArgument {
		t.Fatalf("download onto a symlink: %v", err)
	}
	if string(mustRead(t, target)) != "keep" {
		t.Fatal("download wrote through a symlink")
	}

	// ports, stats, logs
	if ps, err := c.Ports(ctx, "cl"); err != nil || ps.VM != "cl" {
		t.Fatalf("Ports: %+v %v", ps, err)
	}
	if st, err := c.Stats(ctx, "cl", true); err != nil || st.Latest == nil {
		t.Fatalf("Stats: %+v %v", st, err)
	}
	if lg, err := c.Logs(ctx, "cl", 0, 4096); err != nil || lg.NextOffset == 0 || !lg.Running {
		t.Fatalf("Logs: %+v %v", lg, err)
	}

	// workspace push and pull
	if _, err := exec.LookPath("git"); err == nil {
		repo := filepath.Join(t.TempDir(), "proj")
		os.Mkdir(repo, 0o755)
		git(t, repo, "init", "-q", "-b", "main")
		os.WriteFile(filepath.Join(repo, "README"), []byte("host\n"), 0o644)
		big := make([]byte, 1<<20)
		rand.Read(big)
		os.WriteFile(filepath.Join(repo, "big"), big, 0o644)
		git(t, repo, "add", "-A")
		git(t, repo, "commit", "-q", "-m", "first")
		dest, err := c.WorkspacePush(ctx, "cl", repo, client.PushOptions{})
		if err != nil || dest != "/root/proj" {
			t.Fatalf("WorkspacePush: %q %v", dest, err)
		}
		if err := c.WriteFile(ctx, "cl", "/root/proj/README", []byte("guest\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		res, err := c.WorkspacePull(ctx, "cl", "cl", repo, "")
		if err != nil || res.Branch != "banger/cl" || !res.Uncommitted {
			t.Fatalf("WorkspacePull: %+v %v", res, err)
		}
		if got := git(t, repo, "show", "banger/cl:README"); got != "guest" {
			t.Fatalf("pulled README: %q", got)
		}
		// after a push, the guest sends only what the host lacks: not
		// the 1 MiB file, nor its object
		if res.Received == 0 || res.Received > 64<<10 {
			t.Fatalf("the pull received %d bytes, want at most 64 KiB", res.Received)
		}
	}

	// lifecycle
	if v, err := c.StopVM(ctx, "cl", 20*time.Second); err != nil || v.State != api.StateStopped {
		t.Fatalf("StopVM: %+v %v", v, err)
	}
	if _, err := c.Exec(ctx, "cl", []string{"true"}, client.ExecOptions{}); client.Code(err) != client.CodeFailedPrecondition {
		t.Fatalf("exec in a stopped VM: %v", err)
	}
	if v, err := c.StartVM(ctx, "cl"); err != nil || v.State != api.StateRunning {
		t.Fatalf("StartVM: %+v %v", v, err)
	}
	if _, err := c.DeleteVM(ctx, "cl", false); client.Code(err) != client.CodeConflict {
		t.Fatalf("delete a running VM without force: %v", err)
	}
	if r, err := c.DeleteVM(ctx, "cl", true); err != nil || r.Deleted != "cl" {
		t.Fatalf("DeleteVM: %+v %v", r, err)
	}
}

// readyWriter closes ready once "ready" has been written.
type readyWriter struct {
	mu    sync.Mutex
	b     bytes.Buffer
	ready chan struct{}
	once  sync.Once
}

func (w *readyWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b.Write(p)
	if strings.Contains(w.b.String(), "ready") {
		w.once.Do(func() { close(w.ready) })
	}
	return len(p), nil
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func git(t *testing.T, dir string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@t", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@t")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}
