package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/kernel"
)

type kernelFixture struct {
	pkg string // package name
	deb string // path of the cached .deb
	k   *kernel.Kernel
}

var kernelMemo memo[kernelFixture]

// KernelPackage returns the path of the cached Debian cloud kernel package
// (linux-image-<ver>-cloud-amd64-unsigned_*.deb), downloading it with
// `apt-get download` the first time.
func KernelPackage(t testing.TB) string {
	t.Helper()
	f := kernelMemo.get(t, loadGuestKernel(t))
	return f.deb
}

// GuestKernel returns Debian's current cloud kernel, imported with
// kernel.ImportDeb (uncompressed vmlinux, modules, depmod) into the test
// cache. The first use on a machine downloads the package with `apt-get
// download` (about 30 MB) and imports it (~8 s, ~75 s under -race); later uses,
// from any process, reuse it until the package or internal/kernel changes. The
// test is skipped only when apt is absent or the package cannot be fetched.
func GuestKernel(t testing.TB) *kernel.Kernel {
	t.Helper()
	f := kernelMemo.get(t, loadGuestKernel(t))
	k := *f.k
	return &k
}

func loadGuestKernel(t testing.TB) func(s *step) kernelFixture {
	return func(s *step) kernelFixture {
		var out kernelFixture
		withLock(t, "kernel", func() {
			out = loadGuestKernelLocked(t, s)
		})
		return out
	}
}

func loadGuestKernelLocked(t testing.TB, s *step) kernelFixture {
	cache := CacheDir(t)
	debDir := filepath.Join(cache, "debs")
	kernDir := filepath.Join(cache, "kernels")
	for _, d := range []string{debDir, kernDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			s.Fatalf("create %s: %v", d, err)
		}
		prune(d)
	}

	if _, err := lookTool("apt-get"); err != nil {
		s.Skipf("apt-get not installed, cannot fetch a Debian kernel: %v", err)
	}
	ctx := testCtx(t, 20*time.Minute)
	pkg, err := kernel.ResolveKernelPackage(ctx, kernel.CloudKernelMetaPackage)
	if err != nil {
		// Offline, or no package lists: use the newest kernel already cached.
		if f, ok := newestCachedKernel(debDir, kernDir, "-"+kernelSourceHash(t)[:12]); ok {
			t.Logf("testenv: cannot ask apt for the current kernel (%v); using cached %s", err, f.pkg)
			return f
		}
		s.Skipf("cannot find Debian's cloud kernel package: %v", err)
	}

	// The import is keyed by the importer's source too, so that a change to
	// internal/kernel re-imports (and gets tested on the real package).
	suffix := "-" + kernelSourceHash(t)[:12]
	dir := filepath.Join(kernDir, pkg+suffix)
	removeStaleImports(kernDir, pkg, suffix)
	deb := cachedDeb(debDir, pkg)
	if k, err := kernel.Load(dir); err == nil && deb != "" {
		touch(dir)
		touch(deb)
		return kernelFixture{pkg: pkg, deb: deb, k: k}
	}
	if deb == "" {
		t.Logf("testenv: downloading %s with apt-get", pkg)
		start := time.Now()
		deb, err = kernel.FetchPackage(ctx, pkg, debDir)
		if err != nil {
			s.Skipf("cannot fetch kernel package %s: %v", pkg, err)
		}
		t.Logf("testenv: downloaded %s in %v", filepath.Base(deb), time.Since(start).Round(time.Millisecond))
	}
	start := time.Now()
	tmp := filepath.Join(kernDir, fmt.Sprintf(".tmp-%s-%d", pkg, os.Getpid()))
	_ = os.RemoveAll(tmp)
	if _, err := kernel.ImportDeb(ctx, deb, tmp, kernel.ImportOptions{}); err != nil {
		s.Fatalf("import %s: %v", deb, err)
	}
	_ = os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		s.Fatalf("move imported kernel into the cache: %v", err)
	}
	k, err := kernel.Load(dir)
	if err != nil {
		s.Fatalf("load imported kernel: %v", err)
	}
	t.Logf("testenv: imported kernel %s in %v", k.Version, time.Since(start).Round(time.Millisecond))
	return kernelFixture{pkg: pkg, deb: deb, k: k}
}

// cachedDeb returns the cached .deb of pkg, or "".
func cachedDeb(debDir, pkg string) string {
	m, _ := filepath.Glob(filepath.Join(debDir, pkg+"_*.deb"))
	if len(m) == 0 {
		return ""
	}
	sort.Strings(m)
	return m[len(m)-1]
}

// removeStaleImports deletes imports of pkg made by other versions of the
// importer that have not been used for an hour (another checkout's tests may
// still be using a recent one).
func removeStaleImports(kernDir, pkg, suffix string) {
	ents, err := os.ReadDir(kernDir)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, pkg+"-") || name == pkg+suffix || len(name) != len(pkg+suffix) {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > time.Hour {
			_ = os.RemoveAll(filepath.Join(kernDir, name))
		}
	}
}

// newestCachedKernel returns the most recently used complete cache entry
// made by this version of the importer.
func newestCachedKernel(debDir, kernDir, suffix string) (kernelFixture, bool) {
	ents, err := os.ReadDir(kernDir)
	if err != nil {
		return kernelFixture{}, false
	}
	var best kernelFixture
	var bestTime time.Time
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || !e.IsDir() || !strings.HasSuffix(e.Name(), suffix) {
			continue
		}
		k, err := kernel.Load(filepath.Join(kernDir, e.Name()))
		if err != nil || k.Package == "" {
			continue
		}
		deb := cachedDeb(debDir, k.Package)
		if deb == "" {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		if best.k == nil || info.ModTime().After(bestTime) {
			best, bestTime = kernelFixture{pkg: k.Package, deb: deb, k: k}, info.ModTime()
		}
	}
	return best, best.k != nil
}
