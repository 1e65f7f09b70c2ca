package install

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestRenderHelperUnit(t *testing.T) {
	u, err := RenderHelperUnit(Options{HelperBin: "/home/alice/bin/banger-helper", AllowUsers: []string{"alice", "1001"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		// the root-owned copy, never the user's binary
		"\nExecStart=/usr/local/libexec/banger/banger-helper --allow-user alice --allow-user 1001 --config /etc/banger/helper.json\n",
		"\nRuntimeDirectory=banger\n",
		"\nRuntimeDirectoryMode=0755\n",
		"\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n",
		"\nDeviceAllow=/dev/net/tun rw\n",
		"\nWantedBy=multi-user.target\n",
	} {
		if !strings.Contains(u, want) {
			t.Errorf("helper unit lacks %q:\n%s", want, u)
		}
	}
	if strings.Contains(u, "ProtectKernelTunables") {
		t.Error("ProtectKernelTunables would stop the helper enabling ip_forward")
	}
}

func TestRenderDaemonUnit(t *testing.T) {
	u, err := RenderDaemonUnit(Options{DaemonBin: "/opt/banger dir/bangerd", BangerHome: "/home/a/100%$x", HelperSocket: "/run/b/h.sock"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"\nExecStart=\"/opt/banger dir/bangerd\"\n",
		"\nEnvironment=\"BANGER_HOME=/home/a/100%%$x\"\n",
		"\nEnvironment=\"BANGER_HELPER_SOCKET=/run/b/h.sock\"\n",
		"\nKillMode=process\n",
		"\nWantedBy=default.target\n",
	} {
		if !strings.Contains(u, want) {
			t.Errorf("daemon unit lacks %q:\n%s", want, u)
		}
	}
}

func TestRenderRefusesInjection(t *testing.T) {
	cases := []struct {
		name string
		o    Options
		fn   func(Options) (string, error)
	}{
		{"newline in home", Options{DaemonBin: "/b/bangerd", BangerHome: "/h\nExecStartPre=/bin/evil"}, RenderDaemonUnit},
		{"relative home", Options{DaemonBin: "/b/bangerd", BangerHome: "home"}, RenderDaemonUnit},
		{"relative bin", Options{DaemonBin: "bangerd"}, RenderDaemonUnit},
		{"unclean bin", Options{DaemonBin: "/b/../bangerd"}, RenderDaemonUnit},
		{"newline in arg", Options{DaemonBin: "/b/bangerd", DaemonArgs: []string{"x\n[Service]"}}, RenderDaemonUnit},
		{"no users", Options{HelperBin: "/b/banger-helper"}, RenderHelperUnit},
		{"flag as user", Options{HelperBin: "/b/banger-helper", AllowUsers: []string{"--allow-group=0"}}, RenderHelperUnit},
		{"newline in user", Options{HelperBin: "/b/banger-helper", AllowUsers: []string{"a\nUser=root"}}, RenderHelperUnit},
		{"tab in socket", Options{HelperBin: "/b/banger-helper", AllowUsers: []string{"a"}, HelperSocket: "/run/a\tb"}, RenderHelperUnit},
	}
	for _, tc := range cases {
		if u, err := tc.fn(tc.o); err == nil {
			t.Errorf("%s: rendered\n%s", tc.name, u)
		}
	}
}

func TestQuoteArg(t *testing.T) {
	for in, want := range map[string]string{
		"/usr/bin/x":   "/usr/bin/x",
		"--bridge":     "--bridge",
		"a b":          `"a b"`,
		`q"uote`:       `"q\"uote"`,
		"100%":         `"100%%"`,
		"$HOME":        `"$$HOME"`,
		`back\slash`:   `"back\\slash"`,
		"":             `""`,
		"user@example": "user@example",
	} {
		if got := quoteArg(in); got != want {
			t.Errorf("quoteArg(%q) = %s, want %s", in, got, want)
		}
	}
}

type fakeRunner struct{ calls [][]string }

func (f *fakeRunner) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	f.calls = append(f.calls, append([]string{name}, args...))
	return nil, nil
}

func TestInstallerLifecycle(t *testing.T) {
	dir := t.TempDir()
	f := &fakeRunner{}
	src := filepath.Join(dir, "banger-helper")
	if err := os.WriteFile(src, []byte("helper v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	in := &Installer{
		Options: Options{HelperBin: src, DaemonBin: "/usr/bin/bangerd", AllowUsers: []string{"alice"},
			SystemUnitDir: filepath.Join(dir, "system"), UserUnitDir: filepath.Join(dir, "user"),
			HelperInstallPath: filepath.Join(dir, "libexec", "banger", "banger-helper"), HelperConfig: filepath.Join(dir, "etc", "helper.json")},
		Run: f.run, Systemd: func() bool { return true },
	}
	ctx := context.Background()
	p, err := in.InstallHelper(ctx)
	if err != nil || p != filepath.Join(dir, "system", HelperUnit) {
		t.Fatalf("InstallHelper: %q %v", p, err)
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("unit file: %v %v", fi, err)
	}
	if _, err := in.InstallHelper(ctx); err != nil { // unchanged: no restart
		t.Fatal(err)
	}
	for _, f := range []string{in.HelperInstallPath, in.HelperConfig} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("InstallHelper did not write %s: %v", f, err)
		}
	}
	if _, err := in.InstallDaemon(ctx); err != nil {
		t.Fatal(err)
	}
	if err := in.UninstallDaemon(ctx); err != nil {
		t.Fatal(err)
	}
	if err := in.UninstallHelper(ctx); err != nil {
		t.Fatal(err)
	}
	if err := in.UninstallHelper(ctx); err != nil { // nothing left: no-op
		t.Fatal(err)
	}
	want := [][]string{
		{"systemctl", "daemon-reload"},
		{"systemctl", "enable", HelperUnit},
		{"systemctl", "restart", HelperUnit},
		{"systemctl", "daemon-reload"},
		{"systemctl", "enable", "--now", HelperUnit},
		{"systemctl", "--user", "daemon-reload"},
		{"systemctl", "--user", "enable", DaemonUnit},
		{"systemctl", "--user", "restart", DaemonUnit},
		{"systemctl", "--user", "disable", "--now", DaemonUnit},
		{"systemctl", "--user", "daemon-reload"},
		{"systemctl", "disable", "--now", HelperUnit},
		{"systemctl", "daemon-reload"},
	}
	if !reflect.DeepEqual(f.calls, want) {
		t.Fatalf("systemctl calls:\n%q\nwant\n%q", f.calls, want)
	}
	for _, p := range []string{filepath.Join(dir, "system", HelperUnit), filepath.Join(dir, "user", DaemonUnit), in.HelperInstallPath, in.HelperConfig} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
}

func TestNoSystemd(t *testing.T) {
	f := &fakeRunner{}
	in := &Installer{Options: Options{HelperBin: "/usr/bin/banger-helper", AllowUsers: []string{"alice"}, SystemUnitDir: t.TempDir()},
		Run: f.run, Systemd: func() bool { return false }}
	_, err := in.InstallHelper(context.Background())
	if !errors.Is(err, ErrNoSystemd) || !strings.Contains(err.Error(), "sudo /usr/bin/banger-helper --allow-user alice") {
		t.Fatalf("err = %v", err)
	}
	if len(f.calls) != 0 {
		t.Fatalf("ran %q without systemd", f.calls)
	}
}
