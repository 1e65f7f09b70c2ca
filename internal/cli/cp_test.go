package cli

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pkg/sftp"

	"github.com/bangerdev/banger/internal/testenv/sftptest"
)

// fakeInfo is a directory entry as a hostile SFTP server describes it.
type fakeInfo struct {
	name string
	mode fs.FileMode
	size int64
}

func (f fakeInfo) Name() string       { return f.name }
func (f fakeInfo) Size() int64        { return f.size }
func (f fakeInfo) Mode() fs.FileMode  { return f.mode }
func (f fakeInfo) ModTime() time.Time { return time.Unix(1700000000, 0) }
func (f fakeInfo) IsDir() bool        { return f.mode.IsDir() }
func (f fakeInfo) Sys() any           { return nil }

type listerAt []os.FileInfo

func (l listerAt) ListAt(out []os.FileInfo, off int64) (int, error) {
	if off >= int64(len(l)) {
		return 0, io.EOF
	}
	n := copy(out, l[off:])
	if n < len(out) {
		return n, io.EOF
	}
	return n, nil
}

// hostileSFTP is an SFTP server that says whatever a test wants: listings
// with any names, links with any targets. Writes are refused.
type hostileSFTP struct {
	dirs  map[string][]os.FileInfo
	stats map[string]os.FileInfo
	links map[string]string
}

func (h *hostileSFTP) Filelist(r *sftp.Request) (sftp.ListerAt, error) {
	switch r.Method {
	case "List":
		return listerAt(h.dirs[r.Filepath]), nil
	case "Stat", "Lstat":
		if fi, ok := h.stats[r.Filepath]; ok {
			return listerAt{fi}, nil
		}
		return nil, os.ErrNotExist
	case "Readlink":
		return listerAt{fakeInfo{name: h.links[r.Filepath]}}, nil
	}
	return nil, sftp.ErrSSHFxOpUnsupported
}

func (h *hostileSFTP) Fileread(r *sftp.Request) (io.ReaderAt, error) {
	return strings.NewReader("from the guest: " + r.Filepath + "\n"), nil
}
func (h *hostileSFTP) Filewrite(*sftp.Request) (io.WriterAt, error) { return nil, os.ErrPermission }
func (h *hostileSFTP) Filecmd(*sftp.Request) error                  { return os.ErrPermission }

// serve runs h as an in-process SFTP server and returns a client of it.
func (h *hostileSFTP) serve(t *testing.T) *sftp.Client {
	t.Helper()
	return sftptest.Client(t, func(conn io.ReadWriteCloser) (sftptest.Server, error) {
		return sftp.NewRequestServer(conn, sftp.Handlers{FileGet: h, FilePut: h, FileCmd: h, FileList: h}), nil
	})
}

// guestTree builds a hostileSFTP from "path: entries" where an entry is
// name, name/ (directory) or name@target (link); listed directories get
// stats, and the entries are listed in the order given, duplicates kept.
func guestTree(listing map[string][]string) *hostileSFTP {
	h := &hostileSFTP{dirs: map[string][]os.FileInfo{}, stats: map[string]os.FileInfo{}, links: map[string]string{}}
	for dir, ents := range listing {
		h.stats[dir] = fakeInfo{name: path.Base(dir), mode: fs.ModeDir | 0o755}
		for _, e := range ents {
			fi := fakeInfo{name: e, mode: 0o644, size: 64}
			switch {
			case strings.HasSuffix(e, "/") && len(e) > 1:
				fi = fakeInfo{name: strings.TrimSuffix(e, "/"), mode: fs.ModeDir | 0o755}
			case strings.Contains(e, "@"):
				n, target, _ := strings.Cut(e, "@")
				fi = fakeInfo{name: n, mode: fs.ModeSymlink | 0o777}
				h.links[path.Join(dir, n)] = target
			case strings.HasPrefix(e, "suid:"):
				fi = fakeInfo{name: strings.TrimPrefix(e, "suid:"), mode: fs.ModeSetuid | fs.ModeSetgid | 0o755, size: 64}
			}
			h.dirs[dir] = append(h.dirs[dir], fi)
			if _, ok := h.stats[path.Join(dir, fi.name)]; !ok {
				h.stats[path.Join(dir, fi.name)] = fi
			}
		}
	}
	return h
}

// digestExcept hashes everything under dir but skip: names, modes, link
// targets, contents.
func digestExcept(t *testing.T, dir, skip string) string {
	t.Helper()
	h := sha256.New()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		if p == skip {
			return filepath.SkipDir
		}
		fi, _ := os.Lstat(p)
		fmt.Fprintf(h, "%s %v %d\n", p, fi.Mode(), fi.ModTime().UnixNano())
		if fi.Mode()&fs.ModeSymlink != 0 {
			l, _ := os.Readlink(p)
			fmt.Fprintln(h, l)
		} else if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			h.Write(b)
		}
		return nil
	})
	return fmt.Sprintf("%x", h.Sum(nil))
}

// TestCopyFromHostileGuest: whatever a guest's SFTP server lists, banger cp
// from it writes nothing outside the destination.
func TestCopyFromHostileGuest(t *testing.T) {
	tests := []struct {
		name    string
		listing map[string][]string
		// prepare runs in the destination before the copy (the user's
		// own files there); victim is a directory outside it
		prepare func(t *testing.T, dest, victim string)
		errHas  string
		anyErr  bool // success or failure, as long as nothing outside changes
		newDest bool // DST does not exist: the copy is DST itself
		check   func(t *testing.T, dest string)
	}{
		// copied as a new directory dest, "q/.." (which the client cuts to
		// "..") would be dest/.., and the guest's "/" lists what lands there
		{name: "q/.. names the parent", listing: map[string][]string{"/src": {"ok", "q/../"}, "/": {"evil"}}, newDest: true, errHas: "bad name"},
		// the sftp client keeps only path.Base of these; rawNames below
		// checks planCopy's own refusal
		{name: "../ escapes", listing: map[string][]string{"/src": {"../evil"}}, anyErr: true},
		{name: "absolute name", listing: map[string][]string{"/src": {"/tmp/evil"}}, anyErr: true},
		{name: "empty name", listing: map[string][]string{"/src": {"ok", ""}}, errHas: "bad name"},
		{name: "symlink then a directory of the same name", listing: map[string][]string{
			"/src": {"a@VICTIM", "a/"}, "/src/a": {"x"},
		}, errHas: "bad name"},
		{name: "same file listed twice", listing: map[string][]string{"/src": {"f", "f"}}, errHas: "bad name"},
		{name: "an existing link in the destination is not followed (directory)", listing: map[string][]string{
			"/src": {"a/"}, "/src/a": {"x"},
		}, prepare: func(t *testing.T, dest, victim string) {
			os.MkdirAll(filepath.Join(dest, "src"), 0o755)
			os.Symlink(victim, filepath.Join(dest, "src", "a"))
		}, errHas: "not a directory"},
		{name: "an existing link in the destination is not followed (file)", listing: map[string][]string{
			"/src": {"f"},
		}, prepare: func(t *testing.T, dest, victim string) {
			os.MkdirAll(filepath.Join(dest, "src"), 0o755)
			os.Symlink(filepath.Join(victim, "file"), filepath.Join(dest, "src", "f"))
		}, errHas: "never followed"},
		{name: "links are data; setuid is dropped", listing: map[string][]string{
			"/src": {"l@VICTIM", "d/", "suid:run"}, "/src/d": {"x", "up@../../.."},
		}, check: func(t *testing.T, dest string) {
			if l, err := os.Readlink(filepath.Join(dest, "src", "l")); err != nil || !strings.HasSuffix(l, "victim") {
				t.Errorf("link l: %q %v", l, err)
			}
			if fi, err := os.Lstat(filepath.Join(dest, "src", "run")); err != nil || fi.Mode() != 0o755 {
				t.Errorf("run: %v %v (want 0755, no setuid/setgid)", fi, err)
			}
			if b, err := os.ReadFile(filepath.Join(dest, "src", "d", "x")); err != nil || string(b) != "from the guest: /src/d/x\n" {
				t.Errorf("d/x: %q %v", b, err)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			box := t.TempDir()
			dest := filepath.Join(box, "dest")
			victim := filepath.Join(box, "victim")
			os.MkdirAll(dest, 0o755)
			os.MkdirAll(victim, 0o755)
			os.WriteFile(filepath.Join(victim, "file"), []byte("precious\n"), 0o644)
			for dir, ents := range tc.listing {
				for i, e := range ents {
					tc.listing[dir][i] = strings.ReplaceAll(e, "VICTIM", victim)
				}
			}
			if tc.prepare != nil {
				tc.prepare(t, dest, victim)
			}
			if tc.newDest {
				os.Remove(dest)
			}
			before := digestExcept(t, box, dest)
			g := sftpFS{c: guestTree(tc.listing).serve(t)}
			src, dst := cpArg{VM: "vm", Path: "/src"}, cpArg{Path: dest}
			plan, err := planCopy(g, osFS{}, src, dst, true)
			if err == nil {
				err = runCopy(g, osFS{}, plan, nil, src, dst)
			}
			if after := digestExcept(t, box, dest); after != before {
				t.Error("the copy changed something outside its destination")
			}
			if tc.anyErr {
				return
			}
			if tc.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errHas) {
					t.Fatalf("err = %v, want one saying %q", err, tc.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, dest)
		})
	}
}

// rawNames is a guest whose listing of one directory reaches planCopy
// exactly as the guest wrote it (no client cleaning).
type rawNames struct {
	sftpFS
	dir   string
	names []string
}

func (r rawNames) ReadDir(p string) ([]fs.FileInfo, error) {
	if p != r.dir {
		return r.sftpFS.ReadDir(p)
	}
	var out []fs.FileInfo
	for _, n := range r.names {
		out = append(out, fakeInfo{name: n, mode: 0o644})
	}
	return out, nil
}

func TestCopyRefusesRawBadNames(t *testing.T) {
	for _, n := range []string{"..", "../evil", "/tmp/evil", "a/b", ".", "", "x\x00y"} {
		g := rawNames{sftpFS{c: guestTree(map[string][]string{"/src": {"f"}}).serve(t)}, "/src", []string{n}}
		_, err := planCopy(g, osFS{}, cpArg{VM: "vm", Path: "/src"}, cpArg{Path: t.TempDir()}, true)
		if err == nil || !strings.Contains(err.Error(), "bad name") {
			t.Errorf("name %q: %v", n, err)
		}
	}
}

func TestCopyIntoDestItself(t *testing.T) {
	// "banger cp -r vm: ." copies the guest home's contents into the
	// current directory, which keeps its own mode
	dest := t.TempDir()
	os.Chmod(dest, 0o711)
	t.Chdir(dest)
	g := sftpFS{c: guestTree(map[string][]string{"/": {"f", "d/"}, "/d": {"x"}}).serve(t)}
	src, dst := cpArg{VM: "vm", Path: "."}, cpArg{Path: "."}
	plan, err := planCopy(g, osFS{}, src, dst, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := runCopy(g, osFS{}, plan, nil, src, dst); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"f", "d/x"} {
		if _, err := os.Stat(filepath.Join(dest, p)); err != nil {
			t.Error(err)
		}
	}
	if fi, _ := os.Stat(dest); fi.Mode().Perm() != 0o711 {
		t.Errorf("destination mode changed to %v", fi.Mode())
	}
	if _, err := planCopy(g, osFS{}, cpArg{VM: "vm", Path: "f"}, dst, false); err != nil {
		t.Errorf("a file into .: %v", err)
	}
}

// The destination's own name comes from SRC's last element; ".." is refused.
func TestCopyRefusesDotDotTarget(t *testing.T) {
	dest := t.TempDir()
	g := sftpFS{c: guestTree(map[string][]string{"/src": {"f"}, "/": {"src/"}}).serve(t)}
	_, err := planCopy(g, osFS{}, cpArg{VM: "vm", Path: "/src/.."}, cpArg{Path: dest}, true)
	if err == nil || !strings.Contains(err.Error(), "not its \"..\"") {
		t.Fatalf("err = %v", err)
	}
}

// TestCopyFromGuestLargeFile: banger cp guest→host of a 5 MiB file (many
// SFTP packets, read concurrently) writes identical bytes, with the SSH
// fallback's client and with the bulk path's 128 KiB packets, from a server
// set up as the agent's.
func TestCopyFromGuestLargeFile(t *testing.T) {
	gdir := t.TempDir()
	big := make([]byte, 5<<20)
	for i := range big {
		big[i] = byte(i*7919 ^ i>>13)
	}
	if err := os.WriteFile(filepath.Join(gdir, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts []sftp.ClientOption
	}{
		{"SSH fallback client", []sftp.ClientOption{sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(64)}},
		{"bulk client, 128 KiB packets", []sftp.ClientOption{sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(64), sftp.MaxPacketUnchecked(128 << 10)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c2sR, c2sW := io.Pipe()
			s2cR, s2cW := io.Pipe()
			srv, err := sftp.NewServer(struct {
				io.Reader
				io.WriteCloser
			}{c2sR, s2cW}, sftp.WithMaxTxPacket(128<<10))
			if err != nil {
				t.Fatal(err)
			}
			go srv.Serve()
			c, err := sftp.NewClientPipe(s2cR, c2sW, tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				c2sR.Close()
				c2sW.Close()
				s2cR.Close()
				s2cW.Close()
				c.Close()
				srv.Close()
			}()
			g := sftpFS{c: c}
			dest := t.TempDir()
			src, dst := cpArg{VM: "vm", Path: filepath.Join(gdir, "big")}, cpArg{Path: dest}
			plan, err := planCopy(g, osFS{}, src, dst, false)
			if err != nil {
				t.Fatal(err)
			}
			if err := runCopy(g, osFS{}, plan, nil, src, dst); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(filepath.Join(dest, "big"))
			if err != nil {
				t.Fatal(err)
			}
			if sha256.Sum256(got) != sha256.Sum256(big) {
				t.Errorf("copied %d bytes that differ from the guest's %d", len(got), len(big))
			}
		})
	}
}

// TestExplainFSErr: the usual failures in plain words, said once (the
// caller names the path), still matching errors.Is.
func TestExplainFSErr(t *testing.T) {
	other := errors.New("disk on fire")
	tests := []struct {
		in   error
		want string
		is   error
	}{
		{fs.ErrNotExist, "no such file or directory", fs.ErrNotExist},
		{&fs.PathError{Op: "stat", Path: "/x", Err: syscall.ENOENT}, "no such file or directory", fs.ErrNotExist},
		{&fs.PathError{Op: "open", Path: "/etc/shadow", Err: syscall.EACCES}, "permission denied", fs.ErrPermission},
		{fmt.Errorf("sftp: %w", fs.ErrPermission), "permission denied", fs.ErrPermission},
		{other, "disk on fire", other},
	}
	for _, tt := range tests {
		got := explainFSErr(tt.in)
		if got.Error() != tt.want || !errors.Is(got, tt.is) {
			t.Errorf("explainFSErr(%v) = %q (errors.Is %v: %v), want %q", tt.in, got, tt.is, errors.Is(got, tt.is), tt.want)
		}
	}
}
