// Package install backs `banger system install` / `uninstall`: it renders
// the systemd units (banger-helper as a system service, bangerd as a user
// service), writes them, and drives systemctl. Rendering is pure and
// testable without systemd; the systemctl runner is replaceable.
//
// The two halves run with different privileges: InstallHelper and
// UninstallHelper need root (they write /etc/systemd/system and talk to the
// system manager); InstallDaemon and UninstallDaemon must run as the user
// (they write ~/.config/systemd/user and talk to the user's manager with
// `systemctl --user`). A CLI run as the user typically does the daemon half
// itself and runs the helper half through sudo.
package install

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/hostnet"
)

// Unit names.
const (
	HelperUnit = "banger-helper.service"
	DaemonUnit = "bangerd.service"
)

// DefaultSystemUnitDir is where the helper's unit goes.
const DefaultSystemUnitDir = "/etc/systemd/system"

// DefaultHelperInstallPath is where InstallHelper copies banger-helper: a
// root-owned location, so that the user who ran the install cannot swap
// the binary the root service runs.
const DefaultHelperInstallPath = "/usr/local/libexec/banger/banger-helper"

// Options describe what to install.
type Options struct {
	// HelperBin and DaemonBin are absolute paths of banger-helper and bangerd.
	// InstallHelper copies HelperBin to HelperInstallPath and the unit runs
	// that copy.
	HelperBin, DaemonBin string
	// HelperInstallPath defaults to DefaultHelperInstallPath.
	HelperInstallPath string
	// HelperConfig is the helper's configuration file (default
	// hostnet.DefaultHelperConfig).
	HelperConfig string
	// Pool, when set, is written to the helper's configuration as the guest
	// address range; when empty, an existing configuration is kept and a new
	// one gets hostnet.DefaultPool.
	Pool string
	// AllowUsers are the users (names or uids) the helper serves.
	AllowUsers []string
	// HelperArgs are extra flags for banger-helper (e.g. "--bridge", "banger1").
	HelperArgs []string
	// DaemonArgs are extra arguments for bangerd.
	DaemonArgs []string
	// BangerHome, when set, becomes BANGER_HOME in bangerd's environment.
	BangerHome string
	// HelperSocket, when set, becomes BANGER_HELPER_SOCKET for both units.
	HelperSocket string
	// SystemUnitDir defaults to DefaultSystemUnitDir.
	SystemUnitDir string
	// UserUnitDir defaults to $XDG_CONFIG_HOME/systemd/user (~/.config/...).
	UserUnitDir string
}

// checkValue refuses what could break out of a unit-file line.
func checkValue(what, s string) error {
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("%s %q contains a control character", what, s)
		}
	}
	return nil
}

func checkPath(what, p string) error {
	if p == "" {
		return fmt.Errorf("%s is required", what)
	}
	if !filepath.IsAbs(p) || filepath.Clean(p) != p {
		return fmt.Errorf("%s %q must be an absolute, clean path", what, p)
	}
	return checkValue(what, p)
}

// quoteArg renders one ExecStart= argument: plain when safe, else double
// quoted with C escapes; '%' (specifiers) and '$' (variables) are escaped.
func quoteArg(s string) string {
	safe := s != ""
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._:=@+,-", r)) {
			safe = false
			break
		}
	}
	if safe {
		return s
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, `%`, `%%`, `$`, `$$`)
	return `"` + r.Replace(s) + `"`
}

// quoteEnv renders one Environment= assignment.
func quoteEnv(k, v string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, `%`, `%%`)
	return `"` + k + "=" + r.Replace(v) + `"`
}

func execLine(bin string, args []string) string {
	parts := []string{quoteArg(bin)}
	for _, a := range args {
		parts = append(parts, quoteArg(a))
	}
	return strings.Join(parts, " ")
}

func (o Options) helperInstallPath() string {
	if o.HelperInstallPath != "" {
		return o.HelperInstallPath
	}
	return DefaultHelperInstallPath
}

// HelperInstallPathOrDefault is where InstallHelper puts the helper.
func (o Options) HelperInstallPathOrDefault() string { return o.helperInstallPath() }

// HelperConfigOrDefault is the helper's configuration file.
func (o Options) HelperConfigOrDefault() string { return o.helperConfig() }

func (o Options) helperConfig() string {
	if o.HelperConfig != "" {
		return o.HelperConfig
	}
	return hostnet.DefaultHelperConfig
}

// RenderHelperUnit renders banger-helper.service; it runs the installed
// copy of the helper (HelperInstallPath) with its configuration file.
func RenderHelperUnit(o Options) (string, error) {
	bin := o.helperInstallPath()
	if err := checkPath("installed helper binary", bin); err != nil {
		return "", err
	}
	if err := checkPath("helper configuration", o.helperConfig()); err != nil {
		return "", err
	}
	if len(o.AllowUsers) == 0 {
		return "", errors.New("at least one user to allow is required")
	}
	var args []string
	for _, u := range o.AllowUsers {
		if u == "" || strings.HasPrefix(u, "-") {
			return "", fmt.Errorf("bad user %q", u)
		}
		if err := checkValue("user", u); err != nil {
			return "", err
		}
		args = append(args, "--allow-user", u)
	}
	for _, a := range o.HelperArgs {
		if err := checkValue("helper argument", a); err != nil {
			return "", err
		}
	}
	args = append(args, o.HelperArgs...)
	args = append(args, "--config", o.helperConfig())
	var b strings.Builder
	b.WriteString("# Written by `banger system install`; `banger system uninstall` removes it.\n")
	b.WriteString("[Unit]\n")
	b.WriteString("Description=banger root helper (bridge, taps and NAT for banger microVMs)\n")
	b.WriteString("Documentation=https://github.com/bangerdev/banger\n")
	b.WriteString("After=network.target\n\n")
	b.WriteString("[Service]\n")
	b.WriteString("Type=simple\n")
	b.WriteString("ExecStart=" + execLine(bin, args) + "\n")
	if o.HelperSocket != "" {
		if err := checkPath("helper socket", o.HelperSocket); err != nil {
			return "", err
		}
		b.WriteString("Environment=" + quoteEnv("BANGER_HELPER_SOCKET", o.HelperSocket) + "\n")
		b.WriteString("ReadWritePaths=" + quoteArg(filepath.Dir(o.HelperSocket)) + "\n")
	} else {
		b.WriteString("RuntimeDirectory=banger\nRuntimeDirectoryMode=0755\n")
	}
	b.WriteString("Restart=on-failure\nRestartSec=1s\n")
	b.WriteString("# It only configures networking and serves guests' DNS on port 53.\n")
	b.WriteString("CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n")
	b.WriteString("NoNewPrivileges=yes\n")
	b.WriteString("ProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\n")
	b.WriteString("DevicePolicy=closed\nDeviceAllow=/dev/net/tun rw\n")
	b.WriteString("ProtectControlGroups=yes\nRestrictNamespaces=yes\nLockPersonality=yes\n")
	b.WriteString("MemoryDenyWriteExecute=yes\nRestrictRealtime=yes\nRestrictSUIDSGID=yes\n")
	b.WriteString("SystemCallArchitectures=native\n")
	b.WriteString("RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6\n\n")
	b.WriteString("[Install]\nWantedBy=multi-user.target\n")
	return b.String(), nil
}

// RenderDaemonUnit renders the user unit bangerd.service.
func RenderDaemonUnit(o Options) (string, error) {
	if err := checkPath("bangerd binary", o.DaemonBin); err != nil {
		return "", err
	}
	for _, a := range o.DaemonArgs {
		if err := checkValue("bangerd argument", a); err != nil {
			return "", err
		}
	}
	var b strings.Builder
	b.WriteString("# Written by `banger system install`; `banger system uninstall` removes it.\n")
	b.WriteString("[Unit]\n")
	b.WriteString("Description=banger daemon (disposable microVMs)\n")
	b.WriteString("Documentation=https://github.com/bangerdev/banger\n\n")
	b.WriteString("[Service]\n")
	b.WriteString("Type=simple\n")
	b.WriteString("ExecStart=" + execLine(o.DaemonBin, o.DaemonArgs) + "\n")
	if o.BangerHome != "" {
		if err := checkPath("BANGER_HOME", o.BangerHome); err != nil {
			return "", err
		}
		b.WriteString("Environment=" + quoteEnv("BANGER_HOME", o.BangerHome) + "\n")
	}
	if o.HelperSocket != "" {
		if err := checkPath("helper socket", o.HelperSocket); err != nil {
			return "", err
		}
		b.WriteString("Environment=" + quoteEnv("BANGER_HELPER_SOCKET", o.HelperSocket) + "\n")
	}
	b.WriteString("Restart=on-failure\nRestartSec=1s\n")
	b.WriteString("# VMs run in their own sessions and must outlive a daemon restart:\n")
	b.WriteString("# stopping the unit stops only bangerd itself.\n")
	b.WriteString("KillMode=process\n\n")
	b.WriteString("[Install]\nWantedBy=default.target\n")
	return b.String(), nil
}

// ErrNoSystemd is returned by the install functions when systemd is not the
// running init system.
var ErrNoSystemd = errors.New("systemd is not running on this machine")

// SystemdRunning reports whether systemd manages this machine (the check of
// sd_booted(3): /run/systemd/system exists).
func SystemdRunning() bool {
	fi, err := os.Stat("/run/systemd/system")
	return err == nil && fi.IsDir()
}

// ForegroundInstructions tells a user without systemd how to run banger.
func ForegroundInstructions(o Options) string {
	helper := o.HelperBin
	if helper == "" {
		helper = "banger-helper"
	}
	users := o.AllowUsers
	if len(users) == 0 {
		users = []string{"$USER"}
	}
	var args []string
	for _, u := range users {
		args = append(args, "--allow-user", u)
	}
	return fmt.Sprintf("systemd is not running here, so banger cannot install services.\n"+
		"Start the root helper yourself and keep it running (it logs to stderr):\n"+
		"  sudo %s %s\n"+
		"bangerd needs no service: banger starts it on demand.", helper, strings.Join(args, " "))
}

// Runner runs a command and returns its combined output.
type Runner func(ctx context.Context, name string, args ...string) ([]byte, error)

// CommandTimeout bounds each systemctl call.
const CommandTimeout = 60 * time.Second

func execRunner(ctx context.Context, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, CommandTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// Installer writes units and drives systemctl.
type Installer struct {
	Options
	// Run runs systemctl (default: the real command, bounded by CommandTimeout).
	Run Runner
	// Systemd reports whether systemd is running (default: SystemdRunning).
	Systemd func() bool
}

func (i *Installer) run(ctx context.Context, args ...string) error {
	r := i.Run
	if r == nil {
		r = execRunner
	}
	_, err := r(ctx, "systemctl", args...)
	return err
}

func (i *Installer) checkSystemd() error {
	up := i.Systemd
	if up == nil {
		up = SystemdRunning
	}
	if !up() {
		return fmt.Errorf("%w\n%s", ErrNoSystemd, ForegroundInstructions(i.Options))
	}
	return nil
}

func (i *Installer) systemDir() string {
	if i.SystemUnitDir != "" {
		return i.SystemUnitDir
	}
	return DefaultSystemUnitDir
}

// UserUnitDir returns $XDG_CONFIG_HOME/systemd/user, or ~/.config/systemd/user.
func UserUnitDir() (string, error) {
	if x := os.Getenv("XDG_CONFIG_HOME"); x != "" && filepath.IsAbs(x) {
		return filepath.Join(x, "systemd", "user"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("cannot find the home directory for the user unit: %w", err)
	}
	return filepath.Join(home, ".config", "systemd", "user"), nil
}

func (i *Installer) userDir() (string, error) {
	if i.UserUnitDir != "" {
		return i.UserUnitDir, nil
	}
	return UserUnitDir()
}

// writeUnit writes content atomically; changed reports whether it differed.
func writeUnit(path, content string) (changed bool, err error) {
	if old, err := os.ReadFile(path); err == nil && string(old) == content {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return false, fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return false, fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Close(); err != nil {
		return false, err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return false, fmt.Errorf("install %s: %w", path, err)
	}
	return true, nil
}

func (i *Installer) install(ctx context.Context, dir, unit, content string, user bool) (string, error) {
	path := filepath.Join(dir, unit)
	changed, err := writeUnit(path, content)
	if err != nil {
		return "", err
	}
	var scope []string
	if user {
		scope = []string{"--user"}
	}
	if err := i.run(ctx, append(scope, "daemon-reload")...); err != nil {
		return path, err
	}
	if changed {
		// A running service keeps its old definition until restarted.
		if err := i.run(ctx, append(scope, "enable", unit)...); err != nil {
			return path, err
		}
		return path, i.run(ctx, append(scope, "restart", unit)...)
	}
	return path, i.run(ctx, append(scope, "enable", "--now", unit)...)
}

func (i *Installer) uninstall(ctx context.Context, dir, unit string, user bool) error {
	path := filepath.Join(dir, unit)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var scope []string
	if user {
		scope = []string{"--user"}
	}
	if err := i.run(ctx, append(scope, "disable", "--now", unit)...); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return i.run(ctx, append(scope, "daemon-reload")...)
}

// InstallHelper (root) writes the helper's system unit, enables and
// (re)starts it. It returns the unit's path.
func (i *Installer) InstallHelper(ctx context.Context) (string, error) {
	if err := i.checkSystemd(); err != nil {
		return "", err
	}
	content, err := RenderHelperUnit(i.Options)
	if err != nil {
		return "", err
	}
	if err := checkPath("helper binary", i.HelperBin); err != nil {
		return "", err
	}
	if err := InstallBinary(i.HelperBin, i.helperInstallPath()); err != nil {
		return "", err
	}
	if err := WriteHelperConfig(i.helperConfig(), i.Pool); err != nil {
		return "", err
	}
	return i.install(ctx, i.systemDir(), HelperUnit, content, false)
}

// UninstallHelper (root) stops, disables and removes the helper's unit.
func (i *Installer) UninstallHelper(ctx context.Context) error {
	if err := i.checkSystemd(); err != nil {
		return err
	}
	if err := i.uninstall(ctx, i.systemDir(), HelperUnit, false); err != nil {
		return err
	}
	for _, p := range []string{i.helperInstallPath(), i.helperConfig()} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", p, err)
		}
	}
	return nil
}

// InstallDaemon (as the user) writes bangerd's user unit, enables and
// (re)starts it. It returns the unit's path. Without lingering
// (`loginctl enable-linger`) the user manager, and bangerd with it, stops
// when the user's last session ends.
func (i *Installer) InstallDaemon(ctx context.Context) (string, error) {
	if err := i.checkSystemd(); err != nil {
		return "", err
	}
	content, err := RenderDaemonUnit(i.Options)
	if err != nil {
		return "", err
	}
	dir, err := i.userDir()
	if err != nil {
		return "", err
	}
	return i.install(ctx, dir, DaemonUnit, content, true)
}

// UninstallDaemon (as the user) stops, disables and removes bangerd's unit.
func (i *Installer) UninstallDaemon(ctx context.Context) error {
	if err := i.checkSystemd(); err != nil {
		return err
	}
	dir, err := i.userDir()
	if err != nil {
		return err
	}
	return i.uninstall(ctx, dir, DaemonUnit, true)
}
