package client_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/agent/sshd"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/rpc"
)

// TestMain lets this test binary act as banger-agent's sftp-server child,
// which the agent's SSH and bulk sessions start (as /proc/self/exe) for the
// sftp subsystem.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == sshd.SFTPServerArg {
		os.Exit(agent.Main(os.Args))
	}
	os.Exit(m.Run())
}

// agentKind is the guest a fakeGuest plays.
type agentKind string

const (
	agentNew agentKind = "new" // today's agent: the one-file streams
	agentOld agentKind = "old" // bulk sessions (so SFTP over them), no file streams
	agentSSH agentKind = "ssh" // no bulk path at all (an older bangerd): SSH
)

// fakeGuest is a bangerd stand-in on a socket of its own whose VM "vm" is
// the agent's real SSH and bulk server (internal/agent/sshd) on this host's
// filesystem, as this test's user, whose home (a relative path's base) is
// home. It records the bulk operations opened ("session" is SFTP's) and
// "ssh" for each SSH connection. With getfile set, OpGetFile is answered by
// it instead (a hostile agent).
type fakeGuest struct {
	kind    agentKind
	getfile func(c net.Conn)
	// refusePut refuses every OpPutFile before changing anything, as an
	// agent does for a destination it cannot open
	refusePut bool
	home      string

	mu  sync.Mutex
	ops []string
}

func (g *fakeGuest) note(op string) {
	g.mu.Lock()
	g.ops = append(g.ops, op)
	g.mu.Unlock()
}

// take returns the operations recorded since the last take.
func (g *fakeGuest) take() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	ops := g.ops
	g.ops = nil
	return ops
}

// start serves g until the test ends and returns a client for it.
func (g *fakeGuest) start(t *testing.T) *client.Client {
	t.Helper()
	dir := t.TempDir()
	g.home = filepath.Join(dir, "home")
	os.Mkdir(g.home, 0o755)
	passwd := filepath.Join(dir, "passwd")
	os.WriteFile(passwd, []byte("tester:x:"+strconv.Itoa(os.Getuid())+":"+strconv.Itoa(os.Getgid())+":Tester:"+g.home+":/bin/sh\n"), 0o644)
	uk, err := guest.LoadOrCreateUserKey(filepath.Join(dir, "key", "id_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	hk, err := guest.LoadOrCreateUserKey(filepath.Join(dir, "hostkey", "id_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := sshd.New(sshd.Config{HostKey: hk.Signer, AuthorizedKeys: []ssh.PublicKey{uk.Signer.PublicKey()},
		PasswdFile: passwd, GroupFile: filepath.Join(dir, "group"), DefaultUser: "tester", KeepAlive: -1,
		// the sftp-server child is this binary: under -race it would sleep
		// a second as it exits, and SSH's close waits for that
		Env:    []string{"GORACE=atexit_sleep_ms=0"},
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	m := rpc.NewMux()
	if g.kind != agentSSH { // an older bangerd has no vm.bulk: unknown_method
		rpc.Handle(m, api.MethodVMBulk, func(ctx context.Context, p api.BulkParams) (*rpc.Upgrade, error) {
			return &rpc.Upgrade{Result: api.BulkResult{VM: p.VM}, Then: g.serveBulk(srv)}, nil
		})
	}
	rpc.Handle(m, api.MethodVMConnect, func(ctx context.Context, p api.VMRef) (*rpc.Upgrade, error) {
		g.note("ssh")
		res := api.ConnectResult{VM: p.VM, HostKey: hk.AuthorizedLine(), User: "tester", KeyPath: uk.Path}
		return &rpc.Upgrade{Result: res, Then: srv.ServeConn}, nil
	})
	sockDir, err := os.MkdirTemp("", "bgfiles") // sun_path is short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "bangerd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	rs := &rpc.Server{Mux: m, Logger: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); rs.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		sctx, c2 := context.WithTimeout(context.Background(), 10*time.Second)
		defer c2()
		rs.Shutdown(sctx)
		ln.Close()
		<-done
		srv.Wait()
	})
	c, err := client.New(client.WithSocket(sock))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// fileOps are the bulk operations an older agent does not know: it reads
// the Open and closes the stream.
var fileOps = []string{bulk.OpPutFile, bulk.OpGetFile, bulk.OpPut, bulk.OpGet}

func (g *fakeGuest) serveBulk(srv *sshd.Server) func(ctx context.Context, c net.Conn) {
	return func(ctx context.Context, c net.Conn) {
		o, err := bulk.ReadOpen(c)
		if err != nil {
			c.Close()
			return
		}
		g.note(o.Op)
		switch {
		case g.kind == agentOld && slices.Contains(fileOps, o.Op):
			c.Close()
			return
		case o.Op == bulk.OpPutFile && g.refusePut:
			defer c.Close()
			req, err := bulk.ReadPutFile(c)
			if err == nil {
				bulk.RefusePutFile(c, c, req, errors.New("refused by the test"))
			}
			return
		case o.Op == bulk.OpGetFile && g.getfile != nil:
			defer c.Close()
			g.getfile(c)
			return
		}
		var open bytes.Buffer
		bulk.WriteOpen(&open, o)
		srv.ServeBulk(ctx, &bulk.PeekConn{Conn: c, R: bufio.NewReader(io.MultiReader(&open, c))})
	}
}

func umask() fs.FileMode {
	m := syscall.Umask(0)
	syscall.Umask(m)
	return fs.FileMode(m)
}

func modeOf(t *testing.T, p string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

// TestFileOpsOneStream: ReadFile, WriteFile, Upload and Download against
// today's agent take one bulk stream each and never open an SFTP session
// (a bulk "session"); against an agent without those streams, and without
// any bulk path, they do the same over SFTP. Each step's result (contents,
// modes, errors and their codes) is the same for all three.
func TestFileOpsOneStream(t *testing.T) {
	for _, kind := range []agentKind{agentNew, agentOld, agentSSH} {
		t.Run(string(kind), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			g := &fakeGuest{kind: kind}
			c := g.start(t)
			home := g.home
			local := t.TempDir()
			big := bytes.Repeat([]byte("0123456789abcdef"), (bulk.MaxInline+4096)/16) // not inline
			os.WriteFile(filepath.Join(local, "big"), big, 0o751)
			os.WriteFile(filepath.Join(local, "small"), []byte("small"), 0o600)
			os.WriteFile(filepath.Join(local, "keep"), []byte("keep"), 0o600)
			os.Symlink(filepath.Join(local, "keep"), filepath.Join(local, "link"))
			os.Mkdir(filepath.Join(home, "d"), 0o755)
			wantErr := func(code string, is error, text string) func(*testing.T, error) {
				return func(t *testing.T, err error) {
					t.Helper()
					if err == nil || (code != "" && client.Code(err) != code) || (is != nil && !errors.Is(err, is)) || !strings.Contains(err.Error(), text) {
						t.Fatalf("err %v (code %s), want code %q, %v, %q", err, client.Code(err), code, is, text)
					}
				}
			}
			ok := func(t *testing.T, err error) {
				t.Helper()
				if err != nil {
					t.Fatal(err)
				}
			}
			var read []byte
			steps := []struct {
				name  string
				do    func() error
				check func(*testing.T, error)
				ops   []string // against agentNew
			}{
				{"write with a mode", func() error {
					return c.WriteFile(ctx, "vm", filepath.Join(home, "f"), []byte("hello\n"), 0o640)
				}, func(t *testing.T, err error) {
					ok(t, err)
					if b, _ := os.ReadFile(filepath.Join(home, "f")); string(b) != "hello\n" || modeOf(t, filepath.Join(home, "f")) != 0o640 {
						t.Fatalf("f: %q %v", b, modeOf(t, filepath.Join(home, "f")))
					}
					if fi, _ := os.Stat(filepath.Join(home, "f")); time.Since(fi.ModTime()).Abs() > time.Minute {
						t.Fatalf("mtime %v is not now", fi.ModTime())
					}
				}, []string{bulk.OpPutFile}},
				{"rewrite with mode 0 keeps the mode", func() error {
					return c.WriteFile(ctx, "vm", filepath.Join(home, "f"), []byte("again"), 0)
				}, func(t *testing.T, err error) {
					ok(t, err)
					if b, _ := os.ReadFile(filepath.Join(home, "f")); string(b) != "again" || modeOf(t, filepath.Join(home, "f")) != 0o640 {
						t.Fatalf("f: %q %v", b, modeOf(t, filepath.Join(home, "f")))
					}
				}, []string{bulk.OpPut}},
				{"create with mode 0", func() error {
					return c.WriteFile(ctx, "vm", filepath.Join(home, "new"), nil, 0)
				}, func(t *testing.T, err error) {
					ok(t, err)
					if m := modeOf(t, filepath.Join(home, "new")); m != 0o644&^umask() {
						t.Fatalf("new: mode %v", m)
					}
				}, []string{bulk.OpPut}},
				{"write a relative path", func() error {
					return c.WriteFile(ctx, "vm", "rel", []byte("r"), 0o600)
				}, func(t *testing.T, err error) {
					ok(t, err)
					if b, _ := os.ReadFile(filepath.Join(home, "rel")); string(b) != "r" {
						t.Fatalf("rel: %q", b)
					}
				}, []string{bulk.OpPutFile}},
				{"write to a directory", func() error {
					return c.WriteFile(ctx, "vm", filepath.Join(home, "d"), []byte("x"), 0o644)
				}, wantErr("", nil, "vm:"+filepath.Join(home, "d")+": "), []string{bulk.OpPutFile, "session"}},
				{"write below a missing directory", func() error {
					return c.WriteFile(ctx, "vm", filepath.Join(home, "no/f"), []byte("x"), 0o644)
				}, wantErr("", fs.ErrNotExist, "vm:"+filepath.Join(home, "no/f")+": "), []string{bulk.OpPutFile, "session"}},
				{"write mode 0 below a missing directory", func() error {
					return c.WriteFile(ctx, "vm", filepath.Join(home, "no/f"), []byte("x"), 0)
				}, wantErr("", fs.ErrNotExist, "vm:"+filepath.Join(home, "no/f")+": "), []string{bulk.OpPut, "session"}},
				{"write to a device, as SFTP does", func() error {
					// putfile refuses what is not a regular file; SFTP writes it
					return c.WriteFile(ctx, "vm", "/dev/null", []byte("x"), 0)
				}, ok, []string{bulk.OpPut}},
				{"write to a device with a mode, as SFTP does", func() error {
					// 0666 is /dev/null's own mode: SFTP's chmod changes nothing
					return c.WriteFile(ctx, "vm", "/dev/null", []byte("x"), 0o666)
				}, ok, []string{bulk.OpPutFile, "session"}},
				{"read a device", func() (err error) {
					_, err = c.ReadFile(ctx, "vm", "/dev/null", 0)
					return err
				}, wantErr(client.CodeInvalidArgument, nil, "vm:/dev/null is not a regular file"), []string{bulk.OpGetFile}},
				{"write a path with .. after a symlink", func() error {
					// the kernel (and so SFTP) takes ln/.. as d, not home
					os.Mkdir(filepath.Join(home, "d/sub"), 0o755)
					os.Symlink("d/sub", filepath.Join(home, "ln"))
					return c.WriteFile(ctx, "vm", home+"/ln/../dd", []byte("dd"), 0o644)
				}, func(t *testing.T, err error) {
					ok(t, err)
					if b, _ := os.ReadFile(filepath.Join(home, "d/dd")); string(b) != "dd" {
						t.Fatalf("d/dd: %q", b)
					}
				}, []string{"session"}},
				{"read", func() (err error) {
					read, err = c.ReadFile(ctx, "vm", filepath.Join(home, "f"), 0)
					return err
				}, func(t *testing.T, err error) {
					ok(t, err)
					if string(read) != "again" {
						t.Fatalf("read %q", read)
					}
				}, []string{bulk.OpGetFile}},
				{"read a relative path", func() (err error) {
					read, err = c.ReadFile(ctx, "vm", "rel", 1)
					return err
				}, func(t *testing.T, err error) {
					ok(t, err)
					if string(read) != "r" {
						t.Fatalf("read %q", read)
					}
				}, []string{bulk.OpGetFile}},
				{"read with the largest max", func() (err error) {
					read, err = c.ReadFile(ctx, "vm", filepath.Join(home, "f"), math.MaxInt64)
					return err
				}, func(t *testing.T, err error) {
					ok(t, err)
					if string(read) != "again" {
						t.Fatalf("read %q", read)
					}
				}, []string{bulk.OpGetFile}},
				{"read over max", func() (err error) {
					_, err = c.ReadFile(ctx, "vm", filepath.Join(home, "f"), 4)
					return err
				}, wantErr(client.CodeInvalidArgument, nil, "vm:"+filepath.Join(home, "f")+" is larger than 4 bytes"), []string{bulk.OpGetFile}},
				{"read a directory", func() (err error) {
					_, err = c.ReadFile(ctx, "vm", filepath.Join(home, "d"), 0)
					return err
				}, wantErr(client.CodeInvalidArgument, nil, "vm:"+filepath.Join(home, "d")+" is not a regular file"), []string{bulk.OpGetFile}},
				{"read a missing file", func() (err error) {
					_, err = c.ReadFile(ctx, "vm", filepath.Join(home, "nope"), 0)
					return err
				}, wantErr("", fs.ErrNotExist, "vm:"+filepath.Join(home, "nope")+": "), []string{bulk.OpGetFile, "session"}},
				{"read a file through a trailing slash", func() (err error) {
					_, err = c.ReadFile(ctx, "vm", filepath.Join(home, "f")+"/", 0)
					return err
				}, wantErr("", nil, "vm:"+filepath.Join(home, "f")+"/: "), []string{"session"}},
				{"upload a large file", func() error {
					return c.Upload(ctx, "vm", filepath.Join(local, "big"), filepath.Join(home, "big"))
				}, func(t *testing.T, err error) {
					ok(t, err)
					if b, _ := os.ReadFile(filepath.Join(home, "big")); !bytes.Equal(b, big) || modeOf(t, filepath.Join(home, "big")) != 0o751 {
						t.Fatalf("big: %d bytes, mode %v", len(b), modeOf(t, filepath.Join(home, "big")))
					}
				}, []string{bulk.OpPutFile}},
				{"upload a small file", func() error {
					return c.Upload(ctx, "vm", filepath.Join(local, "small"), filepath.Join(home, "small"))
				}, func(t *testing.T, err error) {
					ok(t, err)
					if b, _ := os.ReadFile(filepath.Join(home, "small")); string(b) != "small" || modeOf(t, filepath.Join(home, "small")) != 0o600 {
						t.Fatalf("small: %q %v", b, modeOf(t, filepath.Join(home, "small")))
					}
				}, []string{bulk.OpPutFile}},
				{"upload into a missing directory", func() error {
					return c.Upload(ctx, "vm", filepath.Join(local, "big"), filepath.Join(home, "no/big"))
				}, wantErr("", fs.ErrNotExist, "vm:"+filepath.Join(home, "no/big")+": "), []string{bulk.OpPutFile, "session"}},
				{"download", func() error {
					return c.Download(ctx, "vm", filepath.Join(home, "big"), filepath.Join(local, "back"))
				}, func(t *testing.T, err error) {
					ok(t, err)
					if b, _ := os.ReadFile(filepath.Join(local, "back")); !bytes.Equal(b, big) || modeOf(t, filepath.Join(local, "back")) != 0o751 {
						t.Fatalf("back: %d bytes, mode %v", len(b), modeOf(t, filepath.Join(local, "back")))
					}
				}, []string{bulk.OpGetFile}},
				{"download masks group and other write", func() error {
					os.Chmod(filepath.Join(home, "f"), 0o666)
					return c.Download(ctx, "vm", filepath.Join(home, "f"), filepath.Join(local, "back"))
				}, func(t *testing.T, err error) {
					ok(t, err)
					if b, _ := os.ReadFile(filepath.Join(local, "back")); string(b) != "again" || modeOf(t, filepath.Join(local, "back")) != 0o644 {
						t.Fatalf("back: %q %v", b, modeOf(t, filepath.Join(local, "back")))
					}
				}, []string{bulk.OpGetFile}},
				{"download onto a symlink", func() error {
					return c.Download(ctx, "vm", filepath.Join(home, "f"), filepath.Join(local, "link"))
				}, func(t *testing.T, err error) {
					wantErr(client.CodeInvalidArgument, nil, "exists and is not a regular file")(t, err)
					if b, _ := os.ReadFile(filepath.Join(local, "keep")); string(b) != "keep" {
						t.Fatalf("the link's target changed: %q", b)
					}
					if l, err := os.Readlink(filepath.Join(local, "link")); err != nil || l != filepath.Join(local, "keep") {
						t.Fatalf("the link changed: %q %v", l, err)
					}
				}, []string{bulk.OpGetFile}},
				{"download a directory", func() error {
					return c.Download(ctx, "vm", filepath.Join(home, "d"), filepath.Join(local, "dir"))
				}, wantErr(client.CodeInvalidArgument, nil, "is not a regular file"), []string{bulk.OpGetFile}},
				{"download a missing file", func() error {
					return c.Download(ctx, "vm", filepath.Join(home, "nope"), filepath.Join(local, "nope"))
				}, wantErr("", fs.ErrNotExist, "vm:"+filepath.Join(home, "nope")+": "), []string{bulk.OpGetFile, "session"}},
			}
			for _, s := range steps {
				err := s.do()
				ops := g.take()
				t.Run(s.name, func(t *testing.T) {
					s.check(t, err)
					switch kind {
					case agentNew:
						if !slices.Equal(ops, s.ops) {
							t.Fatalf("operations %v, want %v", ops, s.ops)
						}
					case agentOld:
						if !slices.Contains(ops, "session") {
							t.Fatalf("operations %v: no SFTP session", ops)
						}
					case agentSSH:
						if !slices.Contains(ops, "ssh") {
							t.Fatalf("operations %v: no SSH connection", ops)
						}
					}
				})
			}
			if ents, _ := os.ReadDir(local); len(ents) != 5 { // big small keep link back
				t.Fatalf("%s holds %d entries (a temporary file left?)", local, len(ents))
			}
		})
	}
}

// getFileAnswer is a hostile agent's answer to OpGetFile: meta, then
// data frames of data's bytes (each of up to chunk bytes), then (with end)
// a FrameEOF; then it closes the stream.
func getFileAnswer(meta bulk.FileMeta, data []byte, chunk int, end bool) func(net.Conn) {
	return func(c net.Conn) {
		c.SetWriteDeadline(time.Now().Add(20 * time.Second))
		if bulk.WriteFrame(c, bulk.FrameReply, ssh.Marshal(&bulk.Reply{OK: true, Payload: ssh.Marshal(&meta)})) != nil {
			return
		}
		for d := data; len(d) > 0; d = d[min(chunk, len(d)):] {
			if bulk.WriteFrame(c, bulk.FrameData, d[:min(chunk, len(d))]) != nil {
				return
			}
		}
		if end {
			bulk.WriteFrame(c, bulk.FrameEOF, nil)
		}
	}
}

// TestFileOpsHostileGuest plays an agent that lies in its answer to
// OpGetFile: ReadFile refuses what is over its max or not a regular file
// (checking the announced size as unsigned, before reading) and never
// returns more than announced; Download leaves local as it was, with no
// temporary file beside it. Neither falls back to SFTP for these.
func TestFileOpsHostileGuest(t *testing.T) {
	file := func(size uint64) bulk.FileMeta { return bulk.FileMeta{Type: "f", Size: size, Mode: 0o644} }
	many := bytes.Repeat([]byte("x"), 1<<20)
	tests := []struct {
		name     string
		answer   func(net.Conn)
		readCode string // ReadFile (max 16)'s error code ("": any error)
		readText string
	}{
		{"more bytes than announced", getFileAnswer(file(2), many, 1, true), "", "the guest sent more than the 2 bytes it announced"},
		{"more bytes than announced in one frame", getFileAnswer(file(2), many[:64<<10], 64<<10, true), "", "more than the 2 bytes"},
		{"fewer bytes than announced", getFileAnswer(file(10), []byte("abc"), 1, true), "", "the guest sent 3 of the 10 bytes"},
		{"the stream ends early", getFileAnswer(file(10), []byte("abc"), 1, false), "", "bytes missing"},
		{"a size over max", getFileAnswer(file(17), nil, 1, false), client.CodeInvalidArgument, "is larger than 16 bytes"},
		{"a huge size", getFileAnswer(file(1<<40), nil, 1, false), client.CodeInvalidArgument, "is larger than 16 bytes"},
		{"a size beyond int64", getFileAnswer(file(1<<63+1), nil, 1, false), client.CodeInvalidArgument, "is larger than 16 bytes"},
		{"a size of 2^64-1", getFileAnswer(file(^uint64(0)), nil, 1, false), client.CodeInvalidArgument, "is larger than 16 bytes"},
		{"another kind of file", getFileAnswer(bulk.FileMeta{Type: "o"}, many[:8], 1, true), client.CodeInvalidArgument, "is not a regular file"},
		{"a directory", getFileAnswer(bulk.FileMeta{Type: "d"}, many[:8], 1, true), client.CodeInvalidArgument, "is not a regular file"},
		{"a directory with a size", getFileAnswer(bulk.FileMeta{Type: "d", Size: 8}, many[:8], 1, true), "", "size for something that is not a regular file"},
		{"an unknown type", getFileAnswer(bulk.FileMeta{Type: "l"}, nil, 1, false), "", "unknown file type"},
		{"mode bits beyond permissions", getFileAnswer(bulk.FileMeta{Type: "f", Size: 1, Mode: 1 << 31}, []byte("x"), 1, true), "", "mode bits"},
		{"a data frame where the reply was due", func(c net.Conn) { bulk.WriteFrame(c, bulk.FrameData, []byte("hi")); io.Copy(io.Discard, c) }, "", "where a reply was due"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			g := &fakeGuest{kind: agentNew, getfile: tt.answer}
			c := g.start(t)
			b, err := c.ReadFile(ctx, "vm", "/etc/hostname", 16)
			if err == nil || (tt.readCode != "" && client.Code(err) != tt.readCode) || !strings.Contains(err.Error(), tt.readText) || !strings.Contains(err.Error(), "vm:/etc/hostname") {
				t.Fatalf("ReadFile: %q, %v (code %s), want code %q and %q", b, err, client.Code(err), tt.readCode, tt.readText)
			}
			if b != nil {
				t.Fatalf("ReadFile returned %d bytes with its error", len(b))
			}
			local := t.TempDir()
			dst := filepath.Join(local, "dst")
			os.WriteFile(dst, []byte("keep"), 0o600)
			if err := c.Download(ctx, "vm", "/etc/hostname", dst); err == nil {
				t.Fatal("Download accepted it")
			}
			if got, _ := os.ReadFile(dst); string(got) != "keep" || modeOf(t, dst) != 0o600 {
				t.Fatalf("Download changed local: %q %v", got, modeOf(t, dst))
			}
			if ents, _ := os.ReadDir(local); len(ents) != 1 {
				t.Fatalf("Download left %d entries beside local", len(ents)-1)
			}
			if ops := g.take(); slices.Contains(ops, "session") || slices.Contains(ops, "ssh") {
				t.Fatalf("fell back to SFTP on a hostile answer: %v", ops)
			}
		})
	}
}

// TestUploadAfterARefusal: when the agent refuses a putfile after Upload
// has read the start of the local file (all of a small one, the first
// bulk.MaxInline+1 bytes of a large one), the SFTP fallback still sends
// the whole file.
func TestUploadAfterARefusal(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	g := &fakeGuest{kind: agentNew, refusePut: true}
	c := g.start(t)
	for _, size := range []int{10, bulk.MaxInline + 4096} {
		data := bytes.Repeat([]byte("0123456789abcdef"), size/16+1)[:size]
		local := filepath.Join(t.TempDir(), "f")
		os.WriteFile(local, data, 0o640)
		dst := filepath.Join(g.home, "f")
		if err := c.Upload(ctx, "vm", local, dst); err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
		if got, _ := os.ReadFile(dst); !bytes.Equal(got, data) || modeOf(t, dst) != 0o640 {
			t.Fatalf("%d bytes: the guest got %d bytes, mode %v", size, len(got), modeOf(t, dst))
		}
		if ops := g.take(); !slices.Equal(ops, []string{bulk.OpPutFile, "session"}) {
			t.Fatalf("operations %v", ops)
		}
	}
}
