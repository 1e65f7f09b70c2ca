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
