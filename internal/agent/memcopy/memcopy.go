// Package memcopy keeps the agent's bulk copies off a slow path of Go's
// memmove under emulation.
//
// Go's memmove (go1.26, amd64) copies more than 2 KiB with REP MOVSB unless
// the source and the destination are both 8-byte aligned, on a CPU without
// AVX. QEMU's default TCG CPU model (qemu64) has no AVX, and TCG runs REP
// MOVSB a byte at a time: in a guest here such a copy of 1 MiB ran at
// ~0.3-0.5 GiB/s, against ~2 GiB/s for the same bytes in copies of up to
// 2 KiB (SSE moves, any alignment) and ~2.5-4 GiB/s aligned. The agent's
// streams rarely are aligned: a bulk frame's payload follows a 5-byte
// header, a yamux frame's body a 12-byte one. With AVX (KVM guests run
// with -cpu host) memmove is fast at any alignment and nothing is split.
package memcopy

import "golang.org/x/sys/cpu"

// Chunk bounds one copy on the agent's bulk paths (0: no bound).
var Chunk = chunkFor(cpu.X86.HasAVX)

func chunkFor(avx bool) int {
	if avx {
		return 0
	}
	return 2048
}

// Append appends src to dst like append, in copies of at most Chunk bytes.
func Append(dst, src []byte) []byte {
	if Chunk <= 0 || len(src) <= Chunk {
		return append(dst, src...)
	}
	dst = grow(dst, len(src))
	for len(src) > 0 {
		k := min(len(src), Chunk)
		dst = append(dst, src[:k]...)
		src = src[k:]
	}
	return dst
}

// grow makes room for n more bytes at the end of b (one allocation, and one
// aligned copy of what b holds, instead of several as the pieces go in).
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b
	}
	nb := make([]byte, len(b), max(2*cap(b), len(b)+n))
	copy(nb, b)
	return nb
}

// Copy is copy(dst, src) in copies of at most Chunk bytes.
func Copy(dst, src []byte) int {
	if Chunk <= 0 || len(src) <= Chunk || len(dst) <= Chunk {
		return copy(dst, src)
	}
	n := 0
	for n < len(dst) && n < len(src) {
		n += copy(dst[n:min(n+Chunk, len(dst))], src[n:])
	}
	return n
}
