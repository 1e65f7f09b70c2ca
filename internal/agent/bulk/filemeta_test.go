package bulk

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// putFile runs OpPutFile as the host does (request and, when it fits, the
// contents in one write) against ServePutFile for dest.
func putFile(t *testing.T, dest string, mustBeDir bool, base string, mode fs.FileMode, mtime time.Time, data []byte) (string, error) {
	t.Helper()
	host, agent := pipe(t)
	mt, ok := MTimeOf(mtime)
	if !ok {
		t.Fatalf("mtime %v out of range", mtime)
	}
	inline := len(data) <= MaxInline
	req := PutFile{Base: base, Mode: KeptMode(mode), MTime: mt, Inline: inline}
	served := make(chan error, 1)
	go func() {
		got, err := ReadPutFile(agent)
		if err != nil {
			served <- err
			return
		}
		served <- ServePutFile(agent, agent, got, dest, mustBeDir, nil)
	}()
	var b Batch
	b.Request(PutFileRequest, ssh.Marshal(&req))
	if inline {
		b.Data(data)
		b.EOF()
	}
	first, _ := b.Bytes()
	// net.Pipe is unbuffered: an agent that did not read an inline file
	// it refused would leave this write hanging (and the test failing)
	wrote := make(chan error, 1)
	go func() { _, err := host.Write(first); wrote <- err }()
	p, err := StartPutFile(host, inline)
	if err != nil {
		if werr := <-wrote; werr != nil {
			t.Fatalf("the host's write was cut off: %v", werr)
		}
		<-served
		return "", err
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if !inline {
		if _, err := p.ReadFrom(bytes.NewReader(data)); err != nil {
			return p.Target, err
		}
	}
	err = p.Finish()
	if serr := <-served; (serr == nil) != (err == nil) {
		t.Fatalf("host %v, agent %v", err, serr)
	}
	return p.Target, err
}

// TestPutFile: OpPutFile writes Base inside an existing directory, else
// the destination itself; contents, mode (with setuid) and the time to the
// nanosecond are kept, inline and streamed; what SFTP would refuse is
// refused before anything changes (ErrOpenRefused), an inline file read to
// its end first.
func TestPutFile(t *testing.T) {
	mtime := time.Unix(1600000000, 123456789)
	for _, size := range []int{0, 1, MaxInline, MaxInline + 1, 3*chunk + 17} {
		dir := t.TempDir()
		data := randomBytes(size)
		for _, tc := range []struct {
			dest, want string
		}{
			{dir, filepath.Join(dir, "src.bin")},                   // into an existing directory
			{filepath.Join(dir, "new"), filepath.Join(dir, "new")}, // a new name
			{filepath.Join(dir, "new"), filepath.Join(dir, "new")}, // over an existing file
		} {
			target, err := putFile(t, tc.dest, false, "src.bin", 0o751|fs.ModeSetuid, mtime, data)
			if err != nil {
				t.Fatalf("size %d → %s: %v", size, tc.dest, err)
			}
			if target != tc.want {
				t.Fatalf("target %q, want %q", target, tc.want)
			}
			got, err := os.ReadFile(tc.want)
			fi, serr := os.Stat(tc.want)
			if err != nil || serr != nil || !bytes.Equal(got, data) {
				t.Fatalf("size %d: %s holds %d bytes (%v %v)", size, tc.want, len(got), err, serr)
			}
			if fi.Mode()&(fs.ModePerm|fs.ModeSetuid) != 0o751|fs.ModeSetuid || !fi.ModTime().Equal(mtime) {
				t.Fatalf("size %d: mode %v mtime %v, want -rwsr-x--x and %v", size, fi.Mode(), fi.ModTime(), mtime)
			}
		}
	}

	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("keep"), 0o644)
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	os.Mkdir(filepath.Join(dir, "sub", "src.bin"), 0o755)
	for _, tc := range []struct {
		name, dest string
		mustBeDir  bool
		base       string
		errHas     string
	}{
		{"missing directory", filepath.Join(dir, "no", "f"), false, "src.bin", "no such file"},
		{"trailing slash, missing", filepath.Join(dir, "nodir"), true, "src.bin", "no such directory"},
		{"trailing slash on a file", file, true, "src.bin", "not a directory"},
		{"a fifo (no reader: ENXIO, not a wait)", fifo, false, "src.bin", "no such device"},
		{"a device", "/dev/null", false, "src.bin", "not a regular file"},
		{"a directory inside", filepath.Join(dir, "sub"), false, "src.bin", "is a directory"},
		{"bad base", dir, false, "../x", "bad file name"},
	} {
		for _, size := range []int{1, MaxInline + 1} {
			_, err := putFile(t, tc.dest, tc.mustBeDir, tc.base, 0o644, mtime, randomBytes(size))
			if !errors.Is(err, ErrOpenRefused) || !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("%s (%d bytes): %v, want a refusal saying %q", tc.name, size, err, tc.errHas)
			}
		}
	}
	if b, _ := os.ReadFile(file); string(b) != "keep" {
		t.Fatalf("a refused put changed the file: %q", b)
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); err == nil {
		t.Fatal("a bad base wrote outside the directory")
	}
}

// TestPutFileBadRequest: a request with mode bits beyond the kept ones or a
// time out of range is refused (and its inline contents read).
func TestPutFileBadRequest(t *testing.T) {
	dir := t.TempDir()
	for _, req := range []PutFile{
		{Base: "f", Mode: uint32(fs.ModeDir | 0o755), Inline: true},
		{Base: "f", Mode: 0o644, MTime: MaxMTime + 1, Inline: true},
	} {
		host, agent := pipe(t)
		go func() { ServePutFile(agent, agent, req, dir, false, nil) }()
		go func() {
			var b Batch
			b.Data([]byte("x"))
			b.EOF()
			p, _ := b.Bytes()
			host.Write(p)
		}()
		if _, err := StartPutFile(host, true); !errors.Is(err, ErrOpenRefused) || !strings.Contains(err.Error(), "out of range") {
			t.Fatalf("%+v: %v", req, err)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("a refused request wrote %v", ents)
	}
}

// TestGetFile: OpGetFile reports a regular file's size, mode and time and
// sends exactly its bytes; a directory and a fifo are reported (type "d",
// "o") without data and without waiting on the fifo; a missing file is
// refused (ErrOpenRefused).
func TestGetFile(t *testing.T) {
	dir := t.TempDir()
	mtime := time.Unix(1600000000, 987654321)
	for _, size := range []int{0, 1, smallGet - 1, smallGet, 3*chunk + 17} {
		p := filepath.Join(dir, "f")
		data := randomBytes(size)
		os.WriteFile(p, data, 0o600)
		os.Chmod(p, 0o750|fs.ModeSetgid)
		os.Chtimes(p, mtime, mtime)
		host, agent := pipe(t)
		served := make(chan error, 1)
		go func() { served <- ServeGetFile(agent, agent, p, nil) }()
		g, m, err := StartGetFile(host)
		if err != nil {
			t.Fatal(err)
		}
		want := FileMeta{Type: "f", Size: uint64(size), Mode: KeptMode(0o750 | fs.ModeSetgid), MTime: uint64(mtime.UnixNano())}
		if fi, _ := os.Stat(p); fi.Mode()&fs.ModeSetgid == 0 {
			want.Mode = KeptMode(0o750) // setgid dropped: not in the file's group
		}
		if m != want {
			t.Fatalf("meta %+v, want %+v", m, want)
		}
		got, err := io.ReadAll(g)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("size %d: got %d bytes, %v", size, len(got), err)
		}
		if err := <-served; err != nil {
			t.Fatal(err)
		}
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	for p, typ := range map[string]string{dir: "d", fifo: "o"} {
		host, agent := pipe(t)
		go ServeGetFile(agent, agent, p, nil)
		g, m, err := StartGetFile(host)
		if err != nil || g != nil || m.Type != typ {
			t.Fatalf("%s: getter %v meta %+v err %v, want type %q and no data", p, g, m, err, typ)
		}
	}
	host, agent := pipe(t)
	go ServeGetFile(agent, agent, filepath.Join(dir, "missing"), nil)
	if _, _, err := StartGetFile(host); !errors.Is(err, ErrOpenRefused) || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("missing file: %v", err)
	}
	// an agent without the operation closes the stream: SFTP then
	host, agent = pipe(t)
	agent.Close()
	if _, _, err := StartGetFile(host); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("an older agent: %v, want ErrUnsupported", err)
	}
}

// TestGetFileHostileAgent plays a guest agent that lies in OpGetFile's
// reply: every field out of bounds is refused before a byte is written,
// and the size bounds the bytes as for OpGet.
func TestGetFileHostileAgent(t *testing.T) {
	frame := func(typ byte, p []byte) []byte {
		var b bytes.Buffer
		WriteFrame(&b, typ, p)
		return b.Bytes()
	}
	meta := func(m FileMeta) []byte {
		return frame(FrameReply, ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&m)}))
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	ok := FileMeta{Type: "f", Size: 10, Mode: 0o644, MTime: 1}
	with := func(f func(*FileMeta)) FileMeta { m := ok; f(&m); return m }
	tests := []struct {
		name   string
		stream []byte
		errHas string
	}{
		{"mode: a directory bit", meta(with(func(m *FileMeta) { m.Mode = uint32(fs.ModeDir | 0o755) })), "mode bits"},
		{"mode: a device bit", meta(with(func(m *FileMeta) { m.Mode = uint32(fs.ModeDevice | 0o644) })), "mode bits"},
		{"mode: unix bits above 07777", meta(with(func(m *FileMeta) { m.Mode = 0o100644 })), "mode bits"},
		{"mtime beyond int64 ns", meta(with(func(m *FileMeta) { m.MTime = MaxMTime + 1 })), "out of range"},
		{"unknown type", meta(with(func(m *FileMeta) { m.Type = "l\x1b[2J" })), "unknown file type"},
		{"a directory with a size", meta(with(func(m *FileMeta) { m.Type = "d" })), "size"},
		{"bad meta", frame(FrameReply, ssh.Marshal(&Reply{OK: true, Payload: []byte{1, 2}})), "bad file info"},
		{"more than announced", cat(meta(ok), frame(FrameData, make([]byte, 11))), "more than"},
		{"fewer then EOF", cat(meta(ok), frame(FrameData, make([]byte, 4)), frame(FrameEOF, nil)), "4 of the 10"},
		{"huge error", frame(FrameReply, ssh.Marshal(&Reply{Payload: bytes.Repeat([]byte("A"), 100000)})), "AAAA"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			g, _, err := StartGetFile(bytes.NewReader(tt.stream))
			if err == nil && g != nil {
				_, err = g.WriteTo(&out)
				if uint64(out.Len()) > g.Info.Size {
					t.Fatalf("yielded %d bytes of an announced %d", out.Len(), g.Info.Size)
				}
			}
			if err == nil || !strings.Contains(err.Error(), tt.errHas) {
				t.Fatalf("err = %v, want one saying %q", err, tt.errHas)
			}
			if len(err.Error()) > 2000 || strings.Contains(err.Error(), "\x1b") {
				t.Fatalf("the guest's words reached the host raw: %q", err.Error()[:min(len(err.Error()), 200)])
			}
		})
	}
}

// FuzzGetFile: whatever a guest agent answers to OpGetFile, the host never
// panics, never accepts a mode beyond the kept bits or a time out of range,
// and never yields more bytes than announced.
func FuzzGetFile(f *testing.F) {
	frame := func(typ byte, p []byte) []byte {
		var b bytes.Buffer
		WriteFrame(&b, typ, p)
		return b.Bytes()
	}
	ok := frame(FrameReply, ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&FileMeta{Type: "f", Size: 5, Mode: 0o644, MTime: 1e18})}))
	f.Add(append(append(append([]byte{}, ok...), frame(FrameData, []byte("hello"))...), frame(FrameEOF, nil)...))
	f.Add(frame(FrameReply, ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&FileMeta{Type: "d"})})))
	f.Add(frame(FrameReply, ssh.Marshal(&Reply{OK: true, Payload: ssh.Marshal(&FileMeta{Type: "f", Mode: 0o7777777})})))
	f.Fuzz(func(t *testing.T, stream []byte) {
		g, m, err := StartGetFile(bytes.NewReader(stream))
		if err != nil {
			return
		}
		if m.Mode&^keptBits != 0 || m.MTime > MaxMTime || m.ModTime().Before(time.Unix(0, 0)) {
			t.Fatalf("accepted %+v", m)
		}
		if g == nil {
			return
		}
		n, _ := g.WriteTo(io.Discard)
		if uint64(n) > m.Size {
			t.Fatalf("yielded %d bytes of an announced %d", n, m.Size)
		}
	})
}
