package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ModulesLoadFile lists the kernel modules the agent loads, one path per
// line relative to /lib/modules/<version>, dependencies first.
const ModulesLoadFile = "/banger/modules.load"

// ParseModulesLoad parses a modules.load list. Blank lines and lines
// starting with '#' are skipped. Paths must be relative and stay inside the
// modules directory.
func ParseModulesLoad(r io.Reader) ([]string, error) {
	var out []string
	sc := bufio.NewScanner(r)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		clean := path.Clean(line)
		if path.IsAbs(line) || clean == ".." || strings.HasPrefix(clean, "../") || !strings.Contains(path.Base(clean), ".ko") {
			return nil, fmt.Errorf("modules.load line %d: %q is not a module path relative to the modules directory", n, line)
		}
		out = append(out, clean)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.load: %w", err)
	}
	return out, nil
}

// kernelRelease returns `uname -r`.
func kernelRelease() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}

// moduleInitCompressedFile asks the kernel to decompress the module itself
// (Linux 6.1+ with CONFIG_MODULE_DECOMPRESS).
const moduleInitCompressedFile = 4

// loadModules loads every module listed in listFile from modDir, in order.
// A module that is already loaded or built in is fine. It returns the number
// loaded and the failures (boot goes on: a missing optional module, say
// vsock, must not stop the guest).
func loadModules(modDir, listFile string, log *slog.Logger) (int, []error) {
	f, err := os.Open(listFile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, nil
		}
		return 0, []error{err}
	}
	mods, err := ParseModulesLoad(f)
	f.Close()
	if err != nil {
		return 0, []error{err}
	}
	loaded := 0
	var errs []error
	for _, m := range mods {
		if err := loadModule(filepath.Join(modDir, filepath.FromSlash(m))); err != nil {
			errs = append(errs, fmt.Errorf("load module %s: %w", m, err))
			continue
		}
		loaded++
		log.Debug("module loaded", "module", m)
	}
	return loaded, errs
}

func loadModule(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	flags := 0
	if isCompressedModule(p) {
		flags = moduleInitCompressedFile
	}
	err = unix.FinitModule(int(f.Fd()), "", flags)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	if err != nil && flags != 0 {
		return fmt.Errorf("%w (compressed modules need a kernel with CONFIG_MODULE_DECOMPRESS; banger's initrd builder stores them uncompressed)", err)
	}
	return err
}

func isCompressedModule(p string) bool {
	for _, ext := range []string{".ko.xz", ".ko.gz", ".ko.zst"} {
		if strings.HasSuffix(p, ext) {
			return true
		}
	}
	return false
}
