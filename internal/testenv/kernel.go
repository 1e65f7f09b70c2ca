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

// GuestKernel returns Debian's current cloud kernel, imported (uncompressed
// vmlinux, modules, depmod) into the test cache. The first use on a machine
// downloads the package with `apt-get download` (about 30 MB) and imports it
// (a few seconds); later uses, from any process, reuse it. The test is
// skipped only when apt is absent or the package cannot be fetched.
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
		if f, ok := newestCachedKernel(debDir, kernDir); ok {
			t.Logf("testenv: cannot ask apt for the current kernel (%v); using cached %s", err, f.pkg)
			return f
		}
		s.Skipf("cannot find Debian's cloud kernel package: %v", err)
	}

	dir := filepath.Join(kernDir, pkg)
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

// newestCachedKernel returns the most recently used complete cache entry.
func newestCachedKernel(debDir, kernDir string) (kernelFixture, bool) {
	ents, err := os.ReadDir(kernDir)
	if err != nil {
		return kernelFixture{}, false
	}
	var best kernelFixture
	var bestTime time.Time
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || !e.IsDir() {
			continue
		}
		k, err := kernel.Load(filepath.Join(kernDir, e.Name()))
		deb := cachedDeb(debDir, e.Name())
		if err != nil || deb == "" {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		if best.k == nil || info.ModTime().After(bestTime) {
			best, bestTime = kernelFixture{pkg: e.Name(), deb: deb, k: k}, info.ModTime()
		}
	}
	return best, best.k != nil
}
