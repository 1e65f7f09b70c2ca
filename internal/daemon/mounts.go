package daemon

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
)

// mountsUnder returns the mount points at or below dir, deepest first, read
// from a mountinfo table (/proc/self/mountinfo format).
func mountsUnder(mountinfo io.Reader, dir string) []string {
	dir = filepath.Clean(dir)
	var out []string
	sc := bufio.NewScanner(mountinfo)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// unescapeMountinfo undoes the octal escapes (\040 for a space, ...) of
// /proc/self/mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeTree unmounts everything mounted under dir (a debootstrap stopped
// half-way leaves proc mounted in its target), then removes dir. It never
// removes a tree that still has a mount in it: RemoveAll would descend into
// the mounted filesystem.
func removeTree(dir string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	mps := mountsUnder(f, dir)
	f.Close()
	var left []string
	for _, mp := range mps {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
			left = append(left, mp)
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("cannot unmount %s (as root: umount -l %s), so %s is kept", strings.Join(left, ", "), strings.Join(left, " "), dir)
	}
	return os.RemoveAll(dir)
}
