package bulk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fakeDIOReader plays a get's file: it refuses unaligned O_DIRECT reads as
// the kernel does (and records them), refuses O_DIRECT at the first read,
// returns short reads, or fails once some bytes are read.
type fakeDIOReader struct {
	data        []byte
	off         int
	direct      bool
	refuseRead  bool // EINVAL on every O_DIRECT read
	maxRead     int  // cap every read at this many bytes (0: none)
	failAfter   int  // EIO once this many bytes are read (0: never)
	directBytes int
	bad         []string
	reads       int
}

func (f *fakeDIOReader) SetDirect(on bool) error { f.direct = on; return nil }

func (f *fakeDIOReader) Read(b []byte) (int, error) {
	f.reads++
	if f.failAfter > 0 && f.off >= f.failAfter {
		return 0, syscall.EIO
	}
	if f.direct {
		if f.refuseRead {
			return 0, syscall.EINVAL
		}
		if len(b) == 0 || f.off%directAlign != 0 || len(b)%directAlign != 0 || uintptr(unsafe.Pointer(&b[0]))%directAlign != 0 {
			f.bad = append(f.bad, fmt.Sprintf("%d bytes at %d", len(b), f.off))
			return 0, syscall.EINVAL
		}
	}
	if f.off >= len(f.data) {
		return 0, io.EOF
	}
	if f.maxRead > 0 && len(b) > f.maxRead {
		b = b[:f.maxRead]
	}
	n := copy(b, f.data[f.off:])
	f.off += n
	if f.direct {
		f.directBytes += n
	}
	return n, nil
}

// getStream reads what sendDirect wrote as a host does, for a file of size
// bytes: exactly size bytes or an error.
func getStream(t *testing.T, stream []byte, size int) ([]byte, error) {
	t.Helper()
	g := &Getter{Info: FileInfo{Size: uint64(size)}, r: bytes.NewReader(stream), left: uint64(size)}
	return io.ReadAll(g)
}

// TestSendDirect: every size arrives whole and exactly (a file that grew
// sends only the size announced), around the block and buffer sizes; with
// O_DIRECT taken every direct read is aligned (offset, length, buffer) and
// the whole file is read with it; refused at the first read, or cut short
// off a block, the get goes on buffered.
func TestSendDirect(t *testing.T) {
	sizes := []int{0, 1, directAlign - 1, directAlign, directAlign + 1, getPayload - 1, getPayload, getPayload + 1,
		directBuf, (directBufs+1)*getPayload + directAlign + 5, 7*directBuf + 123}
	modes := []struct {
		name       string
		refuseRead bool
		maxRead    int
		grow       int
		allDirect  bool
	}{
		{"direct", false, 0, 0, true},
		{"direct, the file grew", false, 0, 3*directAlign + 11, true},
		{"direct, short aligned reads", false, 3 * directAlign, 0, true},
		{"refused at the first read", true, 0, 0, false},
		{"short reads off a block", false, 100003, 0, false},
	}
	for _, m := range modes {
		for _, size := range sizes {
			t.Run(fmt.Sprintf("%s/size %d", m.name, size), func(t *testing.T) {
				data := randomBytes(size + m.grow)
				f := &fakeDIOReader{data: data, direct: true, refuseRead: m.refuseRead, maxRead: m.maxRead}
				var out bytes.Buffer
				if err := sendDirect(&out, f, int64(size), "f"); err != nil {
					t.Fatal(err)
				}
				got, err := getStream(t, out.Bytes(), size)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, data[:size]) {
					t.Fatalf("got %d bytes, not the file's %d", len(got), size)
				}
				if len(f.bad) > 0 {
					t.Fatalf("unaligned O_DIRECT reads: %v", f.bad)
				}
				if m.allDirect && f.directBytes < size {
					t.Fatalf("%d of %d bytes read with O_DIRECT", f.directBytes, size)
				}
				if m.refuseRead && f.directBytes != 0 {
					t.Fatalf("%d bytes read with O_DIRECT from a file that refuses it", f.directBytes)
				}
				checkUnmapped(t)
			})
		}
	}
}

// TestSendDirectFrames: a get's frames are whole buffers (one Write each,
// header included) of at most MaxFrame bytes: a 100 MiB file is about 100
// frames, not 400 of a chunk.
func TestSendDirectFrames(t *testing.T) {
	size := 5*getPayload + 77
	f := &fakeDIOReader{data: randomBytes(size), direct: true}
	w := &countWriter{}
	if err := sendDirect(w, f, int64(size), "f"); err != nil {
		t.Fatal(err)
	}
	// 6 data frames and the EOF, each in one Write
	if w.writes != 7 {
		t.Fatalf("%d writes, want 7 (6 frames of up to %d bytes and the EOF)", w.writes, getPayload)
	}
	if w.max > 5+MaxFrame {
		t.Fatalf("a frame of %d bytes exceeds MaxFrame", w.max-5)
	}
	checkUnmapped(t)
}

type countWriter struct {
	writes, max int
	failAfter   int // fail once this many writes were made (0: never)
}

func (w *countWriter) Write(b []byte) (int, error) {
	if w.failAfter > 0 && w.writes >= w.failAfter {
		return 0, syscall.EPIPE
	}
	w.writes++
	w.max = max(w.max, len(b))
	return len(b), nil
}

// TestSendDirectBroken: a file that shrank or fails to read ends in a
// failure reply with the reason (the host reports it), a stream that fails
// to take a frame stops the reads there, and the buffer comes back every
// time.
func TestSendDirectBroken(t *testing.T) {
	size := 6*getPayload + 999
	tests := []struct {
		name      string
		f         *fakeDIOReader
		wantReply string
	}{
		{"shrank", &fakeDIOReader{data: randomBytes(2*getPayload + 5), direct: true}, "shrank while it was read"},
		{"shrank to a block", &fakeDIOReader{data: randomBytes(3 * getPayload), direct: true}, "shrank while it was read"},
		{"read fails", &fakeDIOReader{data: randomBytes(size), direct: true, failAfter: 2 * getPayload}, "input/output error"},
		{"read fails buffered", &fakeDIOReader{data: randomBytes(size), direct: true, refuseRead: true, failAfter: 3 * directAlign}, "input/output error"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if err := sendDirect(&out, tt.f, int64(size), "f"); err == nil || !strings.Contains(err.Error(), tt.wantReply) {
				t.Fatalf("err = %v, want %q", err, tt.wantReply)
			}
			if _, err := getStream(t, out.Bytes(), size); !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), tt.wantReply) {
				t.Fatalf("the host got %v, want the agent's %q", err, tt.wantReply)
			}
			checkUnmapped(t)
		})
	}
	t.Run("stream fails", func(t *testing.T) {
		f := &fakeDIOReader{data: randomBytes(32 * directBuf), direct: true}
		if err := sendDirect(&countWriter{failAfter: 1}, f, int64(len(f.data)), "f"); !errors.Is(err, syscall.EPIPE) {
			t.Fatalf("err = %v, want EPIPE", err)
		}
		if f.off > 2*getPayload {
			t.Fatalf("read %d bytes of the file after the stream failed at its second frame", f.off)
		}
		checkUnmapped(t)
	})
}

// TestGetReadsDirect: a get of a real file whose filesystem takes O_DIRECT
// arrives whole and leaves the page cache alone (what shows the read went
// around it); TestPutGetRoundTrip covers the rest.
func TestGetReadsDirect(t *testing.T) {
	dir := directDir(t, "TestSendDirect")
	p := filepath.Join(dir, "f")
	size := 3*directBuf + 5*directAlign + 77
	data := randomBytes(size)
	if err := os.WriteFile(p, data, 0o640); err != nil {
		t.Fatal(err)
	}
	// written back and dropped from the page cache
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	if n := cachedPages(t, f, size); n != 0 {
		t.Skipf("%d pages stay cached after FADV_DONTNEED here: cannot tell a direct read", n)
	}
	host, agent := socketPair(t)
	served := make(chan error, 1)
	go func() { served <- ServeGet(agent, agent, p, nil) }()
	g, err := StartGet(host)
	if err != nil {
		t.Fatal(err)
	}
	if g.Info.Mode != 0o640 || g.Info.Size != uint64(size) {
		t.Fatalf("info %+v", g.Info)
	}
	var got bytes.Buffer
	if _, err := g.WriteTo(&got); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("got %d bytes, not the file's %d", got.Len(), size)
	}
	if n := cachedPages(t, f, size); n != 0 {
		t.Fatalf("%d of the file's pages are in the page cache after the get: it was not read with O_DIRECT", n)
	}
	checkUnmapped(t)
}

// cachedPages counts f's pages in the page cache (mincore).
func cachedPages(t *testing.T, f *os.File, size int) int {
	t.Helper()
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (size+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal("mincore:", errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}
