package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"

	"github.com/bangerdev/banger/internal/hostnet"
)

// trustedDir creates dir (0755) when missing and checks it and each of its
// ancestors: a real directory (not a symlink) owned by root (or this
// process's uid) that nobody else may write, unless it is sticky (like
// /tmp, where others cannot rename root's entries).
func trustedDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		stat := os.Stat // an ancestor may be a symlink (e.g. /usr/local); its target counts
		if d == dir {
			stat = os.Lstat
		}
		fi, err := stat(d)
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		switch {
		case !ok:
			return fmt.Errorf("cannot read the owner of %s", d)
		case !fi.IsDir():
			return fmt.Errorf("%s is not a directory (a symlink?); refusing to install there", d)
		case st.Uid != 0 && int(st.Uid) != os.Geteuid():
			return fmt.Errorf("%s is owned by uid %d, not root; refusing to install there", d, st.Uid)
		case fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0:
			return fmt.Errorf("%s is writable by group or others (mode %04o); refusing to install there", d, fi.Mode().Perm())
		}
		if d == "/" || d == "." {
			return nil
		}
	}
}

// InstallBinary copies src to dst atomically: a new file (0755, owned by
// the installing user, i.e. root) in a trusted directory, renamed into
// place. Later changes to src do not affect dst.
func InstallBinary(src, dst string) error {
	if err := checkPath("installed binary", dst); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("open %s: %w", src, err)
	}
	defer in.Close()
	if fi, err := in.Stat(); err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file (%v)", src, err)
	}
	dir := filepath.Dir(dst)
	if err := trustedDir(dir); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".*")
	if err != nil {
		return fmt.Errorf("install %s: %w", dst, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("install %s: %w", dst, err)
	}
	return nil
}

// WriteHelperConfig writes the helper's configuration (0644, in a trusted
// directory). pool, when set, replaces the configured range and keeps the
// file's other settings; when empty, an existing file is left alone and a
// new one gets hostnet.DefaultPool.
func WriteHelperConfig(path, pool string) error {
	if err := checkPath("helper configuration", path); err != nil {
		return err
	}
	if pool != "" {
		p, err := netip.ParsePrefix(pool)
		if err != nil || !p.Addr().Is4() || !hostnet.IsPrivate(p) || p.Bits() > hostnet.MaxSubnetBits {
			return fmt.Errorf("pool %q must be a private IPv4 range such as %s, of at most /%d", pool, hostnet.DefaultPool, hostnet.MaxSubnetBits)
		}
		pool = p.Masked().String()
	}
	if err := trustedDir(filepath.Dir(path)); err != nil {
		return err
	}
	cfg := map[string]json.RawMessage{}
	old, err := os.ReadFile(path)
	switch {
	case err == nil && pool == "":
		return nil
	case err == nil:
		if err := json.Unmarshal(old, &cfg); err != nil {
			return fmt.Errorf("existing %s is not a JSON object (%v); remove it or fix it", path, err)
		}
	case errors.Is(err, os.ErrNotExist):
		if pool == "" {
			pool = hostnet.DefaultPool
		}
	default:
		return err
	}
	cfg["pool"], _ = json.Marshal(pool)
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if bytes.Equal(b, old) {
		return nil
	}
	_, err = writeUnit(path, string(b))
	return err
}
