package kernel

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/blakesmith/ar"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// ErrUnsafePath is returned when an archive holds an entry whose name is
// absolute or climbs out of the archive root ("..").
var ErrUnsafePath = errors.New("archive entry escapes the extraction directory")

// Bounds against decompression bombs in kernel packages (a real one unpacks to
// about 100 MB).
const (
	maxDebFileSize  = 1 << 30
	maxDebTotalSize = 4 << 30
)

// versionRE is what a kernel release may look like; it also keeps versions
// from being taken as options by depmod.
var versionRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$`)

// ImportOptions tunes ImportDeb.
type ImportOptions struct {
	// Logger receives progress messages; nil means slog.Default().
	Logger *slog.Logger
}

// ImportDeb imports the kernel from the Debian kernel package debPath (e.g.
// linux-image-6.1.0-56-cloud-amd64-unsigned_*.deb) into destDir, which must
// not exist or be empty. It extracts boot/vmlinuz-<ver> and
// [usr/]lib/modules/<ver>/ from the package (nothing runs from it), turns the
// vmlinuz into an uncompressed ELF at destDir/vmlinux, puts the modules under
// destDir/lib/modules/<ver>, runs depmod on them and writes a manifest that
// Load reads back. On failure destDir is removed again.
func ImportDeb(ctx context.Context, debPath, destDir string, opts ImportOptions) (k *Kernel, err error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := prepareEmptyDir(destDir); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(destDir)
		}
	}()
	root, err := os.OpenRoot(destDir)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", destDir, err)
	}
	defer root.Close()

	x := &debExtractor{ctx: ctx, root: root, log: log}
	if err := x.readDeb(debPath); err != nil {
		return nil, fmt.Errorf("kernel package %s: %w", debPath, err)
	}
	if x.version == "" {
		return nil, fmt.Errorf("kernel package %s holds no boot/vmlinuz-<version>: is it a linux-image package?", debPath)
	}
	if len(x.modVersions) == 0 {
		return nil, fmt.Errorf("kernel package %s holds no lib/modules/%s: banger needs the modules (use the linux-image package, not a meta package)", debPath, x.version)
	}
	if len(x.modVersions) > 1 || !x.modVersions[x.version] {
		return nil, fmt.Errorf("kernel package %s: modules are for %v but the kernel is %s", debPath, keys(x.modVersions), x.version)
	}

	vmlinuz := filepath.Join(destDir, x.vmlinuzTmp)
	k = &Kernel{
		Version:     x.version,
		VmlinuxPath: filepath.Join(destDir, "vmlinux"),
		ModulesDir:  filepath.Join(destDir, "lib", "modules", x.version),
		Package:     x.pkgName,
	}
	comp, err := ExtractVmlinuxFile(ctx, vmlinuz, k.VmlinuxPath)
	if err != nil {
		return nil, err
	}
	_ = os.Remove(vmlinuz)
	log.Debug("extracted vmlinux", "version", k.Version, "compression", string(comp))

	if err := runDepmod(ctx, destDir, x.version); err != nil {
		return nil, err
	}
	if err := writeManifest(destDir, k); err != nil {
		return nil, fmt.Errorf("write kernel manifest: %w", err)
	}
	log.Info("imported kernel", "version", k.Version, "package", k.Package, "dir", destDir)
	return k, nil
}

// prepareEmptyDir creates dir, or accepts it if it exists and is empty.
func prepareEmptyDir(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(dir), err)
	}
	err := os.Mkdir(dir, 0o755)
	if err == nil {
		return nil
	}
	if !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	ents, rerr := os.ReadDir(dir)
	if rerr != nil {
		return fmt.Errorf("%s: %w", dir, rerr)
	}
	if len(ents) > 0 {
		return fmt.Errorf("%s is not empty: import a kernel into a new directory", dir)
	}
	return nil
}

type debExtractor struct {
	ctx  context.Context
	root *os.Root
	log  *slog.Logger

	pkgName     string
	version     string
	vmlinuzTmp  string
	modVersions map[string]bool
	total       int64
}

func (x *debExtractor) readDeb(debPath string) error {
	f, err := os.Open(debPath)
	if err != nil {
		return err
	}
	defer f.Close()
	var magic [8]byte
	if _, err := io.ReadFull(f, magic[:]); err != nil || string(magic[:]) != "!<arch>\n" {
		return errors.New("not a Debian package (no ar archive header)")
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	ard := ar.NewReader(f)
	sawData := false
	for {
		hdr, err := ard.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read ar archive: %w", err)
		}
		if hdr.Size < 0 {
			return errors.New("corrupt ar archive (negative member size)")
		}
		name := strings.TrimSuffix(hdr.Name, "/")
		switch {
		case name == "debian-binary":
			b, _ := io.ReadAll(io.LimitReader(ard, 64))
			if !strings.HasPrefix(string(b), "2.") {
				return fmt.Errorf("unsupported Debian package format %q", strings.TrimSpace(string(b)))
			}
		case strings.HasPrefix(name, "control.tar"):
			if err := x.readTar(name, ard, x.controlEntry); err != nil {
				return err
			}
		case strings.HasPrefix(name, "data.tar"):
			sawData = true
			if err := x.readTar(name, ard, x.dataEntry); err != nil {
				return err
			}
		}
	}
	if !sawData {
		return errors.New("no data.tar member: not a Debian binary package")
	}
	return nil
}

// readTar decompresses a (control|data).tar[.gz|.xz|.zst|.bz2] member and hands
// every entry to fn after checking its name.
func (x *debExtractor) readTar(member string, r io.Reader, fn func(name string, hdr *tar.Header, tr *tar.Reader) error) error {
	br := bufio.NewReaderSize(r, 1<<20)
	var dr io.Reader
	switch ext := path.Ext(member); ext {
	case ".tar":
		dr = br
	case ".gz":
		zr, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("%s: %w", member, err)
		}
		defer zr.Close()
		dr = zr
	case ".xz":
		zr, err := xz.NewReader(br)
		if err != nil {
			return fmt.Errorf("%s: %w", member, err)
		}
		dr = zr
	case ".zst":
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return fmt.Errorf("%s: %w", member, err)
		}
		defer zr.Close()
		dr = zr
	case ".bz2":
		dr = bzip2.NewReader(br)
	default:
		return fmt.Errorf("%s: unsupported compression %q", member, ext)
	}
	tr := tar.NewReader(dr)
	for {
		if err := x.ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %w", member, err)
		}
		name, err := cleanEntryName(hdr.Name)
		if err != nil {
			return fmt.Errorf("%s: %w", member, err)
		}
		if name == "" {
			continue
		}
		if err := fn(name, hdr, tr); err != nil {
			return fmt.Errorf("%s: %s: %w", member, name, err)
		}
	}
}

// cleanEntryName turns an archive entry name ("./lib/modules/...") into a
// clean relative path, "" for the root, or ErrUnsafePath for names that are
// absolute or contain "..".
func cleanEntryName(name string) (string, error) {
	if strings.HasPrefix(name, "/") || strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("%w: %q", ErrUnsafePath, name)
	}
	for _, el := range strings.Split(name, "/") {
		if el == ".." {
			return "", fmt.Errorf("%w: %q", ErrUnsafePath, name)
		}
	}
	clean := path.Clean(name)
	if clean == "." {
		return "", nil
	}
	if !fs.ValidPath(clean) {
		return "", fmt.Errorf("%w: %q", ErrUnsafePath, name)
	}
	return clean, nil
}

func (x *debExtractor) controlEntry(name string, hdr *tar.Header, tr *tar.Reader) error {
	if name != "control" || hdr.Typeflag != tar.TypeReg {
		return nil
	}
	b, err := io.ReadAll(io.LimitReader(tr, 1<<20))
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Package:"); ok {
			x.pkgName = strings.TrimSpace(v)
		}
	}
	return nil
}

func (x *debExtractor) dataEntry(name string, hdr *tar.Header, tr *tar.Reader) error {
	// The kernel itself.
	if dir, file := path.Split(name); dir == "boot/" && strings.HasPrefix(file, "vmlinuz-") {
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		ver := strings.TrimPrefix(file, "vmlinuz-")
		if !versionRE.MatchString(ver) {
			return fmt.Errorf("unusable kernel version %q", ver)
		}
		if x.version != "" {
			return fmt.Errorf("package holds two kernels (%s and %s)", x.version, ver)
		}
		x.version = ver
		x.vmlinuzTmp = ".vmlinuz-" + ver
		return x.writeFile(x.vmlinuzTmp, hdr, tr)
	}
	if dir, file := path.Split(name); dir == "boot/" && strings.HasPrefix(file, "config-") {
		if hdr.Typeflag == tar.TypeReg {
			return x.writeFile("config", hdr, tr)
		}
		return nil
	}
	// Its modules, under lib/modules/<ver>/ or usr/lib/modules/<ver>/.
	rest, ok := strings.CutPrefix(name, "lib/modules/")
	if !ok {
		rest, ok = strings.CutPrefix(name, "usr/lib/modules/")
	}
	if !ok {
		return nil
	}
	ver, sub, _ := strings.Cut(rest, "/")
	if !versionRE.MatchString(ver) {
		return fmt.Errorf("unusable kernel version %q", ver)
	}
	if x.modVersions == nil {
		x.modVersions = map[string]bool{}
	}
	x.modVersions[ver] = true
	dst := path.Join("lib/modules", ver, sub)
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := x.root.MkdirAll(dst, 0o755); err != nil {
			return err
		}
	case tar.TypeReg:
		return x.writeFile(dst, hdr, tr)
	default:
		// Symlinks and hard links are not needed to boot and could point
		// anywhere: leave them out.
		x.log.Debug("skipping non-regular entry in kernel package", "name", name, "type", string(hdr.Typeflag))
	}
	return nil
}

func (x *debExtractor) writeFile(dst string, hdr *tar.Header, r io.Reader) (err error) {
	if hdr.Size > maxDebFileSize {
		return fmt.Errorf("file of %d bytes is too large", hdr.Size)
	}
	x.total += hdr.Size
	if x.total > maxDebTotalSize {
		return fmt.Errorf("package unpacks to more than %d bytes", int64(maxDebTotalSize))
	}
	if d := path.Dir(dst); d != "." {
		if err := x.root.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	f, err := x.root.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	n, err := io.Copy(f, io.LimitReader(r, hdr.Size))
	if err != nil {
		return err
	}
	if n != hdr.Size {
		return io.ErrUnexpectedEOF
	}
	return nil
}

// runDepmod generates modules.dep and friends for base/lib/modules/<version>.
func runDepmod(ctx context.Context, base, version string) error {
	depmod, err := lookTool("depmod")
	if err != nil {
		return fmt.Errorf("depmod not found (install kmod): %w", err)
	}
	base, err = filepath.Abs(base)
	if err != nil {
		return err
	}
	modDir := filepath.Join(base, "lib", "modules", version)
	run := func() error {
		ctx, cancel := context.WithTimeout(ctx, depmodTimeout)
		defer cancel()
		out, err := runTool(ctx, depmod, "-b", base, version)
		if err != nil {
			return fmt.Errorf("depmod for %s failed: %w: %s", version, err, bytes.TrimSpace(out))
		}
		return nil
	}
	if err := run(); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(modDir, "modules.dep")); err == nil {
		return nil
	}
	// A kmod built with /usr/lib/modules as its module directory looks for
	// base/usr/lib/modules: point that at our tree and try once more.
	if err := os.MkdirAll(filepath.Join(base, "usr", "lib"), 0o755); err != nil {
		return err
	}
	if err := os.Symlink("../../lib/modules", filepath.Join(base, "usr", "lib", "modules")); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	if err := run(); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(modDir, "modules.dep")); err != nil {
		return fmt.Errorf("depmod did not write modules.dep for %s: %w", version, err)
	}
	return nil
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
