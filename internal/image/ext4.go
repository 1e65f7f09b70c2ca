package image

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// BuildOptions tune the ext4 image.
type BuildOptions struct {
	// HeadroomMiB is free space added on top of the content (default 64).
	HeadroomMiB int
	// Label is the filesystem volume label (default "banger-image").
	Label string
	// SourceBytes is the expected size of local layer data, for progress.
	SourceBytes int64
	// Limits bound what the layers may unpack to (Flatten, FromTar).
	Limits Limits
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
	workDir := filepath.Dir(out)
	defer os.RemoveAll(filepath.Join(workDir, "xattrs"))
	var script debugfsScript
	blocks, inodes, err := t.fixupScript(&script, workDir)
	if err != nil {
		return nil, err
	}
	if err := script.verify(); err != nil {
		return nil, err
	}
	res := &BuildResult{Inodes: inodes, ContentBytes: t.Bytes, FixupCmds: script.n}
	nInodes := inodes + inodes/10 + 256
	size := blocks*blockSize*11/10 + int64(nInodes)*256 + 16<<20 + int64(opts.HeadroomMiB)<<20
	size = (size + 1<<20 - 1) &^ (1<<20 - 1)
	// The file is sparse: it takes about the content plus the inode tables.
	if err := t.checkSpace(blocks*blockSize+int64(nInodes)*256, "the image's filesystem"); err != nil {
		return nil, err
	}
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
	var stderr bytes.Buffer
	stdout := &stdoutCheck{}
	// debugfs runs in workDir: the batch names xattr value files relative to it.
	if err := runDebugfs(ctx, debugfs, workDir, out, script.b.Bytes(), stdout, &limitedBuffer{b: &stderr, max: 64 << 10}); err != nil {
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
	// Some commands (ea_set) print their usage on stdout.
	errs = append(errs, stdout.bad...)
	if len(errs) > 0 {
		os.Remove(out)
		return nil, fmt.Errorf("set owners, modes and special files with debugfs: %s", firstLines(strings.Join(errs, "\n"), 5))
	}
	res.FixupTime = time.Since(start)
	return res, nil
}

// runDebugfs runs `debugfs -w -f - img` in dir and feeds it script on stdin.
// Before the script is written, the child's RLIMIT_NPROC is set to 0: an
// unprivileged debugfs then cannot fork, so a shell escape that got past the
// script writer would still run nothing (bangerd never runs as root, which
// the limit does not bind). Nothing in debugfs forks before reading the script.
func runDebugfs(ctx context.Context, debugfs, dir, img string, script []byte, stdout, stderr io.Writer) error {
	cmd := exec.CommandContext(ctx, debugfs, "-w", "-f", "-", img)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = stdout, stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	if err := unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_NPROC, &unix.Rlimit{}, nil); err != nil {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
		return fmt.Errorf("forbid debugfs to start processes: %w", err)
	}
	_, werr := stdin.Write(script)
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		return err
	}
	if werr != nil {
		return fmt.Errorf("write the batch: %w", werr)
	}
	return nil
}

// stdoutCheck keeps (a few of) the lines of debugfs's stdout that are not
// its echo of a command or mknod's inode number.
type stdoutCheck struct {
	partial []byte
	bad     []string
}

func (w *stdoutCheck) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			if len(w.partial) < 256 {
				w.partial = append(w.partial, p[:min(len(p), 256-len(w.partial))]...)
			}
			break
		}
		line := append(w.partial, p[:i]...)
		w.partial = w.partial[:0]
		p = p[i+1:]
		l := string(line)
		if strings.HasPrefix(l, "debugfs: ") || strings.HasPrefix(l, "Allocated inode: ") || strings.TrimSpace(l) == "" {
			continue
		}
		if len(w.bad) < 10 {
			w.bad = append(w.bad, strings.TrimSpace(l))
		}
	}
	return n, nil
}

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	b   *bytes.Buffer
	max int
}

func (w *limitedBuffer) Write(p []byte) (int, error) {
	if room := w.max - w.b.Len(); room > 0 {
		w.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
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
// counts blocks and inodes for sizing. debugfs works in the directory being
// fixed (cd), so every name in the batch is one component; xattr values go to
// files under workDir/xattrs, named relative to workDir (debugfs's working
// directory).
func (t *Tree) fixupScript(s *debugfsScript, workDir string) (int64, int, error) {
	// Special files with several names need their link count set.
	links := map[*inode]int{}
	t.walk(func(_ string, n *inode, _, _ string) error {
		links[n]++
		return nil
	})
	first := map[*inode][]string{} // inodes with several names: the first name's path
	var blocks int64
	inodes := 0
	nx := 0
	xdir := filepath.Join(workDir, "xattrs")

	// fix sets one inode's metadata; ref names it from the current directory.
	fix := func(ref, desc string, n *inode) error {
		if err := s.cmd("sif", ref, "mode", fmt.Sprintf("0%o", typeBits(n.kind)|n.mode)); err != nil {
			return err
		}
		if err := s.cmd("sif", ref, "uid", strconv.Itoa(n.uid)); err != nil {
			return err
		}
		if err := s.cmd("sif", ref, "gid", strconv.Itoa(n.gid)); err != nil {
			return err
		}
		if len(n.xattrs) > 0 && nx == 0 {
			if err := os.MkdirAll(xdir, 0o700); err != nil {
				return err
			}
		}
		for _, k := range sortedKeys(n.xattrs) {
			if err := checkXattr(k, n.xattrs[k]); err != nil {
				return fmt.Errorf("%s: %w", desc, err)
			}
			nx++
			vf := strconv.Itoa(nx)
			if err := os.WriteFile(filepath.Join(xdir, vf), []byte(n.xattrs[k]), 0o600); err != nil {
				return err
			}
			blocks++
			if err := s.cmd("ea_set", "-f", "xattrs/"+vf, ref, k); err != nil {
				return fmt.Errorf("%s: %w", desc, err)
			}
		}
		return nil
	}

	inodes++
	if err := fix("/", "/", t.root); err != nil {
		return 0, 0, err
	}
	var rec func(dir []string, d *inode) error
	rec = func(dir []string, d *inode) error {
		for _, name := range sortedKeys(d.children) {
			n := d.children[name].ino
			p := append(slices.Clip(dir), name)
			desc := "/" + strings.Join(p, "/")
			if err := checkName(name); err != nil {
				return fmt.Errorf("%s: %w", desc, err)
			}
			if len(desc) > maxPathLen {
				return fmt.Errorf("%s: %w: path of %d bytes (at most %d)", desc[:64]+"…", ErrUnsafePath, len(desc), maxPathLen)
			}
			ref := "./" + name
			if links[n] > 1 {
				if firstPath, ok := first[n]; ok {
					// A further name. Regular files and symlinks were staged
					// as hard links, which mkfs keeps; special files need ln.
					if n.kind != kindReg && n.kind != kindSymlink {
						if err := s.cmd("ln", linkSource(dir, firstPath), ref); err != nil {
							return fmt.Errorf("hard link %s: %w", desc, err)
						}
					}
					continue
				}
				first[n] = p
			}
			inodes++
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
				var err error
				switch n.kind {
				case kindFifo:
					err = s.cmd("mknod", name, "p")
				case kindChar:
					err = s.cmd("mknod", name, "c", strconv.FormatInt(n.major, 10), strconv.FormatInt(n.minor, 10))
				case kindBlock:
					err = s.cmd("mknod", name, "b", strconv.FormatInt(n.major, 10), strconv.FormatInt(n.minor, 10))
				}
				if err != nil {
					return fmt.Errorf("%s: %w", desc, err)
				}
				sec := strconv.FormatInt(min(max(n.mtime.Unix(), 0), 1<<33), 10)
				for _, f := range []string{"mtime", "atime", "ctime"} {
					if err := s.cmd("sif", ref, f, "@"+sec); err != nil {
						return err
					}
				}
				if links[n] > 1 {
					if err := s.cmd("sif", ref, "links_count", strconv.Itoa(links[n])); err != nil {
						return err
					}
				}
			}
			if err := fix(ref, desc, n); err != nil {
				return err
			}
			if n.kind == kindDir {
				if err := s.cmd("cd", ref); err != nil {
					return fmt.Errorf("%s: %w", desc, err)
				}
				if err := rec(p, n); err != nil {
					return err
				}
				if err := s.cmd("cd", ".."); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := rec(nil, t.root); err != nil {
		return 0, 0, err
	}
	return blocks, inodes, nil
}

// linkSource names target (a path from the root) from directory dir: the
// shorter of the absolute path and the relative one.
func linkSource(dir, target []string) string {
	abs := "/" + strings.Join(target, "/")
	k := 0
	for k < len(dir) && k < len(target)-1 && dir[k] == target[k] {
		k++
	}
	rel := strings.Repeat("../", len(dir)-k) + strings.Join(target[k:], "/")
	if k == len(dir) {
		rel = "./" + rel
	}
	if len(rel) < len(abs) {
		return rel
	}
	return abs
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
