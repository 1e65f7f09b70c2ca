package memcopy

import (
	"bytes"
	"testing"
)

func TestChunkFor(t *testing.T) {
	if chunkFor(true) != 0 || chunkFor(false) != 2048 {
		t.Fatalf("chunkFor(avx) = %d, chunkFor(no avx) = %d; want 0 and 2048", chunkFor(true), chunkFor(false))
	}
}

// TestAppend: the same bytes as append, whatever the chunk, the sizes and
// the room already in dst.
func TestAppend(t *testing.T) {
	defer func(c int) { Chunk = c }(Chunk)
	src := make([]byte, 10000)
	for i := range src {
		src[i] = byte(i * 31)
	}
	for _, chunk := range []int{0, 1, 7, 2048} {
		for _, n := range []int{0, 1, 2047, 2048, 2049, 10000} {
			for _, room := range []int{0, 5, 20000} {
				Chunk = chunk
				dst := make([]byte, 3, 3+room)
				copy(dst, "abc")
				got := Append(dst, src[:n])
				want := append([]byte("abc"), src[:n]...)
				if !bytes.Equal(got, want) {
					t.Fatalf("chunk %d, %d bytes, room %d: got %d bytes, want %d, or they differ", chunk, n, room, len(got), len(want))
				}
			}
		}
	}
}

func TestCopy(t *testing.T) {
	defer func(c int) { Chunk = c }(Chunk)
	src := make([]byte, 10000)
	for i := range src {
		src[i] = byte(i * 31)
	}
	for _, chunk := range []int{0, 1, 7, 2048} {
		for _, n := range []int{0, 1, 2047, 2048, 2049, 10000} {
			for _, room := range []int{0, 5, 2049, 20000} {
				Chunk = chunk
				dst := make([]byte, room)
				got := Copy(dst, src[:n])
				want := min(n, room)
				if got != want || !bytes.Equal(dst[:got], src[:want]) {
					t.Fatalf("chunk %d, %d bytes into %d: copied %d, want %d, or they differ", chunk, n, room, got, want)
				}
			}
		}
	}
}

// BenchmarkCopy is the copy this package avoids, against what it does
// instead. Its numbers mean something in a guest under TCG (qemu64, no
// AVX); run it there:
//
//	CGO_ENABLED=0 go test -c -o /tmp/memcopy.test ./internal/agent/memcopy
//	banger cp /tmp/memcopy.test VM:/root/memcopy.test
//	banger exec VM -- /root/memcopy.test -test.run '^$' -test.bench Copy
func BenchmarkCopy(b *testing.B) {
	const n = 1 << 20
	src := make([]byte, n+64)
	dst := make([]byte, n+64)
	for _, off := range []int{0, 5} {
		for _, chunk := range []int{0, 2048} {
			name := map[bool]string{true: "aligned", false: "unaligned"}[off == 0]
			name += map[bool]string{true: "/one-copy", false: "/2KiB-pieces"}[chunk == 0]
			b.Run(name, func(b *testing.B) {
				b.SetBytes(n)
				s := src[off : off+n]
				for b.Loop() {
					d := dst[:n]
					if chunk == 0 {
						copy(d, s)
						continue
					}
					for i := 0; i < n; i += chunk {
						copy(d[i:i+chunk], s[i:i+chunk])
					}
				}
			})
		}
	}
}
