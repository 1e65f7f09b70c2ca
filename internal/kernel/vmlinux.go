package kernel

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
)

// Compression names how a bzImage's payload is compressed.
type Compression string

// Payload compressions Vmlinux understands. CompressionNone means the input
// already was an ELF vmlinux.
const (
	CompressionNone Compression = ""
	CompressionLZ4  Compression = "lz4" // LZ4 legacy frame, what Debian uses
	CompressionGzip Compression = "gzip"
	CompressionXZ   Compression = "xz"
	CompressionZstd Compression = "zstd"
)

// MaxVmlinuxSize bounds the size of a decompressed kernel (a defence against
// decompression bombs; real ones are 30-100 MB).
const MaxVmlinuxSize = 512 << 20

// maxPayloadAttempts bounds how many magic-number hits Vmlinux tries to
// decompress when the bzImage header does not locate the payload.
const maxPayloadAttempts = 32

// ErrUnknownKernelFormat is returned for files that are neither an x86-64 ELF
// vmlinux nor a bzImage with a payload banger can decompress.
var ErrUnknownKernelFormat = errors.New("not an x86-64 ELF vmlinux, nor a bzImage with an lz4, gzip, xz or zstd payload")

var payloadMagics = []struct {
	c     Compression
	magic []byte
}{
	{CompressionLZ4, []byte{0x02, 0x21, 0x4c, 0x18}},
	{CompressionGzip, []byte{0x1f, 0x8b, 0x08}},
	{CompressionXZ, xzMagic},
	{CompressionZstd, []byte{0x28, 0xb5, 0x2f, 0xfd}},
}

// payload is a place in a kernel image where a compressed kernel may start.
type payload struct {
	Offset      int
	End         int  // exclusive; len(img) when unknown
	Exact       bool // bounds come from the bzImage header: the last 4 bytes are the decompressed size
	Compression Compression
}

// ExtractVmlinuxFile reads the kernel image at src (an ELF vmlinux or a
// bzImage) and writes the uncompressed ELF vmlinux to dst atomically. It
// returns the compression the payload had (CompressionNone for an ELF input).
func ExtractVmlinuxFile(ctx context.Context, src, dst string) (Compression, error) {
	st, err := os.Stat(src)
	if err != nil {
		return "", fmt.Errorf("read kernel image: %w", err)
	}
	if !st.Mode().IsRegular() || st.Size() > MaxVmlinuxSize {
		return "", fmt.Errorf("kernel image %s: %w (not a regular file of at most %d bytes)", src, ErrUnknownKernelFormat, MaxVmlinuxSize)
	}
	img, err := os.ReadFile(src)
	if err != nil {
		return "", fmt.Errorf("read kernel image: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	out, comp, err := Vmlinux(img)
	if err != nil {
		return "", fmt.Errorf("kernel image %s: %w", src, err)
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if err := writeFileAtomic(dst, out, 0o644); err != nil {
		return "", fmt.Errorf("write vmlinux: %w", err)
	}
	return comp, nil
}

// Vmlinux returns the uncompressed x86-64 ELF kernel for img. An ELF is
// returned as is (after checking it is an x86-64 executable); for a bzImage the
// compressed payload is located (from the boot header, else by scanning for
// the magic numbers of LZ4 legacy frames, gzip, xz and zstd streams),
// decompressed and checked to be an x86-64 ELF.
func Vmlinux(img []byte) ([]byte, Compression, error) {
	return vmlinux(img, MaxVmlinuxSize)
}

func vmlinux(img []byte, limit int) ([]byte, Compression, error) {
	if bytes.HasPrefix(img, []byte(elf.ELFMAG)) {
		if err := checkELF(img); err != nil {
			return nil, "", err
		}
		return img, CompressionNone, nil
	}
	cands := findPayloads(img, maxPayloadAttempts)
	if len(cands) == 0 {
		return nil, "", ErrUnknownKernelFormat
	}
	var firstErr error
	for _, p := range cands {
		out, err := decompressPayload(img, p, limit)
		if err == nil {
			err = checkELF(out)
		}
		if err == nil {
			return out, p.Compression, nil
		}
		if firstErr == nil {
			firstErr = fmt.Errorf("%s payload at offset %d: %w", p.Compression, p.Offset, err)
		}
	}
	return nil, "", fmt.Errorf("%w (%v)", ErrUnknownKernelFormat, firstErr)
}

// findPayloads lists where a compressed kernel may start in img, the one the
// bzImage header names first, then magic-number hits in file order; at most max.
func findPayloads(img []byte, max int) []payload {
	var out []payload
	if p, ok := headerPayload(img); ok {
		out = append(out, p)
	}
	var hits []payload
	for _, m := range payloadMagics {
		for off := 0; off < len(img); {
			i := bytes.Index(img[off:], m.magic)
			if i < 0 {
				break
			}
			hits = append(hits, payload{Offset: off + i, End: len(img), Compression: m.c})
			off += i + 1
			if len(hits) >= max*len(payloadMagics) {
				break
			}
		}
	}
	sort.SliceStable(hits, func(i, j int) bool { return hits[i].Offset < hits[j].Offset })
	for _, h := range hits {
		if len(out) >= max {
			break
		}
		if len(out) > 0 && out[0].Offset == h.Offset && out[0].Compression == h.Compression {
			continue // already tried with exact bounds
		}
		out = append(out, h)
	}
	return out
}

// headerPayload reads payload_offset/payload_length from an x86 boot
// protocol (>= 2.08) header.
func headerPayload(img []byte) (payload, bool) {
	const (
		setupSectsOff = 0x1f1
		magicOff      = 0x202
		versionOff    = 0x206
		payloadOff    = 0x248
	)
	if len(img) < payloadOff+8 || string(img[magicOff:magicOff+4]) != "HdrS" {
		return payload{}, false
	}
	if binary.LittleEndian.Uint16(img[versionOff:]) < 0x208 {
		return payload{}, false
	}
	setupSects := int(img[setupSectsOff])
	if setupSects == 0 {
		setupSects = 4
	}
	start := int64(setupSects+1) * 512
	off := start + int64(binary.LittleEndian.Uint32(img[payloadOff:]))
	end := off + int64(binary.LittleEndian.Uint32(img[payloadOff+4:]))
	if end > int64(len(img)) || end-off < 8 {
		return payload{}, false
	}
	for _, m := range payloadMagics {
		if bytes.HasPrefix(img[off:end], m.magic) {
			return payload{Offset: int(off), End: int(end), Exact: true, Compression: m.c}, true
		}
	}
	return payload{}, false
}

// decompressPayload decompresses one candidate, producing at most limit bytes.
func decompressPayload(img []byte, p payload, limit int) ([]byte, error) {
	data := img[p.Offset:p.End]
	var wantSize int64 = -1
	if p.Exact {
		// The kernel build appends the decompressed size (le32) to every payload.
		wantSize = int64(binary.LittleEndian.Uint32(data[len(data)-4:]))
		data = data[:len(data)-4]
	}
	var (
		out []byte
		err error
	)
	switch p.Compression {
	case CompressionLZ4:
		out, err = decodeKernelLZ4(data, p.Exact, limit)
	case CompressionGzip:
		var zr *gzip.Reader
		if zr, err = gzip.NewReader(bytes.NewReader(data)); err == nil {
			zr.Multistream(false)
			out, err = readAllLimit(zr, limit)
		}
	case CompressionXZ:
		out, err = decodeKernelXZ(data, limit)
	case CompressionZstd:
		var zr *zstd.Decoder
		zr, err = zstd.NewReader(bytes.NewReader(data), zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(limit)))
		if err == nil {
			out, err = readAllLimit(zr, limit)
			zr.Close()
			// Without exact bounds whatever follows the frame is not another
			// frame; the frame itself was complete and checksummed.
			if err != nil && !p.Exact && len(out) > 0 && errors.Is(err, zstd.ErrMagicMismatch) {
				err = nil
			}
		}
	default:
		err = fmt.Errorf("unknown compression %q", p.Compression)
	}
	if err != nil {
		return nil, err
	}
	if wantSize >= 0 && int64(len(out)) != wantSize {
		return nil, fmt.Errorf("decompressed to %d bytes, the image says %d", len(out), wantSize)
	}
	return out, nil
}

// decodeKernelLZ4 decodes the LZ4 legacy frame the kernel build makes
// ("lz4 -l"): magic, then blocks of [le32 compressed size][data], each
// decompressing to at most 8 MiB, then the le32 total decompressed size. With
// exact bounds the stream ends with data; otherwise it ends where a block
// size equals the total decompressed so far (the appended size), at a zero
// size, or where the data runs out.
func decodeKernelLZ4(data []byte, exact bool, limit int) ([]byte, error) {
	const (
		legacyBlock = 8 << 20
		maxBlock    = legacyBlock + legacyBlock/255 + 16 // LZ4_compressBound
		legacyMagic = 0x184c2102
	)
	if len(data) < 4 || binary.LittleEndian.Uint32(data) != legacyMagic {
		return nil, errors.New("lz4: not a legacy frame")
	}
	var out []byte
	block := make([]byte, min(legacyBlock, limit))
	p := 4
	for {
		if len(data)-p < 4 {
			if exact && p != len(data) {
				return nil, errors.New("lz4: truncated block header")
			}
			break
		}
		n := binary.LittleEndian.Uint32(data[p:])
		if n == legacyMagic { // concatenated frame
			p += 4
			continue
		}
		if !exact && (n == 0 || uint64(n) == uint64(len(out))) {
			break
		}
		if n == 0 || n > maxBlock {
			return nil, fmt.Errorf("lz4: bad block size %d", n)
		}
		p += 4
		if uint64(len(data)-p) < uint64(n) {
			return nil, errors.New("lz4: truncated block")
		}
		k, err := lz4.UncompressBlock(data[p:p+int(n)], block)
		if err != nil {
			return nil, fmt.Errorf("lz4: %w", err)
		}
		p += int(n)
		if len(out)+k > limit {
			return nil, fmt.Errorf("decompressed kernel is larger than %d bytes", limit)
		}
		out = append(out, block[:k]...)
	}
	if len(out) == 0 {
		return nil, errors.New("lz4: empty stream")
	}
	return out, nil
}

// readAllLimit reads r to the end, failing if it yields more than limit bytes.
func readAllLimit(r io.Reader, limit int) ([]byte, error) {
	var buf bytes.Buffer
	n, err := buf.ReadFrom(io.LimitReader(r, int64(limit)+1))
	if err != nil {
		return buf.Bytes(), err
	}
	if n > int64(limit) {
		return nil, fmt.Errorf("decompressed kernel is larger than %d bytes", limit)
	}
	return buf.Bytes(), nil
}

// checkELF verifies b is a 64-bit little-endian x86-64 executable ELF.
func checkELF(b []byte) error {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("not a valid ELF file: %w", err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB || f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("ELF kernel is %v %v %v, banger needs x86-64", f.Class, f.Data, f.Machine)
	}
	if f.Type != elf.ET_EXEC {
		return fmt.Errorf("ELF kernel has type %v, want an executable", f.Type)
	}
	return nil
}

// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY, the note that marks a
// kernel with a PVH entry point (what QEMU's microvm and Firecracker may use).
const xenElfnotePhys32Entry = 18

// PVHEntry reports the 32-bit PVH entry point of an ELF vmlinux, from its Xen
// ELF note; ok is false when the kernel has none.
func PVHEntry(vmlinux []byte) (entry uint32, ok bool, err error) {
	f, err := elf.NewFile(bytes.NewReader(vmlinux))
	if err != nil {
		return 0, false, fmt.Errorf("not a valid ELF file: %w", err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(io.LimitReader(prog.Open(), 1<<20))
		if err != nil {
			return 0, false, fmt.Errorf("read ELF notes: %w", err)
		}
		for len(notes) >= 12 {
			namesz := binary.LittleEndian.Uint32(notes[0:])
			descsz := binary.LittleEndian.Uint32(notes[4:])
			typ := binary.LittleEndian.Uint32(notes[8:])
			nameEnd := 12 + uint64(align4(namesz))
			descEnd := nameEnd + uint64(align4(descsz))
			if descEnd > uint64(len(notes)) {
				break
			}
			name := string(bytes.TrimRight(notes[12:12+uint64(namesz)], "\x00"))
			desc := notes[nameEnd : nameEnd+uint64(descsz)]
			if name == "Xen" && typ == xenElfnotePhys32Entry && len(desc) >= 4 {
				return binary.LittleEndian.Uint32(desc), true, nil
			}
			notes = notes[descEnd:]
		}
	}
	return 0, false, nil
}

func align4(n uint32) uint64 { return (uint64(n) + 3) &^ 3 }
