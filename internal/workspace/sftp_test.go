package workspace

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pkg/sftp"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/guestfs"
	"github.com/bangerdev/banger/internal/testenv/sftptest"
)

// sftpGuest serves the local filesystem over an in-process SFTP server set
// up as the agent's (128 KiB reads allowed) and returns a client made with
// opts, as the pull's SFTP fallback reaches a guest.
func sftpGuest(t *testing.T, opts ...sftp.ClientOption) *sftp.Client {
	t.Helper()
	return sftptest.Local(t, []sftp.ServerOption{sftp.WithMaxTxPacket(api.SFTPMaxPacket)}, opts...)
}

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestDownloadOverSFTPLargeFiles: files larger than one SFTP packet (loose
// objects of 32 KiB to 1 MiB, of incompressible data and of text git
// compresses with dynamic Huffman codes, and a 5 MiB file) arrive byte for
// byte over the SFTP path a pull falls back to, and the import accepts the
// objects.
func TestDownloadOverSFTPLargeFiles(t *testing.T) {
	requireGit(t)
	g := filepath.Join(t.TempDir(), "guest")
	os.Mkdir(g, 0o755)
	run(t, g, "init", "-q", "-b", "main")
	for i, n := range []int{32 << 10, 64<<10 - 200, 64 << 10, 64<<10 + 100, 65 << 10, 128 << 10, 200 << 10, 1 << 20} {
		b := make([]byte, n)
		rand.Read(b)
		if err := os.WriteFile(filepath.Join(g, fmt.Sprintf("blob%d", i)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// text (hex lines) of the same sizes: git compresses it with dynamic
	// Huffman codes whose tables come before the object's header
	for i, n := range []int{32 << 10, 64 << 10, 65 << 10, 200 << 10, 1 << 20} {
		b := make([]byte, n/2)
		rand.Read(b)
		txt := []byte(fmt.Sprintf("%x", b))
		for j := 64; j < len(txt); j += 65 {
			txt[j] = '\n'
		}
		if err := os.WriteFile(filepath.Join(g, fmt.Sprintf("text%d.txt", i)), txt, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// a directory of 1600 files: its tree object is about 64 KiB, and git
	// compresses it with dynamic Huffman codes too
	rnd := make([]byte, 8)
	for i := 0; i < 1600; i++ {
		rand.Read(rnd)
		if err := os.MkdirAll(filepath.Join(g, "many"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(g, "many", fmt.Sprintf("file-%04d.txt", i)), []byte(fmt.Sprintf("%x\n", rnd)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	run(t, g, "add", "-A")
	run(t, g, "commit", "-q", "-m", "big objects")
	head := run(t, g, "rev-parse", "HEAD")
	big := make([]byte, 5<<20)
	rand.Read(big)
	if err := os.WriteFile(filepath.Join(g, "five-mib"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	// the loose objects' own sizes span the packet sizes
	var sizes []int64
	filepath.WalkDir(filepath.Join(g, ".git", "objects"), func(p string, d fs.DirEntry, err error) error {
		if fi, err := d.Info(); err == nil && fi.Mode().IsRegular() {
			sizes = append(sizes, fi.Size())
		}
		return nil
	})
	var over int
	for _, s := range sizes {
		if s > 64<<10 {
			over++
		}
	}
	if over < 5 {
		t.Fatalf("only %d loose objects over 64 KiB: %v", over, sizes)
	}

	for _, tc := range []struct {
		name string
		opts []sftp.ClientOption
	}{
		{"default client", nil},
		{"SSH fallback client", []sftp.ClientOption{sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(64)}},
		{"bulk client, 128 KiB packets", []sftp.ClientOption{sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(64), sftp.MaxPacketUnchecked(api.SFTPMaxPacket)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			guest := guestfs.SFTP{C: sftpGuest(t, tc.opts...)}
			tmp := t.TempDir()
			raw := filepath.Join(tmp, "guest-git")
			if err := Download(ctx, guest, filepath.Join(g, ".git"), raw, guestGitKeep); err != nil {
				t.Fatal(err)
			}
			err := filepath.WalkDir(filepath.Join(g, ".git", "objects"), func(p string, d fs.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return err
				}
				rel, _ := filepath.Rel(filepath.Join(g, ".git"), p)
				if fileSum(t, p) != fileSum(t, filepath.Join(raw, rel)) {
					t.Errorf("%s differs after the download", rel)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			r, err := importGuestGit(ctx, raw, filepath.Join(tmp, "import.git"), "sha1", "", false)
			if err != nil {
				t.Fatal(err)
			}
			if r.Head != head {
				t.Errorf("imported HEAD %s, want %s", r.Head, head)
			}
			if _, err := git(ctx, r.GitDir, []string{"GIT_DIR=" + r.GitDir}, nil, "fsck", "--no-dangling", "--strict"); err != nil {
				t.Errorf("imported repository: %v", err)
			}
			wt := filepath.Join(tmp, "tree")
			onlyBig := func(rel string, _ fs.FileInfo) bool { return rel == "five-mib" }
			if err := Download(ctx, guest, g, wt, onlyBig); err != nil {
				t.Fatal(err)
			}
			if fileSum(t, filepath.Join(wt, "five-mib")) != sha256.Sum256(big) {
				t.Error("the 5 MiB file differs after the download")
			}
		})
	}
}
