package sshd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// poisonSource plays a bulk stream: it hands out frames carrying a
// pattern (byte i of the stream is pat(i)) and, the moment a frame is
// given back, overwrites it and reuses it for the next one, as the
// stream's buffer pool may. A buffer given back while the pipe still
// refers to it therefore reaches the reader with the wrong bytes.
type poisonSource struct {
	mu       sync.Mutex
	sizes    []int
	off      int
	free     [][]byte
	out      int // handed out and not given back
	released int
}

func pat(i int) byte { return byte(i*7 + i>>9) }

func (p *poisonSource) TakeData() ([]byte, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.sizes) == 0 {
		return nil, io.EOF
	}
	n := p.sizes[0]
	p.sizes = p.sizes[1:]
	var b []byte
	for i, f := range p.free {
		if cap(f) >= n {
			b = f[:n]
			p.free = append(p.free[:i], p.free[i+1:]...)
			break
		}
	}
	if b == nil {
		b = make([]byte, n)
	}
	for i := range b {
		b[i] = pat(p.off + i)
	}
	p.off += n
	p.out++
	return b, nil
}

func (p *poisonSource) release(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range b {
		b[i] = 0xEE
	}
	p.free = append(p.free, b)
	p.out--
	p.released++
}

// splicerPipe is a pipe whose read end the "command" reads (readEnd) and
// the splicer watches through a copy of its own, as in runPipes.
func splicerPipe(t *testing.T, src *poisonSource) (*stdinSplicer, *os.File) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(pr.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pr.Close(); pw.Close() })
	return &stdinSplicer{w: pw, r: os.NewFile(uintptr(fd), "stdin-watch"), src: src, release: src.release}, pr
}

// frameSizes is total bytes in frames of the given sizes, in turn.
func frameSizes(total int, sizes ...int) []int {
	var out []int
	for i := 0; total > 0; i++ {
		n := min(total, sizes[i%len(sizes)])
		out = append(out, n)
		total -= n
	}
	return out
}

// TestStdinSplicerNoEarlyReuse: a slow reader gets every byte right while
// the source reuses (and first poisons) every buffer the moment it is given
// back, so no buffer is given back before the reader has read past it; at
// the end all of them are back.
func TestStdinSplicerNoEarlyReuse(t *testing.T) {
	tests := []struct {
		name    string
		sizes   []int
		total   int
		readBuf int
	}{
		{"256 KiB frames, 1000-byte reads", []int{256 << 10}, 6 << 20, 1000},
		{"odd frames, page reads", []int{100003, 7, 4096, 65537}, 3 << 20, 4096},
		{"one small frame", []int{10}, 10, 3},
		{"no data", []int{1}, 0, 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := &poisonSource{sizes: frameSizes(tt.total, tt.sizes...)}
			sp, rd := splicerPipe(t, src)
			before := strandedBytes()
			readErr := make(chan error, 1)
			go func() {
				buf := make([]byte, tt.readBuf)
				off := 0
				for {
					n, err := rd.Read(buf)
					for i := 0; i < n; i++ {
						if buf[i] != pat(off+i) {
							readErr <- errorf("byte %d is %#x, want %#x: its buffer was reused while in the pipe", off+i, buf[i], pat(off+i))
							return
						}
					}
					off += n
					if err == io.EOF {
						if off != tt.total {
							readErr <- errorf("read %d bytes, want %d", off, tt.total)
							return
						}
						readErr <- nil
						return
					}
					if err != nil {
						readErr <- err
						return
					}
					runtime.Gosched() // a slow reader
				}
			}()
			ran := make(chan struct{})
			go func() { sp.run(); close(ran) }()
			select {
			case err := <-readErr:
				if err != nil {
					sp.exited() // unblocks the splicer
					t.Fatal(err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("the reader did not finish")
			}
			waitFor(t, ran, "the splicer to reach the stream's end")
			sp.exited() // the command exits after reading it all
			if src.out != 0 {
				t.Fatalf("%d buffers never given back", src.out)
			}
			if strandedBytes() != before {
				t.Fatal("buffers were stranded though the pipe was read to the end")
			}
		})
	}
}

// TestStdinSplicerCommandExitsEarly: when the command exits without
// reading its stdin, the splicer stops (EPIPE) rather than blocking, and
// keeps for good what the pipe may still hold instead of giving it back.
func TestStdinSplicerCommandExitsEarly(t *testing.T) {
	src := &poisonSource{sizes: frameSizes(16<<20, 256<<10)}
	sp, rd := splicerPipe(t, src)
	before := strandedBytes()
	ran := make(chan struct{})
	go func() { sp.run(); close(ran) }()
	buf := make([]byte, 1000)
	if _, err := io.ReadFull(rd, buf); err != nil {
		t.Fatal(err)
	}
	// the command exits: its copy of the read end goes, then exited runs
	rd.Close()
	sp.exited()
	waitFor(t, ran, "the splicer to stop once nobody reads the pipe")
	if src.out == 0 || strandedBytes() == before {
		t.Fatalf("buffers still in the pipe were given back (%d out, stranded %d → %d)", src.out, before, strandedBytes())
	}
	if src.sizes == nil || len(src.sizes) == 0 {
		t.Fatal("the splicer read the whole stream into a pipe nobody reads")
	}
}

// TestStdinSplicerFallsBack: where vmsplice is refused the data is written.
func TestStdinSplicerFallsBack(t *testing.T) {
	src := &poisonSource{sizes: frameSizes(1<<20, 70000)}
	sp, rd := splicerPipe(t, src)
	// a write end that is not a pipe: vmsplice fails with EBADF/EINVAL
	f, err := os.CreateTemp(t.TempDir(), "stdin")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sp.w = f
	rd.Close()
	_, serr := sp.vmsplice([]byte("x"))
	if !errors.Is(serr, syscall.EBADF) && !errors.Is(serr, syscall.EINVAL) {
		t.Fatalf("vmsplice into a file: %v", serr)
	}
	sp.run()
	got, _ := os.ReadFile(f.Name())
	want := make([]byte, 1<<20)
	for i := range want {
		want[i] = pat(i)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("wrote %d bytes, not the data", len(got))
	}
	if src.out != 0 {
		t.Fatalf("%d buffers never given back", src.out)
	}
}

func strandedBytes() int {
	stranded.mu.Lock()
	defer stranded.mu.Unlock()
	return stranded.bytes
}

func waitFor(t *testing.T, done <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func errorf(format string, a ...any) error { return fmt.Errorf(format, a...) }
