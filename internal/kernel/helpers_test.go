package kernel

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
)

// fakeELF builds a small x86-64 executable ELF with a Xen PVH note (entry
// 0x1000000) followed by size bytes of pseudo-random "code" that contains
// plenty of E8/E9 bytes.
func fakeELF(size int, machine uint16) []byte {
	var b bytes.Buffer
	le := binary.LittleEndian
	note := new(bytes.Buffer)
	_ = binary.Write(note, le, []uint32{4, 4, xenElfnotePhys32Entry})
	note.WriteString("Xen\x00")
	_ = binary.Write(note, le, uint32(0x1000000))

	// ELF header
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	_ = binary.Write(&b, le, uint16(2))      // e_type EXEC
	_ = binary.Write(&b, le, machine)        // e_machine
	_ = binary.Write(&b, le, uint32(1))      // e_version
	_ = binary.Write(&b, le, uint64(0x1000)) // e_entry
	_ = binary.Write(&b, le, uint64(64))     // e_phoff
	_ = binary.Write(&b, le, uint64(0))      // e_shoff
	_ = binary.Write(&b, le, uint32(0))      // e_flags
	_ = binary.Write(&b, le, []uint16{64, 56, 1, 64, 0, 0})
	// one PT_NOTE program header
	_ = binary.Write(&b, le, []uint32{4, 4})
	_ = binary.Write(&b, le, []uint64{120, 0, 0, uint64(note.Len()), uint64(note.Len()), 4})
	b.Write(note.Bytes())

	r := rand.New(rand.NewPCG(1, 2))
	code := make([]byte, size)
	for i := range code {
		switch r.IntN(8) {
		case 0:
			code[i] = 0xe8
		case 1:
			code[i] = 0x00
		case 2:
			code[i] = 0xff
		default:
			code[i] = byte(r.IntN(16)) // compressible
		}
	}
	b.Write(code)
	return b.Bytes()
}

func gzipBytes(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func lz4LegacyBytes(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw := lz4.NewWriter(&buf)
	if err := zw.Apply(lz4.LegacyOption(true)); err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func xzBytes(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw, err := xz.WriterConfig{CheckSum: xz.CRC32}.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zstdBytes(t testing.TB, b []byte) []byte {
	zw, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer zw.Close()
	return zw.EncodeAll(b, nil)
}

// fakeBzImage wraps a compressed payload the way arch/x86/boot does: a boot
// sector and setup header ("HdrS", protocol 2.15, payload_offset/length),
// then the payload followed by the le32 decompressed size, then trailing
// bytes that are not part of the payload.
func fakeBzImage(compressed []byte, rawSize int, withHeader bool) []byte {
	const setupSects = 3
	start := (setupSects + 1) * 512
	payloadOff := 0x200 // inside the protected-mode part
	img := make([]byte, start+payloadOff)
	img[0], img[1] = 'M', 'Z'
	if withHeader {
		img[0x1f1] = setupSects
		copy(img[0x202:], "HdrS")
		binary.LittleEndian.PutUint16(img[0x206:], 0x020f)
		binary.LittleEndian.PutUint32(img[0x248:], uint32(payloadOff))
		binary.LittleEndian.PutUint32(img[0x24c:], uint32(len(compressed)+4))
	}
	img = append(img, compressed...)
	img = binary.LittleEndian.AppendUint32(img, uint32(rawSize))
	img = append(img, bytes.Repeat([]byte{0xcc, 0x02, 0x21}, 100)...) // trailing junk
	return img
}
