package kernel

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/cavaliergopher/cpio"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// ModulesLoadPath is where the initrd lists the modules for banger-agent to
// load, one path per line relative to /lib/modules/<version>, dependencies
// first.
const ModulesLoadPath = "banger/modules.load"

// defaultModules is what a virtio guest needs that Debian's cloud kernel
// builds as modules: block and network devices over virtio-mmio or virtio-pci,
// the virtio console/serial port, overlayfs for the root, and virtio vsock.
var defaultModules = []string{
	"virtio_ring", "virtio", "virtio_mmio",
	"virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
	"virtio_blk",
	"failover", "net_failover", "virtio_net",
	"virtio_console",
	"overlay",
	"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
	// ACPI power button events reach the agent through evdev (QEMU's graceful stop).
	"button", "evdev",
}

// DefaultModules returns the modules banger puts into an initrd by default.
func DefaultModules() []string { return slices.Clone(defaultModules) }

// initrdDirs are the empty directories banger-agent needs in its initramfs.
var initrdDirs = []string{"banger", "dev", "newroot", "proc", "run", "sys", "tmp"}

var moduleNameRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// InitrdOptions says what goes into an initrd.
type InitrdOptions struct {
	// Kernel provides the modules (Kernel.ModulesDir, with depmod output) and
	// the version (the directory under /lib/modules).
	Kernel *Kernel
	// AgentPath is the static banger-agent binary; it becomes /init.
	AgentPath string
	// Modules to include with their dependencies; nil means DefaultModules().
	// A module that the kernel has built in (modules.builtin) is skipped.
	Modules []string
}

// WriteInitrd builds the initrd described by opts into path, atomically.
func WriteInitrd(ctx context.Context, path string, opts InitrdOptions) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create initrd: %w", err)
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	if err = BuildInitrd(ctx, bw, opts); err != nil {
		return err
	}
	if err = bw.Flush(); err != nil {
		return fmt.Errorf("write initrd: %w", err)
	}
	if err = f.Chmod(0o644); err != nil {
		return fmt.Errorf("write initrd: %w", err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write initrd: %w", err)
	}
	if err = os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write initrd: %w", err)
	}
	return nil
}

// BuildInitrd writes a gzip-compressed newc cpio archive to w holding /init
// (the agent), the requested modules and their dependencies under
// /lib/modules/<version>/ (decompressed, so the agent can load them with a
// plain finit_module), /banger/modules.load, and the empty directories the
// agent needs. The same inputs always give the same bytes.
func BuildInitrd(ctx context.Context, w io.Writer, opts InitrdOptions) error {
	if opts.Kernel == nil {
		return errors.New("build initrd: no kernel given")
	}
	names := opts.Modules
	if names == nil {
		names = defaultModules
	}
	// An explicitly empty module list is for kernels with their drivers
	// built in (e.g. a plain vmlinux): the initrd then holds only the agent.
	var order []string
	if len(names) > 0 {
		if !versionRE.MatchString(opts.Kernel.Version) {
			return fmt.Errorf("build initrd: unusable kernel version %q", opts.Kernel.Version)
		}
		var err error
		if order, err = ModuleLoadOrder(opts.Kernel.ModulesDir, names); err != nil {
			return fmt.Errorf("build initrd: %w", err)
		}
	}
	agent, err := readAgent(opts.AgentPath)
	if err != nil {
		return fmt.Errorf("build initrd: %w", err)
	}

	type entry struct {
		mode cpio.FileMode
		data []byte
	}
	entries := map[string]entry{}
	addDir := func(p string) {
		for ; p != "." && p != "/"; p = path.Dir(p) {
			if _, ok := entries[p]; ok {
				return
			}
			mode := cpio.FileMode(cpio.TypeDir | 0o755)
			if p == "tmp" {
				mode = cpio.TypeDir | cpio.ModeSticky | 0o777
			}
			entries[p] = entry{mode: mode}
		}
	}
	for _, d := range initrdDirs {
		addDir(d)
	}
	modRoot := path.Join("lib/modules", opts.Kernel.Version)
	if len(order) > 0 {
		addDir(modRoot)
	}

	var load bytes.Buffer
	for _, rel := range order {
		if err := ctx.Err(); err != nil {
			return err
		}
		data, err := readModule(filepath.Join(opts.Kernel.ModulesDir, filepath.FromSlash(rel)))
		if err != nil {
			return fmt.Errorf("build initrd: module %s: %w", rel, err)
		}
		rel = stripModuleCompression(rel)
		p := path.Join(modRoot, rel)
		addDir(path.Dir(p))
		entries[p] = entry{mode: cpio.TypeReg | 0o644, data: data}
		load.WriteString(rel)
		load.WriteByte('\n')
	}
	entries[ModulesLoadPath] = entry{mode: cpio.TypeReg | 0o644, data: load.Bytes()}
	entries["init"] = entry{mode: cpio.TypeReg | 0o755, data: agent}

	paths := make([]string, 0, len(entries))
	for p := range entries {
		paths = append(paths, p)
	}
	// Sorted order puts every directory before what it contains.
	sort.Strings(paths)

	zw, err := gzip.NewWriterLevel(w, gzip.DefaultCompression)
	if err != nil {
		return err
	}
	cw := cpio.NewWriter(zw)
	for _, p := range paths {
		e := entries[p]
		hdr := &cpio.Header{Name: p, Mode: e.mode, Size: int64(len(e.data)), Links: 1}
		if e.mode.IsDir() {
			hdr.Links = 2
		}
		if err := cw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("build initrd: %w", err)
		}
		if _, err := cw.Write(e.data); err != nil {
			return fmt.Errorf("build initrd: %w", err)
		}
	}
	if err := cw.Close(); err != nil {
		return fmt.Errorf("build initrd: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("build initrd: %w", err)
	}
	return nil
}

func readAgent(p string) ([]byte, error) {
	if p == "" {
		return nil, errors.New("no agent binary given")
	}
	st, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("agent binary: %w", err)
	}
	if !st.Mode().IsRegular() || st.Size() == 0 {
		return nil, fmt.Errorf("agent binary %s is not a regular non-empty file", p)
	}
	if st.Size() > 256<<20 {
		return nil, fmt.Errorf("agent binary %s is implausibly large (%d bytes)", p, st.Size())
	}
	return os.ReadFile(p)
}

// readModule reads a module file, decompressing .ko.xz, .ko.zst and .ko.gz.
func readModule(p string) ([]byte, error) {
	raw, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	const limit = 64 << 20
	switch {
	case strings.HasSuffix(p, ".ko"):
		return raw, nil
	case strings.HasSuffix(p, ".ko.xz"):
		zr, err := xz.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, err
		}
		return readAllLimit(zr, limit)
	case strings.HasSuffix(p, ".ko.zst"):
		zr, err := zstd.NewReader(bytes.NewReader(raw), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, err
		}
		defer zr.Close()
		return readAllLimit(zr, limit)
	case strings.HasSuffix(p, ".ko.gz"):
		zr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, err
		}
		return readAllLimit(zr, limit)
	}
	return nil, errors.New("not a kernel module file (.ko, .ko.xz, .ko.zst, .ko.gz)")
}

func stripModuleCompression(rel string) string {
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		if strings.HasSuffix(rel, ".ko"+ext) {
			return strings.TrimSuffix(rel, ext)
		}
	}
	return rel
}

// moduleName turns a module path ("kernel/drivers/virtio/virtio-pci.ko.xz")
// or a name ("virtio-pci") into the kernel's canonical name ("virtio_pci").
func moduleName(s string) string {
	s = path.Base(s)
	s = stripModuleCompression(s)
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

type modDep struct {
	path string
	deps []string // paths
}

// ModuleLoadOrder returns the module files (paths relative to modulesDir) to
// load for names, in an order where every module comes after all of its
// dependencies, each once. modulesDir must hold depmod's modules.dep. Names
// built into the kernel (listed in modules.builtin) need no file and are
// skipped; any other name missing from modules.dep is an error.
func ModuleLoadOrder(modulesDir string, names []string) ([]string, error) {
	depFile := filepath.Join(modulesDir, "modules.dep")
	f, err := os.Open(depFile)
	if err != nil {
		return nil, fmt.Errorf("read module dependencies (was depmod run?): %w", err)
	}
	defer f.Close()
	byName, byPath, err := parseModulesDep(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", depFile, err)
	}
	builtin, err := readBuiltin(filepath.Join(modulesDir, "modules.builtin"))
	if err != nil {
		return nil, err
	}

	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []string
	var visit func(p string, chain []string) error
	visit = func(p string, chain []string) error {
		switch state[p] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("module dependency cycle: %s", strings.Join(append(chain, p), " -> "))
		}
		m, ok := byPath[p]
		if !ok {
			return fmt.Errorf("module %s is listed as a dependency but missing from modules.dep", p)
		}
		state[p] = visiting
		chain = append(slices.Clone(chain), p)
		// depmod lists dependencies so that loading them last-to-first works;
		// visiting in that order keeps the result close to what modprobe does.
		for i := len(m.deps) - 1; i >= 0; i-- {
			if err := visit(m.deps[i], chain); err != nil {
				return err
			}
		}
		state[p] = done
		order = append(order, p)
		return nil
	}
	for _, n := range names {
		if !moduleNameRE.MatchString(n) {
			return nil, fmt.Errorf("invalid module name %q", n)
		}
		name := moduleName(n)
		m, ok := byName[name]
		if !ok {
			if builtin[name] {
				continue
			}
			return nil, fmt.Errorf("kernel module %s is neither in modules.dep nor built into the kernel (modules.builtin): this kernel cannot run banger guests without it", n)
		}
		if err := visit(m.path, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// parseModulesDep reads depmod's modules.dep: "path: dep-path dep-path ...".
func parseModulesDep(r io.Reader) (byName, byPath map[string]*modDep, err error) {
	byName = map[string]*modDep{}
	byPath = map[string]*modDep{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		p, rest, ok := strings.Cut(line, ":")
		if !ok {
			return nil, nil, fmt.Errorf("malformed line %q", line)
		}
		if err := checkModulePath(p); err != nil {
			return nil, nil, err
		}
		m := &modDep{path: p}
		for _, d := range strings.Fields(rest) {
			if err := checkModulePath(d); err != nil {
				return nil, nil, err
			}
			m.deps = append(m.deps, d)
		}
		if _, dup := byPath[p]; dup {
			continue
		}
		byPath[p] = m
		if _, dup := byName[moduleName(p)]; !dup { // the first one wins, as with modprobe
			byName[moduleName(p)] = m
		}
	}
	if err := sc.Err(); err != nil {
		return nil, nil, err
	}
	return byName, byPath, nil
}

// checkModulePath accepts relative module paths that stay inside the modules
// directory (modules.dep comes from the kernel package, via depmod).
func checkModulePath(p string) error {
	if strings.HasPrefix(p, "/") || p != path.Clean(p) || strings.HasPrefix(p, "../") || p == ".." {
		return fmt.Errorf("unsafe module path %q in modules.dep", p)
	}
	if stripModuleCompression(p) == p && !strings.HasSuffix(p, ".ko") {
		return fmt.Errorf("unexpected module file name %q in modules.dep", p)
	}
	return nil
}

func readBuiltin(p string) (map[string]bool, error) {
	out := map[string]bool{}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil // a kernel without modules.builtin has nothing built in we know of
	}
	if err != nil {
		return nil, fmt.Errorf("read built-in module list: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			out[moduleName(line)] = true
		}
	}
	return out, nil
}
