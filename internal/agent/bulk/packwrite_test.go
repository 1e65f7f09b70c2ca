package bulk

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"hash/adler32"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testenv/gittest"
)

type testObj struct {
	typ  byte
	data []byte
}

func (o testObj) id(newHash func() hash.Hash) []byte {
	name := map[byte]string{ObjCommit: "commit", ObjTree: "tree", ObjBlob: "blob", ObjTag: "tag"}[o.typ]
	h := newHash()
	h.Write([]byte(name + " " + strconv.Itoa(len(o.data)) + "\x00"))
	h.Write(o.data)
	return h.Sum(nil)
}

// buildPack lays out objs as a banger pack the way the agent writes it and
// the host sums it (content split into frames of split bytes); drop names
// objects laid out, then dropped (as a file that changed during a push).
func buildPack(t *testing.T, objs []testObj, newHash func() hash.Hash, split int, drop map[int]bool) (pack, idx, sum []byte) {
	t.Helper()
	var buf bytes.Buffer
	buf.Write(PackHeader(uint32(len(objs) - len(drop))))
	s := NewPackSummer(newHash, uint32(len(objs)-len(drop)))
	var e PackEntry
	for i, o := range objs {
		if err := s.BeginEntry(); err != nil {
			t.Fatal(err)
		}
		start := buf.Len()
		write := func(iov [][]byte) {
			s.Add(iov)
			for _, b := range iov {
				buf.Write(b)
			}
			e.Reset()
		}
		write(e.Begin(nil, o.typ, uint64(len(o.data))))
		for d := o.data; len(d) > 0; {
			n := min(split, len(d))
			write(e.Data(nil, d[:n]))
			d = d[n:]
		}
		iov, err := e.End(nil, adler32.Checksum(o.data))
		if err != nil {
			t.Fatal(err)
		}
		write(iov)
		if drop[i] {
			if err := s.DropEntry(); err != nil {
				t.Fatal(err)
			}
			buf.Truncate(start)
			continue
		}
		s.EndEntry(o.id(newHash))
	}
	sum, idx, err := s.Finish()
	if err != nil {
		t.Fatal(err)
	}
	buf.Write(sum)
	return buf.Bytes(), idx, sum
}

// packObjects is a commit, its tree and blobs of sizes around the stored
// blocks' and the size varint's boundaries (0, 15, 16, 65535, 65536, ...).
func packObjects(newHash func() hash.Hash) []testObj {
	var objs []testObj
	var tree []byte
	for i, n := range []int{0, 1, 15, 16, 127, 2047, 2048, 65535, 65536, 65537, 200_000} {
		d := make([]byte, n)
		for j := range d {
			d[j] = byte(j*7 + i)
		}
		o := testObj{ObjBlob, d}
		objs = append(objs, o)
		tree = append(tree, []byte("100644 f"+strconv.Itoa(100+i)+"\x00")...)
		tree = append(tree, o.id(newHash)...)
	}
	tr := testObj{ObjTree, tree}
	commit := "tree " + hex.EncodeToString(tr.id(newHash)) + "\nauthor a <a@a> 1 +0000\ncommitter a <a@a> 1 +0000\n\nm\n"
	return append(objs, tr, testObj{ObjCommit, []byte(commit)})
}

// TestPackLayoutGit: a pack laid out by PackEntry and summed by PackSummer
// is one git reads (verify-pack, cat-file, fsck --strict of a repository
// whose only objects are in it), for SHA-1 and SHA-256 and any split of the
// content into frames; git index-pack builds the very same index bytes;
// an entry laid out and dropped leaves no trace.
func TestPackLayoutGit(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git not installed")
	}
	for _, tc := range []struct {
		format string
		split  int
		drop   bool
	}{
		{"sha1", 1 << 20, false},
		{"sha1", 1000, false},
		{"sha1", 65535, true},
		{"sha256", 70_000, false},
	} {
		t.Run(tc.format+"/"+strconv.Itoa(tc.split), func(t *testing.T) {
			hexLen := 40
			if tc.format == "sha256" {
				hexLen = 64
			}
			newHash, _ := HashFor(hexLen)
			objs := packObjects(newHash)
			drop := map[int]bool{}
			if tc.drop {
				// a blob that is not in the tree, laid out then dropped
				objs = append(objs[:3:3], append([]testObj{{ObjBlob, []byte("changed while sent")}}, objs[3:]...)...)
				drop[3] = true
			}
			pack, idx, sum := buildPack(t, objs, newHash, tc.split, drop)
			dir := t.TempDir()
			gittest.Run(t, dir, "init", "-q", "--object-format="+tc.format)
			name := filepath.Join(dir, ".git/objects/pack/pack-"+hex.EncodeToString(sum))
			os.WriteFile(name+".pack", pack, 0o444)
			os.WriteFile(name+".idx", idx, 0o444)
			out := gittest.Run(t, dir, "verify-pack", "-v", name+".idx")
			if want := strconv.Itoa(len(objs)-len(drop)) + " objects"; !strings.Contains(out, "non delta: "+want) {
				t.Fatalf("verify-pack: want %s:\n%s", want, out)
			}
			for i, o := range objs {
				id := hex.EncodeToString(o.id(newHash))
				if drop[i] {
					if exec.Command("git", "-C", dir, "cat-file", "-e", id).Run() == nil {
						t.Fatalf("dropped object %s is in the pack", id)
					}
					continue
				}
				if got := gittest.Run(t, dir, "cat-file", "-p", id); o.typ == ObjBlob && got != string(o.data) {
					t.Fatalf("object %d reads back as %d bytes, want %d", i, len(got), len(o.data))
				}
			}
			commit := hex.EncodeToString(objs[len(objs)-1].id(newHash))
			gittest.Run(t, dir, "update-ref", "refs/heads/main", commit)
			gittest.Run(t, dir, "fsck", "--strict", "--no-dangling", "--full")
			// git's own index of the same pack is byte-for-byte ours
			other := filepath.Join(t.TempDir(), "other.idx")
			gittest.Run(t, dir, "index-pack", "-o", other, name+".pack")
			if b, _ := os.ReadFile(other); !bytes.Equal(b, idx) {
				t.Fatalf("git index-pack's index differs from PackIndex's")
			}
		})
	}
}

// TestPackLayoutGolden pins every byte of the layout: a change of any byte
// of a pack or its index (header, varint, zlib header, block headers,
// Adler-32, trailer, index) changes these digests. Agent and host share the
// layout, so a change there would still agree with itself; this says it
// must also still be the same bytes git was checked against.
func TestPackLayoutGolden(t *testing.T) {
	newHash, _ := HashFor(40)
	pack, idx, sum := buildPack(t, packObjects(newHash), newHash, 1000, nil)
	got := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }
	const (
		wantPack = "9cbf0f77e728631da320790085e916a42e909976c7cbee3f5c032cd7756fc0df"
		wantIdx  = "79b84a5f0792a1fea19fa3ff19e74060e635baadc0dd60ec715d6969391e06ff"
		wantSum  = "ce454adb13b7c143edae3805ee2fdc2da3c95193"
	)
	if got(pack) != wantPack || got(idx) != wantIdx || hex.EncodeToString(sum) != wantSum {
		t.Fatalf("layout changed: pack %s, idx %s, sum %s", got(pack), got(idx), hex.EncodeToString(sum))
	}
	// and the pieces of one small entry, spelled out
	var e PackEntry
	iov := e.Begin(nil, ObjBlob, 20)
	iov = e.Data(iov, []byte("0123456789"))
	iov = e.Data(iov, []byte("abcdefghij"))
	iov, err := e.End(iov, 0x01020304)
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{0xb4, 0x01, 0x78, 0x01, 1, 20, 0, 0xeb, 0xff}
	want = append(want, "0123456789abcdefghij"...)
	want = append(want, 1, 2, 3, 4)
	if b := bytes.Join(iov, nil); !bytes.Equal(b, want) {
		t.Fatalf("entry bytes\n got % x\nwant % x", b, want)
	}
}

// TestPackEntrySizeMismatch: content longer or shorter than announced is
// an error at End, never a pack git would misread.
func TestPackEntrySizeMismatch(t *testing.T) {
	for _, tc := range []struct {
		size uint64
		data []byte
	}{{3, []byte("abcd")}, {5, []byte("abcd")}} {
		var e PackEntry
		iov := e.Begin(nil, ObjBlob, tc.size)
		iov = e.Data(iov, tc.data)
		if _, err := e.End(iov, 0); err == nil {
			t.Fatalf("size %d with %d bytes: no error", tc.size, len(tc.data))
		}
	}
}

// TestPackIndexLargeOffsets: offsets at and past 2^31 go to the 64-bit
// table, the 4-byte slot holding its index with the high bit set.
func TestPackIndexLargeOffsets(t *testing.T) {
	newHash, _ := HashFor(40)
	id := func(b byte) []byte { return bytes.Repeat([]byte{b}, 20) }
	idx, err := PackIndex([]PackIndexEntry{{id(3), 1, 1 << 31}, {id(1), 2, 12}, {id(2), 3, 5 << 32}}, make([]byte, 20), newHash)
	if err != nil {
		t.Fatal(err)
	}
	n := 3
	offs := 8 + 1024 + n*20 + n*4
	var got []uint32
	for i := range n {
		got = append(got, binary.BigEndian.Uint32(idx[offs+4*i:]))
	}
	if got[0] != 12 || got[1] != 1<<31|0 || got[2] != 1<<31|1 {
		t.Fatalf("offset slots %x", got)
	}
	large := offs + 4*n
	if binary.BigEndian.Uint64(idx[large:]) != 5<<32 || binary.BigEndian.Uint64(idx[large+8:]) != 1<<31 {
		t.Fatalf("large offsets % x", idx[large:large+16])
	}
	if _, err := PackIndex([]PackIndexEntry{{id(1), 0, 12}, {id(1), 0, 40}}, make([]byte, 20), newHash); err == nil {
		t.Fatal("an id twice: no error")
	}
}
