package kernel

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestVmlinux(t *testing.T) {
	raw := fakeELF(100<<10, uint16(elf.EM_X86_64))
	compressors := []struct {
		c    Compression
		pack func(testing.TB, []byte) []byte
	}{
		{CompressionLZ4, lz4LegacyBytes},
		{CompressionGzip, gzipBytes},
		{CompressionXZ, xzBytes},
		{CompressionZstd, zstdBytes},
	}
	type tc struct {
		name string
		img  []byte
		comp Compression
	}
	tests := []tc{{"elf as is", raw, CompressionNone}}
	for _, c := range compressors {
		packed := c.pack(t, raw)
		tests = append(tests,
			tc{string(c.c) + " via header", fakeBzImage(packed, len(raw), true), c.c},
			tc{string(c.c) + " via magic scan", fakeBzImage(packed, len(raw), false), c.c},
		)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, comp, err := Vmlinux(tt.img)
			if err != nil {
				t.Fatalf("Vmlinux: %v", err)
			}
			if comp != tt.comp {
				t.Errorf("compression = %q, want %q", comp, tt.comp)
			}
			if !bytes.Equal(out, raw) {
				t.Fatalf("output differs from the original ELF (%d vs %d bytes)", len(out), len(raw))
			}
			entry, ok, err := PVHEntry(out)
			if err != nil || !ok || entry != 0x1000000 {
				t.Errorf("PVHEntry = %#x, %v, %v; want 0x1000000, true, nil", entry, ok, err)
			}
		})
	}
}

func TestVmlinuxErrors(t *testing.T) {
	arm := fakeELF(1<<10, uint16(elf.EM_AARCH64))
	notELF := bytes.Repeat([]byte("not a kernel "), 1000)
	tests := []struct {
		name    string
		img     []byte
		unknown bool // errors.Is ErrUnknownKernelFormat
	}{
		{"empty", nil, true},
		{"text", notELF, true},
		{"arm64 ELF", arm, false},
		{"bzImage of arm64 ELF", fakeBzImage(gzipBytes(t, arm), len(arm), true), true},
		{"bzImage of non-ELF", fakeBzImage(gzipBytes(t, notELF), len(notELF), true), true},
		{"truncated gzip payload", fakeBzImage(gzipBytes(t, fakeELF(1<<10, uint16(elf.EM_X86_64)))[:100], 1<<10, true), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Vmlinux(tt.img)
			if err == nil {
				t.Fatal("Vmlinux succeeded, want an error")
			}
			if got := errors.Is(err, ErrUnknownKernelFormat); got != tt.unknown {
				t.Errorf("errors.Is(%v, ErrUnknownKernelFormat) = %v, want %v", err, got, tt.unknown)
			}
		})
	}
}

func TestVmlinuxSizeMismatch(t *testing.T) {
	raw := fakeELF(10<<10, uint16(elf.EM_X86_64))
	img := fakeBzImage(gzipBytes(t, raw), len(raw)+1, true) // header claims another size
	_, _, err := Vmlinux(img)
	if err == nil || !strings.Contains(err.Error(), "the image says") {
		t.Fatalf("Vmlinux = %v, want a size mismatch error", err)
	}
	if _, err := decompressPayload(img, mustHeaderPayload(t, img), MaxVmlinuxSize); err == nil {
		t.Fatal("header candidate with a wrong size decoded without error")
	}
}

func mustHeaderPayload(t *testing.T, img []byte) payload {
	t.Helper()
	p, ok := headerPayload(img)
	if !ok {
		t.Fatal("no header payload")
	}
	return p
}

func TestVmlinuxLimit(t *testing.T) {
	raw := fakeELF(200<<10, uint16(elf.EM_X86_64))
	for _, img := range [][]byte{
		fakeBzImage(gzipBytes(t, raw), len(raw), true),
		fakeBzImage(lz4LegacyBytes(t, raw), len(raw), true),
		fakeBzImage(xzBytes(t, raw), len(raw), true),
		fakeBzImage(zstdBytes(t, raw), len(raw), true),
	} {
		if _, _, err := vmlinux(img, 64<<10); err == nil {
			t.Error("decompressing past the limit succeeded")
		}
	}
}

// TestXZWithX86BCJ checks the BCJ decoder against the reference xz tool,
// compressing the way the kernel build does (xz --check=crc32 --x86 --lzma2).
func TestXZWithX86BCJ(t *testing.T) {
	xzTool, err := exec.LookPath("xz")
	if err != nil {
		t.Skipf("xz not installed (Debian package xz-utils): %v", err)
	}
	self, err := os.Executable() // real x86 code, full of CALLs and JMPs
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	raw = raw[:min(len(raw), 1<<20)] // the ELF header and plenty of code
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, xzTool, "--format=xz", "--check=crc32", "--x86", "--lzma2=preset=1,dict=1MiB", "-c")
	cmd.Stdin = bytes.NewReader(raw)
	packed, err := cmd.Output()
	if err != nil {
		t.Fatalf("xz: %v", err)
	}
	out, err := decodeKernelXZ(packed, MaxVmlinuxSize)
	if err != nil {
		t.Fatalf("decodeKernelXZ: %v", err)
	}
	if !bytes.Equal(out, raw) {
		t.Fatalf("BCJ x86 + LZMA2 decode differs from the original (%d vs %d bytes)", len(out), len(raw))
	}
	// And through the bzImage path, which then checks the ELF.
	elfRaw := fakeELF(256<<10, uint16(elf.EM_X86_64))
	cmd = exec.CommandContext(ctx, xzTool, "--format=xz", "--check=crc32", "--x86", "--lzma2=preset=1,dict=1MiB", "-c")
	cmd.Stdin = bytes.NewReader(elfRaw)
	if packed, err = cmd.Output(); err != nil {
		t.Fatalf("xz: %v", err)
	}
	out, comp, err := Vmlinux(fakeBzImage(packed, len(elfRaw), true))
	if err != nil || comp != CompressionXZ || !bytes.Equal(out, elfRaw) {
		t.Fatalf("Vmlinux = %q, %v (equal: %v)", comp, err, bytes.Equal(out, elfRaw))
	}
}

func TestExtractVmlinuxFile(t *testing.T) {
	dir := t.TempDir()
	raw := fakeELF(64<<10, uint16(elf.EM_X86_64))
	src := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(src, fakeBzImage(lz4LegacyBytes(t, raw), len(raw), true), 0o644); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "vmlinux")
	comp, err := ExtractVmlinuxFile(context.Background(), src, dst)
	if err != nil || comp != CompressionLZ4 {
		t.Fatalf("ExtractVmlinuxFile = %q, %v", comp, err)
	}
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("vmlinux on disk differs: %v", err)
	}
	if _, err := ExtractVmlinuxFile(context.Background(), filepath.Join(dir, "missing"), dst); err == nil {
		t.Fatal("missing source: want an error")
	}
}

func TestFindPayloadsBounds(t *testing.T) {
	raw := fakeELF(4<<10, uint16(elf.EM_X86_64))
	img := fakeBzImage(gzipBytes(t, raw), len(raw), true)
	ps := findPayloads(img, maxPayloadAttempts)
	if len(ps) == 0 || !ps[0].Exact || ps[0].Compression != CompressionGzip {
		t.Fatalf("first candidate = %+v, want the exact gzip payload from the header", ps)
	}
	// Many magic hits are capped.
	many := bytes.Repeat([]byte{0x1f, 0x8b, 0x08, 0}, 1000)
	if got := len(findPayloads(many, 5)); got != 5 {
		t.Fatalf("findPayloads capped at 5 returned %d", got)
	}
}

// FuzzVmlinux feeds arbitrary kernel images (untrusted: users import their
// own) to the payload scanner and decompressors: no panics, candidates inside
// the input, bounded output.
func FuzzVmlinux(f *testing.F) {
	raw := fakeELF(2<<10, uint16(elf.EM_X86_64))
	f.Add(raw)
	f.Add(fakeBzImage(gzipBytes(f, raw), len(raw), true))
	f.Add(fakeBzImage(lz4LegacyBytes(f, raw), len(raw), true))
	f.Add(fakeBzImage(xzBytes(f, raw), len(raw), false))
	f.Add(fakeBzImage(zstdBytes(f, raw), len(raw), false))
	f.Add([]byte{0x02, 0x21, 0x4c, 0x18, 0xff, 0xff, 0xff, 0x7f})
	f.Add(append([]byte{}, xzMagic...))
	f.Fuzz(func(t *testing.T, img []byte) {
		const limit = 1 << 20
		for _, p := range findPayloads(img, 8) {
			if p.Offset < 0 || p.Offset >= len(img) || p.End > len(img) || p.End <= p.Offset {
				t.Fatalf("candidate %+v outside input of %d bytes", p, len(img))
			}
		}
		out, _, err := vmlinux(img, limit)
		if err == nil {
			if len(out) > limit && !bytes.Equal(out, img) {
				t.Fatalf("output of %d bytes exceeds the limit", len(out))
			}
			if cerr := checkELF(out); cerr != nil {
				t.Fatalf("accepted output is not a valid ELF: %v", cerr)
			}
		}
		_, _, _ = PVHEntry(img)
	})
}
