package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/guest"
)

// extImage returns a fake ext superblock with the given label.
func extImage(label string) []byte {
	b := make([]byte, 8192)
	binary.LittleEndian.PutUint16(b[extSuperblockOffset+extMagicOffset:], extMagic)
	copy(b[extSuperblockOffset+extLabelOffset:], label)
	return b
}

func TestClassifyDisk(t *testing.T) {
	cfg, err := bootcfg.Encode(&bootcfg.Config{Version: 1})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		data  []byte
		kind  DiskKind
		label string
	}{
		{"boot config", cfg, DiskConfig, ""},
		{"writable", extImage(bootcfg.RWLabel), DiskRW, bootcfg.RWLabel},
		{"root with label", extImage("debian-root"), DiskRoot, "debian-root"},
		{"root without label", extImage(""), DiskRoot, ""},
		{"label that only starts like banger-rw", extImage("banger-rw2"), DiskRoot, "banger-rw2"},
		{"zeros", make([]byte, 8192), DiskUnknown, ""},
		{"short", []byte("hi"), DiskUnknown, ""},
		{"empty", nil, DiskUnknown, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kind, label, err := ClassifyDisk(bytes.NewReader(tt.data))
			if err != nil {
				t.Fatal(err)
			}
			if kind != tt.kind || label != tt.label {
				t.Fatalf("got %v %q, want %v %q", kind, label, tt.kind, tt.label)
			}
		})
	}
}

// TestClassifyRealExt4 checks the superblock reading against mkfs.ext4.
func TestClassifyRealExt4(t *testing.T) {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skipf("mkfs.ext4 not installed: %v", err)
	}
	dir := t.TempDir()
	for _, label := range []string{bootcfg.RWLabel, "image"} {
		p := filepath.Join(dir, label+".ext4")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", "-L", label, p, "8M").CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("mkfs.ext4: %v\n%s", err, out)
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		kind, got, err := ClassifyDisk(f)
		f.Close()
		want := DiskRoot
		if label == bootcfg.RWLabel {
			want = DiskRW
		}
		if err != nil || kind != want || got != label {
			t.Fatalf("%s: got %v %q %v", label, kind, got, err)
		}
	}
}

func FuzzClassifyDisk(f *testing.F) {
	cfg, _ := bootcfg.Encode(&bootcfg.Config{Version: 1})
	f.Add(cfg[:100])
	f.Add(extImage("x")[:2048])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, label, err := ClassifyDisk(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		if kind != DiskRW && kind != DiskRoot && label != "" {
			t.Fatalf("label %q on a %v disk", label, kind)
		}
	})
}

func TestScanDisks(t *testing.T) {
	sys := t.TempDir()
	dev := t.TempDir()
	cfg, _ := bootcfg.Encode(&bootcfg.Config{Version: 1})
	disks := map[string][]byte{
		"vda":   extImage("image"),
		"vdb":   extImage(bootcfg.RWLabel),
		"vdc":   cfg,
		"vdd":   extImage("second-image"),
		"loop0": extImage("loop"),
		"vdf":   append([]byte(bulk.SpoolMagic), make([]byte, 8192)...),
	}
	for name, data := range disks {
		if err := os.Mkdir(filepath.Join(sys, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dev, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// vdb (the writable disk) takes discards, vda says it does not.
	for name, max := range map[string]string{"vda": "0\n", "vdb": "2147483136\n"} {
		if err := os.MkdirAll(filepath.Join(sys, name, "queue"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sys, name, "queue", "discard_max_bytes"), []byte(max), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A device listed in sysfs whose node is not there yet.
	if err := os.Mkdir(filepath.Join(sys, "vde"), 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := ScanDisks(sys, dev)
	if err != nil {
		t.Fatal(err)
	}
	if !d.complete() {
		t.Fatalf("incomplete scan: %s", d)
	}
	if d.Root.Name != "vda" || d.RW.Name != "vdb" || d.Config.Name != "vdc" || d.Spool == nil || d.Spool.Name != "vdf" {
		t.Fatalf("root %s rw %s config %s spool %v", d.Root.Name, d.RW.Name, d.Config.Name, d.Spool)
	}
	if !d.RW.Discard || d.Root.Discard || d.Config.Discard {
		t.Fatalf("discard: rw %v root %v config %v, want only rw", d.RW.Discard, d.Root.Discard, d.Config.Discard)
	}
	if got := rwMountOptions(d.RW); got != "noinit_itable,discard" {
		t.Fatalf("writable disk that takes discards mounted with %q", got)
	}
	if got := rwMountOptions(d.Root); got != "noinit_itable" {
		t.Fatalf("a disk without discard mounted with %q", got)
	}
	if len(d.All) != 5 {
		t.Fatalf("scanned %d disks, want 5 (loop ignored, missing node skipped): %s", len(d.All), d)
	}
	if !strings.Contains(d.String(), "vdd=image root(second-image)") {
		t.Fatalf("summary %q", d.String())
	}
}

func TestParseModulesLoad(t *testing.T) {
	got, err := ParseModulesLoad(strings.NewReader("# comment\nkernel/drivers/virtio/virtio.ko\n\n  kernel/fs/overlayfs/overlay.ko  \nkernel/x/y.ko.xz\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"kernel/drivers/virtio/virtio.ko", "kernel/fs/overlayfs/overlay.ko", "kernel/x/y.ko.xz"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q", got)
	}
	for _, bad := range []string{"/abs/x.ko\n", "../x.ko\n", "kernel/../../x.ko\n", "kernel/notamodule.txt\n"} {
		if _, err := ParseModulesLoad(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseModulesLoad(%q) succeeded", bad)
		}
	}
}

func TestHostsWithName(t *testing.T) {
	tests := []struct{ old, want string }{
		{"", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tvm1\n"},
		{"127.0.0.1 localhost\n127.0.1.1 old\n10.0.0.1 db\n", "127.0.0.1 localhost\n10.0.0.1 db\n127.0.1.1\tvm1\n"},
	}
	for _, tt := range tests {
		if got := hostsWithName(tt.old, "vm1"); got != tt.want {
			t.Errorf("hostsWithName(%q) = %q, want %q", tt.old, got, tt.want)
		}
	}
}

func TestWriteResolvConfAndHostname(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	// systemd-resolved style dangling symlink.
	if err := os.Symlink("../run/systemd/resolve/stub-resolv.conf", filepath.Join(root, "etc", "resolv.conf")); err != nil {
		t.Fatal(err)
	}
	if err := writeResolvConf(root, []string{"10.0.0.1", "2001:db8::1"}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "etc", "resolv.conf"))
	if err != nil || !strings.Contains(string(b), "nameserver 10.0.0.1\nnameserver 2001:db8::1\n") {
		t.Fatalf("resolv.conf %q %v", b, err)
	}
	if fi, _ := os.Lstat(filepath.Join(root, "etc", "resolv.conf")); fi.Mode()&os.ModeSymlink != 0 {
		t.Fatal("resolv.conf is still a symlink")
	}
	if err := writeResolvConf(root, []string{"not-an-ip"}); err == nil {
		t.Fatal("bad DNS address accepted")
	}
	if err := writeHostname(root, "vm7"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc", "hostname")); string(b) != "vm7\n" {
		t.Fatalf("hostname file %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc", "hosts")); !strings.Contains(string(b), "127.0.1.1\tvm7") {
		t.Fatalf("hosts file %q", b)
	}
}

func TestDebugRequested(t *testing.T) {
	for in, want := range map[string]bool{
		"console=ttyS0 banger.debug":  true,
		"banger.debug=1 quiet":        true,
		"banger.debug=0":              false,
		"console=ttyS0 xbanger.debug": false,
		"":                            false,
	} {
		if got := debugRequested(in); got != want {
			t.Errorf("debugRequested(%q) = %v", in, got)
		}
	}
}

func TestSSHConfigFromBoot(t *testing.T) {
	log := newLogger(io.Discard, nil)
	if _, err := SSHConfig(&bootcfg.Config{HostKey: "garbage"}, log); err == nil {
		t.Fatal("garbage host key accepted")
	}
	hk, err := guest.GenerateHostKey()
	if err != nil {
		t.Fatal(err)
	}
	uk, err := guest.LoadOrCreateUserKey(filepath.Join(t.TempDir(), "k"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &bootcfg.Config{HostKey: string(hk.PrivatePEM), AuthorizedKeys: []string{"ssh-ed25519 broken", uk.AuthorizedLine()}, User: "dev", Env: []string{"A=1"}}
	sc, err := SSHConfig(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	if len(sc.AuthorizedKeys) != 1 || sc.DefaultUser != "dev" || sc.Env[0] != "A=1" {
		t.Fatalf("config %+v", sc)
	}
	cfg.AuthorizedKeys = cfg.AuthorizedKeys[:1]
	if _, err := SSHConfig(cfg, log); err == nil {
		t.Fatal("config without a usable key accepted")
	}
}

func TestPrefixLogger(t *testing.T) {
	var b bytes.Buffer
	newLoggerClock(&b, nil, nil).Info("hello", "k", "v")
	if got := b.String(); got != "banger-agent: level=INFO msg=hello k=v\n" {
		t.Fatalf("log line %q", got)
	}
	b.Reset()
	newLoggerClock(&b, nil, func() (time.Duration, bool) { return 3*time.Second + 45*time.Millisecond, true }).Info("x")
	if got := b.String(); got != "banger-agent: [    3.045] level=INFO msg=x\n" {
		t.Fatalf("log line %q", got)
	}
}

func inputEvent(typ, code uint16, value int32) []byte {
	ev := make([]byte, inputEventSize)
	binary.NativeEndian.PutUint16(ev[16:], typ)
	binary.NativeEndian.PutUint16(ev[18:], code)
	binary.NativeEndian.PutUint32(ev[20:], uint32(value))
	return ev
}

func TestReadPowerKey(t *testing.T) {
	var stream []byte
	stream = append(stream, inputEvent(evKey, 30, 1)...)       // 'a' pressed
	stream = append(stream, inputEvent(evKey, keyPower, 1)...) // power pressed
	stream = append(stream, inputEvent(0, 0, 0)...)            // EV_SYN
	stream = append(stream, inputEvent(evKey, keyPower, 0)...) // power released
	stream = append(stream, inputEvent(evKey, keyPower, 1)...) // pressed again
	stream = append(stream, 1, 2, 3)                           // truncated
	presses := 0
	err := readPowerKey(bytes.NewReader(stream), func() { presses++ })
	if presses != 2 {
		t.Fatalf("%d presses, want 2", presses)
	}
	if err == nil {
		t.Fatal("no error at the end of the stream")
	}
}

func TestHasKey(t *testing.T) {
	tests := []struct {
		bitmap string
		code   int
		want   bool
	}{
		// The ACPI power button: only KEY_POWER (116 = word 1, bit 52).
		{"10000000000000 0\n", keyPower, true},
		{"10000000000000 0\n", 30, false},
		// A keyboard-ish bitmap without KEY_POWER.
		{"0 0 fffffffffffffffe\n", keyPower, false},
		{"", keyPower, false},
		{"zz 0", keyPower, false},
	}
	for _, tt := range tests {
		if got := hasKey(tt.bitmap, tt.code); got != tt.want {
			t.Errorf("hasKey(%q, %d) = %v", tt.bitmap, tt.code, got)
		}
	}
}

func TestPowerButtons(t *testing.T) {
	sys := t.TempDir()
	for name, caps := range map[string]string{"event0": "10000000000000 0\n", "event1": "0 0 fffe\n"} {
		d := filepath.Join(sys, name, "device", "capabilities")
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "key"), []byte(caps), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got := powerButtons(sys, "/dev/input")
	if !reflect.DeepEqual(got, []string{"/dev/input/event0"}) {
		t.Fatalf("power buttons %q", got)
	}
}

// TestRewriteFile: a regular file is rewritten in place (same inode, the
// mode set); a symlink is replaced by a file, its target untouched; a FIFO
// is replaced without blocking; a missing file is created with its
// directory.
// TestRewriteFileNeverEmpty: a rewrite overwrites in place and is never
// truncated to zero first (which made ext4 flush the file on close, cold
// kernel work on a clone's way to its first command): a reader never sees
// the file empty.
func TestRewriteFileNeverEmpty(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(p, []byte("127.0.0.1\tlocalhost\n127.0.1.1\tsrc\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	sawEmpty := make(chan bool, 1)
	go func() {
		empty := false
		for {
			select {
			case <-stop:
				sawEmpty <- empty
				return
			default:
			}
			if fi, err := os.Stat(p); err == nil && fi.Size() == 0 {
				empty = true
			}
		}
	}()
	for i := 0; i < 3000; i++ {
		c := fmt.Sprintf("127.0.0.1\tlocalhost\n127.0.1.1\tclone-%d\n", i%20)
		if err := rewriteFile(p, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	if <-sawEmpty {
		t.Fatal("a reader saw the file empty during a rewrite")
	}
}

func TestRewriteFile(t *testing.T) {
	root := t.TempDir()
	ino := func(p string) uint64 {
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Sys().(*syscall.Stat_t).Ino
	}
	reg := filepath.Join(root, "machine-id")
	if err := os.WriteFile(reg, []byte("a much longer old content\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	before := ino(reg)
	if err := rewriteFile(reg, []byte("new\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Lstat(reg)
	if b, _ := os.ReadFile(reg); string(b) != "new\n" || ino(reg) != before || fi.Mode().Perm() != 0o444 {
		t.Fatalf("regular file: %q, inode %d (was %d), mode %v", b, ino(reg), before, fi.Mode())
	}
	// written in place, not truncated first: longer and equal-length
	// contents replace the old bytes exactly
	for _, c := range []string{"a content longer than all before it\n", "a content shorter\n", "a content 18 char\n"} {
		if err := rewriteFile(reg, []byte(c), 0o444); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(reg); string(b) != c || ino(reg) != before {
			t.Fatalf("rewrite to %q: %q, inode %d (was %d)", c, b, ino(reg), before)
		}
	}
	target := filepath.Join(root, "target")
	os.WriteFile(target, []byte("keep"), 0o644)
	link := filepath.Join(root, "hostname")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := rewriteFile(link, []byte("vm\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Lstat(link); !fi.Mode().IsRegular() {
		t.Fatal("the symlink is still there")
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Fatalf("the link's target was written: %q", b)
	}
	fifo := filepath.Join(root, "hosts")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- rewriteFile(fifo, []byte("x\n"), 0o644) }()
	select {
	case err := <-done:
		if fi, _ := os.Lstat(fifo); err != nil || !fi.Mode().IsRegular() {
			t.Fatalf("fifo: %v, mode %v", err, fi.Mode())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("rewriting a FIFO blocked")
	}
	missing := filepath.Join(root, "etc", "new")
	if err := rewriteFile(missing, []byte("m\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(missing); string(b) != "m\n" {
		t.Fatalf("missing file: %q", b)
	}
}

// TestReidentifySampleComplete: the payload the agent decodes at boot to
// build encoding/json's state for a reidentify (warmReidentifyDecoder) is
// valid and sets every field, so a field added later is warmed too.
func TestReidentifySampleComplete(t *testing.T) {
	if err := warmReidentifyDecoder(); err != nil {
		t.Fatal(err)
	}
	var p api.Reidentify
	d := json.NewDecoder(strings.NewReader(reidentifySample))
	d.DisallowUnknownFields()
	if err := d.Decode(&p); err != nil {
		t.Fatal(err)
	}
	for _, v := range []reflect.Value{reflect.ValueOf(p), reflect.ValueOf(*p.Network)} {
		for i := 0; i < v.NumField(); i++ {
			if v.Field(i).IsZero() {
				t.Errorf("reidentifySample leaves %s.%s unset", v.Type().Name(), v.Type().Field(i).Name)
			}
		}
	}
}
