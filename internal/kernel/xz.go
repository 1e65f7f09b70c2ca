package kernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/ulikunitz/xz/lzma"
)

// The Linux build compresses an x86 kernel with "xz --check=crc32 --x86
// --lzma2=...": an xz stream whose only block uses the x86 BCJ filter in front
// of LZMA2. github.com/ulikunitz/xz implements LZMA2 but no BCJ filters, so this
// file parses the (small) xz container itself, lets the lzma package decode the
// LZMA2 data and undoes the x86 BCJ transform afterwards.

var xzMagic = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}

const (
	xzFilterX86   = 0x04
	xzFilterLZMA2 = 0x21
	// maxXZDict bounds the LZMA2 dictionary we agree to allocate. The kernel
	// uses 32 MiB at most.
	maxXZDict = 256 << 20
)

// decodeKernelXZ decodes the first block of the xz stream at the start of data
// (trailing bytes after the block are ignored), producing at most limit bytes.
func decodeKernelXZ(data []byte, limit int) ([]byte, error) {
	if len(data) < 12 || !bytes.HasPrefix(data, xzMagic) {
		return nil, errors.New("xz: no stream header")
	}
	if crc32.ChecksumIEEE(data[6:8]) != binary.LittleEndian.Uint32(data[8:12]) {
		return nil, errors.New("xz: stream header checksum mismatch")
	}
	if data[6] != 0 || data[7]&0xf0 != 0 {
		return nil, errors.New("xz: unsupported stream flags")
	}
	p := 12
	if p >= len(data) {
		return nil, errors.New("xz: truncated stream")
	}
	if data[p] == 0 {
		return nil, errors.New("xz: stream holds no data")
	}
	hsize := (int(data[p]) + 1) * 4
	if len(data)-p < hsize {
		return nil, errors.New("xz: truncated block header")
	}
	hdr := data[p : p+hsize]
	if crc32.ChecksumIEEE(hdr[:hsize-4]) != binary.LittleEndian.Uint32(hdr[hsize-4:]) {
		return nil, errors.New("xz: block header checksum mismatch")
	}
	flags := hdr[1]
	if flags&0x3c != 0 {
		return nil, errors.New("xz: reserved block flags set")
	}
	r := &varintReader{b: hdr[2 : hsize-4]}
	if flags&0x40 != 0 {
		if _, err := r.varint(); err != nil {
			return nil, err
		}
	}
	uncompressed := int64(-1)
	if flags&0x80 != 0 {
		v, err := r.varint()
		if err != nil {
			return nil, err
		}
		uncompressed = int64(min(v, 1<<62))
	}
	nfilters := int(flags&3) + 1
	var (
		x86       bool
		x86Start  uint32
		dictCap   int64
		sawLZMA2  bool
		filterErr = errors.New("xz: unsupported filter chain (banger decodes x86 BCJ + LZMA2 or LZMA2 alone)")
	)
	for i := 0; i < nfilters; i++ {
		id, err := r.varint()
		if err != nil {
			return nil, err
		}
		psize, err := r.varint()
		if err != nil {
			return nil, err
		}
		if psize > uint64(len(r.b)-r.off) {
			return nil, errors.New("xz: truncated filter properties")
		}
		props := r.b[r.off : r.off+int(psize)]
		r.off += int(psize)
		last := i == nfilters-1
		switch {
		case id == xzFilterX86 && !last && i == 0:
			x86 = true
			switch len(props) {
			case 0:
			case 4:
				x86Start = binary.LittleEndian.Uint32(props)
			default:
				return nil, errors.New("xz: bad x86 filter properties")
			}
		case id == xzFilterLZMA2 && last:
			if len(props) != 1 {
				return nil, errors.New("xz: bad LZMA2 filter properties")
			}
			dc, err := lzma.DecodeDictCap(props[0])
			if err != nil {
				return nil, fmt.Errorf("xz: %w", err)
			}
			if dc > maxXZDict {
				return nil, fmt.Errorf("xz: LZMA2 dictionary of %d bytes is too large", dc)
			}
			dictCap = dc
			sawLZMA2 = true
		default:
			return nil, filterErr
		}
	}
	if !sawLZMA2 {
		return nil, filterErr
	}
	for _, b := range r.b[r.off:] {
		if b != 0 {
			return nil, errors.New("xz: non-zero block header padding")
		}
	}
	// Matches never reach further back than the output produced, so a
	// dictionary larger than the output limit is never needed.
	dictCap = min(dictCap, int64(limit))
	dr, err := lzma.Reader2Config{DictCap: int(max(dictCap, lzma.MinDictCap))}.NewReader2(bytes.NewReader(data[p+hsize:]))
	if err != nil {
		return nil, fmt.Errorf("xz: %w", err)
	}
	out, err := readAllLimit(dr, limit)
	if err != nil {
		return nil, fmt.Errorf("xz: %w", err)
	}
	if uncompressed >= 0 && int64(len(out)) != uncompressed {
		return nil, fmt.Errorf("xz: block decoded to %d bytes, header says %d", len(out), uncompressed)
	}
	if x86 {
		bcjX86Decode(out, x86Start)
	}
	return out, nil
}

type varintReader struct {
	b   []byte
	off int
}

// varint reads an xz multibyte integer (7 bits per byte, little endian, at most 9 bytes).
func (r *varintReader) varint() (uint64, error) {
	var v uint64
	for i := 0; i < 9; i++ {
		if r.off >= len(r.b) {
			return 0, errors.New("xz: truncated block header field")
		}
		c := r.b[r.off]
		r.off++
		v |= uint64(c&0x7f) << (7 * i)
		if c&0x80 == 0 {
			if i > 0 && c == 0 {
				return 0, errors.New("xz: malformed integer in block header")
			}
			return v, nil
		}
	}
	return 0, errors.New("xz: integer in block header too long")
}

// bcjX86Decode undoes the x86 branch/call/jump filter in place on a whole
// buffer (the algorithm of XZ Embedded, which is what the kernel's own
// decompressor runs): the encoder turned the relative targets of E8 (CALL) and
// E9 (JMP) instructions into absolute ones so that they compress better; this
// turns them back. The final four bytes are never converted.
func bcjX86Decode(buf []byte, startPos uint32) {
	allowed := [8]bool{true, true, true, false, true, false, false, false}
	bitNum := [8]uint32{0, 1, 2, 2, 3, 3, 3, 3}
	msByte := func(b byte) bool { return b == 0x00 || b == 0xff }

	if len(buf) <= 4 {
		return
	}
	end := len(buf) - 4
	prevPos := -1
	var mask uint32
	for i := 0; i < end; i++ {
		if buf[i]&0xfe != 0xe8 {
			continue
		}
		dist := i - prevPos
		if dist > 3 {
			mask = 0
		} else {
			mask = (mask << uint(dist-1)) & 7
			if mask != 0 && (!allowed[mask] || msByte(buf[i+4-int(bitNum[mask])])) {
				prevPos = i
				mask = mask<<1 | 1
				continue
			}
		}
		prevPos = i
		if !msByte(buf[i+4]) {
			mask = mask<<1 | 1
			continue
		}
		src := binary.LittleEndian.Uint32(buf[i+1:])
		var dest uint32
		for {
			dest = src - (startPos + uint32(i) + 5)
			if mask == 0 {
				break
			}
			j := bitNum[mask] * 8
			if !msByte(byte(dest >> (24 - j))) {
				break
			}
			src = dest ^ (1<<(32-j) - 1)
		}
		dest &= 0x01ffffff
		dest |= -(dest & 0x01000000)
		binary.LittleEndian.PutUint32(buf[i+1:], dest)
		i += 4
	}
}
