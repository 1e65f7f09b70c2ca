package image

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

var (
	suiteRe   = regexp.MustCompile(`^[a-z][a-z0-9-]{1,31}$`)
	packageRe = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]{1,62}$`)
)

// ValidateSuite checks a Debian suite or codename (bookworm, stable, sid).
func ValidateSuite(s string) error {
	if !suiteRe.MatchString(s) {
		return fmt.Errorf("bad Debian suite %q (e.g. bookworm, trixie, stable)", s)
	}
	return nil
}

// ValidatePackage checks a Debian package name.
func ValidatePackage(s string) error {
	if !packageRe.MatchString(s) {
		return fmt.Errorf("bad Debian package name %q", s)
	}
	return nil
}

// DefaultMirror reads the host's apt sources (one-line and deb822 formats)
// and returns the first Debian archive URI, or deb.debian.org.
func DefaultMirror(root string) string {
	var files []string
	files = append(files, filepath.Join(root, "etc/apt/sources.list"))
	for _, pat := range []string{"*.list", "*.sources"} {
		m, _ := filepath.Glob(filepath.Join(root, "etc/apt/sources.list.d", pat))
		files = append(files, m...)
	}
	for _, f := range files {
		if u := mirrorIn(f); u != "" {
			return u
		}
	}
	return "http://deb.debian.org/debian"
}

func mirrorIn(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	deb822 := strings.HasSuffix(path, ".sources")
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		var cands []string
		if deb822 {
			if v, ok := strings.CutPrefix(l, "URIs:"); ok {
				cands = strings.Fields(v)
			}
		} else if fs := strings.Fields(l); len(fs) >= 3 && fs[0] == "deb" {
			for _, x := range fs[1:] {
				if !strings.HasPrefix(x, "[") && !strings.HasSuffix(x, "]") {
					cands = append(cands, x)
					break
				}
			}
		}
		for _, c := range cands {
			u, err := url.Parse(c)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
				continue
			}
			// the main archive, not security or third-party repositories
			if strings.HasSuffix(strings.TrimSuffix(u.Path, "/"), "/debian") {
				return strings.TrimSuffix(c, "/")
			}
		}
	}
	return ""
}

// DebootstrapOptions describe a Debian image build.
type DebootstrapOptions struct {
	Suite    string
	Mirror   string // default: DefaultMirror("/")
	Packages []string
	Work     string // a directory the caller owns and removes
	Logger   *slog.Logger
	Log      io.Writer // debootstrap's output
}

// Debootstrap builds a Debian tree and returns it as one tar stream with the
// true owners, modes, device nodes and xattrs: as root with plain
// debootstrap, as a user with fakechroot + fakeroot (their state file keeps
// the owners). The returned wait func reports the archiver's result.
func Debootstrap(ctx context.Context, o DebootstrapOptions) (io.ReadCloser, func() error, error) {
	if err := ValidateSuite(o.Suite); err != nil {
		return nil, nil, err
	}
	for _, p := range o.Packages {
		if err := ValidatePackage(p); err != nil {
			return nil, nil, err
		}
	}
	if o.Mirror == "" {
		o.Mirror = DefaultMirror("/")
	}
	if u, err := url.Parse(o.Mirror); err != nil || (u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "file") || u.Host == "" && u.Scheme != "file" {
		return nil, nil, fmt.Errorf("bad mirror URL %q", o.Mirror)
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	deb, err := exec.LookPath("debootstrap")
	if err != nil {
		if deb, err = tool("debootstrap"); err != nil {
			return nil, nil, errors.New("debootstrap is not installed (apt-get install debootstrap)")
		}
	}
	target := filepath.Join(o.Work, "rootfs")
	args := []string{"--variant=minbase"}
	if len(o.Packages) > 0 {
		args = append(args, "--include="+strings.Join(o.Packages, ","))
	}
	var prefix, tarPrefix []string
	if os.Geteuid() != 0 {
		fc, err1 := exec.LookPath("fakechroot")
		fr, err2 := exec.LookPath("fakeroot")
		if err1 != nil || err2 != nil {
			return nil, nil, errors.New("building a Debian image without root needs fakechroot and fakeroot (apt-get install fakechroot fakeroot), or run bangerd as root")
		}
		state := filepath.Join(o.Work, "fakeroot.state")
		prefix = []string{fc, fr, "-s", state, "--"}
		tarPrefix = []string{fr, "-i", state, "--"}
		args[0] = "--variant=fakechroot"
	}
	args = append(args, o.Suite, target, o.Mirror)
	full := append(append(prefix, deb), args...)
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	cmd.Stdout, cmd.Stderr = o.Log, o.Log
	cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		return nil, nil, fmt.Errorf("debootstrap %s from %s failed: %w (its output is in the daemon log)", o.Suite, o.Mirror, err)
	}
	tarBin, err := exec.LookPath("tar")
	if err != nil {
		return nil, nil, errors.New("tar is not installed")
	}
	targs := append(append([]string{}, tarPrefix...), tarBin, "--numeric-owner", "--xattrs", "--xattrs-include=*",
		"--format=pax", "-C", target, "-cf", "-", ".")
	tc := exec.CommandContext(ctx, targs[0], targs[1:]...)
	tc.Stderr = o.Log
	out, err := tc.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := tc.Start(); err != nil {
		return nil, nil, fmt.Errorf("archive the Debian tree: %w", err)
	}
	return out, tc.Wait, nil
}
