package bulk

import (
	"bytes"
	"crypto/sha1"
	"encoding/hex"
	"fmt"
	"hash/adler32"
	"io/fs"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv/gittest"

	"golang.org/x/crypto/ssh"
)

// pushSizes are the file sizes around the block, O_DIRECT threshold and
// buffer sizes.
var pushSizes = []int{0, 1, 4095, 4096, 65536, 65537, 3 << 20}

// TestSyncFilesSizes: files of every size around the alignment edges, sent
// as SyncFile (new, and over an existing file) or SyncFilePack, in frames
// that straddle the pack's 1 MiB buffers, arrive whole with their modes
// (one set after the data: setgid) and mtimes; the pack their data made,
// written with O_DIRECT or buffered (as when the filesystem refuses it),
// passes git verify-pack and holds every blob (cat-file); no buffer stays
// mapped.
func TestSyncFilesSizes(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git not installed")
	}
	rng := rand.New(rand.NewSource(3))
	mtime := time.Date(2020, 1, 2, 3, 4, 5, 6, time.UTC)
	for _, buffered := range []bool{false, true} {
		for _, kind := range []string{SyncFile, "over", SyncFilePack} {
			t.Run(fmt.Sprintf("buffered=%v/%s", buffered, kind), func(t *testing.T) {
				dest := filepath.Join(t.TempDir(), "ws")
				os.MkdirAll(filepath.Join(dest, packDir), 0o755)
				gittest.Run(t, dest, "init", "-q")
				datas := make([][]byte, len(pushSizes))
				for i, n := range pushSizes {
					datas[i] = make([]byte, n)
					rng.Read(datas[i])
					if kind == "over" {
						os.WriteFile(filepath.Join(dest, "f"+strconv.Itoa(i)), []byte("old contents"), 0o644)
					}
				}
				host, agent := net.Pipe()
				done := make(chan error, 1)
				s := &Syncer{Dest: dest, StateDir: t.TempDir(), packBuffered: buffered}
				go func() { done <- s.Serve(agent, agent); agent.Close() }()
				if _, _, err := ReadManifestCaps(host); err != nil {
					t.Fatal(err)
				}
				go func() {
					req := func(typ string, payload []byte) {
						WriteFrame(host, FrameRequest, ssh.Marshal(&Request{Type: typ, Payload: payload}))
					}
					sum := NewPackSummer(sha1.New, uint32(len(datas)))
					for i, d := range datas {
						e := SyncEntry{Rel: "f" + strconv.Itoa(i), Mode: 0o755, MTime: uint64(mtime.UnixNano()), Size: uint64(len(d))}
						if i%2 == 1 {
							e.Mode = uint32(0o750 | fs.ModeSetgid)
						}
						typ := SyncFile
						if kind == SyncFilePack {
							typ = SyncFilePack
							sum.BeginEntry()
							var pe PackEntry
							sum.Add(pe.Begin(nil, ObjBlob, uint64(len(d))))
							sum.Add(pe.Data(nil, d))
							iov, _ := pe.End(nil, adler32.Checksum(d))
							sum.Add(iov)
							sum.EndEntry(testObj{ObjBlob, d}.id(sha1.New))
						}
						req(typ, ssh.Marshal(&e))
						for p := d; len(p) > 0; {
							k := min(len(p), 300_001)
							WriteFrame(host, FrameData, p[:k])
							p = p[k:]
						}
						if typ == SyncFilePack {
							req(SyncObjEnd, ssh.Marshal(&ObjEnd{OK: true, Adler: adler32.Checksum(d)}))
						}
					}
					if kind == SyncFilePack {
						ps, idx, err := sum.Finish()
						if err != nil {
							panic(err)
						}
						req(SyncPackEnd, ssh.Marshal(&PackEnd{Count: uint32(len(datas)), Name: hex.EncodeToString(ps), IdxSize: uint64(len(idx))}))
						WriteFrame(host, FrameData, idx)
					}
					req(SyncDone, ssh.Marshal(&SyncEntry{}))
				}()
				st, err := ReadSyncReply(host)
				host.Close()
				if err != nil || <-done != nil {
					t.Fatalf("push: %v", err)
				}
				if st.Files != len(datas) {
					t.Fatalf("stats %+v", st)
				}
				for i, d := range datas {
					p := filepath.Join(dest, "f"+strconv.Itoa(i))
					got, err := os.ReadFile(p)
					if err != nil || !bytes.Equal(got, d) {
						t.Fatalf("f%d: %d bytes, want %d: %v", i, len(got), len(d), err)
					}
					fi, _ := os.Stat(p)
					wantMode := fs.FileMode(0o755)
					if i%2 == 1 {
						wantMode = 0o750 | fs.ModeSetgid
					}
					if fi.Mode() != wantMode || !fi.ModTime().Equal(mtime) {
						t.Errorf("f%d: mode %v mtime %v, want %v %v", i, fi.Mode(), fi.ModTime(), wantMode, mtime)
					}
				}
				if ents, _ := filepath.Glob(filepath.Join(dest, ".banger-push-*")); len(ents) > 0 {
					t.Errorf("temporary files left: %v", ents)
				}
				if kind == SyncFilePack {
					idx, _ := filepath.Glob(filepath.Join(dest, packDir, "pack-*.idx"))
					if len(idx) != 1 {
						t.Fatalf("packs: %v", idx)
					}
					gittest.Run(t, dest, "verify-pack", idx[0])
					for _, d := range datas {
						id := hex.EncodeToString(testObj{ObjBlob, d}.id(sha1.New))
						if got := gittest.Run(t, dest, "cat-file", "-s", id); got != strconv.Itoa(len(d))+"\n" {
							t.Fatalf("blob %s: size %q, want %d", id, got, len(d))
						}
					}
				}
				checkUnmapped(t)
			})
		}
	}
}
