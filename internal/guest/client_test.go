package guest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/sshd"
)

// unixDialer dials a unix socket: the test's stand-in for a guest channel.
type unixDialer string

func (d unixDialer) Dial(ctx context.Context) (net.Conn, error) {
	var nd net.Dialer
	return nd.DialContext(ctx, "unix", string(d))
}

type testEnv struct {
	dir      string
	home     string
	client   *Client
	hostKey  HostKey
	userKey  UserKey
	dialer   unixDialer
	shutdown atomic.Int32
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// startAgent runs an in-process agent SSH server on a unix socket and returns
// a client for it.
func startAgent(t *testing.T) *testEnv {
	t.Helper()
	dir := t.TempDir()
	home := filepath.Join(dir, "home")
	if err := os.Mkdir(home, 0o755); err != nil {
		t.Fatal(err)
	}
	passwd, hk, uk, signer := agentFiles(t, dir, home)
	env := &testEnv{dir: dir, home: home, hostKey: hk, userKey: uk}
	srv, err := sshd.New(sshd.Config{
		HostKey:        signer,
		AuthorizedKeys: []ssh.PublicKey{uk.Signer.PublicKey()},
		Env:            []string{"IMAGE_VAR=from-image"},
		PasswdFile:     passwd,
		GroupFile:      filepath.Join(dir, "group"),
		OnShutdown:     func() { env.shutdown.Add(1) },
		Logger:         testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ctx, l)
	}()
	env.dialer = unixDialer(sock)
	env.client = env.newClient(t, hk.Public, uk.Signer)
	t.Cleanup(func() {
		env.client.Close()
		cancel()
		<-served
		srv.Wait()
	})
	return env
}

// agentFiles writes into dir what an in-process agent needs: a passwd
// file naming tester (home home), a host key and a user key.
func agentFiles(t *testing.T, dir, home string) (passwd string, hk HostKey, uk UserKey, hostSigner ssh.Signer) {
	t.Helper()
	passwd = filepath.Join(dir, "passwd")
	line := fmt.Sprintf("tester:x:%d:%d:Tester:%s:/bin/sh\n", os.Getuid(), os.Getgid(), home)
	if err := os.WriteFile(passwd, []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	hk, err := GenerateHostKey()
	if err != nil {
		t.Fatal(err)
	}
	if uk, err = LoadOrCreateUserKey(filepath.Join(dir, "keys", "id_ed25519")); err != nil {
		t.Fatal(err)
	}
	if hostSigner, err = ssh.ParsePrivateKey(hk.PrivatePEM); err != nil {
		t.Fatal(err)
	}
	return passwd, hk, uk, hostSigner
}

func (e *testEnv) newClient(t *testing.T, hostKey ssh.PublicKey, signer ssh.Signer) *Client {
	t.Helper()
	c, err := NewClient(ClientConfig{Dialer: e.dialer, HostKey: hostKey, UserKey: signer, User: "tester", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestExecExitCodesAndStreams(t *testing.T) {
	e := startAgent(t)
	tests := []struct {
		name       string
		cmd        []string
		code       int
		stdout     string
		stderr     string
		opts       ExecOptions
		shellLine  string
		wantErrSub string
	}{
		{name: "true", cmd: []string{"true"}, code: 0},
		{name: "exit 7", shellLine: "exit 7", code: 7},
		{name: "separate streams", shellLine: "echo out; echo err >&2; exit 3", code: 3, stdout: "out\n", stderr: "err\n"},
		{name: "argv quoting", cmd: []string{"printf", "%s|", "a b", "it's", "$HOME", ""}, stdout: "a b|it's|$HOME||"},
		{name: "killed by signal", shellLine: "kill -KILL $$", code: 128 + 9},
		{name: "client env", cmd: []string{"sh", "-c", "echo $FOO"}, opts: ExecOptions{Env: []string{"FOO=bar baz"}}, stdout: "bar baz\n"},
		{name: "image env and user env", shellLine: "echo $IMAGE_VAR $USER $HOME", stdout: "from-image tester " + e.home + "\n"},
		{name: "default dir is home", cmd: []string{"pwd"}, stdout: e.home + "\n"},
		{name: "dir", cmd: []string{"pwd"}, opts: ExecOptions{Dir: "/tmp"}, stdout: "/tmp\n"},
		{name: "missing dir", cmd: []string{"pwd"}, opts: ExecOptions{Dir: "/nonexistent-banger"}, wantErrSub: "does not exist in the guest"},
		{name: "missing command", cmd: []string{"banger-no-such-command"}, code: 127},
		{name: "path", shellLine: "echo $PATH", stdout: sshd.DefaultPath + "\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			var code int
			var err error
			if tt.shellLine != "" {
				code, err = e.client.ExecShell(testCtx(t), tt.shellLine, nil, &out, &errb, tt.opts)
			} else {
				code, err = e.client.Exec(testCtx(t), tt.cmd, nil, &out, &errb, tt.opts)
			}
			if tt.wantErrSub != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErrSub) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.wantErrSub)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if code != tt.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tt.code, errb.String())
			}
			if tt.stdout != "" && out.String() != tt.stdout {
				t.Errorf("stdout %q, want %q", out.String(), tt.stdout)
			}
			if tt.stderr != "" && errb.String() != tt.stderr {
				t.Errorf("stderr %q, want %q", errb.String(), tt.stderr)
			}
		})
	}
}

func TestExecLargeStdin(t *testing.T) {
	e := startAgent(t)
	data := make([]byte, 10<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	var out, errb bytes.Buffer
	// Checksum in the "guest" with the agent's view of stdin: cat to a file
	// and report its size, then return the file for comparison.
	target := filepath.Join(e.dir, "stdin.bin")
	code, err := e.client.Exec(testCtx(t), []string{"sh", "-c", `cat > "$1" && wc -c < "$1"`, "sh", target}, bytes.NewReader(data), &out, &errb, ExecOptions{})
	if err != nil || code != 0 {
		t.Fatalf("exec: code %d err %v stderr %q", code, err, errb.String())
	}
	if strings.TrimSpace(out.String()) != fmt.Sprint(len(data)) {
		t.Fatalf("guest saw %s bytes, want %d", out.String(), len(data))
	}
	got, err := os.ReadFile(target)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sum {
		t.Fatal("stdin arrived corrupted")
	}
	// And 10 MiB the other way.
	out.Reset()
	code, err = e.client.Exec(testCtx(t), []string{"cat", target}, nil, &out, &errb, ExecOptions{})
	if err != nil || code != 0 {
		t.Fatalf("exec cat: code %d err %v", code, err)
	}
	if sha256.Sum256(out.Bytes()) != sum {
		t.Fatalf("stdout corrupted: %d bytes", out.Len())
	}
}

// lineWatcher is a writer that signals when its output contains a string.
type lineWatcher struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	want map[string]chan struct{}
}

func newWatcher(wants ...string) *lineWatcher {
	w := &lineWatcher{want: map[string]chan struct{}{}}
	for _, s := range wants {
		w.want[s] = make(chan struct{})
	}
	return w
}

func (w *lineWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	for s, ch := range w.want {
		if ch != nil && strings.Contains(w.buf.String(), s) {
			close(ch)
			w.want[s] = nil
		}
	}
	return len(p), nil
}

func (w *lineWatcher) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func (w *lineWatcher) wait(t *testing.T, s string) {
	t.Helper()
	w.mu.Lock()
	ch := w.want[s]
	w.mu.Unlock()
	if ch == nil {
		return
	}
	select {
	case <-ch:
	case <-time.After(20 * time.Second):
		t.Fatalf("output never contained %q; got %q", s, w.String())
	}
}

func TestExecTTY(t *testing.T) {
	e := startAgent(t)
	resize := make(chan WindowSize, 1)
	w := newWatcher("ready", "size 30 100")
	type result struct {
		code int
		err  error
	}
	res := make(chan result, 1)
	script := `test -t 0 && test -t 1 && echo "tty $TERM"; stty size; trap 'echo size $(stty size); exit 4' WINCH; echo ready; while :; do sleep 0.05; done`
	go func() {
		code, err := e.client.ExecShell(testCtx(t), script, nil, w, nil, ExecOptions{TTY: true, Term: "xterm-test", Size: WindowSize{Rows: 24, Cols: 80}, Resize: resize})
		res <- result{code, err}
	}()
	w.wait(t, "ready")
	resize <- WindowSize{Rows: 30, Cols: 100}
	w.wait(t, "size 30 100")
	r := <-res
	if r.err != nil || r.code != 4 {
		t.Fatalf("code %d err %v output %q", r.code, r.err, w.String())
	}
	out := w.String()
	if !strings.Contains(out, "tty xterm-test") || !strings.Contains(out, "24 80") {
		t.Fatalf("unexpected pty output %q", out)
	}
}

func TestSignalsAndCancel(t *testing.T) {
	e := startAgent(t)
	w := newWatcher("ready", "got usr1")
	sigs := make(chan ssh.Signal, 1)
	res := make(chan error, 1)
	var code int
	go func() {
		var err error
		code, err = e.client.ExecShell(testCtx(t), `trap 'echo got usr1; exit 3' USR1; echo ready; while :; do sleep 0.05; done`, nil, w, nil, ExecOptions{Signals: sigs})
		res <- err
	}()
	w.wait(t, "ready")
	sigs <- ssh.SIGUSR1
	if err := <-res; err != nil || code != 3 {
		t.Fatalf("exec: code %d err %v, want exit 3", code, err)
	}
	w.wait(t, "got usr1")

	// Cancelling Exec's context ends the command (SIGTERM, then hangup). The
	// trap writes the marker with a shell builtin: a child such as touch
	// would be in the process group the hangup also reaches.
	marker := filepath.Join(e.dir, "terminated")
	ctx, cancel := context.WithCancel(testCtx(t))
	w2 := newWatcher("ready")
	res = make(chan error, 1)
	go func() {
		_, err := e.client.ExecShell(ctx, fmt.Sprintf(`trap ': > %s; exit 1' TERM HUP; echo ready; while :; do sleep 0.05; done`, marker), nil, w2, nil, ExecOptions{})
		res <- err
	}()
	w2.wait(t, "ready")
	cancel()
	if err := <-res; !errors.Is(err, context.Canceled) {
		t.Fatalf("exec after cancel: %v, want context.Canceled", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the command was not signalled after the cancel")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSFTP(t *testing.T) {
	e := startAgent(t)
	sc, err := e.client.SFTP(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	content := bytes.Repeat([]byte("banger sftp\n"), 100000)
	dst := filepath.Join(e.dir, "put.txt")
	f, err := sc.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadFrom(bytes.NewReader(content)); err != nil {
		t.Fatal(err)
	}
	if err := f.Chmod(0o751); err != nil {
		t.Fatal(err)
	}
	f.Close()
	fi, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o751 || fi.Size() != int64(len(content)) {
		t.Fatalf("put file mode %v size %d", fi.Mode(), fi.Size())
	}
	st, err := sc.Stat(dst)
	if err != nil || st.Mode().Perm() != 0o751 {
		t.Fatalf("sftp stat: %v %v", st, err)
	}
	// a relative symlink keeps its relative target
	link := filepath.Join(e.dir, "link")
	if err := sc.Symlink("put.txt", link); err != nil {
		t.Fatal(err)
	}
	if target, err := os.Readlink(link); err != nil || target != "put.txt" {
		t.Fatalf("symlink target %q (%v), want put.txt", target, err)
	}
	rf, err := sc.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := rf.WriteTo(&got); err != nil {
		t.Fatal(err)
	}
	rf.Close()
	if !bytes.Equal(got.Bytes(), content) {
		t.Fatal("get returned different content")
	}
	wd, err := sc.Getwd()
	if err != nil || wd != e.home {
		t.Fatalf("sftp working directory %q (%v), want %q", wd, err, e.home)
	}
}

func TestDirectTCPIP(t *testing.T) {
	e := startAgent(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	conn, err := e.client.SSH(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c, err := conn.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := bytes.Repeat([]byte("echo"), 50000)
	go func() { _, _ = c.Write(msg) }()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("forwarded data differs")
	}
	// A closed port is refused, not hung.
	l2, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l2.Addr().String()
	l2.Close()
	if _, err := conn.Dial("tcp", addr); err == nil {
		t.Fatal("dial to a closed port succeeded")
	}
}

func TestAuthFailures(t *testing.T) {
	e := startAgent(t)
	other, err := GenerateHostKey()
	if err != nil {
		t.Fatal(err)
	}
	c := e.newClient(t, other.Public, e.userKey.Signer)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.SSH(ctx); err == nil || !strings.Contains(err.Error(), "different host key") {
		t.Fatalf("wrong host key: err = %v", err)
	}
	stranger, err := LoadOrCreateUserKey(filepath.Join(t.TempDir(), "k"))
	if err != nil {
		t.Fatal(err)
	}
	c = e.newClient(t, e.hostKey.Public, stranger.Signer)
	if _, err := c.SSH(ctx); err == nil || !strings.Contains(err.Error(), "does not accept") {
		t.Fatalf("unknown user key: err = %v", err)
	}
	// Ping gives up at the deadline rather than retrying forever.
	pctx, pcancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer pcancel()
	if err := c.Ping(pctx); err == nil {
		t.Fatal("ping with an unknown key succeeded")
	}
}

func TestGlobalRequests(t *testing.T) {
	e := startAgent(t)
	ctx := testCtx(t)
	if err := e.client.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ports, err := e.client.Ports(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := l.Addr().(*net.TCPAddr).Port
	found := false
	for _, p := range ports {
		if p.Port == want && p.Proto == "tcp" {
			found = p.PID == os.Getpid()
		}
	}
	if !found {
		t.Fatalf("port %d owned by this process not in %+v", want, ports)
	}
	st, err := e.client.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.MemTotalBytes == 0 || st.DiskTotalBytes == 0 {
		t.Fatalf("implausible stats %+v", st)
	}
	if err := e.client.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.shutdown.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("OnShutdown was not called")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The client reconnects after Shutdown dropped its connection.
	if err := e.client.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentExec(t *testing.T) {
	e := startAgent(t)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out bytes.Buffer
			code, err := e.client.Exec(testCtx(t), []string{"echo", fmt.Sprint(i)}, nil, &out, io.Discard, ExecOptions{})
			if err != nil || code != 0 || out.String() != fmt.Sprintf("%d\n", i) {
				errs <- fmt.Errorf("exec %d: code %d err %v out %q", i, code, err, out.String())
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestKeys(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "sub", "id")
	k1, err := LoadOrCreateUserKey(p)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v (%v)", fi.Mode(), err)
	}
	k2, err := LoadOrCreateUserKey(p)
	if err != nil {
		t.Fatal(err)
	}
	if k1.AuthorizedLine() != k2.AuthorizedLine() {
		t.Fatal("reloading the key gave a different key")
	}
	pub, err := os.ReadFile(p + ".pub")
	if err != nil || !strings.HasPrefix(string(pub), k1.AuthorizedLine()) {
		t.Fatalf("public key file %q (%v)", pub, err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateUserKey(p); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable key accepted: %v", err)
	}
	hk, err := GenerateHostKey()
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := ParsePublicKey(hk.AuthorizedLine())
	if err != nil || !bytes.Equal(parsed.Marshal(), hk.Public.Marshal()) {
		t.Fatalf("host key line does not round-trip: %v", err)
	}
	if _, err := ssh.ParsePrivateKey(hk.PrivatePEM); err != nil {
		t.Fatal(err)
	}
}

func TestShellQuote(t *testing.T) {
	tests := []struct {
		in   []string
		want string
	}{
		{[]string{"ls", "-l"}, "ls -l"},
		{[]string{"echo", "a b"}, "echo 'a b'"},
		{[]string{"echo", "it's"}, `echo 'it'"'"'s'`},
		{[]string{"echo", ""}, "echo ''"},
		{[]string{"echo", "$HOME", "*"}, "echo '$HOME' '*'"},
	}
	for _, tt := range tests {
		if got := ShellQuote(tt.in); got != tt.want {
			t.Errorf("ShellQuote(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}
