package cli

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/testenv/sftptest"
)

// realGuest is an SFTP server on this host's filesystem, as the agent's.
func realGuest(t *testing.T) *sftp.Client {
	t.Helper()
	return sftptest.Local(t, nil, sftp.UseConcurrentWrites(true))
}

// agentFiles serves guestFiles with the agent's OpPut/OpGet code on this
// host's filesystem; with getStream set, OpGet answers those bytes instead
// (a hostile agent); with unsupported set, both refuse as an older agent.
type agentFiles struct {
	mu          sync.Mutex
	puts, gets  []string
	getStream   []byte
	unsupported bool
}

type putConn struct {
	*bulk.Putter
	c net.Conn
}

func (p putConn) Close() error { err := p.Finish(); p.c.Close(); return err }

type getConn struct {
	*bulk.Getter
	c net.Conn
}

func (g getConn) Close() error { return g.c.Close() }

func (a *agentFiles) pipe() (net.Conn, net.Conn) {
	host, agent := net.Pipe()
	host.SetDeadline(time.Now().Add(20 * time.Second))
	agent.SetDeadline(time.Now().Add(20 * time.Second))
	if a.unsupported {
		agent.Close() // an agent without the operation closes the stream
	}
	return host, agent
}

func (a *agentFiles) create(p string) (io.WriteCloser, error) {
	a.mu.Lock()
	a.puts = append(a.puts, p)
	a.mu.Unlock()
	host, agent := a.pipe()
	if a.unsupported {
		// the stream is closed: nothing here may write the file, which
		// the SFTP fallback writes (an empty one written late would
		// replace it)
		_, err := bulk.StartPut(host)
		host.Close()
		if err == nil {
			err = errors.New("an older agent accepted a put")
		}
		return nil, err
	}
	go func() {
		// as an agent may: the contents reach the file only once they
		// are all in (so a time set before Finish would be lost)
		var buf bytes.Buffer
		bulk.WriteFrame(agent, bulk.FrameReply, sshMarshalReply(true, nil))
		for {
			typ, b, err := bulk.ReadFrame(agent, nil)
			if err != nil || typ != bulk.FrameData {
				break
			}
			buf.Write(b)
		}
		err := os.WriteFile(p, buf.Bytes(), 0o644)
		bulk.WriteFrame(agent, bulk.FrameReply, sshMarshalReply(err == nil, nil))
		agent.Close()
	}()
	w, err := bulk.StartPut(host)
	if err != nil {
		host.Close()
		return nil, err
	}
	return putConn{w, host}, nil
}

func (a *agentFiles) open(p string) (io.ReadCloser, error) {
	a.mu.Lock()
	a.gets = append(a.gets, p)
	a.mu.Unlock()
	host, agent := a.pipe()
	if a.getStream != nil {
		go func() { agent.Write(a.getStream); agent.Close() }()
	} else {
		go func() { bulk.ServeGet(agent, agent, p, nil); agent.Close() }()
	}
	g, err := bulk.StartGet(host)
	if err != nil {
		host.Close()
		return nil, err
	}
	return getConn{g, host}, nil
}

// TestCopyBulkFiles: banger cp carries files of bulkMin bytes or more in a
// bulk stream each (OpPut, OpGet) and smaller ones over SFTP, both ways,
// keeping contents, modes and times; against an agent without the bulk
// file operations it uses SFTP for all.
func TestCopyBulkFiles(t *testing.T) {
	for _, unsupported := range []bool{false, true} {
		src := t.TempDir()
		big := bytes.Repeat([]byte("0123456789abcdef"), (bulkMin+12345)/16)
		os.WriteFile(filepath.Join(src, "big"), big, 0o640)
		os.WriteFile(filepath.Join(src, "small"), []byte("small\n"), 0o600)
		mtime := time.Unix(1600000000, 0)
		for _, n := range []string{"big", "small"} {
			os.Chtimes(filepath.Join(src, n), mtime, mtime)
		}
		files := &agentFiles{unsupported: unsupported}
		g := sftpFS{c: realGuest(t), files: files}
		guestDir := t.TempDir()
		back := t.TempDir()
		for _, step := range []struct {
			from     cpSource
			to       cpDest
			src, dst cpArg
		}{
			{osFS{}, g, cpArg{Path: src}, cpArg{VM: "vm", Path: guestDir}},
			{g, osFS{}, cpArg{VM: "vm", Path: filepath.Join(guestDir, filepath.Base(src))}, cpArg{Path: back}},
		} {
			plan, err := planCopy(step.from, step.to, step.src, step.dst, true)
			if err != nil {
				t.Fatal(err)
			}
			if err := runCopy(step.from, step.to, plan, nil, step.src, step.dst); err != nil {
				t.Fatalf("unsupported=%v: %s → %s: %v", unsupported, step.src, step.dst, err)
			}
		}
		for _, dir := range []string{filepath.Join(guestDir, filepath.Base(src)), filepath.Join(back, filepath.Base(src))} {
			for n, want := range map[string][]byte{"big": big, "small": []byte("small\n")} {
				p := filepath.Join(dir, n)
				got, err := os.ReadFile(p)
				fi, serr := os.Stat(p)
				if err != nil || serr != nil || !bytes.Equal(got, want) {
					t.Fatalf("%s: %d bytes, %v %v", p, len(got), err, serr)
				}
				if !fi.ModTime().Equal(mtime) {
					t.Errorf("%s: mtime %v, want %v (set before the contents were all in?)", p, fi.ModTime(), mtime)
				}
			}
		}
		wantPuts, wantGets := 1, 1 // the big file, each way; the small one goes over SFTP
		if len(files.puts) != wantPuts || len(files.gets) != wantGets || !strings.HasSuffix(files.puts[0], "/big") || !strings.HasSuffix(files.gets[0], "/big") {
			t.Fatalf("unsupported=%v: bulk puts %q gets %q, want the big file once each way", unsupported, files.puts, files.gets)
		}
	}
}

// TestCopyFromHostileGuestBulk: a guest agent whose OpGet lies about a
// file (more bytes than it announced, fewer, garbage frames) fails the
// copy; the host file never holds more than announced, and nothing outside
// the destination changes.
func TestCopyFromHostileGuestBulk(t *testing.T) {
	frame := func(typ byte, p []byte) []byte {
		var b bytes.Buffer
		bulk.WriteFrame(&b, typ, p)
		return b.Bytes()
	}
	ok := func(size uint64) []byte {
		return frame(bulk.FrameReply, sshMarshalReply(true, sshMarshalInfo(size)))
	}
	tests := []struct {
		name   string
		stream []byte
		errHas string
	}{
		{"more than announced", append(ok(10), frame(bulk.FrameData, bytes.Repeat([]byte("X"), 1<<20))...), "more than"},
		{"fewer than announced", append(append(ok(1<<20), frame(bulk.FrameData, []byte("x"))...), frame(bulk.FrameEOF, nil)...), "1 of the"},
		{"garbage frame", append(ok(10), 0x42, 0, 0, 0, 1, 'x'), "unexpected frame type"},
		{"frame too large", append(ok(10), bulk.FrameData, 0x7f, 0xff, 0xff, 0xff), "exceeds"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			box := t.TempDir()
			gdir := filepath.Join(box, "guest")
			dest := filepath.Join(box, "dest")
			os.MkdirAll(gdir, 0o755)
			os.MkdirAll(dest, 0o755)
			// the guest's SFTP lists a large file; its OpGet lies
			os.WriteFile(filepath.Join(gdir, "f"), make([]byte, bulkMin), 0o644)
			before := digestExcept(t, box, dest)
			g := sftpFS{c: realGuest(t), files: &agentFiles{getStream: tc.stream}}
			src, dst := cpArg{VM: "vm", Path: filepath.Join(gdir, "f")}, cpArg{Path: dest}
			plan, err := planCopy(g, osFS{}, src, dst, false)
			if err == nil {
				err = runCopy(g, osFS{}, plan, nil, src, dst)
			}
			if err == nil || !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("err = %v, want one saying %q", err, tc.errHas)
			}
			if fi, err := os.Stat(filepath.Join(dest, "f")); err == nil && fi.Size() > 1<<20 {
				t.Fatalf("the host file holds %d bytes", fi.Size())
			}
			if after := digestExcept(t, box, dest); after != before {
				t.Error("the copy changed something outside its destination")
			}
		})
	}
}

func sshMarshalReply(ok bool, payload []byte) []byte {
	return ssh.Marshal(&bulk.Reply{OK: ok, Payload: payload})
}

func sshMarshalInfo(size uint64) []byte {
	return ssh.Marshal(&bulk.FileInfo{Size: size, Mode: 0o644})
}
