package image

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func testOCIImage(t *testing.T) v1.Image {
	t.Helper()
	img := empty.Image
	for _, l := range testLayers(t) {
		data := l
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			t.Fatal(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Env = []string{"PATH=/bin", "GREETING=hi"}
	cf.Config.WorkingDir = "/home/u"
	cf.Config.User = "1000:1000"
	cf.Config.Entrypoint = []string{"/bin/sh", "-c"}
	cf.Config.Cmd = []string{"echo hi"}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// countingRegistry serves an in-process registry and counts blob GETs.
type countingRegistry struct {
	srv  *httptest.Server
	mu   sync.Mutex
	gets map[string]int
}

func newRegistry(t *testing.T) *countingRegistry {
	r := &countingRegistry{gets: map[string]int{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/sha256:") {
			r.mu.Lock()
			r.gets[req.URL.Path[strings.LastIndex(req.URL.Path, "/")+1:]]++
			r.mu.Unlock()
		}
		reg.ServeHTTP(w, req)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *countingRegistry) host() string { return strings.TrimPrefix(r.srv.URL, "http://") }

func (r *countingRegistry) count(d string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gets[d]
}

func checkBuilt(t *testing.T, img string) {
	t.Helper()
	st := debugfsStat(t, img, "/usr/bin/su")
	if !strings.Contains(st, "Mode:  04755") || !strings.Contains(st, "Links: 2") {
		t.Fatalf("unexpected /usr/bin/su: %s", st)
	}
	if st := debugfsStat(t, img, "/opq/lower"); !strings.Contains(st, "not found") {
		t.Fatalf("opaque directory kept a lower file: %s", st)
	}
}

func TestPullTwiceDownloadsOnce(t *testing.T) {
	if _, err := tool("mkfs.ext4"); err != nil {
		t.Skipf("e2fsprogs not installed: %v", err)
	}
	reg := newRegistry(t)
	src := testOCIImage(t)
	ref, err := name.ParseReference(reg.host()+"/test/props:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, src); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cache := &BlobCache{Dir: filepath.Join(t.TempDir(), "blobs")}
	layers, _ := src.Layers()
	for round := 1; round <= 2; round++ {
		img, _, err := RemoteImage(ctx, reg.host()+"/test/props:v1", true)
		if err != nil {
			t.Fatal(err)
		}
		digest, cfg, err := ConfigOf(img)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := src.ConfigName()
		if digest != want.String() || cfg.WorkingDir != "/home/u" || cfg.User != "1000:1000" || len(cfg.Env) != 2 || cfg.Cmd[0] != "echo hi" {
			t.Fatalf("config: %s %+v", digest, cfg)
		}
		work := t.TempDir()
		var events int
		out := filepath.Join(work, "rootfs.ext4")
		if _, err := Flatten(ctx, img, cache, work, out, BuildOptions{HeadroomMiB: 4}, func(Event) { events++ }); err != nil {
			t.Fatal(err)
		}
		checkBuilt(t, out)
		if events == 0 {
			t.Errorf("no progress events")
		}
		for _, l := range layers {
			d, _ := l.Digest()
			if n := reg.count(d.String()); n != 1 {
				t.Errorf("round %d: layer %s fetched %d times, want 1", round, d, n)
			}
		}
	}
}

func TestInterruptedDownloadLeavesNoBlob(t *testing.T) {
	reg := newRegistry(t)
	src := testOCIImage(t)
	ref, _ := name.ParseReference(reg.host()+"/test/props:v1", name.Insecure)
	if err := remote.Write(ref, src); err != nil {
		t.Fatal(err)
	}
	img, _, err := RemoteImage(context.Background(), reg.host()+"/test/props:v1", true)
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	cache := &BlobCache{Dir: filepath.Join(t.TempDir(), "blobs")}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := cache.Fetch(ctx, layers[0], nil); err == nil {
		t.Fatal("cancelled fetch succeeded")
	}
	var files []string
	filepath.Walk(cache.Dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			files = append(files, p)
		}
		return nil
	})
	if len(files) != 0 {
		t.Fatalf("cancelled fetch left %v", files)
	}
	// A later fetch completes and a third reuses it.
	if _, err := cache.Fetch(context.Background(), layers[0], nil); err != nil {
		t.Fatal(err)
	}
	d, _ := layers[0].Digest()
	if _, err := cache.Fetch(context.Background(), layers[0], nil); err != nil || reg.count(d.String()) != 1 {
		t.Fatalf("refetch: %v, %d GETs", err, reg.count(d.String()))
	}
}

func TestImportArchives(t *testing.T) {
	if _, err := tool("mkfs.ext4"); err != nil {
		t.Skipf("e2fsprogs not installed: %v", err)
	}
	src := testOCIImage(t)
	dir := t.TempDir()
	tag, _ := name.NewTag("test/props:v1")
	dockerTar := filepath.Join(dir, "docker.tar")
	if err := tarball.WriteToFile(dockerTar, tag, src); err != nil {
		t.Fatal(err)
	}
	ociDir := filepath.Join(dir, "ocidir")
	lp, err := layout.Write(ociDir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(src, layout.WithPlatform(Platform)); err != nil {
		t.Fatal(err)
	}
	ociTar := filepath.Join(dir, "oci.tar")
	tarDir(t, ociDir, ociTar)
	cases := []struct {
		path string
		kind Kind
	}{{dockerTar, KindDockerTar}, {ociDir, KindOCIDir}, {ociTar, KindOCITar}}
	for _, c := range cases {
		t.Run(string(c.kind), func(t *testing.T) {
			k, err := Detect(c.path)
			if err != nil || k != c.kind {
				t.Fatalf("Detect = %q, %v; want %q", k, err, c.kind)
			}
			work := t.TempDir()
			img, err := OpenArchive(c.path, k, work)
			if err != nil {
				t.Fatal(err)
			}
			d, _, err := ConfigOf(img)
			want, _ := src.ConfigName()
			if err != nil || d != want.String() {
				t.Fatalf("digest %s, %v", d, err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			out := filepath.Join(work, "rootfs.ext4")
			if _, err := Flatten(ctx, img, nil, work, out, BuildOptions{HeadroomMiB: 4}, nil); err != nil {
				t.Fatal(err)
			}
			checkBuilt(t, out)
			if k, err := Detect(out); err != nil || k != KindExt4 {
				t.Fatalf("Detect(ext4) = %q, %v", k, err)
			}
		})
	}
}

func tarDir(t *testing.T, dir, out string) {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		tw.WriteHeader(&tar.Header{Name: rel, Mode: 0o644, Size: info.Size(), Typeflag: tar.TypeReg})
		b, _ := os.ReadFile(p)
		tw.Write(b)
		return nil
	})
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}
