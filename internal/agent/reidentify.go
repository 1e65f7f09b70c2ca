package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/api"
)

var machineIDRe = regexp.MustCompile(`^[0-9a-f]{32}$`)

// reidentify gives a guest restored from a snapshot its own identity, in
// the order that makes its secrets diverge first: the entropy pool, the
// clock, the hostname and machine-id, then the network. The SSH host key is
// swapped by the server once this returns. root is the guest's root ("/").
func reidentify(root string, p api.Reidentify, log *slog.Logger) error {
	var errs []error
	// Each step's duration, logged once at the end (warm-start profiling).
	var steps []any
	last := time.Now()
	step := func(name string) {
		now := time.Now()
		steps = append(steps, name, now.Sub(last).Round(100*time.Microsecond).String())
		last = now
	}
	defer func() { log.Info("reidentify steps", steps...) }()
	if err := seedRNG(p.RNGSeed); err != nil {
		errs = append(errs, fmt.Errorf("seed the entropy pool: %w", err))
	} else if err := reseedCRNG(); err != nil {
		// Crediting entropy reseeds the kernel's CRNG only during early
		// boot; a running kernel would go on with the source's state until
		// its next scheduled reseed.
		errs = append(errs, fmt.Errorf("reseed the kernel RNG: %w", err))
	}
	step("rng")
	if p.TimeUnixNano > 0 {
		tv := unix.NsecToTimeval(p.TimeUnixNano)
		if err := unix.Settimeofday(&tv); err != nil {
			errs = append(errs, fmt.Errorf("set the clock: %w", err))
		}
		// the clock jumped: measure the next steps from here
		last = time.Now()
	}
	if p.Hostname != "" {
		if !validHostname(p.Hostname) {
			return fmt.Errorf("invalid hostname %q", p.Hostname)
		}
		if err := unix.Sethostname([]byte(p.Hostname)); err != nil {
			errs = append(errs, fmt.Errorf("set hostname: %w", err))
		}
		if err := writeHostname(root, p.Hostname); err != nil {
			errs = append(errs, fmt.Errorf("write /etc/hostname: %w", err))
		}
		step("hostname")
	}
	if p.MachineID != "" {
		if !machineIDRe.MatchString(p.MachineID) {
			return fmt.Errorf("invalid machine-id %q", p.MachineID)
		}
		if err := replaceFile(filepath.Join(root, "etc", "machine-id"), []byte(p.MachineID+"\n"), 0o444); err != nil {
			errs = append(errs, fmt.Errorf("write /etc/machine-id: %w", err))
		}
		step("machine_id")
	}
	if n := p.Network; n != nil {
		if err := renumber(n, log); err != nil {
			errs = append(errs, err)
		} else if err := writeResolvConf(root, n.DNS); err != nil {
			errs = append(errs, fmt.Errorf("write /etc/resolv.conf: %w", err))
		}
		step("network")
	}
	return errors.Join(errs...)
}

var hostnameRe = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func validHostname(s string) bool { return hostnameRe.MatchString(s) }

// renumber moves the interface that has n.FromMAC (or already n.MAC) to the
// new MAC and address, with the default route through the new gateway.
func renumber(n *api.ReidentifyNetwork, log *slog.Logger) error {
	mac, addr, gw, err := parseNetwork(n.MAC, n.Address, n.Gateway)
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	var link netlink.Link
	for _, m := range []string{n.FromMAC, n.MAC} {
		hw, err := net.ParseMAC(m)
		if err != nil {
			continue
		}
		if link, err = waitLinkByMAC(hw, time.Second); err == nil {
			break
		}
	}
	if link == nil {
		return fmt.Errorf("network: no interface with MAC %s or %s", n.FromMAC, n.MAC)
	}
	name := link.Attrs().Name
	if err := netlink.LinkSetDown(link); err != nil {
		return fmt.Errorf("network: take %s down: %w", name, err)
	}
	if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
		return fmt.Errorf("network: set %s's MAC to %s: %w", name, mac, err)
	}
	old, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("network: list %s's addresses: %w", name, err)
	}
	for _, a := range old {
		if err := netlink.AddrDel(link, &a); err != nil {
			return fmt.Errorf("network: remove %s from %s: %w", a.IPNet, name, err)
		}
	}
	if err := addrUpRoute(link, addr, gw, true); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	log.Info("network renumbered", "interface", name, "mac", n.MAC, "address", n.Address, "gateway", n.Gateway)
	return nil
}

// rndReseedCRNG is RNDRESEEDCRNG, _IO('R', 0x07) (Linux 4.17 and later).
const rndReseedCRNG = 0x5207

// reseedCRNG makes the kernel reseed its CRNG from the input pool now.
func reseedCRNG() error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndReseedCRNG, 0); errno != 0 {
		return errno
	}
	return nil
}
