package bulk

import (
	"crypto/sha1"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// The byte layout of a banger pack (CapPack), in one place: the agent
// writes these bytes (PackHeader, then each PackEntry's pieces, then the
// checksum the host names), and the host feeds the very same pieces to the
// pack's checksum and each entry's CRC-32 and builds the index from them
// (PackIndex), so neither end computes anything the other could lay out
// differently. The guest hashes nothing.
//
// A pack is git's version 2: "PACK", version 2, the object count (all
// big-endian uint32), the entries, then the hash (SHA-1 or SHA-256, the
// repository's) of all that. An entry is an object's type and inflated size
// (git's varint: type in bits 4-6 of the first byte, size in 4 bits then 7
// per byte, the high bit saying more follows), then a zlib stream of stored
// (uncompressed) deflate blocks of the object's content: 0x78 0x01, blocks
// of at most 65535 bytes each behind a 5-byte header (final flag, LEN and
// ^LEN little-endian; an empty object is one empty final block), then the
// Adler-32 of the content, big-endian. Stored blocks cost no CPU to make:
// under TCG the guest's vCPU is the push's bottleneck.

// Git object types as a pack entry names them.
const (
	ObjCommit = 1
	ObjTree   = 2
	ObjBlob   = 3
	ObjTag    = 4
)

// PackHeader is the first 12 bytes of a pack of n objects.
func PackHeader(n uint32) []byte {
	b := []byte{'P', 'A', 'C', 'K', 0, 0, 0, 2, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[8:], n)
	return b
}

// maxStored is the most data a stored deflate block holds.
const maxStored = 65535

// PackEntry lays out one entry of a pack. Begin, then Data for every byte
// of the content in order (any split), then End; each appends to iov the
// pieces to write, in order: its own headers and the caller's data slices
// (not copied). The pieces it made itself are valid until the next call
// that starts a new batch (Reset), so write or hash them first.
type PackEntry struct {
	left  uint64 // content bytes not yet laid out
	block uint64 // bytes left in the current stored block
	hdrs  []byte
	begun bool
}

// Reset drops the pieces made so far (after they were written).
func (e *PackEntry) Reset() { e.hdrs = e.hdrs[:0] }

// piece appends b to e.hdrs (which never grows past its capacity between
// Resets: earlier pieces stay valid) and returns it.
func (e *PackEntry) piece(b ...byte) []byte {
	if cap(e.hdrs)-len(e.hdrs) < len(b) {
		// a new array: earlier pieces keep the old one
		e.hdrs = make([]byte, 0, max(4096, 2*len(b)))
	}
	at := len(e.hdrs)
	e.hdrs = append(e.hdrs, b...)
	return e.hdrs[at:len(e.hdrs):len(e.hdrs)]
}

// Begin starts an entry of type typ (ObjBlob, ...) with size content bytes.
func (e *PackEntry) Begin(iov [][]byte, typ byte, size uint64) [][]byte {
	var h [12]byte
	n := 0
	c := typ<<4 | byte(size&15)
	s := size >> 4
	for s != 0 {
		h[n] = c | 0x80
		n++
		c = byte(s & 0x7f)
		s >>= 7
	}
	h[n] = c
	n++
	h[n], h[n+1] = 0x78, 0x01
	n += 2
	e.left, e.block, e.begun = size, 0, true
	iov = append(iov, e.piece(h[:n]...))
	if size == 0 {
		iov = append(iov, e.piece(1, 0, 0, 0xff, 0xff))
	}
	return iov
}

// Data lays out d, the next content bytes, with a block header wherever a
// stored block starts.
func (e *PackEntry) Data(iov [][]byte, d []byte) [][]byte {
	for len(d) > 0 {
		var k int
		if iov, k = e.Next(iov, len(d)); k == 0 {
			break // more data than announced: End reports it
		}
		iov = append(iov, d[:k])
		d = d[k:]
	}
	if len(d) > 0 {
		e.left = ^uint64(0) // poisoned
	}
	return iov
}

// Next lays out the header of a stored block if one starts at the next
// content byte, and returns how many of the next n content bytes go before
// the next header (0: none, more content than Begin announced); the caller
// places that many bytes after iov's pieces itself (Data appends them; the
// agent reads them from the stream into place).
func (e *PackEntry) Next(iov [][]byte, n int) ([][]byte, int) {
	if n <= 0 || e.left == 0 {
		return iov, 0
	}
	if e.block == 0 {
		b := min(e.left, maxStored)
		var final byte
		if e.left <= maxStored {
			final = 1
		}
		iov = append(iov, e.piece(final, byte(b), byte(b>>8), ^byte(b), ^byte(b>>8)))
		e.block = b
	}
	k := min(uint64(n), e.block, e.left)
	e.block -= k
	e.left -= k
	return iov, int(k)
}

// End finishes the entry with adler, the Adler-32 of its content; it fails
// if the content laid out was not exactly the size Begin announced.
func (e *PackEntry) End(iov [][]byte, adler uint32) ([][]byte, error) {
	if !e.begun || e.left != 0 {
		return iov, errors.New("pack entry: content does not match its announced size")
	}
	e.begun = false
	return append(iov, e.piece(byte(adler>>24), byte(adler>>16), byte(adler>>8), byte(adler))), nil
}

// PackIndexEntry is what a pack's index records of one object.
type PackIndexEntry struct {
	ID     []byte // raw object id
	CRC    uint32 // CRC-32 (IEEE) of the entry's bytes in the pack
	Offset uint64 // of the entry in the pack
}

// PackIndex returns the version 2 index of a pack whose checksum is
// packSum, with hash newHash (the repository's): magic, version, the
// 256-entry fanout, the sorted ids, their CRC-32s, their offsets (31 bits,
// or the high bit and an index into a table of 64-bit offsets), packSum,
// and the hash of all that. Ids must be distinct.
func PackIndex(entries []PackIndexEntry, packSum []byte, newHash func() hash.Hash) ([]byte, error) {
	es := slices.Clone(entries)
	slices.SortFunc(es, func(a, b PackIndexEntry) int { return strings.Compare(string(a.ID), string(b.ID)) })
	hl := len(packSum)
	b := make([]byte, 0, 8+1024+len(es)*(hl+8)+2*hl)
	b = append(b, 0xff, 't', 'O', 'c', 0, 0, 0, 2)
	var fan [256]uint32
	for i, e := range es {
		if len(e.ID) != hl {
			return nil, fmt.Errorf("pack index: id of %d bytes in a pack hashed with %d", len(e.ID), hl)
		}
		if i > 0 && string(es[i-1].ID) == string(e.ID) {
			return nil, fmt.Errorf("pack index: object %x twice", e.ID)
		}
		fan[e.ID[0]]++
	}
	var sum uint32
	for _, n := range fan {
		sum += n
		b = binary.BigEndian.AppendUint32(b, sum)
	}
	for _, e := range es {
		b = append(b, e.ID...)
	}
	for _, e := range es {
		b = binary.BigEndian.AppendUint32(b, e.CRC)
	}
	var large []uint64
	for _, e := range es {
		if e.Offset < 1<<31 {
			b = binary.BigEndian.AppendUint32(b, uint32(e.Offset))
			continue
		}
		b = binary.BigEndian.AppendUint32(b, 1<<31|uint32(len(large)))
		large = append(large, e.Offset)
	}
	for _, o := range large {
		b = binary.BigEndian.AppendUint64(b, o)
	}
	b = append(b, packSum...)
	h := newHash()
	h.Write(b)
	return h.Sum(b), nil
}

// HashFor returns the object hash of ids of hexLen hex digits (SHA-1 or
// SHA-256).
func HashFor(hexLen int) (func() hash.Hash, error) {
	switch hexLen {
	case 40:
		return sha1.New, nil
	case 64:
		return sha256.New, nil
	}
	return nil, fmt.Errorf("object ids of %d hex digits", hexLen)
}

// PackBaseName reports whether s is a pack's base name, pack-<hex> (SHA-1
// or SHA-256), and returns the hex.
func PackBaseName(s string) (string, bool) {
	h, ok := strings.CutPrefix(s, "pack-")
	if !ok || (len(h) != 40 && len(h) != 64) || !isHexName(h) {
		return "", false
	}
	return h, true
}

// maxIndexBytes bounds an index a reader reads (64 MiB: about 2 million
// SHA-1 objects).
const maxIndexBytes = 64 << 20

// packIDs returns the hex ids in the version 2 pack index at p, opened
// without following a link, bounded by maxIndexBytes; hexLen is the ids'
// length (from the pack's name). The index is the guest's file: it is
// checked, not trusted (the guest may have rewritten it).
func packIDs(p string, hexLen int) ([]string, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxIndexBytes || fi.Size() < 8+1024 {
		return nil, fmt.Errorf("%s: not a pack index of a size read here", p)
	}
	b := make([]byte, fi.Size())
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, err
	}
	if string(b[:8]) != "\xfftOc\x00\x00\x00\x02" {
		return nil, fmt.Errorf("%s: not a version 2 pack index", p)
	}
	hl := hexLen / 2
	n := int(binary.BigEndian.Uint32(b[8+1020:]))
	if n < 0 || 8+1024+n*hl > len(b) {
		return nil, fmt.Errorf("%s: truncated pack index", p)
	}
	ids := make([]string, n)
	for i := range ids {
		ids[i] = hex.EncodeToString(b[8+1024+i*hl : 8+1024+(i+1)*hl])
	}
	return ids, nil
}

// PackSummer follows a pack's bytes as they are laid out (the host's side:
// it sends the content, the agent writes the pieces) and computes what the
// guest does not: the pack's checksum, each entry's CRC-32 and offset, and
// the index.
type PackSummer struct {
	newHash func() hash.Hash
	h       hash.Hash
	off     uint64
	crc     uint32
	count   uint32
	start   uint64
	saved   []byte // the hash's state at the entry's start
	entries []PackIndexEntry
}

// NewPackSummer starts a pack of n objects hashed with newHash.
func NewPackSummer(newHash func() hash.Hash, n uint32) *PackSummer {
	s := &PackSummer{newHash: newHash, h: newHash(), count: n}
	hd := PackHeader(n)
	s.h.Write(hd)
	s.off = uint64(len(hd))
	return s
}

// BeginEntry marks the start of an entry (before its pieces are added).
func (s *PackSummer) BeginEntry() error {
	m, ok := s.h.(encoding.BinaryMarshaler)
	if !ok {
		return errors.New("pack hash cannot save its state")
	}
	st, err := m.MarshalBinary()
	if err != nil {
		return err
	}
	s.saved, s.start, s.crc = st, s.off, 0
	return nil
}

// Add follows pieces of the current entry.
func (s *PackSummer) Add(iov [][]byte) {
	for _, b := range iov {
		s.h.Write(b)
		s.crc = crc32.Update(s.crc, crc32.IEEETable, b)
		s.off += uint64(len(b))
	}
}

// EndEntry records the entry as the object id.
func (s *PackSummer) EndEntry(id []byte) {
	s.entries = append(s.entries, PackIndexEntry{ID: slices.Clone(id), CRC: s.crc, Offset: s.start})
}

// DropEntry forgets the current entry's bytes (the agent truncates them).
func (s *PackSummer) DropEntry() error {
	u, ok := s.h.(encoding.BinaryUnmarshaler)
	if !ok || s.saved == nil {
		return errors.New("pack hash cannot restore its state")
	}
	if err := u.UnmarshalBinary(s.saved); err != nil {
		return err
	}
	s.off = s.start
	return nil
}

// Finish returns the pack's checksum (its trailer and its name) and index.
func (s *PackSummer) Finish() (sum, idx []byte, err error) {
	if uint32(len(s.entries)) != s.count {
		return nil, nil, fmt.Errorf("pack of %d objects has %d", s.count, len(s.entries))
	}
	sum = s.h.Sum(nil)
	idx, err = PackIndex(s.entries, sum, s.newHash)
	return sum, idx, err
}
