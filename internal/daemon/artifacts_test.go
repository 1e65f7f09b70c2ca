package daemon

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestCopyFileKeepsContentAndHoles(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, _ := os.Create(src)
	f.WriteAt([]byte("head"), 0)
	f.WriteAt([]byte("middle"), 64<<20)
	f.Truncate(128 << 20) // trailing hole
	f.Close()
	dst := filepath.Join(dir, "dst")
	if err := copyFile(src, dst); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Fatal("content differs")
	}
	var st syscall.Stat_t
	syscall.Stat(dst, &st)
	if used := st.Blocks * 512; used > 4<<20 {
		t.Fatalf("copy of a 128 MiB sparse file uses %d bytes: holes were filled", used)
	}
}
