package helper

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/hostnet/netcfg"
)

// TestLoadConfigFileRefusesUnsafeFiles: only a regular file that root owns
// and nobody else may write, in a directory of the same kind, is read.
func TestLoadConfigFileRefusesUnsafeFiles(t *testing.T) {
	good := writeConfig(t, `{"pool":"10.9.0.0/16","max_taps_per_user":4,"request_timeout":"2s","allow_cidrs":["192.168.1.7/24"]}`)
	fc, found, err := LoadConfigFile(good)
	if err != nil || !found || fc.Pool != "10.9.0.0/16" || *fc.MaxTapsPerUser != 4 {
		t.Fatalf("good file: %+v %v %v", fc, found, err)
	}
	var c Config
	if err := fc.Apply(&c); err != nil || c.Pool.String() != "10.9.0.0/16" || c.MaxTapsPerUser != 4 || c.RequestTimeout != 2*time.Second ||
		len(c.AllowCIDRs) != 1 || c.AllowCIDRs[0].String() != "192.168.1.0/24" {
		t.Fatalf("Apply: %+v %v", c, err)
	}
	if _, found, err := LoadConfigFile(filepath.Join(t.TempDir(), "missing.json")); err != nil || found {
		t.Fatalf("missing file: found=%v %v (want the defaults)", found, err)
	}
	mk := func(name, content string, mode os.FileMode) string {
		p := writeConfig(t, content)
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	link := filepath.Join(filepath.Dir(good), "link.json")
	os.Symlink(good, link)
	openDir := writeConfig(t, `{}`)
	os.Chmod(filepath.Dir(openDir), 0o777)
	cases := map[string]string{
		"symlink":             link,
		"world-writable file": mk("ww", `{}`, 0o666),
		"group-writable file": mk("gw", `{}`, 0o664),
		"world-writable dir":  openDir,
		"unknown field":       writeConfig(t, `{"pool":"10.9.0.0/16","exec":"/bin/sh"}`),
		"trailing data":       writeConfig(t, `{} {}`),
		"too large":           writeConfig(t, `{"pool":"`+strings.Repeat("a", 70<<10)+`"}`),
		"directory":           filepath.Dir(good),
	}
	if os.Geteuid() == 0 {
		p := writeConfig(t, `{}`)
		os.Chown(p, 65534, 65534)
		cases["owned by nobody"] = p
	} else {
		t.Log("not root: the foreign-owner case needs chown and is skipped")
	}
	for name, p := range cases {
		if _, _, err := LoadConfigFile(p); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	for _, bad := range []string{`{"pool":"8.8.8.0/24"}`, `{"pool":"fd00::/64"}`, `{"max_taps_per_user":0}`, `{"max_conns_per_user":-1}`, `{"request_timeout":"1ns"}`, `{"allow_cidrs":["fd00::/8"]}`, `{"allow_cidrs":["lan"]}`} {
		fc, _, err := LoadConfigFile(writeConfig(t, bad))
		var c Config
		if err == nil {
			if err = fc.Apply(&c); err == nil {
				err = c.fill()
			}
		}
		if err == nil {
			t.Errorf("configuration %s accepted", bad)
		}
	}
	// Main refuses to start on a bad configuration.
	var stderr bytes.Buffer
	if code := Main([]string{"--config", cases["world-writable file"], "--socket", filepath.Join(t.TempDir(), "h.sock")}, &stderr); code != 2 || !strings.Contains(stderr.String(), "writable") {
		t.Fatalf("Main with a world-writable configuration: exit %d\n%s", code, stderr.String())
	}
}

// TestListenRefusesUnsafeDirectory: the socket directory must be the
// helper's own, not a symlink, not writable by others; the socket never
// replaces a non-socket and nothing is chmodded through a link.
func TestListenRefusesUnsafeDirectory(t *testing.T) {
	ctx := context.Background()
	base := t.TempDir()
	os.Chmod(base, 0o755)
	real := filepath.Join(base, "real")
	os.Mkdir(real, 0o700)
	link := filepath.Join(base, "link")
	os.Symlink(real, link)
	open := filepath.Join(base, "open")
	os.Mkdir(open, 0o700)
	os.Chmod(open, 0o777)
	entry := filepath.Join(base, "entry")
	os.Mkdir(entry, 0o755)
	target := filepath.Join(base, "target")
	os.WriteFile(target, []byte("keep"), 0o600)
	os.Symlink(target, filepath.Join(entry, "helper.sock"))
	cases := map[string]string{
		"symlinked directory":      filepath.Join(link, "helper.sock"),
		"world-writable directory": filepath.Join(open, "helper.sock"),
		"socket path is a symlink": filepath.Join(entry, "helper.sock"),
		"relative path":            "run/helper.sock",
	}
	if os.Geteuid() == 0 {
		foreign := filepath.Join(base, "foreign")
		os.Mkdir(foreign, 0o755)
		os.Chown(foreign, 65534, 65534)
		cases["directory owned by nobody"] = filepath.Join(foreign, "helper.sock")
	} else {
		t.Log("not root: the foreign-owner case needs chown and is skipped")
	}
	for name, p := range cases {
		if ln, err := Listen(ctx, p); err == nil {
			ln.Close()
			t.Errorf("%s: listening on %s", name, p)
		}
	}
	for p, want := range map[string]os.FileMode{real: 0o700, open: 0o777, target: 0o600} {
		if fi, _ := os.Stat(p); fi.Mode().Perm() != want {
			t.Errorf("%s: mode changed to %v", p, fi.Mode().Perm())
		}
	}
	if ents, _ := os.ReadDir(real); len(ents) != 0 {
		t.Errorf("created through the symlink: %v", ents)
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Errorf("symlink target changed: %q", b)
	}
	// A good directory: a 0666 socket that Close removes.
	good := filepath.Join(base, "good", "helper.sock")
	ln, err := Listen(ctx, good)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(good)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o666 {
		t.Fatalf("socket: %v %v", fi, err)
	}
	if c, err := net.Dial("unix", good); err != nil {
		t.Fatalf("dial the socket: %v", err)
	} else {
		c.Close()
	}
	if _, err := Listen(ctx, good); err == nil || !strings.Contains(err.Error(), "already listening") {
		t.Fatalf("second helper on a live socket: %v", err)
	}
	ln.Close()
	if _, err := os.Lstat(good); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}
}

// TestRefusalLogRateLimited: a burst, then silence, then one summary with
// the count; then a new burst.
func TestRefusalLogRateLimited(t *testing.T) {
	var buf syncBuf
	r := newRefusalLog(NewLogger(&buf, 0))
	r.burst, r.window = 3, 100*time.Millisecond
	for i := 0; i < 1000; i++ {
		r.record(context.Background(), "refused")
	}
	if n := strings.Count(buf.String(), `"msg":"refused"`); n != 3 {
		t.Fatalf("%d records during the burst, want 3", n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(buf.String(), SuppressedMsg) {
		if time.Now().After(deadline) {
			t.Fatalf("no summary:\n%s", buf.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(buf.String(), `"count":997`) {
		t.Fatalf("summary without the count:\n%s", buf.String())
	}
	r.record(context.Background(), "refused")
	if n := strings.Count(buf.String(), `"msg":"refused"`); n != 4 {
		t.Fatalf("after the window: %d records, want 4", n)
	}
}

// TestAdmitCaps: per-uid and total connection caps; root is not capped
// per uid; a closed connection frees its slot.
func TestAdmitCaps(t *testing.T) {
	l := &limitListener{perUID: 2, total: 4, byUID: map[uint32]int{}}
	u := Caller{UID: 1000}
	for i := range 2 {
		if why := l.admit(u); why != "" {
			t.Fatalf("connection %d of one uid refused: %s", i+1, why)
		}
	}
	if l.admit(u) == "" {
		t.Fatal("third connection of one uid admitted")
	}
	l.done(1000)
	if l.admit(u) != "" {
		t.Fatal("slot not freed")
	}
	for range 2 {
		if why := l.admit(Caller{UID: 0}); why != "" {
			t.Fatalf("root capped per uid: %s", why)
		}
	}
	if why := l.admit(Caller{UID: 0}); why == "" || !strings.Contains(why, "maximum") {
		t.Fatalf("total cap: %q", why)
	}
}

func TestBridgeMarkRoundTrip(t *testing.T) {
	n := uint32(1000)
	for _, m := range []netcfg.BridgeMark{
		{Owner: 0},
		{Owner: 1000, NATOwner: &n, Gateway: netip.MustParsePrefix("172.30.0.1/24")},
		{Owner: 1000, NATOwner: &n, Gateway: netip.MustParsePrefix("172.30.0.1/24"), DNS: true},
	} {
		got, ok := netcfg.ParseBridgeMark(m.String())
		if !ok || got.String() != m.String() {
			t.Errorf("round trip of %q: %q %v", m, got, ok)
		}
	}
	for _, alias := range []string{"", "my bridge", "banger ", "banger owner=x", "banger owner=1 evil=2", "banger nat_owner=1", "banger owner=99999999999", "banger owner=1 dns=yes"} {
		if _, ok := netcfg.ParseBridgeMark(alias); ok {
			t.Errorf("alias %q parsed as banger's mark (the bridge would not belong to root)", alias)
		}
	}
}
