package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/testenv"
)

func TestPeerAllowed(t *testing.T) {
	for _, c := range []struct {
		peer, self uint32
		want       bool
	}{
		{1000, 1000, true},
		{0, 1000, true}, // root can act as the user anyway
		{0, 0, true},
		{1001, 1000, false},
		{65534, 1000, false},
		{1000, 0, false},
	} {
		if got := peerAllowed(c.peer, c.self); got != c.want {
			t.Errorf("peerAllowed(peer %d, self %d) = %v, want %v", c.peer, c.self, got, c.want)
		}
	}
}

const peerDialEnv = "BANGERD_TEST_PEER_DIAL"

// TestPeerDialChild is not a test: it is the child process of
// TestSocketRefusesOtherUsers, run as another uid. It sends two pings on one
// connection and prints every line it gets back until the server closes.
func TestPeerDialChild(t *testing.T) {
	sock := os.Getenv(peerDialEnv)
	if sock == "" {
		t.Skip("child process of TestSocketRefusesOtherUsers")
	}
	fmt.Fprint(os.Stdout, dialAndPing(sock, -1))
}

// dialAndPing sends two pings and returns the lines read back: max of them,
// or (max < 0) all of them until the server closes (a read error, such as
// the deadline, is reported in the output).
func dialAndPing(sock string, max int) string {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return "dial: " + err.Error() + "\n"
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, `{"version":1,"method":"system.ping"}`+"\n"+`{"version":1,"method":"system.ping"}`+"\n")
	var out strings.Builder
	sc := bufio.NewScanner(c)
	for n := 0; n != max && sc.Scan(); n++ {
		out.WriteString(sc.Text() + "\n")
	}
	if err := sc.Err(); err != nil {
		out.WriteString("read: " + err.Error() + "\n")
	}
	return out.String()
}

// bangerd's server (newRPCServer, what Run serves) on a socket whose mode
// was loosened to 0666 in a 0777 directory: its own user is served; another
// uid gets one permission_denied answer and the connection is closed.
func TestSocketRefusesOtherUsers(t *testing.T) {
	dir, err := os.MkdirTemp("", "bangerd-peer")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o777)
	sock := filepath.Join(dir, "bangerd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(sock, 0o666)
	d := &Daemon{mux: rpc.NewMux(), log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	d.mux.HandleFunc("system.ping", func(context.Context, json.RawMessage) (any, error) { return "pong", nil })
	srv := newRPCServer(d)
	go srv.Serve(context.Background(), ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})

	// its own user: both pings answered
	if out := dialAndPing(sock, 2); strings.Count(out, `"result":"pong"`) != 2 {
		t.Fatalf("own user: %q, want two pongs", out)
	}

	if os.Geteuid() != 0 {
		t.Skip("playing another uid needs root (CI runs as root)")
	}
	// another uid: a copy of this test binary run as nobody
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := testenv.AsNobody(ctx, t, "^TestPeerDialChild$")
	cmd.Env = []string{peerDialEnv + "=" + sock}
	cmd.Dir = "/"
	outb, err := cmd.Output()
	if err != nil {
		t.Fatalf("child as nobody: %v: %s", err, outb)
	}
	var lines []string
	for _, l := range strings.Split(string(outb), "\n") {
		if strings.HasPrefix(l, "{") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 {
		t.Fatalf("nobody got %d answers, want exactly 1 then the connection closed: %s", len(lines), outb)
	}
	var resp rpc.Response
	if err := json.Unmarshal([]byte(lines[0]), &resp); err != nil {
		t.Fatal(err)
	}
	if resp.Error == nil || resp.Error.Code != rpc.CodePermissionDenied || !strings.Contains(resp.Error.Message, "uid 65534") {
		t.Fatalf("nobody's answer: %s, want permission_denied naming uid 65534", lines[0])
	}
	if strings.Contains(string(outb), "pong") || strings.Contains(string(outb), "read: ") {
		t.Fatalf("nobody was served: %s", outb)
	}
}

// The socket is made only in a directory nobody else can enter, and is 0600.
func TestListenUnixModes(t *testing.T) {
	for _, mode := range []os.FileMode{0o755, 0o750, 0o707, 0o777} {
		dir := t.TempDir()
		os.Chmod(dir, mode)
		if ln, err := listenUnix(filepath.Join(dir, "bangerd.sock")); err == nil {
			ln.Close()
			t.Errorf("run directory %v: listened, want refused", mode)
		} else if !strings.Contains(err.Error(), "chmod 700") {
			t.Errorf("run directory %v: %v, want the chmod hint", mode, err)
		}
	}
	dir := t.TempDir()
	os.Chmod(dir, 0o700)
	sock := filepath.Join(dir, "bangerd.sock")
	ln, err := listenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
}

// The boot-failure hint quotes the guest's console in an error that becomes
// the VM's last error and an event's reason: bounded however the guest
// filled its console, and never read through a link.
func TestConsoleHintIsBounded(t *testing.T) {
	dir := t.TempDir()
	s := &vmService{layout: paths.Layout{DataDir: dir}}
	id := "vm0"
	vdir := s.vmDir(id)
	os.MkdirAll(vdir, 0o700)
	console := strings.Repeat("x", 4<<20) + "\n" + strings.Repeat("y", 1<<20) + "\nlast line\n"
	if err := os.WriteFile(filepath.Join(vdir, "console.log"), []byte(console), 0o600); err != nil {
		t.Fatal(err)
	}
	h := s.consoleHint(id)
	if len(h) > 8*(consoleHintLine+16)+len(vdir)+100 || !strings.HasSuffix(h, "last line") {
		t.Fatalf("hint of %d bytes, ends %q", len(h), h[max(0, len(h)-40):])
	}
	os.Remove(filepath.Join(vdir, "console.log"))
	secret := filepath.Join(dir, "secret")
	os.WriteFile(secret, []byte("secret\n"), 0o600)
	os.Symlink(secret, filepath.Join(vdir, "console.log"))
	if h := s.consoleHint(id); strings.Contains(h, "secret") {
		t.Fatalf("hint read through a link: %q", h)
	}
}
