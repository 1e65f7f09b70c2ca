package image

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Config is the part of an image's config banger records and honours; its
// JSON shape is what the daemon's start pipeline reads.
type Config struct {
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
}

// Platform is the only platform banger runs.
var Platform = v1.Platform{OS: "linux", Architecture: "amd64"}

// Event reports progress: Phase is "download", "unpack" or "mkfs"; Done and
// Total are bytes (Total 0 = unknown).
type Event struct {
	Phase       string
	Done, Total int64
}

// Progress receives events; it must not block.
type Progress func(Event)

// Kind of an importable file.
type Kind string

const (
	KindExt4      Kind = "ext4"
	KindDockerTar Kind = "docker-archive"
	KindOCITar    Kind = "oci-archive"
	KindOCIDir    Kind = "oci-layout"
)

// Detect tells what p is: an ext4 filesystem, a docker save tarball, an
// OCI-layout tarball or an OCI-layout directory.
func Detect(p string) (Kind, error) {
	st, err := os.Stat(p)
	if err != nil {
		return "", err
	}
	if st.IsDir() {
		if _, err := os.Stat(filepath.Join(p, "oci-layout")); err == nil {
			return KindOCIDir, nil
		}
		return "", fmt.Errorf("%s is a directory without an oci-layout file (not an OCI image layout)", p)
	}
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	magic := make([]byte, 2)
	if _, err := f.ReadAt(magic, 1024+0x38); err == nil && magic[0] == 0x53 && magic[1] == 0xEF {
		return KindExt4, nil
	}
	head := make([]byte, 4)
	if n, _ := f.ReadAt(head, 0); n == 4 && (head[0] == 0x1f && head[1] == 0x8b || string(head) == "\x28\xb5\x2f\xfd") {
		return "", fmt.Errorf("%s is compressed; decompress it first (e.g. gunzip, zstd -d) and import the .tar", p)
	}
	tr := tar.NewReader(bufio.NewReader(f))
	var oci, docker bool
	for i := 0; i < 1<<16; i++ {
		h, err := tr.Next()
		if err != nil {
			break
		}
		switch strings.TrimPrefix(h.Name, "./") {
		case "manifest.json":
			docker = true
		case "oci-layout", "index.json":
			oci = true
		}
	}
	switch {
	case docker:
		return KindDockerTar, nil
	case oci:
		return KindOCITar, nil
	}
	return "", fmt.Errorf("%s is neither an ext4 filesystem nor a docker save / OCI image tarball", p)
}

// RemoteImage resolves ref (e.g. "debian:bookworm" = Docker Hub) to its
// linux/amd64 image, with credentials from the user's Docker config.
// insecure allows plain HTTP (for registries on localhost).
func RemoteImage(ctx context.Context, ref string, insecure bool) (v1.Image, name.Reference, error) {
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("bad image reference %q: %w", ref, err)
	}
	img, err := remote.Image(r, remote.WithContext(ctx), remote.WithPlatform(Platform),
		remote.WithAuthFromKeychain(authn.DefaultKeychain))
	if err != nil {
		return nil, nil, fmt.Errorf("fetch %s: %w", r.Name(), err)
	}
	return img, r, nil
}

// OpenArchive opens a docker save tarball, an OCI-layout tarball (unpacked
// into workDir) or an OCI-layout directory.
func OpenArchive(p string, kind Kind, workDir string) (v1.Image, error) {
	switch kind {
	case KindDockerTar:
		img, err := tarball.ImageFromPath(p, nil)
		if err != nil {
			return nil, fmt.Errorf("read docker archive %s: %w", p, err)
		}
		return img, nil
	case KindOCITar:
		dir := filepath.Join(workDir, "oci")
		if err := unpackLayout(p, dir); err != nil {
			return nil, err
		}
		return layoutImage(dir)
	case KindOCIDir:
		return layoutImage(p)
	}
	return nil, fmt.Errorf("%s is not an image archive", p)
}

var blobName = regexp.MustCompile(`^blobs/[a-z0-9]+/[a-f0-9]{32,128}$`)

// unpackLayout extracts the files of an OCI layout (and nothing else) from a tarball.
func unpackLayout(p, dir string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(bufio.NewReaderSize(f, 1<<20))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		n := strings.TrimPrefix(h.Name, "./")
		if h.Typeflag != tar.TypeReg || !(n == "oci-layout" || n == "index.json" || blobName.MatchString(n)) {
			continue
		}
		dst := filepath.Join(dir, filepath.FromSlash(n))
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			return err
		}
		out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		_, err = io.Copy(out, tr)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("unpack %s: %w", n, err)
		}
	}
	return nil
}

func layoutImage(dir string) (v1.Image, error) {
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("read OCI layout %s: %w", dir, err)
	}
	return pickImage(idx, 0)
}

func pickImage(idx v1.ImageIndex, depth int) (v1.Image, error) {
	if depth > 4 {
		return nil, errors.New("image index nested too deeply")
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	var cands []v1.Descriptor
	for _, d := range m.Manifests {
		if d.Platform != nil && (d.Platform.OS != Platform.OS || d.Platform.Architecture != Platform.Architecture) {
			continue
		}
		if d.Annotations["vnd.docker.reference.type"] == "attestation-manifest" {
			continue
		}
		cands = append(cands, d)
	}
	if len(cands) == 0 {
		return nil, errors.New("the image has no linux/amd64 variant")
	}
	d := cands[0]
	if d.MediaType.IsIndex() {
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, err
		}
		return pickImage(child, depth+1)
	}
	return idx.Image(d.Digest)
}

// ConfigOf returns the image's identity (its config digest) and the config
// banger honours.
func ConfigOf(img v1.Image) (string, Config, error) {
	h, err := img.ConfigName()
	if err != nil {
		return "", Config{}, fmt.Errorf("read image config: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return "", Config{}, fmt.Errorf("read image config: %w", err)
	}
	if cf.OS != "" && cf.OS != Platform.OS || cf.Architecture != "" && cf.Architecture != Platform.Architecture {
		return "", Config{}, fmt.Errorf("the image is for %s/%s; banger runs linux/amd64 guests", cf.OS, cf.Architecture)
	}
	c := cf.Config
	return h.String(), Config{Env: c.Env, WorkingDir: c.WorkingDir, User: c.User, Entrypoint: c.Entrypoint, Cmd: c.Cmd}, nil
}

// BlobCache keeps compressed layer blobs by digest so that no layer is
// downloaded twice; a blob appears under its name only once complete and
// verified.
type BlobCache struct{ Dir string }

func (c *BlobCache) path(h v1.Hash) string {
	return filepath.Join(c.Dir, h.Algorithm, h.Hex)
}

// Has reports whether the blob is cached.
func (c *BlobCache) Has(h v1.Hash) bool {
	_, err := os.Stat(c.path(h))
	return err == nil
}

// Fetch makes sure layer l's compressed blob is in the cache and returns its
// path; n is called with bytes as they arrive.
func (c *BlobCache) Fetch(ctx context.Context, l v1.Layer, n func(int64)) (string, error) {
	h, err := l.Digest()
	if err != nil {
		return "", err
	}
	if h.Algorithm != "sha256" || !regexp.MustCompile(`^[a-f0-9]{64}$`).MatchString(h.Hex) {
		return "", fmt.Errorf("unsupported layer digest %s", h)
	}
	dst := c.path(h)
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return "", err
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	rc, err := l.Compressed()
	if err != nil {
		return "", fmt.Errorf("download layer %s: %w", h, err)
	}
	defer rc.Close()
	var rnd [6]byte
	rand.Read(rnd[:])
	tmp := dst + ".partial-" + hex.EncodeToString(rnd[:])
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp)
	sum := sha256.New()
	_, err = io.Copy(io.MultiWriter(f, sum, countWriter(n)), ctxReader{ctx, rc})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("download layer %s: %w", h, err)
	}
	if got := hex.EncodeToString(sum.Sum(nil)); got != h.Hex {
		return "", fmt.Errorf("layer %s arrived with digest sha256:%s; try again", h, got)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return "", err
	}
	return dst, nil
}

type countWriter func(int64)

func (w countWriter) Write(p []byte) (int, error) {
	if w != nil {
		w(int64(len(p)))
	}
	return len(p), nil
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// decompress returns the tar stream inside a layer blob (gzip, zstd or plain).
func decompress(r io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	head, _ := br.Peek(4)
	switch {
	case len(head) >= 2 && head[0] == 0x1f && head[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, err
		}
		return zr, nil
	case len(head) == 4 && string(head) == "\x28\xb5\x2f\xfd":
		zr, err := zstd.NewReader(br)
		if err != nil {
			return nil, err
		}
		return zr.IOReadCloser(), nil
	}
	return io.NopCloser(br), nil
}

// Flatten applies img's layers (from cache when it is set, downloading
// missing blobs into it) into a tree staged under work/stage and builds the
// ext4 at out.
func Flatten(ctx context.Context, img v1.Image, cache *BlobCache, work, out string, opts BuildOptions, prog Progress) (*BuildResult, error) {
	if prog == nil {
		prog = func(Event) {}
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("read image layers: %w", err)
	}
	// Sizes are compressed sizes for registry layers; local archives count
	// uncompressed bytes against the archive's size.
	total := opts.SourceBytes
	sizes := make([]int64, len(layers))
	if cache != nil {
		total = 0
		for i, l := range layers {
			sizes[i], _ = l.Size()
			total += sizes[i]
		}
	}
	blobs := make([]string, len(layers))
	if cache != nil {
		// The manifest's sizes bound the download (go-containerregistry
		// stops a blob at its declared size): refuse before fetching
		// anything when they exceed the limit or the disk.
		if max := opts.Limits.withDefaults().MaxBytes; total > max {
			return nil, fmt.Errorf("%w: the image's layers are %s compressed, more than %s", ErrLimit, humanBytes(total), humanBytes(max))
		}
		var done int64
		for i, l := range layers {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if h, err := l.Digest(); err == nil && !cache.Has(h) {
				if err := checkFree(freeBytes, cache.Dir, sizes[i], fmt.Sprintf("download layer %d of %d", i+1, len(layers))); err != nil {
					return nil, err
				}
			}
			p, err := cache.Fetch(ctx, l, func(n int64) {
				done += n
				prog(Event{Phase: "download", Done: done, Total: total})
			})
			if err != nil {
				return nil, err
			}
			blobs[i] = p
			done = sumTo(sizes, i+1)
			prog(Event{Phase: "download", Done: done, Total: total})
		}
	}
	tree, err := NewTree(filepath.Join(work, "stage"))
	if err != nil {
		return nil, err
	}
	tree.Limits = opts.Limits
	var done int64
	for i, l := range layers {
		var rc io.ReadCloser
		if blobs[i] != "" {
			f, err := os.Open(blobs[i])
			if err != nil {
				return nil, err
			}
			rc = f
		} else if rc, err = l.Uncompressed(); err != nil {
			return nil, fmt.Errorf("read layer %d: %w", i+1, err)
		}
		base := done
		counted := &countReader{r: ctxReader{ctx, rc}, fn: func(n int64) {
			done = base + n
			prog(Event{Phase: "unpack", Done: done, Total: max(total, done)})
		}}
		var tarStream io.ReadCloser = io.NopCloser(counted)
		if blobs[i] != "" {
			tarStream, err = decompress(counted)
		}
		if err == nil {
			err = tree.ApplyLayer(tarStream)
			tarStream.Close()
		}
		rc.Close()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("unpack layer %d of %d: %w", i+1, len(layers), err)
		}
		if cache != nil {
			done = sumTo(sizes, i+1)
		}
	}
	prog(Event{Phase: "mkfs", Done: 0, Total: tree.Bytes})
	res, err := tree.BuildExt4(ctx, out, opts)
	if err != nil {
		return nil, err
	}
	prog(Event{Phase: "mkfs", Done: tree.Bytes, Total: tree.Bytes})
	return res, nil
}

func sumTo(xs []int64, n int) int64 {
	var s int64
	for _, x := range xs[:n] {
		s += x
	}
	return s
}

type countReader struct {
	r  io.Reader
	n  int64
	fn func(int64)
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if n > 0 {
		c.fn(c.n)
	}
	return n, err
}

// FromTar builds an ext4 at out from one tar stream of a whole tree (e.g. a
// debootstrap directory archived under fakeroot, which keeps the owners).
func FromTar(ctx context.Context, r io.Reader, work, out string, opts BuildOptions) (*BuildResult, error) {
	tree, err := NewTree(filepath.Join(work, "stage"))
	if err != nil {
		return nil, err
	}
	tree.Limits = opts.Limits
	if err := tree.ApplyLayer(ctxReader{ctx, r}); err != nil {
		return nil, err
	}
	return tree.BuildExt4(ctx, out, opts)
}
