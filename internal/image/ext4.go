package image

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// BuildOptions tune the ext4 image.
type BuildOptions struct {
	// HeadroomMiB is free space added on top of the content (default 64).
	HeadroomMiB int
	// Label is the filesystem volume label (default "banger-image").
	Label string
	// SourceBytes is the expected size of local layer data, for progress.
	SourceBytes int64
}

// BuildResult describes a built filesystem.
type BuildResult struct {
	SizeBytes    int64 // the filesystem's size (the file is sparse)
	Inodes       int
	ContentBytes int64
	MkfsTime     time.Duration
	FixupTime    time.Duration
	FixupCmds    int
}

const blockSize = 4096

// BuildExt4 makes out (which must not exist) an ext4 filesystem holding the
// tree exactly. The staging directory is consumed (left for the caller to
// remove).
func (t *Tree) BuildExt4(ctx context.Context, out string, opts BuildOptions) (*BuildResult, error) {
	mkfs, err := tool("mkfs.ext4")
	if err != nil {
		return nil, err
	}
	debugfs, err := tool("debugfs")
	if err != nil {
		return nil, err
	}
	if opts.HeadroomMiB <= 0 {
		opts.HeadroomMiB = 64
	}
	if opts.Label == "" {
		opts.Label = "banger-image"
	}
	if err := t.setStagedTimes(); err != nil {
		return nil, err
	}
	script, blocks, inodes, err := t.fixupScript(filepath.Dir(out))
	if err != nil {
		return nil, err
	}
	res := &BuildResult{Inodes: inodes, ContentBytes: t.Bytes, FixupCmds: bytes.Count(script.Bytes(), []byte("\n"))}
	nInodes := inodes + inodes/10 + 256
	size := blocks*blockSize*11/10 + int64(nInodes)*256 + 16<<20 + int64(opts.HeadroomMiB)<<20
	size = (size + 1<<20 - 1) &^ (1<<20 - 1)
	start := time.Now()
	for attempt := 0; ; attempt++ {
		os.Remove(out)
		args := []string{"-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
			"-N", strconv.Itoa(nInodes), "-O", "^has_journal", "-E", "nodiscard,root_owner=0:0",
			"-L", opts.Label, "-d", t.staging, out, strconv.FormatInt(size>>10, 10) + "k"}
		cmd := exec.CommandContext(ctx, mkfs, args...)
		o, err := cmd.CombinedOutput()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		msg := string(o)
		if attempt < 3 && (strings.Contains(msg, "space") || strings.Contains(msg, "allocate")) {
			size *= 2
			continue
		}
		os.Remove(out)
		return nil, fmt.Errorf("mkfs.ext4 -d: %w: %s", err, strings.TrimSpace(msg))
	}
	res.MkfsTime = time.Since(start)
	res.SizeBytes = size
	start = time.Now()
	scriptPath := out + ".debugfs"
	if err := os.WriteFile(scriptPath, script.Bytes(), 0o600); err != nil {
		return nil, err
	}
	defer os.Remove(scriptPath)
	defer os.RemoveAll(filepath.Join(filepath.Dir(out), "xattrs"))
	cmd := exec.CommandContext(ctx, debugfs, "-w", "-f", scriptPath, out)
	var stderr bytes.Buffer
	cmd.Stdout = nil
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		os.Remove(out)
		return nil, fmt.Errorf("debugfs: %w: %s", err, firstLines(stderr.String(), 5))
	}
	// debugfs exits 0 even when commands fail: any message but the banner is a failure.
	var errs []string
	sc := bufio.NewScanner(&stderr)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "debugfs ") {
			continue
		}
		errs = append(errs, l)
	}
	if len(errs) > 0 {
		os.Remove(out)
		return nil, fmt.Errorf("set owners, modes and special files with debugfs: %s", firstLines(strings.Join(errs, "\n"), 5))
	}
	res.FixupTime = time.Since(start)
	return res, nil
}

func firstLines(s string, n int) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	if len(ls) > n {
		ls = append(ls[:n], fmt.Sprintf("(%d more)", len(ls)-n))
	}
	return strings.Join(ls, "; ")
}

func tool(name string) (string, error) {
	for _, d := range []string{"", "/usr/sbin/", "/sbin/"} {
		if d == "" {
			if p, err := exec.LookPath(name); err == nil {
				return p, nil
			}
			continue
		}
		if st, err := os.Stat(d + name); err == nil && st.Mode().IsRegular() {
			return d + name, nil
		}
	}
	return "", fmt.Errorf("%s not found; install the e2fsprogs package (apt-get install e2fsprogs)", name)
}

// quote makes s one debugfs argument.
func quote(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

func typeBits(k byte) int64 {
	switch k {
	case kindDir:
		return 0o040000
	case kindSymlink:
		return 0o120000
	case kindChar:
		return 0o020000
	case kindBlock:
		return 0o060000
	case kindFifo:
		return 0o010000
	}
	return 0o100000
}

// fixupScript writes the debugfs batch that makes the filesystem exact, and
// counts blocks and inodes for sizing. xattr values go to files under
// workDir/xattrs.
func (t *Tree) fixupScript(workDir string) (*bytes.Buffer, int64, int, error) {
	var b bytes.Buffer
	seen := map[*inode]string{}
	links := map[*inode]int{}
	var blocks int64
	xdir := filepath.Join(workDir, "xattrs")
	nx := 0
	err := t.walk(func(p string, n *inode, parent, name string) error {
		links[n]++
		if first, ok := seen[n]; ok {
			// A further name of an inode. Regular files and symlinks were
			// staged as hard links, which mkfs keeps; others need ln.
			if n.kind != kindReg && n.kind != kindSymlink {
				fmt.Fprintf(&b, "ln %s %s\n", quote(first), quote(p))
			}
			return nil
		}
		seen[n] = p
		switch n.kind {
		case kindReg:
			blocks += (n.size + blockSize - 1) / blockSize
		case kindDir:
			blocks += int64(1 + len(n.children)*32/blockSize)
		case kindSymlink:
			if len(n.link) >= 60 {
				blocks++
			}
		case kindChar, kindBlock, kindFifo:
			if strings.HasPrefix(name, "-") {
				return fmt.Errorf("special file %s: a name starting with '-' is not supported", p)
			}
			fmt.Fprintf(&b, "cd %s\n", quote(parent))
			switch n.kind {
			case kindFifo:
				fmt.Fprintf(&b, "mknod %s p\n", quote(name))
			case kindChar:
				fmt.Fprintf(&b, "mknod %s c %d %d\n", quote(name), n.major, n.minor)
			case kindBlock:
				fmt.Fprintf(&b, "mknod %s b %d %d\n", quote(name), n.major, n.minor)
			}
			fmt.Fprintf(&b, "cd /\n")
			sec := max(n.mtime.Unix(), 0)
			for _, f := range []string{"mtime", "atime", "ctime"} {
				fmt.Fprintf(&b, "sif %s %s @%d\n", quote(p), f, sec)
			}
		}
		q := quote(p)
		fmt.Fprintf(&b, "sif %s mode 0%o\nsif %s uid %d\nsif %s gid %d\n", q, typeBits(n.kind)|n.mode, q, n.uid, q, n.gid)
		if len(n.xattrs) > 0 {
			if nx == 0 {
				if err := os.MkdirAll(xdir, 0o700); err != nil {
					return err
				}
			}
			for _, k := range sortedKeys(n.xattrs) {
				if strings.ContainsAny(k, "\"\n\x00 ") || k == "" {
					return fmt.Errorf("%s: unsupported xattr name %q", p, k)
				}
				nx++
				vf := filepath.Join(xdir, strconv.Itoa(nx))
				if err := os.WriteFile(vf, []byte(n.xattrs[k]), 0o600); err != nil {
					return err
				}
				blocks++
				fmt.Fprintf(&b, "ea_set -f %s %s %s\n", quote(vf), q, k)
			}
		}
		return nil
	})
	if err != nil {
		return nil, 0, 0, err
	}
	for n, c := range links {
		if c > 1 && n.kind != kindReg && n.kind != kindSymlink {
			fmt.Fprintf(&b, "sif %s links_count %d\n", quote(seen[n]), c)
		}
	}
	_ = path.Join
	return &b, blocks, len(seen), nil
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	for i := 1; i < len(ks); i++ {
		for j := i; j > 0 && ks[j] < ks[j-1]; j-- {
			ks[j], ks[j-1] = ks[j-1], ks[j]
		}
	}
	return ks
}
