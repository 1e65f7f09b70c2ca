package bulk

import (
	"bytes"
	"compress/zlib"
	"crypto/sha1"
	"encoding/hex"
	"hash/adler32"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/crypto/ssh"
)

// TestSyncFileObj: a file sent as SyncFileObj in frames that cross the
// stored blocks' 65535-byte boundaries (and an empty one) leaves the file
// and a loose object that inflates to "blob <size>\0" + the data; an object
// the host calls bad (OK false) leaves nothing behind.
func TestSyncFileObj(t *testing.T) {
	data := make([]byte, 200_000)
	for i := range data {
		data[i] = byte(i * 31 / 7)
	}
	for _, tc := range []struct {
		name   string
		frames []int
		ok     bool
		exists bool // a file is at the object's name already
	}{
		{"blocks", []int{70_000, 1, 65_534, 64_465}, true, false},
		{"one frame", []int{200_000}, true, false},
		{"empty", nil, true, false},
		{"bad hash", []int{200_000}, false, false},
		{"object there", []int{1000}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			size := 0
			for _, n := range tc.frames {
				size += n
			}
			body := data[:size]
			head := []byte("blob " + strconv.Itoa(size) + "\x00")
			sum := sha1.Sum(append(append([]byte{}, head...), body...))
			id := hex.EncodeToString(sum[:])
			obj := ".git/objects/" + id[:2] + "/" + id[2:]
			dest := filepath.Join(t.TempDir(), "ws")
			if tc.exists {
				os.MkdirAll(filepath.Join(dest, filepath.Dir(obj)), 0o755)
				os.WriteFile(filepath.Join(dest, obj), []byte("garbage"), 0o644)
			}
			host, agent := net.Pipe()
			done := make(chan error, 1)
			go func() { done <- (&Syncer{Dest: dest, StateDir: t.TempDir()}).Serve(agent, agent); agent.Close() }()
			if _, caps, err := ReadManifestCaps(host); err != nil || !caps[CapObjects] {
				t.Fatalf("manifest: caps %v, %v", caps, err)
			}
			go func() {
				e := SyncObjEntry{Rel: "f", Mode: 0o644, Size: uint64(size), Object: obj, ObjMode: 0o444}
				WriteFrame(host, FrameRequest, ssh.Marshal(&Request{Type: SyncFileObj, Payload: ssh.Marshal(&e)}))
				off := 0
				for _, n := range tc.frames {
					WriteFrame(host, FrameData, body[off:off+n])
					off += n
				}
				ad := adler32.New()
				ad.Write(head)
				ad.Write(body)
				end := ObjEnd{OK: tc.ok, Adler: ad.Sum32()}
				WriteFrame(host, FrameRequest, ssh.Marshal(&Request{Type: SyncObjEnd, Payload: ssh.Marshal(&end)}))
				WriteFrame(host, FrameRequest, ssh.Marshal(&Request{Type: SyncDone, Payload: ssh.Marshal(&SyncEntry{})}))
			}()
			st, err := ReadSyncReply(host)
			host.Close()
			if err != nil || <-done != nil {
				t.Fatalf("push: %v", err)
			}
			if b, err := os.ReadFile(filepath.Join(dest, "f")); err != nil || !bytes.Equal(b, body) {
				t.Fatalf("file: %d bytes, %v", len(b), err)
			}
			ents, _ := os.ReadDir(filepath.Join(dest, ".git/objects", id[:2]))
			if !tc.ok {
				if len(ents) != 0 || st.Objects != 0 {
					t.Fatalf("a bad object was kept: %v, %+v", ents, st)
				}
				return
			}
			if len(ents) != 1 || st.Objects != 1 {
				t.Fatalf("objects dir %v, stats %+v", ents, st)
			}
			f, err := os.Open(filepath.Join(dest, obj))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			fi, _ := f.Stat()
			if fi.Mode().Perm() != 0o444 {
				t.Errorf("object mode %v", fi.Mode())
			}
			zr, err := zlib.NewReader(f)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(zr) // checks the Adler-32 at the end
			if err != nil {
				t.Fatalf("inflate: %v", err)
			}
			if !bytes.Equal(got, append(head, body...)) {
				t.Fatalf("object inflates to %d bytes, want %d", len(got), len(head)+len(body))
			}
		})
	}
}

// TestSyncFileObjRefusesBadObjectPaths: SyncFileObj writes only below
// .git/objects/xx/<hex> of the destination.
func TestSyncFileObjRefusesBadObjectPaths(t *testing.T) {
	for _, obj := range []string{"../x", ".git/config", ".git/objects/ab/../../../../x", ".git/objects/AB/" + string(bytes.Repeat([]byte("a"), 38)), "sub/.git/objects/ab/" + string(bytes.Repeat([]byte("a"), 38))} {
		dest := filepath.Join(t.TempDir(), "ws")
		host, agent := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- (&Syncer{Dest: dest, StateDir: t.TempDir()}).Serve(agent, agent); agent.Close() }()
		ReadManifest(host)
		go func() {
			e := SyncObjEntry{Rel: "f", Mode: 0o644, Size: 1, Object: obj}
			WriteFrame(host, FrameRequest, ssh.Marshal(&Request{Type: SyncFileObj, Payload: ssh.Marshal(&e)}))
			WriteFrame(host, FrameData, []byte("x"))
		}()
		_, err := ReadSyncReply(host)
		host.Close()
		if err == nil || <-done == nil {
			t.Errorf("object path %q accepted", obj)
		}
	}
}
