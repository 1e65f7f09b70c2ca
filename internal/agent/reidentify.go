package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/latelog"
)

var machineIDRe = regexp.MustCompile(`^[0-9a-f]{32}$`)

// reidentify gives a guest restored from a snapshot its own identity, in
// the order that makes its secrets diverge first: the entropy pool, the
// clock, the hostname, then the network. The SSH host key is swapped by the
// server once this returns. root is the guest's root ("/").
//
// The files that carry the identity (/etc/hostname, /etc/hosts,
// /etc/machine-id, /etc/resolv.conf) are written afterwards by files, in
// the background, so that the host's reply does not wait for them: in a
// clone just restored under emulation every kernel path they take runs
// cold (45-100 ms). Commands wait for them (files.wait, sshd's
// BeforeCommand), so none sees the source's. A failed write is logged on
// the console and refuses every later command with the reason (errIdentity):
// a clone that may still carry its source's hostname or machine-id must not
// look healthy. files nil writes them before returning, and returns a
// failed write.
func reidentify(root string, p api.Reidentify, files *background, log *slog.Logger) error {
	if p.Hostname != "" && !validHostname(p.Hostname) {
		return fmt.Errorf("invalid hostname %q", p.Hostname)
	}
	if p.MachineID != "" && !machineIDRe.MatchString(p.MachineID) {
		return fmt.Errorf("invalid machine-id %q", p.MachineID)
	}
	var errs []error
	// Each step's duration, logged once the files are written (warm-start
	// profiling; a console line costs milliseconds under emulation).
	var steps []any
	last := time.Now()
	step := func(name string) {
		now := time.Now()
		steps = append(steps, name, now.Sub(last).Round(100*time.Microsecond).String())
		last = now
	}
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
		if err := unix.Sethostname([]byte(p.Hostname)); err != nil {
			errs = append(errs, fmt.Errorf("set hostname: %w", err))
		}
		step("hostname")
	}
	if n := p.Network; n != nil {
		if err := renumber(n, log); err != nil {
			errs = append(errs, err)
		}
		step("network")
	}
	write := func() error {
		var ferrs []error
		if p.Hostname != "" {
			if err := writeHostname(root, p.Hostname); err != nil {
				ferrs = append(ferrs, fmt.Errorf("write /etc/hostname and /etc/hosts: %w", err))
			}
			step("hostname_files")
		}
		if p.MachineID != "" {
			if err := rewriteFile(filepath.Join(root, "etc", "machine-id"), []byte(p.MachineID+"\n"), 0o444); err != nil {
				ferrs = append(ferrs, fmt.Errorf("write /etc/machine-id: %w", err))
			}
			step("machine_id")
		}
		if n := p.Network; n != nil {
			if err := writeResolvConf(root, n.DNS); err != nil {
				ferrs = append(ferrs, fmt.Errorf("write /etc/resolv.conf: %w", err))
			}
			step("resolv_conf")
		}
		err := errors.Join(ferrs...)
		if err != nil {
			err = &errIdentity{err}
			log.Error("the new identity's files were not all written", "error", err)
		}
		// later: commands wait for this batch (files.wait)
		latelog.Info(log, "reidentify steps", steps...)
		return err
	}
	if err := errors.Join(errs...); err != nil {
		log.Info("reidentify steps", steps...)
		return err
	}
	if files == nil {
		return write()
	}
	files.run(write)
	return nil
}

// errIdentity is a reidentify whose files were not all written.
type errIdentity struct{ err error }

func (e *errIdentity) Error() string {
	return "this clone's new identity was not fully written, so it may still carry its source's hostname or machine-id (" +
		e.err.Error() + "); delete it and make it again"
}

func (e *errIdentity) Unwrap() error { return e.err }

// background runs the reidentify file writes after the reply, one batch
// after the other, and lets commands wait for them. A batch that fails
// fails every later wait: what it did not write is not written by a later
// batch (a rename writes only the hostname).
type background struct {
	mu   sync.Mutex
	done chan struct{} // closed when the latest batch is written; nil: none
	err  error         // the failed batches' errors
}

// run starts f once the previous batch is done.
func (b *background) run(f func() error) {
	d := make(chan struct{})
	b.mu.Lock()
	prev := b.done
	b.done = d
	b.mu.Unlock()
	go func() {
		defer close(d)
		if prev != nil {
			<-prev
		}
		if err := f(); err != nil {
			b.mu.Lock()
			b.err = errors.Join(b.err, err)
			b.mu.Unlock()
		}
	}()
}

// settleWait bounds how long a command waits for the identity files.
const settleWait = 10 * time.Second

// wait returns once the batches started so far are written, or after
// settleWait (a hung filesystem then shows in the command itself), with the
// error of any batch that failed.
func (b *background) wait() error {
	b.mu.Lock()
	d := b.done
	b.mu.Unlock()
	if d != nil {
		t := time.NewTimer(settleWait)
		defer t.Stop()
		select {
		case <-d:
		case <-t.C:
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
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
	latelog.Info(log, "network renumbered", "interface", name, "mac", n.MAC, "address", n.Address, "gateway", n.Gateway)
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
