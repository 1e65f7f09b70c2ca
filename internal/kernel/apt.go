package kernel

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// CloudKernelMetaPackage is Debian's meta package that always depends on the
// current cloud kernel (small, virtio drivers as modules, PVH entry point).
const CloudKernelMetaPackage = "linux-image-cloud-amd64"

// pkgNameRE is Debian's rule for package names (policy 5.6.1), which also
// keeps names from being taken as options.
var pkgNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)

// ValidatePackageName checks that name is a valid Debian package name.
func ValidatePackageName(name string) error {
	if len(name) > 200 || !pkgNameRE.MatchString(name) {
		return fmt.Errorf("%q is not a valid Debian package name (lower-case letters, digits, '+', '-', '.'; at least two characters)", name)
	}
	return nil
}

// FetchPackage downloads the binary package name (for the host's
// architecture, at its candidate version) into dir with `apt-get download`,
// which needs no root, and returns the path of the .deb.
func FetchPackage(ctx context.Context, name, dir string) (string, error) {
	if err := ValidatePackageName(name); err != nil {
		return "", err
	}
	aptGet, err := lookTool("apt-get")
	if err != nil {
		return "", fmt.Errorf("apt-get not found (banger downloads kernel packages with apt; on other systems import a vmlinux or a .deb file instead): %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create download directory: %w", err)
	}
	tmp, err := os.MkdirTemp(dir, ".apt-download-")
	if err != nil {
		return "", fmt.Errorf("create download directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	// apt's sandbox user must be able to write here when we run as root.
	_ = os.Chmod(tmp, 0o755)

	dctx, cancel := context.WithTimeout(ctx, aptDownloadTimeout)
	defer cancel()
	out, err := runToolIn(dctx, tmp, aptGet, "-q", "download", name)
	if err != nil {
		hint := ""
		if bytes.Contains(out, []byte("Unable to locate package")) || bytes.Contains(out, []byte("has no installation candidate")) {
			hint = " (is the package list up to date? try: sudo apt-get update)"
		}
		return "", fmt.Errorf("apt-get download %s failed%s: %w: %s", name, hint, err, lastLines(out, 5))
	}
	matches, err := filepath.Glob(filepath.Join(tmp, name+"_*.deb"))
	if err != nil {
		return "", err
	}
	if len(matches) != 1 {
		return "", fmt.Errorf("apt-get download %s left %d matching .deb files, want 1: %s", name, len(matches), lastLines(out, 5))
	}
	dst := filepath.Join(dir, filepath.Base(matches[0]))
	if err := os.Rename(matches[0], dst); err != nil {
		return "", fmt.Errorf("move downloaded package: %w", err)
	}
	return dst, nil
}

// ResolveKernelPackage asks apt which kernel the meta package meta (normally
// CloudKernelMetaPackage) currently depends on and returns the name of the
// matching unsigned image package, e.g. linux-image-6.1.0-56-cloud-amd64-unsigned.
func ResolveKernelPackage(ctx context.Context, meta string) (string, error) {
	if err := ValidatePackageName(meta); err != nil {
		return "", err
	}
	aptCache, err := lookTool("apt-cache")
	if err != nil {
		return "", fmt.Errorf("apt-cache not found (banger finds kernel packages with apt; on other systems import a vmlinux or a .deb file instead): %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, aptCacheTimeout)
	defer cancel()
	out, err := runTool(cctx, aptCache, "depends", meta)
	if err != nil {
		return "", fmt.Errorf("apt-cache depends %s failed (is the package list up to date? try: sudo apt-get update): %w: %s", meta, err, lastLines(out, 5))
	}
	name, err := parseKernelDepends(out, meta)
	if err != nil {
		return "", err
	}
	return name, nil
}

// parseKernelDepends picks the linux-image-<ver> dependency out of
// `apt-cache depends META` output and names its unsigned variant.
func parseKernelDepends(out []byte, meta string) (string, error) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimLeft(strings.TrimSpace(sc.Text()), "|")
		dep, ok := strings.CutPrefix(line, "Depends:")
		if !ok {
			continue
		}
		dep = strings.TrimSpace(dep)
		if i := strings.IndexAny(dep, " :"); i >= 0 { // "name:arch" or "name (>= v)"
			dep = dep[:i]
		}
		if dep == meta || !strings.HasPrefix(dep, "linux-image-") || ValidatePackageName(dep) != nil {
			continue
		}
		if !strings.HasSuffix(dep, "-unsigned") {
			dep += "-unsigned"
		}
		return dep, nil
	}
	return "", fmt.Errorf("%s depends on no linux-image package (is the package list up to date? try: sudo apt-get update)", meta)
}

// lastLines returns the last n non-empty lines of out, for error messages.
func lastLines(out []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "; ")
}
