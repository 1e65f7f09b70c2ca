package agent

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestClassifyInit(t *testing.T) {
	for _, c := range []struct {
		exe  string
		want initKind
	}{
		{"/usr/lib/systemd/systemd", initSystemd},
		{"/lib/systemd/systemd (deleted)", initSystemd},
		{"/bin/busybox", initBusybox},
		{"/usr/bin/busybox (deleted)", initBusybox},
		{"/sbin/openrc-init", initOther},
		{"/bin/busybox-extras", initOther},
		{"", initOther},
	} {
		if got := classifyInit(c.exe); got != c.want {
			t.Errorf("classifyInit(%q) = %d, want %d", c.exe, got, c.want)
		}
	}
}

func TestIsSystemdShutdown(t *testing.T) {
	for _, c := range []struct {
		exe  string
		want bool
	}{
		{"/usr/lib/systemd/systemd-shutdown", true},
		{"/lib/systemd/systemd-shutdown (deleted)", true},
		{"", true}, // unreadable: the agent asked for the power off
		{"/usr/lib/systemd/systemd", false},
		{"/sbin/init", false},
		{"/usr/lib/systemd/systemd-shutdownd", false},
		{"/tmp/systemd-shutdown/init", false},
	} {
		if got := isSystemdShutdown(c.exe); got != c.want {
			t.Errorf("isSystemdShutdown(%q) = %v, want %v", c.exe, got, c.want)
		}
	}
}

// TestTakeOverAt: the agent ends the VM at the first SIGTERM that comes
// with PID 1 at its last step (systemd-shutdown), waits past SIGTERMs
// before it, and gives up when init never gets there.
func TestTakeOverAt(t *testing.T) {
	const mgr, sd = "/usr/lib/systemd/systemd", "/usr/lib/systemd/systemd-shutdown"
	for _, c := range []struct {
		name    string
		pid1    []string // PID 1's executable at each SIGTERM, in order
		timeout bool     // init's grace is over after those SIGTERMs
		final   func(string) bool
		want    bool
		asked   int // how many times PID 1 was looked at
	}{
		{"systemd-shutdown's SIGTERM", []string{sd}, false, isSystemdShutdown, true, 1},
		{"a SIGTERM while systemd stops its units, then systemd-shutdown's", []string{mgr, mgr, sd}, false, isSystemdShutdown, true, 3},
		{"only SIGTERMs before systemd-shutdown, then the grace is over", []string{mgr}, true, isSystemdShutdown, false, 1},
		{"no SIGTERM at all", nil, true, isSystemdShutdown, false, 0},
		{"busybox: its first SIGTERM is the last round", []string{"/bin/busybox"}, false, func(string) bool { return true }, true, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			term := make(chan os.Signal, len(c.pid1))
			timeout := make(chan time.Time, 1)
			i := 0
			pid1 := func() string {
				exe := c.pid1[i]
				i++
				// The next event arrives only once this one is handled,
				// as signals do.
				if i < len(c.pid1) {
					term <- syscall.SIGTERM
				} else if c.timeout {
					timeout <- time.Time{}
				}
				return exe
			}
			if len(c.pid1) > 0 {
				term <- syscall.SIGTERM
			} else if c.timeout {
				timeout <- time.Time{}
			}
			log := slog.New(slog.NewTextHandler(io.Discard, nil))
			if got := takeOverAt(log, term, timeout, pid1, c.final); got != c.want {
				t.Fatalf("takeOverAt = %v, want %v", got, c.want)
			}
			if i != c.asked {
				t.Fatalf("PID 1 looked at %d times, want %d", i, c.asked)
			}
		})
	}
}

func TestParseServeArgs(t *testing.T) {
	for _, c := range []struct {
		args    []string
		want    serveArgs
		wantErr string
	}{
		{nil, serveArgs{rwFD: -1}, ""},
		{[]string{"--config", "/c"}, serveArgs{config: "/c", rwFD: -1}, ""},
		{[]string{"--rw-fd", "4"}, serveArgs{rwFD: 4}, ""},
		{[]string{"--config", "/c", "--rw-fd", "9"}, serveArgs{config: "/c", rwFD: 9}, ""},
		{[]string{"--rw-fd"}, serveArgs{}, "needs a value"},
		{[]string{"--rw-fd", "3"}, serveArgs{}, "from 4 to 1024"},
		{[]string{"--rw-fd", "-1"}, serveArgs{}, "from 4 to 1024"},
		{[]string{"--rw-fd", "99999"}, serveArgs{}, "from 4 to 1024"},
		{[]string{"--rw-fd", "x"}, serveArgs{}, "from 4 to 1024"},
		{[]string{"--rw-fd", "4", "--rw-fd", "5"}, serveArgs{}, "from 4 to 1024"},
		{[]string{"--config", ""}, serveArgs{}, "non-empty"},
		{[]string{"--debug", "1"}, serveArgs{}, "unknown argument"},
	} {
		got, err := parseServeArgs(c.args)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("parseServeArgs(%q): error %v, want %q", c.args, err, c.wantErr)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("parseServeArgs(%q) = %+v, %v; want %+v", c.args, got, err, c.want)
		}
	}
}

// fakeProc is a process of a fakeWorld.
type fakeProc struct {
	termExit   time.Duration // how long it takes to exit on SIGTERM; <0: ignores it
	unkillable bool          // stuck (uninterruptible): survives SIGKILL
	preTermed  bool          // got SIGTERM at time 0 (from busybox init)
	termAt     time.Duration
	termed     bool
	killed     bool
}

// fakeWorld is the machine a stopper sees: processes, a clock, and what
// the stopper did, in order.
type fakeWorld struct {
	now   time.Duration
	procs []*fakeProc
	calls []string
}

func (w *fakeWorld) alive() int {
	n := 0
	for _, p := range w.procs {
		if p.killed && !p.unkillable {
			continue
		}
		if p.termed && p.termExit >= 0 && w.now >= p.termAt+p.termExit {
			continue
		}
		n++
	}
	return n
}

func (w *fakeWorld) stopper(remount ...remountStep) *stopper {
	for _, p := range w.procs {
		if p.preTermed {
			p.termed = true
		}
	}
	return &stopper{
		log:    slog.New(slog.NewTextHandler(io.Discard, nil)),
		others: w.alive,
		signal: func(sig syscall.Signal) error {
			w.calls = append(w.calls, sig.String())
			for _, p := range w.procs {
				switch {
				case sig == syscall.SIGKILL:
					p.killed = true
				case sig == syscall.SIGTERM && !p.termed:
					p.termed, p.termAt = true, w.now
				}
			}
			return nil
		},
		reap:    func() {},
		sync:    func() { w.calls = append(w.calls, "sync") },
		remount: remount,
		reboot:  func() { w.calls = append(w.calls, "reboot") },
		poll:    stopPoll,
		now:     func() time.Time { return time.Unix(0, 0).Add(w.now) },
		sleep:   func(d time.Duration) { w.now += d },
	}
}

func TestStopProcesses(t *testing.T) {
	for _, c := range []struct {
		name           string
		procs          []*fakeProc
		term           bool
		grace          time.Duration
		want           []string
		minAt, maxAt   time.Duration
		wantLeftBehind int
	}{
		{"nothing to stop", nil, true, killGrace, []string{"terminated"}, 0, 0, 0},
		{"all exit on SIGTERM: no SIGKILL, no waiting out the grace",
			[]*fakeProc{{termExit: 0}, {termExit: 30 * time.Millisecond}}, true, killGrace,
			[]string{"terminated"}, 30 * time.Millisecond, 30*time.Millisecond + stopPoll, 0},
		{"busybox sent SIGTERM: the agent does not send it again",
			[]*fakeProc{{termExit: 20 * time.Millisecond, preTermed: true}}, false, busyboxTermGrace,
			nil, 20 * time.Millisecond, 20*time.Millisecond + stopPoll, 0},
		{"one ignores SIGTERM: SIGKILL at the end of the grace",
			[]*fakeProc{{termExit: 0}, {termExit: -1}}, true, killGrace,
			[]string{"terminated", "killed"}, killGrace, killGrace + stopPoll, 0},
		{"busybox path, one ignores SIGTERM: killed after busyboxTermGrace",
			[]*fakeProc{{termExit: -1, preTermed: true}}, false, busyboxTermGrace,
			[]string{"killed"}, busyboxTermGrace, busyboxTermGrace + stopPoll, 0},
		{"one survives SIGKILL: give up after killWait",
			[]*fakeProc{{termExit: -1, unkillable: true}}, true, killGrace,
			[]string{"terminated", "killed"}, killGrace + killWait, killGrace + killWait + 2*stopPoll, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := &fakeWorld{procs: c.procs}
			w.stopper().stopProcesses(c.term, c.grace)
			if !reflect.DeepEqual(w.calls, c.want) {
				t.Errorf("signals %q, want %q", w.calls, c.want)
			}
			if w.now < c.minAt || w.now > c.maxAt {
				t.Errorf("returned at %v, want within [%v, %v]", w.now, c.minAt, c.maxAt)
			}
			if got := w.alive(); got != c.wantLeftBehind {
				t.Errorf("%d processes left, want %d", got, c.wantLeftBehind)
			}
		})
	}
}

// TestBusyboxBudget: busybox init sends SIGKILL to every process, the
// agent included, 1 s after its SIGTERM; the agent's end must fit before.
func TestBusyboxBudget(t *testing.T) {
	worst := busyboxTermGrace + killWait + 2*(remountWait+stopPoll)
	if worst >= 900*time.Millisecond {
		t.Fatalf("the agent's worst case after busybox's SIGTERM is %v: it would race busybox's SIGKILL at 1 s", worst)
	}
}

func TestStopperEnd(t *testing.T) {
	ebusyThen := func(n int, calls *int) func() error {
		return func() error {
			*calls++
			if *calls <= n {
				return unix.EBUSY
			}
			return nil
		}
	}
	t.Run("order: flush, every filesystem read-only, flush, reboot", func(t *testing.T) {
		w := &fakeWorld{}
		rec := func(name string) func() error {
			return func() error { w.calls = append(w.calls, "remount "+name); return nil }
		}
		w.stopper(remountStep{"/", rec("/")}, remountStep{"rw", rec("rw")}).end()
		want := []string{"sync", "remount /", "remount rw", "sync", "reboot"}
		if !reflect.DeepEqual(w.calls, want) {
			t.Fatalf("calls %q, want %q", w.calls, want)
		}
	})
	for _, c := range []struct {
		name      string
		do        func(calls *int) func() error
		wantCalls int
		minAt     time.Duration
	}{
		{"busy twice, then read-only", func(n *int) func() error { return ebusyThen(2, n) }, 3, 2 * stopPoll},
		{"busy for good: give up after remountWait, still reboot", func(n *int) func() error { return ebusyThen(1<<30, n) },
			int(remountWait/stopPoll) + 1, remountWait},
		{"another error: not retried", func(n *int) func() error {
			return func() error { *n++; return unix.EINVAL }
		}, 1, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := &fakeWorld{}
			calls := 0
			w.stopper(remountStep{"rw", c.do(&calls)}).end()
			if calls != c.wantCalls {
				t.Errorf("remount tried %d times, want %d", calls, c.wantCalls)
			}
			if w.now < c.minAt || w.now > remountWait+stopPoll {
				t.Errorf("took %v, want within [%v, %v]", w.now, c.minAt, remountWait+stopPoll)
			}
			if n := len(w.calls); n == 0 || w.calls[n-1] != "reboot" {
				t.Errorf("calls %q: no reboot at the end", w.calls)
			}
		})
	}
}

func TestCountProcesses(t *testing.T) {
	dir := t.TempDir()
	self := 4242
	for _, p := range []struct {
		name, cmdline string
	}{
		{"1", "init\x00"},                 // PID 1: never counted
		{strconv.Itoa(self), "agent\x00"}, // this process
		{"77", "sshd\x00-D\x00"},          // counted
		{"78", "sleep\x0060\x00"},         // counted
		{"2", ""},                         // kernel thread
		{"90", ""},                        // zombie
		{"self", "agent\x00"},             // not a pid
		{"sys", ""},                       // not a pid
	} {
		if err := os.Mkdir(filepath.Join(dir, p.name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, p.name, "cmdline"), []byte(p.cmdline), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "91"), 0o755); err != nil { // gone while counting
		t.Fatal(err)
	}
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := 0; i < 2; i++ { // the handle is read afresh every time
		if got := countProcesses(f, self); got != 2 {
			t.Fatalf("pass %d: counted %d processes, want 2", i, got)
		}
	}
	if got := countProcesses(nil, self); got != 0 {
		t.Fatalf("without /proc: %d", got)
	}
}

// TestRemountReadOnlyThroughHandle plays the guest's stop on a real ext4
// filesystem: mounted as the writable disk is, the root overlay's upper
// layer on it, a file written through the overlay, then the mount put out
// of reach by path (as the switch to the new root does). Through the handle
// opened before, the filesystem goes read-only and its journal is clean
// (no needs_recovery: nothing to replay at the next mount). Needs root and
// loop devices (CI has both).
func TestRemountReadOnlyThroughHandle(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to attach a loop device and mount (runs in CI)")
	}
	losetup, err := exec.LookPath("losetup")
	if err != nil {
		t.Skipf("losetup not installed: %v", err)
	}
	dumpe2fs, err := exec.LookPath("dumpe2fs")
	if err != nil {
		t.Skipf("dumpe2fs not installed (e2fsprogs): %v", err)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "rw.ext4")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	mkfsExt4(t, img, "", "-L", "banger-rw")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("no loop device here: %v %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command(losetup, "-d", dev).Run() })

	hide := filepath.Join(dir, "initramfs") // what the new root hides
	rw := filepath.Join(hide, "rw")
	merged := filepath.Join(dir, "merged")
	for _, d := range []string{rw, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount(dev, rw, "ext4", unix.MS_NOATIME, rwMountOptions(&Disk{})); err != nil {
		t.Skipf("cannot mount ext4 here: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(rw, unix.MNT_DETACH) })
	for _, d := range []string{"upper", "work", "lower"} {
		if err := os.Mkdir(filepath.Join(rw, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := "lowerdir=" + filepath.Join(rw, "lower") + ",upperdir=" + filepath.Join(rw, "upper") + ",workdir=" + filepath.Join(rw, "work")
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Skipf("cannot mount overlayfs here: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(merged, unix.MNT_DETACH) })

	h, err := openWritableRoot(rw)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := unix.Mount("tmpfs", hide, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(hide, unix.MNT_DETACH) })
	if _, err := os.Stat(filepath.Join(rw, "upper")); err == nil {
		t.Fatal("the writable disk is still reachable by path")
	}

	f, err := os.Create(filepath.Join(merged, "kept"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("data"); err != nil {
		t.Fatal(err)
	}
	features := func() string {
		out, err := exec.CommandContext(ctx, dumpe2fs, "-h", dev).CombinedOutput()
		if err != nil {
			t.Fatalf("dumpe2fs: %v\n%s", err, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "Filesystem features:") {
				return l
			}
		}
		t.Fatalf("no features in dumpe2fs:\n%s", out)
		return ""
	}
	if !strings.Contains(features(), "needs_recovery") {
		t.Fatalf("a mounted journalled ext4 should need recovery: %s", features())
	}
	// A file open for writing keeps it writable.
	if err := remountReadOnly(int(h.Fd())); err == nil || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("remount with a file open for writing: %v, want busy", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	if err := remountReadOnly(int(h.Fd())); err != nil {
		t.Fatalf("remount read-only through the handle: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(h.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Flags&unix.ST_RDONLY == 0 {
		t.Fatalf("still writable: statfs flags %#x", st.Flags)
	}
	if got := features(); strings.Contains(got, "needs_recovery") {
		t.Fatalf("journal not clean after the read-only remount: %s", got)
	}
	if b, err := os.ReadFile(filepath.Join(merged, "kept")); err != nil || !bytes.Equal(b, []byte("data")) {
		t.Fatalf("data through the overlay: %q %v", b, err)
	}
}

// TestReadPID1Exe reads 1/exe under an open /proc (a directory standing in
// for it here), "" when there is none.
func TestReadPID1Exe(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got := readPID1Exe(f); got != "" {
		t.Fatalf("no 1/exe: %q, want \"\"", got)
	}
	if err := os.Mkdir(filepath.Join(dir, "1"), 0o755); err != nil {
		t.Fatal(err)
	}
	const want = "/usr/lib/systemd/systemd-shutdown"
	if err := os.Symlink(want, filepath.Join(dir, "1", "exe")); err != nil {
		t.Fatal(err)
	}
	if got := readPID1Exe(f); got != want {
		t.Fatalf("readPID1Exe = %q, want %q", got, want)
	}
}
