package cli

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/termsafe"
)

// agentOne serves oneFileStreams with the agent's OpPutFile/OpGetFile code
// on this host's filesystem, a relative path being relative to home (the
// guest user's); with old set it is an agent without those operations
// (it closes the stream); with getStream set, OpGetFile answers those
// bytes (a hostile agent).
type agentOne struct {
	t          *testing.T
	home       string
	old        bool
	getStream  []byte
	puts, gets int
}

// conns is a buffered connected pair (like the real stream), closed when
// the test ends.
func (a *agentOne) conns() (host, agent net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		a.t.Fatal(err)
	}
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			a.t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(20 * time.Second))
		a.t.Cleanup(func() { c.Close() })
		cs[i] = c
	}
	if a.old {
		// an older agent reads the Open, not what follows it, and
		// closes the stream: a unix socket closed with unread data resets
		// its peer, as bangerd's end does when the agent's closes
		go func() {
			bulk.ReadOpen(cs[1])
			cs[1].Close()
		}()
	}
	return cs[0], cs[1]
}

func (a *agentOne) resolve(p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(a.home, p)
}

func (a *agentOne) put(dest, base string, mode fs.FileMode, mtime time.Time, r io.Reader) (string, error) {
	a.puts++
	host, agent := a.conns()
	defer host.Close()
	bulk.WriteOpen(host, bulk.Open{Op: bulk.OpPutFile, Arg: dest})
	if !a.old {
		go func() {
			defer agent.Close()
			bulk.ReadOpen(agent)
			req, err := bulk.ReadPutFile(agent)
			if err == nil {
				bulk.ServePutFile(agent, agent, req, a.resolve(dest), strings.HasSuffix(dest, "/"), nil)
			}
		}()
	}
	return bulk.PutFileHost(host, base, mode, mtime, r)
}

type closeConn struct {
	*bulk.Getter
	c net.Conn
}

func (g closeConn) Close() error { return g.c.Close() }

func (a *agentOne) get(p string) (io.ReadCloser, bulk.FileMeta, error) {
	a.gets++
	host, agent := a.conns()
	bulk.WriteOpen(host, bulk.Open{Op: bulk.OpGetFile, Arg: p})
	switch {
	case a.old:
	case a.getStream != nil:
		go func() { bulk.ReadOpen(agent); agent.Write(a.getStream); agent.Close() }()
	default:
		go func() { bulk.ReadOpen(agent); bulk.ServeGetFile(agent, agent, a.resolve(p), nil); agent.Close() }()
	}
	g, m, err := bulk.StartGetFile(host)
	if err != nil || g == nil {
		host.Close()
		return nil, m, err
	}
	return closeConn{g, host}, m, nil
}

// TestCopyOneFile: a cp whose source is one regular file takes one bulk
// stream each way (no SFTP: the test has none): into an existing
// directory by the source's name, to a new name, over an existing file, to
// a path relative to the guest user's home, keeping contents, mode and the
// time to the nanosecond, for a small (inline) and a large file.
func TestCopyOneFile(t *testing.T) {
	a := &App{Stdout: io.Discard}
	mtime := time.Unix(1600000000, 123456789)
	for _, size := range []int{1, bulk.MaxInline + 4097} {
		host := t.TempDir()
		home := t.TempDir()
		data := bytes.Repeat([]byte("x"), size)
		src := filepath.Join(host, "f.txt")
		os.WriteFile(src, data, 0o600)
		os.Chmod(src, 0o751)
		os.Chtimes(src, mtime, mtime)
		os.Mkdir(filepath.Join(home, "dir"), 0o755)
		g := &agentOne{t: t, home: home}
		steps := []struct {
			src, dst cpArg
			want     string
		}{
			{cpArg{Path: src}, cpArg{VM: "vm", Path: filepath.Join(home, "dir")}, filepath.Join(home, "dir", "f.txt")},
			{cpArg{Path: src}, cpArg{VM: "vm", Path: filepath.Join(home, "new")}, filepath.Join(home, "new")},
			{cpArg{Path: src}, cpArg{VM: "vm", Path: filepath.Join(home, "new")}, filepath.Join(home, "new")},
			{cpArg{Path: src}, cpArg{VM: "vm", Path: "rel"}, filepath.Join(home, "rel")},
			{cpArg{Path: src}, cpArg{VM: "vm", Path: "."}, filepath.Join(home, "f.txt")},
			{cpArg{VM: "vm", Path: "rel"}, cpArg{Path: host}, filepath.Join(host, "rel")},
			{cpArg{VM: "vm", Path: filepath.Join(home, "dir", "f.txt")}, cpArg{Path: filepath.Join(host, "back")}, filepath.Join(host, "back")},
			{cpArg{VM: "vm", Path: "new"}, cpArg{Path: filepath.Join(host, "back")}, filepath.Join(host, "back")},
		}
		for _, st := range steps {
			done, err := a.cpOne(g, st.src, st.dst, cpOptions{})
			if !done || err != nil {
				t.Fatalf("size %d: %s → %s: done %v, %v", size, st.src, st.dst, done, err)
			}
			got, err := os.ReadFile(st.want)
			fi, serr := os.Stat(st.want)
			if err != nil || serr != nil || !bytes.Equal(got, data) {
				t.Fatalf("size %d: %s → %s: %s holds %d bytes (%v %v)", size, st.src, st.dst, st.want, len(got), err, serr)
			}
			if fi.Mode() != 0o751 || !fi.ModTime().Equal(mtime) {
				t.Fatalf("size %d: %s: mode %v mtime %v, want -rwxr-x--x %v", size, st.want, fi.Mode(), fi.ModTime(), mtime)
			}
		}
		if g.puts != 5 || g.gets != 3 {
			t.Fatalf("puts %d gets %d, want 5 and 3", g.puts, g.gets)
		}
	}
}

// TestCopyOneFileFallsBack: the SFTP path does what one stream cannot:
// a directory source (with or without -r: SFTP gives the plan and "use
// cp -r"), a source or destination the agent refuses to open (SFTP says
// why, in cp's words), and every copy against an agent without
// OpPutFile/OpGetFile. Nothing is changed before the fallback.
func TestCopyOneFileFallsBack(t *testing.T) {
	a := &App{Stdout: io.Discard}
	host := t.TempDir()
	home := t.TempDir()
	src := filepath.Join(host, "f")
	os.WriteFile(src, []byte("data"), 0o644)
	os.Mkdir(filepath.Join(home, "gdir"), 0o755)
	os.WriteFile(filepath.Join(home, "gfile"), []byte("guest"), 0o644)
	for _, tc := range []struct {
		name     string
		old      bool
		src, dst cpArg
	}{
		{"older agent, put", true, cpArg{Path: src}, cpArg{VM: "vm", Path: "x"}},
		{"older agent, get", true, cpArg{VM: "vm", Path: "gfile"}, cpArg{Path: filepath.Join(host, "y")}},
		{"host directory", false, cpArg{Path: host}, cpArg{VM: "vm", Path: "x"}},
		{"guest directory", false, cpArg{VM: "vm", Path: "gdir"}, cpArg{Path: filepath.Join(host, "y")}},
		{"missing guest source", false, cpArg{VM: "vm", Path: "nope"}, cpArg{Path: filepath.Join(host, "y")}},
		{"missing guest directory", false, cpArg{Path: src}, cpArg{VM: "vm", Path: "no/such/x"}},
		{"guest destination not a directory", false, cpArg{Path: src}, cpArg{VM: "vm", Path: "gfile/"}},
		{"source with a trailing slash", false, cpArg{VM: "vm", Path: "gfile/"}, cpArg{Path: filepath.Join(host, "y")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &agentOne{t: t, home: home, old: tc.old}
			for _, rec := range []bool{false, true} {
				done, err := a.cpOne(g, tc.src, tc.dst, cpOptions{Recursive: rec})
				if done || err != nil {
					t.Fatalf("-r=%v: done %v, %v: want the SFTP path", rec, done, err)
				}
			}
			for _, p := range []string{filepath.Join(home, "x"), filepath.Join(host, "y")} {
				if _, err := os.Lstat(p); err == nil {
					t.Fatalf("%s was written before the fallback", p)
				}
			}
			if b, _ := os.ReadFile(filepath.Join(home, "gfile")); string(b) != "guest" {
				t.Fatalf("gfile changed: %q", b)
			}
		})
	}
}

// TestCopyOneFileHostRefusals: guest→host, the host side writes through
// workspace.HostDir as before: a destination that is a symbolic link is
// refused (never followed), as is a name below a missing directory; a
// directory the host user named through a link is used (their choice).
func TestCopyOneFileHostRefusals(t *testing.T) {
	a := &App{Stdout: io.Discard}
	home := t.TempDir()
	os.WriteFile(filepath.Join(home, "g"), []byte("guest"), 0o644)
	box := t.TempDir()
	outside := filepath.Join(box, "outside")
	os.WriteFile(outside, []byte("keep"), 0o644)
	dest := filepath.Join(box, "dest")
	os.Mkdir(dest, 0o755)
	os.Symlink(outside, filepath.Join(dest, "link"))
	g := &agentOne{t: t, home: home}
	src := cpArg{VM: "vm", Path: "g"}
	done, err := a.cpOne(g, src, cpArg{Path: filepath.Join(dest, "link")}, cpOptions{})
	if !done || err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("destination a link: done %v, %v", done, err)
	}
	if b, _ := os.ReadFile(outside); string(b) != "keep" {
		t.Fatalf("the link was followed: %q", b)
	}
	done, err = a.cpOne(g, src, cpArg{Path: filepath.Join(dest, "no", "f")}, cpOptions{})
	if !done || err == nil || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("below a missing directory: done %v, %v", done, err)
	}
	// a directory named through a link the host user made: written inside it
	os.Mkdir(filepath.Join(box, "real"), 0o755)
	os.Symlink(filepath.Join(box, "real"), filepath.Join(box, "via"))
	if done, err := a.cpOne(g, src, cpArg{Path: filepath.Join(box, "via")}, cpOptions{}); !done || err != nil {
		t.Fatalf("into a linked directory: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(box, "real", "g")); string(b) != "guest" {
		t.Fatalf("into a linked directory: %q", b)
	}
}

// TestCopyOneFileHostileGuest plays a guest agent whose OpGetFile reply
// lies: mode bits beyond the permissions, setuid, a time out of range, more
// bytes than announced. The copy fails or keeps only the permission bits;
// nothing outside the destination changes and the file never holds more
// than announced.
func TestCopyOneFileHostileGuest(t *testing.T) {
	frame := func(typ byte, p []byte) []byte {
		var b bytes.Buffer
		bulk.WriteFrame(&b, typ, p)
		return b.Bytes()
	}
	meta := func(m bulk.FileMeta) []byte {
		return frame(bulk.FrameReply, sshMarshalReply(true, ssh.Marshal(&m)))
	}
	data := func(p string) []byte { return append(frame(bulk.FrameData, []byte(p)), frame(bulk.FrameEOF, nil)...) }
	tests := []struct {
		name     string
		stream   []byte
		errHas   string // "" when the copy succeeds
		wantMode fs.FileMode
	}{
		{"setuid, setgid, sticky", append(meta(bulk.FileMeta{Type: "f", Size: 2, Mode: uint32(0o777 | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky), MTime: 1}), data("hi")...), "", 0o777},
		{"a device bit", append(meta(bulk.FileMeta{Type: "f", Size: 2, Mode: uint32(fs.ModeDevice | 0o644)}), data("hi")...), "mode bits", 0},
		{"time out of range", append(meta(bulk.FileMeta{Type: "f", Size: 2, Mode: 0o644, MTime: 1 << 63}), data("hi")...), "out of range", 0},
		{"more than announced", append(meta(bulk.FileMeta{Type: "f", Size: 2, Mode: 0o644}), data(strings.Repeat("X", 1<<16))...), "more than", 0},
		{"fewer than announced", append(meta(bulk.FileMeta{Type: "f", Size: 1 << 20, Mode: 0o644}), data("x")...), "1 of the", 0},
	}
	a := &App{Stdout: io.Discard}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			box := t.TempDir()
			dest := filepath.Join(box, "dest")
			os.MkdirAll(dest, 0o755)
			before := digestExcept(t, box, dest)
			g := &agentOne{t: t, home: t.TempDir(), getStream: tc.stream}
			done, err := a.cpOne(g, cpArg{VM: "vm", Path: "/x/f"}, cpArg{Path: dest}, cpOptions{})
			if !done {
				t.Fatal("fell back to SFTP")
			}
			if tc.errHas == "" {
				if err != nil {
					t.Fatal(err)
				}
				fi, err := os.Stat(filepath.Join(dest, "f"))
				if err != nil || fi.Mode() != tc.wantMode {
					t.Fatalf("mode %v (%v), want %v", fi.Mode(), err, tc.wantMode)
				}
			} else if err == nil || !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("err = %v, want one saying %q", err, tc.errHas)
			}
			if fi, err := os.Stat(filepath.Join(dest, "f")); err == nil && fi.Size() > 2 {
				t.Fatalf("the host file holds %d bytes", fi.Size())
			}
			if after := digestExcept(t, box, dest); after != before {
				t.Error("the copy changed something outside its destination")
			}
		})
	}
}

// hostilePut answers every put with a failure naming a target full of
// terminal controls, as a hostile agent may.
type hostilePut struct{ target string }

func (h hostilePut) put(dest, base string, mode fs.FileMode, mtime time.Time, r io.Reader) (string, error) {
	return h.target, errors.New("no space left on device")
}
func (hostilePut) get(p string) (io.ReadCloser, bulk.FileMeta, error) {
	return nil, bulk.FileMeta{}, errors.New("unused")
}

// The path a guest names in a failed put reaches the terminal (the error
// message) without its control sequences.
func TestCopyOneFileGuestPathIsTerminalSafe(t *testing.T) {
	src := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(src, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	a := &App{Stdout: io.Discard}
	done, err := a.cpOne(hostilePut{target: "/root/\x1b]0;owned\x07x\u202egnp.exe\x9b31m"}, cpArg{Path: src}, cpArg{VM: "vm", Path: "/root/"}, cpOptions{})
	if !done || err == nil {
		t.Fatalf("done %v, err %v: want a failed copy", done, err)
	}
	for _, r := range err.Error() {
		if !termsafe.Printable(r) {
			t.Fatalf("the error carries %U from the guest: %q", r, err.Error())
		}
	}
}
