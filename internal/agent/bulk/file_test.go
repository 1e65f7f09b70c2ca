package bulk

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// pipe is a connected pair with a deadline, closed when the test ends.
func pipe(t *testing.T) (host, agent net.Conn) {
	t.Helper()
	host, agent = net.Pipe()
	host.SetDeadline(time.Now().Add(20 * time.Second))
	agent.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { host.Close(); agent.Close() })
	return host, agent
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestPutGetRoundTrip: a file put into the guest and got back arrives
// whole, for sizes around the chunk size and zero.
func TestPutGetRoundTrip(t *testing.T) {
	for _, size := range []int{0, 1, chunk - 1, chunk, chunk + 1, 3*chunk + 17} {
		dir := t.TempDir()
		p := filepath.Join(dir, "f")
		data := randomBytes(size)

		host, agent := pipe(t)
		served := make(chan error, 1)
		go func() { served <- ServePut(agent, agent, p, nil) }()
		w, err := StartPut(host)
		if err != nil {
			t.Fatal(err)
		}
		// half through Write, half through ReadFrom
		if _, err := w.Write(data[:size/2]); err != nil {
			t.Fatal(err)
		}
		if _, err := w.ReadFrom(bytes.NewReader(data[size/2:])); err != nil {
			t.Fatal(err)
		}
		if err := w.Finish(); err != nil {
			t.Fatalf("size %d: finish: %v", size, err)
		}
		if err := <-served; err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(p); !bytes.Equal(got, data) {
			t.Fatalf("size %d: the guest file has %d bytes, not the data sent", size, len(got))
		}

		host, agent = pipe(t)
		go func() { served <- ServeGet(agent, agent, p, nil) }()
		g, err := StartGet(host)
		if err != nil {
			t.Fatal(err)
		}
		if g.Info.Size != uint64(size) {
			t.Fatalf("announced %d bytes, want %d", g.Info.Size, size)
		}
		var got bytes.Buffer
		if size%2 == 0 {
			_, err = io.Copy(&got, g) // WriteTo
		} else {
			_, err = io.Copy(&got, struct{ io.Reader }{g}) // Read
		}
		if err != nil || !bytes.Equal(got.Bytes(), data) {
			t.Fatalf("size %d: got %d bytes, %v", size, got.Len(), err)
		}
		if err := <-served; err != nil {
			t.Fatal(err)
		}
	}
}

// TestPutGetRefusals: what the agent cannot open is refused before any
// data moves, with the reason.
func TestPutGetRefusals(t *testing.T) {
	dir := t.TempDir()
	host, agent := pipe(t)
	go ServePut(agent, agent, filepath.Join(dir, "no", "such", "dir", "f"), nil)
	if _, err := StartPut(host); !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("put into a missing directory: %v", err)
	}
	host, agent = pipe(t)
	go ServeGet(agent, agent, dir, nil)
	if _, err := StartGet(host); !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("get of a directory: %v", err)
	}
	// an agent that does not know the operation closes the stream: the
	// host falls back to SFTP
	host, agent = pipe(t)
	agent.Close()
	if _, err := StartGet(host); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("closed stream: %v, want ErrUnsupported", err)
	}
	host, agent = pipe(t)
	go WriteFrame(agent, FrameReply, ssh.Marshal(&Reply{Payload: []byte(Unsupported + "user")}))
	if _, err := StartPut(host); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("unsupported user: %v, want ErrUnsupported", err)
	}
}

// TestPutReportsAgentFailure: when the agent cannot write the file it says
// why, and the host reports that.
func TestPutReportsAgentFailure(t *testing.T) {
	// a socket pair: buffered like the real stream, unlike net.Pipe
	host, agent := socketPair(t)
	go func() {
		ReadFrame(agent, nil) // nothing else is read: the write is refused
		WriteFrame(agent, FrameReply, ssh.Marshal(&Reply{OK: true}))
		WriteFrame(agent, FrameReply, ssh.Marshal(&Reply{Payload: []byte("no space left on device")}))
		agent.Close()
	}()
	go WriteFrame(host, FrameOpen, nil)
	w, err := StartPut(host)
	if err != nil {
		t.Fatal(err)
	}
	_, err = w.ReadFrom(bytes.NewReader(make([]byte, 4*chunk)))
	if err == nil {
		err = w.Finish()
	}
	if !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("err = %v, want the agent's reason", err)
	}
}

// TestGetHostileAgent plays a guest agent that lies about a file: the host
// never yields more than the size announced and fails on every deviation.
func TestGetHostileAgent(t *testing.T) {
	info := func(size uint64) []byte {
		return ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&FileInfo{Size: size, Mode: 0o644})})
	}
	frame := func(typ byte, p []byte) []byte {
		var b bytes.Buffer
		WriteFrame(&b, typ, p)
		return b.Bytes()
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	huge := []byte{FrameData, 0xff, 0xff, 0xff, 0xff}
	tests := []struct {
		name   string
		stream []byte
		errHas string
	}{
		{"more than announced", cat(frame(FrameReply, info(10)), frame(FrameData, make([]byte, 11)), frame(FrameEOF, nil)), "more than"},
		{"more in a later frame", cat(frame(FrameReply, info(10)), frame(FrameData, make([]byte, 6)), frame(FrameData, make([]byte, 6))), "more than"},
		{"fewer then EOF", cat(frame(FrameReply, info(10)), frame(FrameData, make([]byte, 4)), frame(FrameEOF, nil)), "4 of the 10"},
		{"stream ends", cat(frame(FrameReply, info(10)), frame(FrameData, make([]byte, 4))), "missing"},
		{"frame beyond MaxFrame", cat(frame(FrameReply, info(1<<40)), huge), "exceeds"},
		{"empty data frames", cat(frame(FrameReply, info(10)), frame(FrameData, nil), frame(FrameData, make([]byte, 10)), frame(FrameEOF, nil)), "empty data frame"},
		{"other frame type", cat(frame(FrameReply, info(10)), frame(FrameRequest, nil)), "unexpected frame type"},
		{"failure reply", cat(frame(FrameReply, info(10)), frame(FrameReply, ssh.Marshal(&Reply{Payload: []byte("EIO")}))), "EIO"},
		{"OK reply mid-file", cat(frame(FrameReply, info(10)), frame(FrameReply, ssh.Marshal(&Reply{OK: true}))), "unexpected reply"},
		{"bad info", frame(FrameReply, ssh.Marshal(&Reply{OK: true, Payload: []byte{1}})), "bad file info"},
		{"data before the reply", frame(FrameData, []byte("x")), "where a reply was due"},
		{"huge error message", frame(FrameReply, ssh.Marshal(&Reply{Payload: bytes.Repeat([]byte("A"), 100000)})), "AAAA"},
	}
	for _, tt := range tests {
		for _, useWriteTo := range []bool{true, false} {
			t.Run(tt.name, func(t *testing.T) {
				var out bytes.Buffer
				g, err := StartGet(bytes.NewReader(tt.stream))
				if err == nil {
					if useWriteTo {
						_, err = g.WriteTo(&out)
					} else {
						_, err = io.Copy(&out, struct{ io.Reader }{g})
					}
					if uint64(out.Len()) > g.Info.Size {
						t.Fatalf("yielded %d bytes of an announced %d", out.Len(), g.Info.Size)
					}
				}
				if err == nil || !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("err = %v, want one saying %q", err, tt.errHas)
				}
				if len(err.Error()) > 2000 {
					t.Fatalf("the guest's message reached the host unbounded (%d bytes)", len(err.Error()))
				}
			})
		}
	}
}

func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(20 * time.Second))
		t.Cleanup(func() { c.Close() })
		cs[i] = c
	}
	return cs[0], cs[1]
}

// FuzzGetter: whatever a guest agent sends as OpGet's answer, the host's
// Getter never panics, always ends, and never yields more bytes than the
// size it was told.
func FuzzGetter(f *testing.F) {
	frame := func(typ byte, p []byte) []byte {
		var b bytes.Buffer
		WriteFrame(&b, typ, p)
		return b.Bytes()
	}
	ok := frame(FrameReply, ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&FileInfo{Size: 5, Mode: 0o644})}))
	f.Add(append(append(append([]byte{}, ok...), frame(FrameData, []byte("hello"))...), frame(FrameEOF, nil)...))
	f.Add(append(append([]byte{}, ok...), frame(FrameData, []byte("hello, world"))...))
	f.Add(append(append([]byte{}, ok...), frame(FrameReply, ssh.Marshal(&Reply{Payload: []byte("EIO")}))...))
	f.Add([]byte{FrameReply, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, stream []byte) {
		for _, useWriteTo := range []bool{true, false} {
			g, err := StartGet(bytes.NewReader(stream))
			if err != nil {
				continue
			}
			var n int64
			if useWriteTo {
				n, _ = g.WriteTo(io.Discard)
			} else {
				n, _ = io.Copy(io.Discard, struct{ io.Reader }{g})
			}
			if uint64(n) > g.Info.Size {
				t.Fatalf("yielded %d bytes of an announced %d", n, g.Info.Size)
			}
		}
	})
}
