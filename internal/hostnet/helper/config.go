package helper

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
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/hostnet"
)

// Defaults of the limits in the helper's configuration file.
const (
	DefaultMaxTapsPerUser  = 64
	DefaultMaxConnsPerUser = 8
	DefaultMaxConns        = 64
	DefaultRequestTimeout  = 30 * time.Second
	// MaxRequestLine bounds one request line to the helper (bangerd's own
	// socket keeps rpc.MaxLine).
	MaxRequestLine = 64 << 10
	// maxConfigFile bounds the configuration file.
	maxConfigFile = 64 << 10
)

// FileConfig is the helper's configuration file (hostnet.DefaultHelperConfig,
// JSON, written by `banger system install`). It must be a regular file
// owned by root (or by the helper's own uid) and writable by nobody else,
// in a directory of the same kind; anything else is refused.
type FileConfig struct {
	// Pool is the private IPv4 range banger's /24 is carved out of
	// (default hostnet.DefaultPool). Callers never choose it.
	Pool string `json:"pool,omitempty"`
	// MaxTapsPerUser caps the taps one uid owns (default 64; -1: no cap).
	MaxTapsPerUser *int `json:"max_taps_per_user,omitempty"`
	// MaxConnsPerUser caps one uid's simultaneous connections (default 8;
	// root is not capped).
	MaxConnsPerUser *int `json:"max_conns_per_user,omitempty"`
	// MaxConns caps all simultaneous connections (default 64).
	MaxConns *int `json:"max_conns,omitempty"`
	// RequestTimeout bounds the wait for each request line, e.g. "30s"
	// (default); an idle connection is closed after it.
	RequestTimeout string `json:"request_timeout,omitempty"`
	// AllowCIDRs are IPv4 ranges guests may reach although they are
	// private, link-local or otherwise blocked (netcfg.BlockedEgress), e.g.
	// ["192.168.1.0/24"] for a LAN service; added to --allow-cidr. At most
	// maxAllowCIDRs.
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
}

// maxAllowCIDRs bounds the allowed ranges (each is a rule per packet).
const maxAllowCIDRs = 64

// LoadConfigFile reads and checks the configuration file. A missing file
// gives the defaults (found is false).
func LoadConfigFile(path string) (fc FileConfig, found bool, err error) {
	if !filepath.IsAbs(path) {
		return fc, false, fmt.Errorf("configuration path %q must be absolute", path)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if errors.Is(err, unix.ENOENT) {
		return fc, false, nil
	}
	if errors.Is(err, unix.ELOOP) {
		return fc, false, fmt.Errorf("configuration %s is a symlink; refusing it (hint: write the file itself, e.g. with `sudo banger system install`)", path)
	}
	if err != nil {
		return fc, false, fmt.Errorf("open configuration %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fc, false, fmt.Errorf("stat configuration %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fc, false, fmt.Errorf("configuration %s is not a regular file; refusing it", path)
	}
	if err := trustedOwner("configuration "+path, st.Uid, st.Mode); err != nil {
		return fc, false, err
	}
	dir := filepath.Dir(path)
	var dst unix.Stat_t
	if err := unix.Lstat(dir, &dst); err != nil {
		return fc, false, fmt.Errorf("stat configuration directory %s: %w", dir, err)
	}
	if dst.Mode&unix.S_IFMT != unix.S_IFDIR {
		return fc, false, fmt.Errorf("configuration directory %s is not a directory (a symlink?); refusing it", dir)
	}
	if err := trustedOwner("configuration directory "+dir, dst.Uid, dst.Mode); err != nil {
		return fc, false, err
	}
	b, err := io.ReadAll(io.LimitReader(f, maxConfigFile+1))
	if err != nil {
		return fc, false, fmt.Errorf("read configuration %s: %w", path, err)
	}
	if len(b) > maxConfigFile {
		return fc, false, fmt.Errorf("configuration %s is larger than %d bytes", path, maxConfigFile)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fc); err != nil {
		return FileConfig{}, false, fmt.Errorf("configuration %s: %w", path, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return FileConfig{}, false, fmt.Errorf("configuration %s: trailing data after the object", path)
	}
	return fc, true, nil
}

// trustedOwner refuses a file or directory that someone other than root
// (or the helper's own uid) owns or may write.
func trustedOwner(what string, uid, mode uint32) error {
	if uid != 0 && int(uid) != os.Geteuid() {
		return fmt.Errorf("%s is owned by uid %d, not root; refusing it", what, uid)
	}
	if mode&(syscall.S_IWGRP|syscall.S_IWOTH) != 0 {
		return fmt.Errorf("%s is writable by group or others (mode %04o); refusing it (hint: chmod go-w)", what, mode&0o7777)
	}
	return nil
}

// Apply copies the file's settings into c (unset ones keep c's values).
func (fc FileConfig) Apply(c *Config) error {
	if fc.Pool != "" {
		p, err := netip.ParsePrefix(fc.Pool)
		if err != nil {
			return fmt.Errorf("pool %q is not a CIDR like %s", fc.Pool, hostnet.DefaultPool)
		}
		c.Pool = p
	}
	for _, f := range []struct {
		name string
		v    *int
		dst  *int
		min  int
	}{
		{"max_taps_per_user", fc.MaxTapsPerUser, &c.MaxTapsPerUser, -1},
		{"max_conns_per_user", fc.MaxConnsPerUser, &c.MaxConnsPerUser, 1},
		{"max_conns", fc.MaxConns, &c.MaxConns, 1},
	} {
		if f.v == nil {
			continue
		}
		if *f.v < f.min || *f.v == 0 || *f.v > 1<<16 {
			return fmt.Errorf("%s %d is out of range", f.name, *f.v)
		}
		*f.dst = *f.v
	}
	if len(fc.AllowCIDRs)+len(c.AllowCIDRs) > maxAllowCIDRs {
		return fmt.Errorf("allow_cidrs: at most %d ranges", maxAllowCIDRs)
	}
	for _, a := range fc.AllowCIDRs {
		p, err := netip.ParsePrefix(a)
		if err != nil || !p.Addr().Is4() {
			return fmt.Errorf("allow_cidrs: %q is not an IPv4 CIDR like 192.168.1.0/24", a)
		}
		c.AllowCIDRs = append(c.AllowCIDRs, p.Masked())
	}
	if fc.RequestTimeout != "" {
		d, err := time.ParseDuration(fc.RequestTimeout)
		if err != nil || d < 100*time.Millisecond || d > 10*time.Minute {
			return fmt.Errorf("request_timeout %q must be a duration between 100ms and 10m", fc.RequestTimeout)
		}
		c.RequestTimeout = d
	}
	return nil
}
