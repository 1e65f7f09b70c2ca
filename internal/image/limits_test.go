package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func applyLayers(t *testing.T, lim Limits, free int64, layers ...[]byte) (*Tree, error) {
	t.Helper()
	tr, err := NewTree(filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	tr.Limits = lim
	if free > 0 {
		tr.freeSpace = func(string) (int64, error) { return free, nil }
	}
	for _, l := range layers {
		if err := tr.ApplyLayer(bytes.NewReader(l)); err != nil {
			return tr, err
		}
	}
	return tr, nil
}

func fifos(t *testing.T, prefix string, n int) []byte {
	var es []entry
	for i := 0; i < n; i++ {
		es = append(es, entry{name: fmt.Sprintf("%s%d", prefix, i), typ: tar.TypeFifo})
	}
	return layerTar(t, es...)
}

func TestMaxEntries(t *testing.T) {
	lim := Limits{MaxEntries: 10}
	cases := []struct {
		name   string
		layers [][]byte
		ok     bool
	}{
		{"at the limit", [][]byte{fifos(t, "f", 10)}, true},
		{"one more", [][]byte{fifos(t, "f", 11)}, false},
		{"across layers", [][]byte{fifos(t, "a", 6), fifos(t, "b", 5)}, false},
		// One entry implying ten directories counts eleven.
		{"implied directories", [][]byte{layerTar(t, entry{name: strings.Repeat("d/", 10) + "f", typ: tar.TypeFifo})}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := applyLayers(t, lim, 0, c.layers...)
			if c.ok && err != nil {
				t.Fatal(err)
			}
			if !c.ok && (!errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "more than 10 entries")) {
				t.Fatalf("got %v, want the entry limit", err)
			}
		})
	}
}

func TestMaxBytes(t *testing.T) {
	big := strings.Repeat("x", 600<<10)
	t.Run("file sizes, refused before anything is staged", func(t *testing.T) {
		tr, err := applyLayers(t, Limits{MaxBytes: 1 << 20}, 0,
			layerTar(t, entry{name: "small", body: big}),
			layerTar(t, entry{name: "big", body: big}))
		if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "files add up to more than 1.0 MiB") {
			t.Fatalf("got %v, want the size limit", err)
		}
		if _, err := os.Lstat(filepath.Join(tr.staging, "big")); !os.IsNotExist(err) {
			t.Fatalf("the file over the limit was staged: %v", err)
		}
	})
	t.Run("under the limit", func(t *testing.T) {
		if _, err := applyLayers(t, Limits{MaxBytes: 2 << 20}, 0, layerTar(t, entry{name: "a", body: big}), layerTar(t, entry{name: "b", body: big})); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("tar stream", func(t *testing.T) {
		// 300 empty files: no content, but 150 KiB of headers.
		_, err := applyLayers(t, Limits{MaxBytes: 64 << 10}, 0, fifos(t, "e", 300))
		if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "unpack to more than 64.0 KiB") {
			t.Fatalf("got %v, want the stream limit", err)
		}
	})
	t.Run("through FromTar's options", func(t *testing.T) {
		work := t.TempDir()
		_, err := FromTar(context.Background(), bytes.NewReader(layerTar(t, entry{name: "a", body: big})), work,
			filepath.Join(work, "out.ext4"), BuildOptions{Limits: Limits{MaxBytes: 100 << 10}})
		if !errors.Is(err, ErrLimit) {
			t.Fatalf("got %v, want the size limit", err)
		}
	})
}

// TestNoSpace: with less free space than a file (plus the reserve), the
// layer stops with a clear error before writing it, and the build stops
// before mkfs.
func TestNoSpace(t *testing.T) {
	tr, err := applyLayers(t, Limits{}, spaceReserve+100<<10, layerTar(t, entry{name: "f", body: strings.Repeat("x", 200<<10)}))
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "unpack /f needs 200.0 KiB") {
		t.Fatalf("got %v, want ErrNoSpace", err)
	}
	if _, err := os.Lstat(filepath.Join(tr.staging, "f")); !os.IsNotExist(err) {
		t.Fatalf("the file was staged: %v", err)
	}

	requireE2fsprogs(t)
	tr, err = applyLayers(t, Limits{}, 1<<40, layerTar(t, entry{name: "f", body: strings.Repeat("x", 200<<10)}))
	if err != nil {
		t.Fatal(err)
	}
	tr.freeSpace = func(string) (int64, error) { return spaceReserve, nil }
	out := filepath.Join(t.TempDir(), "out.ext4")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := tr.BuildExt4(ctx, out, BuildOptions{}); !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "the image's filesystem needs") {
		t.Fatalf("got %v, want ErrNoSpace", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatalf("mkfs ran: %v", err)
	}
}

// TestMaxMetaBytes: names, symlink targets and xattrs kept in memory are
// bounded together (the bound is lowered here; it is 256 MiB).
func TestMaxMetaBytes(t *testing.T) {
	var es []entry
	for i := 0; i < 30; i++ {
		es = append(es, entry{name: fmt.Sprintf("l%d", i), typ: tar.TypeSymlink, link: strings.Repeat("t", 4000)})
	}
	tr, err := NewTree(filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	tr.maxMeta = 100 << 10
	err = tr.ApplyLayer(bytes.NewReader(layerTar(t, es...)))
	if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "symlink targets and xattrs exceed") {
		t.Fatalf("got %v, want the metadata limit", err)
	}
}

// TestFlattenLimits: Flatten (pull and import) honours BuildOptions.Limits:
// a layer that compresses to a few KiB but unpacks to 8 MiB stops at the
// size limit, and many entries at the entry limit, before mkfs.
func TestFlattenLimits(t *testing.T) {
	bomb := layerTar(t, entry{name: "zeros", body: string(make([]byte, 8<<20))})
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(bomb)), nil })
	if err != nil {
		t.Fatal(err)
	}
	if sz, _ := layer.Size(); sz > 64<<10 {
		t.Fatalf("compressed layer is %d bytes; the test wants a small one", sz)
	}
	bombImg, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		img  v1.Image
		lim  Limits
		want string
	}{
		{"size", bombImg, Limits{MaxBytes: 4 << 20}, "more than 4.0 MiB"},
		{"entries", testOCIImage(t), Limits{MaxEntries: 5}, "more than 5 entries"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			work := t.TempDir()
			out := filepath.Join(work, "rootfs.ext4")
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			_, err := Flatten(ctx, c.img, nil, work, out, BuildOptions{Limits: c.lim}, nil)
			if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrLimit %q", err, c.want)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Fatalf("an image was built: %v", err)
			}
		})
	}
}

// TestPullRefusesOversizedLayersBeforeDownload: the manifest's layer sizes
// are checked against the limit before any blob is fetched.
func TestPullRefusesOversizedLayersBeforeDownload(t *testing.T) {
	reg := newRegistry(t)
	src := testOCIImage(t)
	ref, err := name.ParseReference(reg.host()+"/test/big:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, src); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	img, _, err := RemoteImage(ctx, ref.String(), true)
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := src.Layers()
	var total int64
	for _, l := range layers {
		sz, _ := l.Size()
		total += sz
	}
	work := t.TempDir()
	cache := &BlobCache{Dir: filepath.Join(work, "blobs")}
	_, err = Flatten(ctx, img, cache, work, filepath.Join(work, "out.ext4"), BuildOptions{Limits: Limits{MaxBytes: total - 1}}, nil)
	if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "compressed, more than") {
		t.Fatalf("got %v, want ErrLimit", err)
	}
	for _, l := range layers {
		d, _ := l.Digest()
		if n := reg.count(d.String()); n != 0 {
			t.Errorf("layer %s fetched %d times", d, n)
		}
	}
}

// TestCheckFree: the disk check looks at the nearest existing directory and
// keeps the reserve.
func TestCheckFree(t *testing.T) {
	var asked string
	free := func(dir string) (int64, error) { asked = dir; return spaceReserve + 1000, nil }
	dir := t.TempDir()
	if err := checkFree(free, filepath.Join(dir, "not", "yet"), 1000, "x"); err != nil {
		t.Fatal(err)
	}
	if asked != dir {
		t.Errorf("asked about %s, want %s", asked, dir)
	}
	if err := checkFree(free, dir, 1001, "download layer 1 of 1"); !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "download layer 1 of 1 needs 1001 bytes") {
		t.Fatalf("got %v, want ErrNoSpace", err)
	}
}
