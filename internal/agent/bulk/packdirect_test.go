package bulk

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dioRecorder wraps unix.Pwrite: it records every write made with O_DIRECT
// set and can refuse O_DIRECT (EINVAL) at the first write, as an overlayfs
// does.
type dioRecorder struct {
	o           *packOut
	refuseWrite bool
	directBytes int
	bad         []string
}

func (d *dioRecorder) pwrite(fd int, b []byte, off int64) (int, error) {
	if d.o.direct.Load() {
		if d.refuseWrite {
			return 0, syscall.EINVAL
		}
		if off%directAlign != 0 || len(b)%directAlign != 0 || uintptr(unsafe.Pointer(&b[0]))%directAlign != 0 {
			d.bad = append(d.bad, fmt.Sprintf("%d bytes at %d from %p", len(b), off, &b[0]))
		}
		d.directBytes += len(b)
	}
	return unix.Pwrite(fd, b, off)
}

func openPackOut(t *testing.T, refuseWrite bool) (*packOut, *dioRecorder, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pack")
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	o := newPackOut(fd, p)
	if o == nil {
		t.Skipf("the filesystem of %s refuses O_DIRECT: the direct pack writer cannot be tested here", p)
	}
	d := &dioRecorder{o: o, refuseWrite: refuseWrite}
	o.pwrite = d.pwrite
	return o, d, p
}

// TestPackOut: the file holds exactly the bytes appended, whatever their
// sizes around the block and buffer sizes and however they are split, with
// the header patched at offset 0; every O_DIRECT write is aligned, and all
// whole blocks go direct; refused at the first write, the rest is written
// buffered; no buffer is kept.
func TestPackOut(t *testing.T) {
	sizes := []int{0, 1, 4095, 4096, 65536, 65537, 3 << 20}
	rng := rand.New(rand.NewSource(1))
	for _, refuse := range []bool{false, true} {
		for _, size := range sizes {
			for _, split := range []int{1000, 4096, 65535 + 5, 1 << 20} {
				if size > 1<<20 && split < 4096 {
					continue // slow and nothing new
				}
				t.Run(fmt.Sprintf("refuse=%v/size=%d/split=%d", refuse, size, split), func(t *testing.T) {
					o, d, p := openPackOut(t, refuse)
					want := make([]byte, 12+size)
					rng.Read(want)
					if err := o.append([][]byte{make([]byte, 12)}); err != nil {
						t.Fatal(err)
					}
					for b := want[12:]; len(b) > 0; {
						k := min(split, len(b))
						// two pieces per call, as a header and data
						h := min(k, 5)
						if err := o.append([][]byte{b[:h], b[h:k]}); err != nil {
							t.Fatal(err)
						}
						b = b[k:]
					}
					if err := o.finish(want[:12]); err != nil {
						t.Fatal(err)
					}
					got, err := os.ReadFile(p)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, want) {
						t.Fatalf("file of %d bytes differs from the %d appended", len(got), len(want))
					}
					if len(d.bad) > 0 {
						t.Fatalf("unaligned O_DIRECT writes: %v", d.bad)
					}
					if wantDirect := len(want) &^ (directAlign - 1); !refuse && d.directBytes != wantDirect {
						t.Fatalf("%d bytes written with O_DIRECT, want the %d of whole blocks", d.directBytes, wantDirect)
					}
					if refuse && d.directBytes != 0 {
						t.Fatalf("%d bytes written with O_DIRECT after it was refused", d.directBytes)
					}
					checkUnmapped(t)
				})
			}
		}
	}
}

// TestPackOutTruncate: an entry cut off again, within the buffer being
// filled or reaching back into buffers already written (at, just before
// and just after a block boundary), leaves exactly the bytes before it,
// and the pack goes on from there.
func TestPackOutTruncate(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	for _, c := range []struct{ before, dropped, after int }{
		{100, 1000, 100},
		{4096 - 12, 3 << 20, 5000},
		{4095 - 12, 3 << 20, 1},
		{4097 - 12, 2 << 20, 65537},
		{(1 << 20) - 12, 1 << 20, 0},
		{(2 << 20) + 7, (1 << 20) + 3, 3 << 20},
		{65536, 0, 65536},
	} {
		t.Run(fmt.Sprintf("%d-%d-%d", c.before, c.dropped, c.after), func(t *testing.T) {
			o, d, p := openPackOut(t, false)
			head := make([]byte, 12)
			before, dropped, after := make([]byte, c.before), make([]byte, c.dropped), make([]byte, c.after)
			rng.Read(before)
			rng.Read(dropped)
			rng.Read(after)
			add := func(b []byte) {
				for len(b) > 0 {
					k := min(len(b), 65536)
					if err := o.append([][]byte{b[:k]}); err != nil {
						t.Fatal(err)
					}
					b = b[k:]
				}
			}
			add(make([]byte, 12))
			add(before)
			add(dropped)
			if err := o.truncate(int64(12 + c.before)); err != nil {
				t.Fatal(err)
			}
			add(after)
			rng.Read(head)
			if err := o.finish(head); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			want := append(append(append([]byte(nil), head...), before...), after...)
			if !bytes.Equal(got, want) {
				t.Fatalf("file of %d bytes differs from the %d kept", len(got), len(want))
			}
			if len(d.bad) > 0 {
				t.Fatalf("unaligned O_DIRECT writes: %v", d.bad)
			}
			checkUnmapped(t)
		})
	}
}

// TestPackOutWriteFailure: a write the writer fails (no space left) is
// reported by a later append or by finish, and every buffer comes back.
func TestPackOutWriteFailure(t *testing.T) {
	o, _, _ := openPackOut(t, false)
	o.pwrite = func(int, []byte, int64) (int, error) { return 0, syscall.ENOSPC }
	var err error
	for i := 0; i < 8 && err == nil; i++ {
		err = o.append([][]byte{make([]byte, 1<<20)})
	}
	if err == nil {
		err = o.finish(make([]byte, 12))
	} else {
		o.release()
	}
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("no space")) {
		t.Fatalf("error %v, want the writer's ENOSPC", err)
	}
	checkUnmapped(t)
}

// TestFilePackReadInPlace: a SyncFilePack file's data is read from the
// stream straight into the pack's aligned buffers and written to the work
// tree file from there (only the pack's headers are copied in), in frames
// of every size around the stored block (65535) and buffer (1 MiB) edges,
// a frame reaching across two buffers included; the file and the pack
// entry hold exactly the data, the pack laid out as PackEntry lays it out;
// and an entry cut off again after such data leaves the pack as before it.
func TestFilePackReadInPlace(t *testing.T) {
	rng := rand.New(rand.NewSource(4))
	for _, c := range []struct{ size, frame int }{
		{1, 1}, {65535, 65535}, {65536, 65536}, {65537, 300_001},
		{3 << 20, 1 << 20}, {3<<20 + 17, 65535 + 5}, {2 << 20, 4096},
	} {
		for _, cut := range []bool{false, true} {
			t.Run(fmt.Sprintf("size=%d/frame=%d/cut=%v", c.size, c.frame, cut), func(t *testing.T) {
				dest := t.TempDir()
				s := &Syncer{Dest: dest, known: map[string]bool{"": true}, state: map[string]bool{}, umask: processUmask()}
				w, err := s.packW()
				if err != nil {
					t.Fatal(err)
				}
				if w.out == nil {
					t.Skipf("the filesystem of %s refuses O_DIRECT", dest)
				}
				defer s.abortPack()
				// an entry before, so that the data starts mid-buffer
				lead := make([]byte, 1000)
				rng.Read(lead)
				w.begin(ObjBlob, uint64(len(lead)))
				if err := w.write(lead); err != nil {
					t.Fatal(err)
				}
				var le PackEntry
				wantPack := slices.Concat(le.Data(le.Begin(nil, ObjBlob, uint64(len(lead))), lead)...)
				w.pending = append(w.pending, []byte{0, 0, 0, 0}) // its (dummy) Adler-32
				wantPack = append(wantPack, 0, 0, 0, 0)
				w.e.Reset()
				w.e.left = 0
				w.inEntry = false

				data := make([]byte, c.size)
				rng.Read(data)
				var stream bytes.Buffer
				for d := data; len(d) > 0; {
					k := min(c.frame, len(d))
					WriteFrame(&stream, FrameData, d[:k])
					d = d[k:]
				}
				copied := w.out.copied
				w.begin(ObjBlob, uint64(len(data)))
				e := SyncEntry{Rel: "f", Mode: 0o644, MTime: 1, Size: uint64(len(data))}
				if err := s.writeFile(filepath.Join(dest, "f"), e, &stream, w); err != nil {
					t.Fatal(err)
				}
				if got, _ := os.ReadFile(filepath.Join(dest, "f")); !bytes.Equal(got, data) {
					t.Fatalf("the file holds %d bytes, not the %d sent", len(got), len(data))
				}
				// only the entry's and blocks' headers were copied in
				headers := 12 + 5*(len(data)/maxStored+1)
				if n := w.out.copied - copied; n > headers {
					t.Fatalf("%d bytes copied into the pack's buffers for %d bytes of data: not read in place", n, len(data))
				}
				if cut {
					if err := w.out.truncate(w.start); err != nil {
						t.Fatal(err)
					}
					w.off = w.start
					w.pending = nil
				} else {
					var pe PackEntry
					iov := pe.Begin(nil, ObjBlob, uint64(len(data)))
					iov = pe.Data(iov, data)
					wantPack = append(wantPack, slices.Concat(iov...)...)
				}
				if err := w.flush(w.pending); err != nil {
					t.Fatal(err)
				}
				if err := w.out.finish(PackHeader(0)); err != nil {
					t.Fatal(err)
				}
				got, err := os.ReadFile(w.tmp)
				if err != nil {
					t.Fatal(err)
				}
				want := slices.Concat(PackHeader(0), wantPack)
				if !bytes.Equal(got, want) {
					t.Fatalf("the pack holds %d bytes, want %d (differ from %d)", len(got), len(want), firstDiff(got, want))
				}
			})
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
