package testenv

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// rootfsVersion changes whenever the layout BusyboxRootfs writes changes
// (bump it to invalidate cached images).
const rootfsVersion = "1"

// BusyboxRootfs returns a fresh copy (in t.TempDir(), the caller may write to
// it) of a sizeMiB ext4 image holding a static busybox as /bin/busybox with a
// symlink for every applet, /etc/passwd (root, /bin/sh), /etc/group,
// /etc/hostname and empty /proc /sys /dev /run /tmp /root, all owned by root.
// There is deliberately no /sbin/init: banger-agent must not need one. The
// image is made without root (mkfs.ext4 -d, then debugfs to make root the
// owner) and cached by content. Skips when busybox-static or e2fsprogs is
// missing.
func BusyboxRootfs(t testing.TB, sizeMiB int) string {
	t.Helper()
	if sizeMiB < 8 || sizeMiB > 64<<10 {
		t.Fatalf("BusyboxRootfs: size %d MiB out of range [8, 65536]", sizeMiB)
	}
	busybox, err := staticBusybox()
	if err != nil {
		t.Skipf("busybox-static not installed: %v", err)
	}
	mkfs, err := lookTool("mkfs.ext4")
	if err != nil {
		t.Skipf("mkfs.ext4 not installed (Debian package e2fsprogs): %v", err)
	}
	debugfs, err := lookTool("debugfs")
	if err != nil {
		t.Skipf("debugfs not installed (Debian package e2fsprogs): %v", err)
	}
	bbSum, err := hashFile(busybox)
	if err != nil {
		t.Fatalf("read busybox: %v", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "rootfs %s\nbusybox %s\nsize %d\n", rootfsVersion, bbSum, sizeMiB)
	key := hex.EncodeToString(h.Sum(nil))[:24]

	dir := filepath.Join(CacheDir(t), "rootfs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("create %s: %v", dir, err)
	}
	cached := filepath.Join(dir, key+".ext4")
	if _, err := os.Stat(cached); err != nil {
		prune(dir)
		start := time.Now()
		if err := buildBusyboxRootfs(t, cached, busybox, mkfs, debugfs, sizeMiB); err != nil {
			t.Fatalf("build busybox rootfs: %v", err)
		}
		t.Logf("testenv: built busybox rootfs (%d MiB) in %v", sizeMiB, time.Since(start).Round(time.Millisecond))
	}
	touch(cached)
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	if err := copySparse(cached, out); err != nil {
		t.Fatalf("copy busybox rootfs: %v", err)
	}
	return out
}

// staticBusybox finds a statically linked busybox (the busybox-static package).
func staticBusybox() (string, error) {
	cands := []string{"/bin/busybox", "/usr/bin/busybox"}
	if p, err := exec.LookPath("busybox"); err == nil {
		cands = append(cands, p)
	}
	var lastErr error = errors.New("no busybox binary found")
	for _, p := range cands {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		dynamic := false
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				dynamic = true
			}
		}
		f.Close()
		if !dynamic {
			return p, nil
		}
		lastErr = fmt.Errorf("%s is dynamically linked (install busybox-static, not busybox)", p)
	}
	return "", lastErr
}

func buildBusyboxRootfs(t testing.TB, dst, busybox, mkfs, debugfs string, sizeMiB int) error {
	ctx := testCtx(t, 5*time.Minute)
	work, err := os.MkdirTemp(filepath.Dir(dst), ".build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	tree := filepath.Join(work, "tree")

	out, err := exec.CommandContext(ctx, busybox, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("busybox --list-full: %w", err)
	}
	// Everything below is created with explicit modes (no umask surprises).
	var paths []string // every path in the image, for the ownership fix
	mkdir := func(rel string, mode fs.FileMode) error {
		for _, d := range parents(rel) {
			p := filepath.Join(tree, d)
			if _, err := os.Lstat(p); err == nil {
				continue
			}
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(p, 0o755); err != nil {
				return err
			}
			paths = append(paths, "/"+d)
		}
		p := filepath.Join(tree, rel)
		if err := os.Mkdir(p, mode); err != nil {
			return err
		}
		paths = append(paths, "/"+rel)
		return os.Chmod(p, mode)
	}
	writeFile := func(rel string, data []byte, mode fs.FileMode) error {
		if d := path.Dir(rel); d != "." {
			if _, err := os.Lstat(filepath.Join(tree, d)); err != nil {
				if err := mkdir(d, 0o755); err != nil {
					return err
				}
			}
		}
		p := filepath.Join(tree, rel)
		if err := os.WriteFile(p, data, mode); err != nil {
			return err
		}
		paths = append(paths, "/"+rel)
		return os.Chmod(p, mode)
	}

	if err := os.Mkdir(tree, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(tree, 0o755); err != nil {
		return err
	}
	paths = append(paths, "/")
	for _, d := range []struct {
		rel  string
		mode fs.FileMode
	}{{"bin", 0o755}, {"etc", 0o755}, {"proc", 0o555}, {"sys", 0o555}, {"dev", 0o755}, {"run", 0o755}, {"tmp", 0o777 | fs.ModeSticky}, {"root", 0o700}} {
		if err := mkdir(d.rel, d.mode); err != nil {
			return err
		}
	}
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	if err := writeFile("bin/busybox", bb, 0o755); err != nil {
		return err
	}
	for _, f := range []struct{ rel, data string }{
		{"etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"},
		{"etc/group", "root:x:0:\n"},
		{"etc/hostname", "banger-test\n"},
	} {
		if err := writeFile(f.rel, []byte(f.data), 0o644); err != nil {
			return err
		}
	}
	applets := 0
	for _, line := range strings.Split(string(out), "\n") {
		rel := strings.TrimSpace(line)
		if rel == "" || rel == "sbin/init" || rel == "linuxrc" || rel == "bin/busybox" {
			continue // no init: the agent must do without one
		}
		if !fs.ValidPath(rel) || strings.Contains(rel, "..") {
			return fmt.Errorf("busybox lists an odd applet path %q", rel)
		}
		if d := path.Dir(rel); d != "." {
			if _, err := os.Lstat(filepath.Join(tree, d)); err != nil {
				if err := mkdir(d, 0o755); err != nil {
					return err
				}
			}
		}
		if err := os.Symlink("/bin/busybox", filepath.Join(tree, rel)); err != nil {
			if errors.Is(err, fs.ErrExist) {
				continue
			}
			return err
		}
		paths = append(paths, "/"+rel)
		applets++
	}
	if applets == 0 {
		return errors.New("busybox --list-full listed no applets")
	}

	img := filepath.Join(work, "rootfs.ext4")
	if out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", "-L", "busybox-root", "-d", tree, img, fmt.Sprintf("%dM", sizeMiB)).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, bytes.TrimSpace(out))
	}
	// mkfs.ext4 -d copies the builder's uid/gid; make root the owner of
	// everything, which also works when the tests do not run as root.
	var cmds bytes.Buffer
	for _, p := range paths {
		fmt.Fprintf(&cmds, "sif \"%s\" uid 0\nsif \"%s\" gid 0\n", p, p)
	}
	cmdFile := filepath.Join(work, "debugfs.cmds")
	if err := os.WriteFile(cmdFile, cmds.Bytes(), 0o644); err != nil {
		return err
	}
	dout, err := exec.CommandContext(ctx, debugfs, "-w", "-f", cmdFile, img).CombinedOutput()
	if err != nil {
		return fmt.Errorf("debugfs (set owners): %w: %s", err, bytes.TrimSpace(dout))
	}
	for _, line := range strings.Split(string(dout), "\n") {
		if strings.HasPrefix(line, "sif:") || strings.Contains(line, "File not found") {
			return fmt.Errorf("debugfs (set owners): %s", line)
		}
	}
	return os.Rename(img, dst)
}

// parents returns the proper ancestors of a relative path, outermost first.
func parents(rel string) []string {
	var out []string
	for d := path.Dir(rel); d != "."; d = path.Dir(d) {
		out = append([]string{d}, out...)
	}
	return out
}

// copySparse copies src to dst, leaving holes where src has runs of zeros.
func copySparse(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	}()
	buf := make([]byte, 1<<20)
	zero := make([]byte, len(buf))
	var off int64
	for {
		n, rerr := io.ReadFull(in, buf)
		if n > 0 {
			for i := 0; i < n; i += 64 << 10 {
				chunk := buf[i:min(i+64<<10, n)]
				if !bytes.Equal(chunk, zero[:len(chunk)]) {
					if _, err := out.WriteAt(chunk, off+int64(i)); err != nil {
						return err
					}
				}
			}
			off += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	return out.Truncate(st.Size())
}
