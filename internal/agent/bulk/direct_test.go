package bulk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fakeDIO records what a put writes and plays a filesystem that takes
// O_DIRECT, refuses it when asked to set it, refuses it at the first
// write, or fails after some bytes.
type fakeDIO struct {
	refuseSet   bool
	refuseWrite bool
	failAfter   int // fail every write once this many bytes are written (0: never)
	direct      bool
	out         bytes.Buffer
	directBytes int
	bad         []string // O_DIRECT writes that were not aligned
}

func (f *fakeDIO) SetDirect(on bool) error {
	if on && f.refuseSet {
		return syscall.EINVAL
	}
	f.direct = on
	return nil
}

func (f *fakeDIO) Write(b []byte) (int, error) {
	if f.failAfter > 0 && f.out.Len() >= f.failAfter {
		return 0, syscall.ENOSPC
	}
	if f.direct {
		if f.refuseWrite {
			return 0, syscall.EINVAL
		}
		off := f.out.Len()
		if len(b) > 0 && (off%directAlign != 0 || len(b)%directAlign != 0 || uintptr(unsafe.Pointer(&b[0]))%directAlign != 0) {
			f.bad = append(f.bad, fmt.Sprintf("%d bytes at %d from %p", len(b), off, &b[0]))
		}
		f.directBytes += len(b)
	}
	return f.out.Write(b)
}

// stream is data in FrameData frames of frameSize bytes, then a FrameEOF.
func stream(data []byte, frameSize int) *bytes.Reader {
	var s bytes.Buffer
	for p := data; len(p) > 0; {
		k := min(len(p), frameSize)
		WriteFrame(&s, FrameData, p[:k])
		p = p[k:]
	}
	WriteFrame(&s, FrameEOF, nil)
	return bytes.NewReader(s.Bytes())
}

// checkUnmapped fails when a put kept a buffer it mapped.
func checkUnmapped(t *testing.T) {
	t.Helper()
	releaseDirectBufs()
	if n := dioMapped.Load(); n != 0 {
		t.Fatalf("%d write buffers still mapped after the put", n)
	}
}

// TestReceiveDirect: every size arrives whole, around the block and buffer
// sizes, in frames that straddle buffers or not; with O_DIRECT taken, every
// direct write is aligned and only the tail is written buffered; refused
// when set or at the first write, the put goes on buffered.
func TestReceiveDirect(t *testing.T) {
	sizes := []int{0, 1, directAlign - 1, directAlign, directAlign + 1, directBuf - 1, directBuf, directBuf + 1,
		(directBufs+1)*directBuf + directAlign + 5, 7*directBuf + 123}
	modes := []struct {
		name        string
		refuseSet   bool
		refuseWrite bool
	}{
		{"direct", false, false},
		{"refused when set", true, false},
		{"refused at the first write", false, true},
	}
	for _, m := range modes {
		for _, frameSize := range []int{chunk, 100003, MaxFrame} {
			for _, size := range sizes {
				t.Run(fmt.Sprintf("%s/frame %d/size %d", m.name, frameSize, size), func(t *testing.T) {
					data := randomBytes(size)
					f := &fakeDIO{refuseSet: m.refuseSet, refuseWrite: m.refuseWrite}
					if err := receiveDirect(f, stream(data, frameSize)); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(f.out.Bytes(), data) {
						t.Fatalf("wrote %d bytes, not the %d sent", f.out.Len(), size)
					}
					if len(f.bad) > 0 {
						t.Fatalf("unaligned O_DIRECT writes: %v", f.bad)
					}
					want := size &^ (directAlign - 1)
					if m.refuseSet || m.refuseWrite {
						want = 0
					}
					if f.directBytes != want {
						t.Fatalf("%d bytes written with O_DIRECT, want %d", f.directBytes, want)
					}
					checkUnmapped(t)
				})
			}
		}
	}
}

// TestReceiveDirectBroken: a stream that ends early, a frame of another
// type, and a file that fails to write are errors (with the reason), and
// the buffers come back.
func TestReceiveDirectBroken(t *testing.T) {
	data := randomBytes(5*directBuf + 17)
	whole := stream(data, chunk)
	full, _ := io.ReadAll(whole)
	eofLen := 5 // a FrameEOF with no payload
	var other bytes.Buffer
	WriteFrame(&other, FrameData, data[:3*directBuf])
	WriteFrame(&other, FrameRequest, nil)
	tests := []struct {
		name      string
		stream    []byte
		failAfter int
		want      error
		wantText  string
	}{
		{"ends before EOF", full[:len(full)-eofLen], 0, io.ErrUnexpectedEOF, ""},
		{"ends in a frame", full[:len(full)/2+3], 0, io.ErrUnexpectedEOF, ""},
		{"ends in a header", full[:5+chunk+2], 0, io.ErrUnexpectedEOF, ""},
		{"empty", nil, 0, io.ErrUnexpectedEOF, ""},
		{"another frame type", other.Bytes(), 0, nil, "unexpected frame type 5"},
		{"write fails", full, 2 * directBuf, syscall.ENOSPC, ""},
	}
	for _, tt := range tests {
		for _, refuse := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/buffered %v", tt.name, refuse), func(t *testing.T) {
				f := &fakeDIO{refuseSet: refuse, failAfter: tt.failAfter}
				err := receiveDirect(f, bytes.NewReader(tt.stream))
				if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) || !bytes.Contains([]byte(err.Error()), []byte(tt.wantText)) {
					t.Fatalf("err = %v, want %v %q", err, tt.want, tt.wantText)
				}
				if !bytes.Equal(f.out.Bytes(), data[:f.out.Len()]) {
					t.Fatal("what was written is not the start of the data")
				}
				checkUnmapped(t)
			})
		}
	}
}

// TestReceiveDirectStopsOnWriteFailure: when the file fails to write, the
// put stops reading the stream within its few buffers (the host then gets
// the reason) rather than reading it all.
func TestReceiveDirectStopsOnWriteFailure(t *testing.T) {
	r := stream(randomBytes(16*directBuf), chunk)
	f := &fakeDIO{failAfter: directBuf}
	if err := receiveDirect(f, r); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("err = %v, want ENOSPC", err)
	}
	if read := int(r.Size()) - r.Len(); read > (directBufs+3)*directBuf {
		t.Fatalf("read %d bytes of the stream after the write failed at %d", read, directBuf)
	}
	checkUnmapped(t)
}

// TestPutWritesDirect: a put into a real file whose filesystem takes
// O_DIRECT arrives whole and leaves the page cache alone but for the tail
// (what shows the write went around it), and is still buffered where the
// filesystem refuses O_DIRECT.
func TestPutWritesDirect(t *testing.T) {
	dir := directDir(t, "TestReceiveDirect")
	p := filepath.Join(dir, "f")
	size := 3*directBuf + 5*directAlign + 77
	data := randomBytes(size)
	if err := os.WriteFile(p, bytes.Repeat([]byte("old"), 5*directBuf), 0o600); err != nil {
		t.Fatal(err)
	}
	host, agent := socketPair(t)
	served := make(chan error, 1)
	go func() { served <- ServePut(agent, agent, p, nil) }()
	w, err := StartPut(host)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.ReadFrom(bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	// What is cached before anything reads the file: only the tail's page.
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	vec := make([]byte, (size+os.Getpagesize()-1)/os.Getpagesize())
	_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0])))
	unix.Munmap(m)
	if errno != 0 {
		t.Fatal("mincore:", errno)
	}
	cached := 0
	for _, v := range vec {
		cached += int(v & 1)
	}
	if cached > 1 {
		t.Fatalf("%d of the file's %d pages are in the page cache: it was not written with O_DIRECT", cached, len(vec))
	}
	got, _ := os.ReadFile(p)
	if !bytes.Equal(got, data) {
		t.Fatalf("the file has %d bytes, not the %d sent", len(got), size)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v: a put into an existing file keeps its mode, as before", fi.Mode())
	}
}

// directDir is a temporary directory whose filesystem takes O_DIRECT; the
// test skips where it does not, naming the test that covers the buffered
// path there (buffered).
func directDir(t *testing.T, buffered string) string {
	t.Helper()
	dir := t.TempDir()
	probe, err := os.Create(filepath.Join(dir, "probe"))
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	if err := (osFile{probe}).SetDirect(true); err != nil {
		t.Skipf("the test directory's filesystem refuses O_DIRECT (%v): the buffered path is %s's", err, buffered)
	}
	return dir
}
