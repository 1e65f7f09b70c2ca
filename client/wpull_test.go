package client

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
)

func TestPackRoundTrip(t *testing.T) {
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "d/e"), 0o755)
	os.WriteFile(filepath.Join(src, "d/e/f"), bytes.Repeat([]byte("x"), 300<<10), 0o640)
	os.WriteFile(filepath.Join(src, "top"), []byte("t"), 0o755)
	os.Symlink("../../etc/passwd", filepath.Join(src, "d/link"))
	var b bytes.Buffer
	if err := bulk.ServePack(&b, src); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "copy")
	os.Mkdir(dst, 0o700)
	if err := receiveTree(&b, dst, 1<<30, 100); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(dst, "d/e/f")); len(got) != 300<<10 {
		t.Fatalf("d/e/f: %d bytes", len(got))
	}
	if fi, _ := os.Stat(filepath.Join(dst, "top")); fi.Mode().Perm() != 0o755 {
		t.Fatalf("top mode %v", fi.Mode())
	}
	if l, _ := os.Readlink(filepath.Join(dst, "d/link")); l != "../../etc/passwd" {
		t.Fatalf("link: %q", l)
	}
}

// TestReceiveTreeHostile plays a guest sending its workspace: bad names,
// a link then a directory (or file) below it, oversized frames, more data
// than announced, a file over the bound. Each is refused and nothing
// outside the destination changes.
func TestReceiveTreeHostile(t *testing.T) {
	req := func(b *bytes.Buffer, kind string, e bulk.SyncEntry) {
		bulk.WriteFrame(b, bulk.FrameRequest, ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(&e)}))
	}
	root := t.TempDir()
	outside := filepath.Join(root, "outside")
	os.Mkdir(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "keep"), []byte("keep"), 0o644)
	cases := map[string]func(b *bytes.Buffer){
		"dot-dot": func(b *bytes.Buffer) {
			req(b, bulk.PackFile, bulk.SyncEntry{Rel: "../outside/keep", Size: 1})
			bulk.WriteFrame(b, bulk.FrameData, []byte("x"))
		},
		"absolute":      func(b *bytes.Buffer) { req(b, bulk.PackDir, bulk.SyncEntry{Rel: outside + "/d"}) },
		"inner dot-dot": func(b *bytes.Buffer) { req(b, bulk.PackDir, bulk.SyncEntry{Rel: "a/../../outside/d"}) },
		"link then dir": func(b *bytes.Buffer) {
			req(b, bulk.PackLink, bulk.SyncEntry{Rel: "l", Target: outside})
			req(b, bulk.PackDir, bulk.SyncEntry{Rel: "l"})
		},
		"link then file below": func(b *bytes.Buffer) {
			req(b, bulk.PackLink, bulk.SyncEntry{Rel: "l", Target: outside})
			req(b, bulk.PackFile, bulk.SyncEntry{Rel: "l/keep", Size: 4})
			bulk.WriteFrame(b, bulk.FrameData, []byte("evil"))
		},
		"link over a file": func(b *bytes.Buffer) {
			req(b, bulk.PackFile, bulk.SyncEntry{Rel: "f", Size: 0})
			req(b, bulk.PackLink, bulk.SyncEntry{Rel: "f", Target: outside + "/keep"})
		},
		"more data than announced": func(b *bytes.Buffer) {
			req(b, bulk.PackFile, bulk.SyncEntry{Rel: "f", Size: 2})
			bulk.WriteFrame(b, bulk.FrameData, []byte("xyz"))
		},
		"over the bound": func(b *bytes.Buffer) { req(b, bulk.PackFile, bulk.SyncEntry{Rel: "f", Size: 1 << 40}) },
		"oversized frame": func(b *bytes.Buffer) {
			var h [5]byte
			h[0] = bulk.FrameRequest
			binary.BigEndian.PutUint32(h[1:], bulk.MaxFrame+1)
			b.Write(h[:])
		},
		"unknown type": func(b *bytes.Buffer) { req(b, "c", bulk.SyncEntry{Rel: "dev"}) },
		"truncated":    func(b *bytes.Buffer) { req(b, bulk.PackFile, bulk.SyncEntry{Rel: "f", Size: 10}) },
	}
	for name, build := range cases {
		t.Run(name, func(t *testing.T) {
			var b bytes.Buffer
			build(&b)
			bulk.WriteFrame(&b, bulk.FrameEOF, nil)
			dst := filepath.Join(t.TempDir(), "copy")
			os.Mkdir(dst, 0o700)
			if err := receiveTree(&b, dst, 1<<20, 100); err == nil {
				t.Fatal("accepted")
			}
			if got, _ := os.ReadFile(filepath.Join(outside, "keep")); string(got) != "keep" {
				t.Fatalf("outside/keep changed: %q", got)
			}
			if ents, _ := os.ReadDir(outside); len(ents) != 1 {
				t.Fatalf("outside has %d entries", len(ents))
			}
		})
	}
	_ = strings.Repeat
}
