package vmmproc

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
)

func TestCheckSocketPath(t *testing.T) {
	if err := CheckSocketPath("/" + strings.Repeat("a", 106)); err != nil {
		t.Errorf("107 bytes: %v", err)
	}
	err := CheckSocketPath("/" + strings.Repeat("a", 107))
	if err == nil || !strings.Contains(err.Error(), "shorter BANGER_HOME") {
		t.Errorf("108 bytes: %v", err)
	}
}

func TestRemoveSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if err := RemoveSocket(sock); err != nil {
		t.Fatalf("remove socket: %v", err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket still there: %v", err)
	}
	if err := RemoveSocket(sock); err != nil {
		t.Fatalf("missing socket: %v", err)
	}
	file := filepath.Join(dir, "f")
	os.WriteFile(file, []byte("x"), 0o600)
	if err := RemoveSocket(file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("regular file: %v", err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Fatalf("regular file removed: %v", err)
	}
}

func TestTail(t *testing.T) {
	p := filepath.Join(t.TempDir(), "log")
	var b strings.Builder
	for i := 0; i < 5000; i++ {
		b.WriteString("filler line\n")
	}
	b.WriteString("  ERROR one  \n\nlast\n")
	os.WriteFile(p, []byte(b.String()), 0o600)
	tests := []struct {
		n      int
		filter func(string) bool
		want   []string
	}{
		{2, nil, []string{"ERROR one", "last"}},
		{1, func(s string) bool { return strings.Contains(s, "ERROR") }, []string{"ERROR one"}},
	}
	for _, tc := range tests {
		if got := Tail(p, tc.n, tc.filter); strings.Join(got, "|") != strings.Join(tc.want, "|") {
			t.Errorf("Tail(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
	if got := Tail(filepath.Join(t.TempDir(), "missing"), 3, nil); got != nil {
		t.Errorf("missing file: %q", got)
	}
}

func TestAppendKernelArgs(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", "console=ttyS0 panic=-1 quiet"},
		{"console=hvc0 root=/dev/vda", "console=hvc0 root=/dev/vda panic=-1 quiet"},
		{"  quiet  panic=5 ", "quiet panic=5 console=ttyS0"},
		{"consoleblank=0", "consoleblank=0 console=ttyS0 panic=-1 quiet"},
	}
	for _, tc := range tests {
		if got := AppendKernelArgs(tc.in, "console=ttyS0", "panic=-1", "quiet"); got != tc.want {
			t.Errorf("AppendKernelArgs(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestProcKillAndStatus(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	proc, err := system.StartDetached(exec.Command("sleep", "60"))
	if err != nil {
		t.Fatal(err)
	}
	afterExit := make(chan struct{})
	p := Watch(Config{
		Name: "fake", Handles: vmm.Handles{PID: proc.PID}, Proc: proc, Sockets: []string{sock},
		AfterExit: func() { close(afterExit) },
		Status: func(e Exit) vmm.ExitStatus {
			r := "ended"
			if e.Killed {
				r = "killed by banger"
			}
			return vmm.ExitStatus{Code: e.Code, Signal: e.Signal, Reason: r, At: e.At}
		},
	})
	if p.HasExited() {
		t.Fatal("exited at once")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-afterExit:
	default:
		t.Fatal("Kill returned before the cleanup ran")
	}
	st, err := p.Wait(ctx)
	if err != nil || st.Reason != "killed by banger" || st.Signal != "killed" {
		t.Fatalf("Wait = %+v, %v", st, err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
	if err := p.Kill(ctx); err != nil {
		t.Fatalf("second Kill: %v", err)
	}
}

func TestAdoptProcessRefuses(t *testing.T) {
	proc, err := system.StartDetached(exec.Command("sleep", "60"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.KillAndWait(context.Background()) })
	h := vmm.Handles{Driver: "fake", VMID: "vm1", PID: proc.PID, StartTime: proc.StartTime, APISocket: "/x/api.sock"}
	match := func(argv []string) (string, error) {
		if len(argv) == 2 && argv[0] == "sleep" {
			return "vm1", nil
		}
		return "", errors.New("not ours")
	}
	tests := []struct {
		name  string
		h     func(vmm.Handles) vmm.Handles
		match func([]string) (string, error)
		gone  bool
	}{
		{"other driver", func(h vmm.Handles) vmm.Handles { h.Driver = "qemu"; return h }, match, false},
		{"no pid", func(h vmm.Handles) vmm.Handles { h.PID = 0; return h }, match, true},
		{"reused pid", func(h vmm.Handles) vmm.Handles { h.StartTime++; return h }, match, true},
		{"command line", func(h vmm.Handles) vmm.Handles { return h }, func([]string) (string, error) { return "", errors.New("not ours") }, true},
		{"other vm", func(h vmm.Handles) vmm.Handles { h.VMID = "vm2"; return h }, match, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := AdoptProcess(tc.h(h), "fake", tc.match)
			if err == nil || errors.Is(err, vmm.ErrGone) != tc.gone {
				t.Fatalf("err = %v, want ErrGone=%v", err, tc.gone)
			}
		})
	}
	p, err := AdoptProcess(h, "fake", match)
	if err != nil {
		t.Fatalf("adopt: %v", err)
	}
	if p.PID != proc.PID {
		t.Fatalf("pid %d", p.PID)
	}
}

func TestCopySparse(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "disk")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	// Data at the start, in the middle and at the very end; holes between.
	for _, off := range []int64{0, 20 << 20, size - 5} {
		if _, err := f.WriteAt([]byte("data!"), off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	dst := filepath.Join(dir, "copy")
	ctx := context.Background()
	if _, err := CopySparse(ctx, src, dst); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if len(a) != len(b) || string(a) != string(b) {
		t.Fatalf("copy differs (%d vs %d bytes)", len(a), len(b))
	}
	if use, _ := DiskUse(dst); use > 4<<20 {
		t.Errorf("the copy of a 64 MiB file holding 15 bytes uses %d bytes on disk", use)
	}
	if _, err := CopySparse(ctx, src, dst); err == nil {
		t.Error("CopySparse overwrote an existing file")
	}
	link := filepath.Join(dir, "link")
	os.Symlink(src, link)
	if _, err := CopySparse(ctx, link, filepath.Join(dir, "copy2")); err == nil {
		t.Error("CopySparse followed a symlink")
	}
	if _, err := os.Stat(filepath.Join(dir, "copy2")); !errors.Is(err, os.ErrNotExist) {
		t.Error("a failed copy left its destination")
	}
}

// A memory file whose data regions are mostly zero-filled pages (a guest
// touched them, often only to zero them) copies to the same bytes, with
// holes for the zero pages: the copy takes the room of the non-zero ones.
func TestCopySparseSkipZeros(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "ram")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 16 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	// 8 MiB of written zeros (data, not holes) with a few non-zero pages,
	// one straddling the 1 MiB chunk boundary, and a short tail page.
	if _, err := f.WriteAt(make([]byte, 8<<20), 0); err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 4096 * 3, 1<<20 - 1, 5 << 20, size - 3} {
		if _, err := f.WriteAt([]byte("data!"[:3]), off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	if use, _ := DiskUse(src); use < 8<<20 {
		t.Fatalf("the source uses %d bytes; the test needs zero-filled data regions", use)
	}
	dst := filepath.Join(dir, "copy")
	n, err := CopySparseSkipZeros(context.Background(), src, dst)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if len(a) != len(b) || string(a) != string(b) {
		t.Fatalf("copy differs (%d vs %d bytes)", len(a), len(b))
	}
	// Six non-zero pages (the one across the chunk boundary is two).
	if n != 6*4096 {
		t.Errorf("wrote %d bytes, want the 6 non-zero pages", n)
	}
	if use, _ := DiskUse(dst); use > 1<<20 {
		t.Errorf("the copy uses %d bytes on disk", use)
	}
}

func TestSyncTree(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "state"), 0o700)
	os.WriteFile(filepath.Join(dir, "state", "a"), []byte("a"), 0o600)
	os.Symlink("/nonexistent", filepath.Join(dir, "link")) // not followed
	if err := SyncTree(dir); err != nil {
		t.Fatal(err)
	}
	if err := SyncTree(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("synced a missing directory")
	}
}

// TestCopyNonZeroPaths: the mapped and the read copies agree, page for
// page, and a source cut shorter under the mapping is an error, not a
// crash (a VMM may truncate its memory file).
func TestCopyNonZeroPaths(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "ram")
	const size = 3*mapChunk/2 + 4096 + 100 // two mappings, a short tail
	data := make([]byte, size)
	for _, off := range []int{0, 4096 * 7, mapChunk - 1, mapChunk + 4096*3, size - 1} {
		data[off] = 0x5a
	}
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	copies := map[string]func(ctx context.Context, in, out *os.File, from, to int64) (int64, error){
		"mapped": copyNonZeroMapped, "read": copyNonZeroRead,
	}
	for name, copyFn := range copies {
		dst := filepath.Join(dir, name)
		out, err := os.Create(dst)
		if err != nil {
			t.Fatal(err)
		}
		n, err := copyFn(context.Background(), in, out, 0, size)
		out.Truncate(size)
		out.Close()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if want := int64(4*4096 + 100); n != want { // four whole pages and the short tail
			t.Errorf("%s wrote %d bytes, want %d", name, n, want)
		}
		got, _ := os.ReadFile(dst)
		if !bytes.Equal(got, data) {
			t.Fatalf("%s: the copy differs", name)
		}
	}

	// cut short under the mapping
	m, err := unix.Mmap(int(in.Fd()), 0, 2*4096, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	if err := os.Truncate(src, 0); err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(filepath.Join(dir, "cut"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := writeNonZeroMapped(out, m, 0); err == nil || !strings.Contains(err.Error(), "shrank") {
		t.Fatalf("a source cut short under the mapping: %v", err)
	}
}
