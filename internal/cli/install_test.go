package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/hostnet/install"
)

// fakeSystemd records systemctl calls and writes units into temp dirs.
func withFakeInstaller(t *testing.T, systemd bool) (sysDir, userDir string, calls *[]string) {
	t.Helper()
	sysDir, userDir = t.TempDir(), t.TempDir()
	var rec []string
	old := installerFor
	installerFor = func(o install.Options) *install.Installer {
		o.SystemUnitDir, o.UserUnitDir = sysDir, userDir
		o.HelperInstallPath = filepath.Join(sysDir, "libexec", "banger-helper")
		o.HelperConfig = filepath.Join(sysDir, "etc", "helper.json")
		return &install.Installer{Options: o, Systemd: func() bool { return systemd },
			Run: func(ctx context.Context, name string, args ...string) ([]byte, error) {
				rec = append(rec, name+" "+strings.Join(args, " "))
				return nil, nil
			}}
	}
	t.Cleanup(func() { installerFor = old })
	// the binaries must exist next to the test executable
	exe, _ := os.Executable()
	for _, b := range []string{"banger-helper", "bangerd"} {
		p := filepath.Join(filepath.Dir(exe), b)
		if _, err := os.Stat(p); err != nil {
			os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755)
			t.Cleanup(func() { os.Remove(p) })
		}
	}
	return sysDir, userDir, &rec
}

func TestSystemInstallAndUninstall(t *testing.T) {
	sysDir, userDir, calls := withFakeInstaller(t, true)
	t.Setenv("SUDO_USER", "")
	var out, errb bytes.Buffer
	app := &App{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errb}
	if code := app.Run(context.Background(), []string{"system", "install", "--allow-user", "alice"}); code != 0 {
		t.Fatalf("install: exit %d: %s", code, errb.String())
	}
	units, _ := filepath.Glob(filepath.Join(userDir, "*.service"))
	if len(units) != 1 {
		t.Fatalf("bangerd user unit not written: %v", units)
	}
	if os.Geteuid() == 0 {
		b, err := os.ReadFile(filepath.Join(sysDir, install.HelperUnit))
		if err != nil || !strings.Contains(string(b), "--allow-user") || !strings.Contains(string(b), "alice") ||
			!strings.Contains(string(b), "ExecStart="+filepath.Join(sysDir, "libexec", "banger-helper")+" ") {
			t.Fatalf("helper unit: %v\n%s", err, b)
		}
	}
	if len(*calls) == 0 {
		t.Fatal("systemctl never called")
	}
	if code := app.Run(context.Background(), []string{"system", "uninstall"}); code != 0 {
		t.Fatalf("uninstall: exit %d: %s", code, errb.String())
	}
	units, _ = filepath.Glob(filepath.Join(userDir, "*.service"))
	if len(units) != 0 {
		t.Fatalf("units left after uninstall: %v", units)
	}
}

func TestSystemInstallWithoutSystemdSaysHowToRunHelper(t *testing.T) {
	withFakeInstaller(t, false)
	var out, errb bytes.Buffer
	app := &App{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errb}
	code := app.Run(context.Background(), []string{"system", "install", "--allow-user", "bob"})
	if code != 1 || !strings.Contains(errb.String(), "banger-helper --allow-user bob") {
		t.Fatalf("exit %d, stderr %q", code, errb.String())
	}
}

// `system install --pool` (as root) writes the range into the helper's
// root-owned configuration; bangerd never chooses it.
func TestSystemInstallPool(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("--pool is for the root install; this test runs as root in CI")
	}
	sysDir, _, _ := withFakeInstaller(t, true)
	t.Setenv("SUDO_USER", "alice")
	var out, errb bytes.Buffer
	app := &App{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errb}
	if code := app.Run(context.Background(), []string{"system", "install", "--allow-user", "alice", "--pool", "10.5.0.0/16"}); code != 0 {
		t.Fatalf("install: exit %d: %s", code, errb.String())
	}
	b, err := os.ReadFile(filepath.Join(sysDir, "etc", "helper.json"))
	if err != nil || !strings.Contains(string(b), `"10.5.0.0/16"`) {
		t.Fatalf("helper configuration: %v %s", err, b)
	}
	if code := app.Run(context.Background(), []string{"system", "install", "--allow-user", "alice", "--pool", "8.8.8.0/24"}); code == 0 {
		t.Fatal("a public pool was accepted")
	}
}
