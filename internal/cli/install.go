package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/hostnet/install"
)

// installerFor builds the systemd installer; tests replace it.
var installerFor = func(o install.Options) *install.Installer { return &install.Installer{Options: o} }

func binNextToBanger(name string) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	p := filepath.Join(filepath.Dir(exe), name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not found next to banger (%s): install the banger binaries together", name, p)
	}
	return p, nil
}

func (a *App) systemCommand() *cobra.Command {
	sys := &cobra.Command{Use: "system", Short: "Install or remove banger's services"}
	var allow []string
	var pool string
	inst := &cobra.Command{
		Use:   "install",
		Short: "Install banger-helper as a system service (as root) and bangerd as a user service",
		Long: "Run as root (e.g. sudo banger system install) to install the root helper, allowed for the\n" +
			"invoking user; run as yourself to install bangerd as a systemd user service.\n\n" +
			"As root it copies banger-helper to " + install.DefaultHelperInstallPath + " (root-owned; the\n" +
			"service runs that copy) and writes the helper's configuration " + hostnet.DefaultHelperConfig + ",\n" +
			"which sets the guest address range (--pool).",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.systemInstall(cmd.Context(), allow, pool, true)
		},
	}
	inst.Flags().StringSliceVar(&allow, "allow-user", nil, "users the helper serves (default: the sudo caller)")
	inst.Flags().StringVar(&pool, "pool", "", "private IPv4 `CIDR` guest addresses come from (default: keep the configured one, else "+hostnet.DefaultPool+")")
	uninst := &cobra.Command{
		Use:   "uninstall",
		Short: "Remove the services banger system install made",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.systemInstall(cmd.Context(), allow, "", false)
		},
	}
	sys.AddCommand(inst, uninst)
	return sys
}

func (a *App) systemInstall(ctx context.Context, allow []string, pool string, install_ bool) error {
	helperBin, err := binNextToBanger("banger-helper")
	if err != nil {
		return err
	}
	daemonBin, err := binNextToBanger("bangerd")
	if err != nil {
		return err
	}
	root := os.Geteuid() == 0
	sudoUser := os.Getenv("SUDO_USER")
	if len(allow) == 0 {
		switch {
		case sudoUser != "":
			allow = []string{sudoUser}
		case root:
			allow = []string{"root"}
		default:
			if u, err := user.Current(); err == nil {
				allow = []string{u.Username}
			}
		}
	}
	o := install.Options{HelperBin: helperBin, DaemonBin: daemonBin, AllowUsers: allow, BangerHome: os.Getenv("BANGER_HOME"), Pool: pool}
	if pool != "" && !root {
		return fmt.Errorf("--pool sets the root helper's configuration: run it as root (sudo banger system install --pool %s)", pool)
	}
	if s := os.Getenv("BANGER_HELPER_SOCKET"); s != "" {
		o.HelperSocket = s
	}
	in := installerFor(o)
	noSystemd := func(err error) error {
		if errors.Is(err, install.ErrNoSystemd) {
			return fmt.Errorf("%s", install.ForegroundInstructions(o))
		}
		return err
	}
	if !install_ {
		if root {
			if err := in.UninstallHelper(ctx); err != nil {
				return noSystemd(err)
			}
			fmt.Fprintln(a.Stdout, "removed the banger-helper service")
		}
		if !root || sudoUser == "" {
			if err := in.UninstallDaemon(ctx); err != nil {
				return noSystemd(err)
			}
			fmt.Fprintln(a.Stdout, "removed the bangerd user service")
		}
		return nil
	}
	if root {
		p, err := in.InstallHelper(ctx)
		if err != nil {
			return noSystemd(err)
		}
		fmt.Fprintf(a.Stdout, "installed and started banger-helper (%s, running %s with %s), serving %v\n", p, in.HelperInstallPathOrDefault(), in.HelperConfigOrDefault(), allow)
		if sudoUser != "" {
			fmt.Fprintf(a.Stdout, "now run `banger system install` as %s (without sudo) to run bangerd as a user service\n", sudoUser)
			return nil
		}
	}
	p, err := in.InstallDaemon(ctx)
	if err != nil {
		return noSystemd(err)
	}
	fmt.Fprintf(a.Stdout, "installed and started bangerd as a user service (%s)\n", p)
	if !root {
		fmt.Fprintln(a.Stdout, "for VM networking, also run: sudo banger system install")
	}
	return nil
}
