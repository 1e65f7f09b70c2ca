package agent

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/bootcfg"
)

// linkWait bounds the wait for the network interface to appear.
const linkWait = 5 * time.Second

// configureNetwork brings lo up and, when n is set, configures the
// interface whose MAC is n.MAC: MTU, address, up, default route.
func configureNetwork(n *bootcfg.Network, log *slog.Logger) error {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		if err := netlink.LinkSetUp(lo); err != nil {
			log.Warn("bring up lo", "error", err)
		}
	}
	if n == nil {
		return nil
	}
	mac, addr, gw, err := parseNetwork(n.MAC, n.Address, n.Gateway)
	if err != nil {
		return fmt.Errorf("network config: %w", err)
	}
	link, err := waitLinkByMAC(mac, linkWait)
	if err != nil {
		return err
	}
	name := link.Attrs().Name
	if n.MTU > 0 {
		if err := netlink.LinkSetMTU(link, n.MTU); err != nil {
			return fmt.Errorf("set MTU %d on %s: %w", n.MTU, name, err)
		}
	}
	if err := addrUpRoute(link, addr, gw, false); err != nil {
		return err
	}
	log.Info("network configured", "interface", name, "address", n.Address, "gateway", n.Gateway)
	return nil
}

// parseNetwork parses a network config's MAC, CIDR address and optional
// gateway (nil when empty).
func parseNetwork(macS, address, gateway string) (net.HardwareAddr, *netlink.Addr, net.IP, error) {
	mac, err := net.ParseMAC(macS)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("bad MAC %q: %w", macS, err)
	}
	addr, err := netlink.ParseAddr(address)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("bad address %q (want CIDR like 172.30.0.5/24): %w", address, err)
	}
	var gw net.IP
	if gateway != "" {
		if gw = net.ParseIP(gateway); gw == nil {
			return nil, nil, nil, fmt.Errorf("bad gateway %q", gateway)
		}
	}
	return mac, addr, gw, nil
}

// addrUpRoute adds addr to link, brings it up and, when gw is set, routes
// the default through gw: added (an existing one kept) at boot, replaced
// when replace is set (a renumbered clone's old route points elsewhere).
func addrUpRoute(link netlink.Link, addr *netlink.Addr, gw net.IP, replace bool) error {
	name := link.Attrs().Name
	if err := netlink.AddrAdd(link, addr); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add address %s to %s: %w", addr.IPNet, name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up %s: %w", name, err)
	}
	if gw == nil {
		return nil
	}
	r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw}
	if replace {
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("replace default route via %s on %s: %w", gw, name, err)
		}
	} else if err := netlink.RouteAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add default route via %s on %s: %w", gw, name, err)
	}
	return nil
}

func waitLinkByMAC(mac net.HardwareAddr, d time.Duration) (netlink.Link, error) {
	deadline := time.Now().Add(d)
	for {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, fmt.Errorf("list network interfaces: %w", err)
		}
		var seen []string
		for _, l := range links {
			if bytes.Equal(l.Attrs().HardwareAddr, mac) {
				return l, nil
			}
			seen = append(seen, l.Attrs().Name+"="+l.Attrs().HardwareAddr.String())
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no network interface with MAC %s after %s (found %s; is virtio_net in the initrd?)", mac, d, strings.Join(seen, ", "))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// writeResolvConf writes root/etc/resolv.conf with the given name servers,
// replacing a symlink (systemd-resolved's stub, say) by a plain file.
func writeResolvConf(root string, dns []string) error {
	if len(dns) == 0 {
		return nil
	}
	var b strings.Builder
	b.WriteString("# written by banger-agent at boot\n")
	for _, s := range dns {
		if net.ParseIP(s) == nil {
			return fmt.Errorf("bad DNS server address %q", s)
		}
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	return replaceFile(filepath.Join(root, "etc", "resolv.conf"), []byte(b.String()), 0o644)
}

// writeHostname writes root/etc/hostname and makes root/etc/hosts resolve
// the name, keeping the image's other entries.
func writeHostname(root, name string) error {
	if name == "" {
		return nil
	}
	if err := rewriteFile(filepath.Join(root, "etc", "hostname"), []byte(name+"\n"), 0o644); err != nil {
		return err
	}
	hostsPath := filepath.Join(root, "etc", "hosts")
	old, err := os.ReadFile(hostsPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return rewriteFile(hostsPath, []byte(hostsWithName(string(old), name)), 0o644)
}

// hostsWithName returns an /etc/hosts content that maps name to 127.0.1.1
// (the Debian convention), keeping every other line.
func hostsWithName(old, name string) string {
	var out []string
	if strings.TrimSpace(old) == "" {
		out = []string{"127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"}
	} else {
		for _, l := range strings.Split(strings.TrimRight(old, "\n"), "\n") {
			f := strings.Fields(l)
			if len(f) > 0 && f[0] == "127.0.1.1" {
				continue // previous hostname entry
			}
			out = append(out, l)
		}
	}
	out = append(out, "127.0.1.1\t"+name)
	return strings.Join(out, "\n") + "\n"
}

// rewriteFile overwrites the regular file at p in place (written from the
// start, then cut to the new length when it was longer: the same inode) with
// mode, or creates it (and its directory) when there is nothing there;
// anything else there (a symlink, a FIFO, a device) is replaced by
// replaceFile instead, and never opened. A reader could see a mix of the old
// and the new content for a moment, which is fine for what the agent writes
// this way (hostname, hosts, machine-id) while a guest boots or is
// reidentified (commands wait for a reidentify's files). It is less guest
// work than replaceFile's write and rename (no new inode, no rename through
// overlayfs, no eviction of the old inode), and than truncating first: a
// file truncated to zero and written again is flushed to the disk on close
// (ext4's auto_da_alloc), and its blocks freed and allocated again, where an
// overwrite only dirties the page. In a clone just restored under emulation
// every kernel path runs cold: the truncating rewrite of /etc/hostname and
// /etc/hosts took 40-75 ms of a reidentify.
func rewriteFile(p string, data []byte, mode os.FileMode) error {
	flags := os.O_WRONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK
	fi, err := os.Lstat(p)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		flags |= os.O_CREATE | os.O_EXCL
	case err != nil || !fi.Mode().IsRegular():
		return replaceFile(p, data, mode)
	}
	f, err := os.OpenFile(p, flags, mode)
	if err != nil {
		return replaceFile(p, data, mode)
	}
	_, err = f.WriteAt(data, 0)
	if err == nil {
		var cur os.FileInfo
		if cur, err = f.Stat(); err == nil && cur.Size() > int64(len(data)) {
			err = f.Truncate(int64(len(data)))
		}
	}
	if err == nil && (fi == nil || fi.Mode().Perm() != mode) { // a new file's mode went through the umask
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// replaceFile writes data to p atomically, replacing whatever is there
// (a file or a symlink), creating the directory if needed.
func replaceFile(p string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	tmp := p + ".banger-tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
