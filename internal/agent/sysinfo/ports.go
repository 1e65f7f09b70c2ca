// Package sysinfo reads what the guest agent reports about the guest: its
// listening sockets (from /proc/net and /proc/<pid>/fd) and its resource use.
package sysinfo

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/bangerdev/banger/internal/agent/api"
)

// Socket is one line of /proc/net/{tcp,tcp6,udp,udp6}.
type Socket struct {
	Local      netip.AddrPort
	Remote     netip.AddrPort
	State      uint8
	Inode      uint64
	RemoteZero bool
}

// Kernel socket states (include/net/tcp_states.h).
const (
	stateListen = 0x0A
	stateClose  = 0x07
)

// maxLineLen bounds one /proc/net line; real lines are about 150 bytes.
const maxLineLen = 4096

// ParseProcNet parses the contents of /proc/net/tcp, tcp6, udp or udp6. The
// first line is a header. Malformed lines are an error; the data comes from
// the kernel, so a parse error means a format this code does not know.
func ParseProcNet(r io.Reader) ([]Socket, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 512), maxLineLen)
	var out []Socket
	first := true
	for sc.Scan() {
		line := sc.Text()
		if first {
			first = false
			if strings.Contains(line, "local_address") {
				continue
			}
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		s, err := parseProcNetLine(line)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read socket table: %w", err)
	}
	return out, nil
}

func parseProcNetLine(line string) (Socket, error) {
	// "  0: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 ..."
	f := strings.Fields(line)
	if len(f) < 10 || !strings.HasSuffix(f[0], ":") {
		return Socket{}, fmt.Errorf("malformed socket table line %q", truncate(line))
	}
	local, err := parseHexAddrPort(f[1])
	if err != nil {
		return Socket{}, fmt.Errorf("socket table line %q: %w", truncate(line), err)
	}
	remote, err := parseHexAddrPort(f[2])
	if err != nil {
		return Socket{}, fmt.Errorf("socket table line %q: %w", truncate(line), err)
	}
	st, err := strconv.ParseUint(f[3], 16, 8)
	if err != nil {
		return Socket{}, fmt.Errorf("socket table line %q: bad state: %w", truncate(line), err)
	}
	inode, err := strconv.ParseUint(f[9], 10, 64)
	if err != nil {
		return Socket{}, fmt.Errorf("socket table line %q: bad inode: %w", truncate(line), err)
	}
	return Socket{
		Local:      local,
		Remote:     remote,
		State:      uint8(st),
		Inode:      inode,
		RemoteZero: remote.Port() == 0 && remote.Addr().IsUnspecified(),
	}, nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// parseHexAddrPort decodes "0100007F:0277" (IPv4) or 32 hex digits ":" port
// (IPv6). The kernel prints each 32-bit word of the address in host byte
// order and the port as a number.
func parseHexAddrPort(s string) (netip.AddrPort, error) {
	i := strings.IndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", s)
	}
	port, err := strconv.ParseUint(s[i+1:], 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port in %q", s)
	}
	raw, err := hex.DecodeString(s[:i])
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", s)
	}
	switch len(raw) {
	case 4:
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], binary.NativeEndian.Uint32(raw))
		return netip.AddrPortFrom(netip.AddrFrom4(b), uint16(port)), nil
	case 16:
		var b [16]byte
		for w := 0; w < 4; w++ {
			binary.BigEndian.PutUint32(b[w*4:], binary.NativeEndian.Uint32(raw[w*4:]))
		}
		return netip.AddrPortFrom(netip.AddrFrom16(b).Unmap(), uint16(port)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("bad address length in %q", s)
}

// listening reports whether a socket of the given protocol is a listener:
// TCP in LISTEN state, UDP unconnected (bound, no peer).
func (s Socket) listening(proto string) bool {
	if strings.HasPrefix(proto, "tcp") {
		return s.State == stateListen
	}
	return s.State == stateClose && s.RemoteZero && s.Local.Port() != 0
}

// Ports lists listening TCP and UDP sockets (IPv4 and IPv6) with the process
// owning each one, reading procRoot (normally "/proc"). Sockets whose owner
// cannot be found (another user's process when not root, kernel sockets) are
// listed without a process.
func Ports(procRoot string) ([]api.Port, error) {
	var out []api.Port
	found := false
	for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
		f, err := os.Open(filepath.Join(procRoot, "net", proto))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // IPv6 disabled, for instance
			}
			return nil, fmt.Errorf("list %s sockets: %w", proto, err)
		}
		socks, err := ParseProcNet(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("list %s sockets: %w", proto, err)
		}
		found = true
		for _, s := range socks {
			if !s.listening(proto) {
				continue
			}
			out = append(out, api.Port{
				Proto:   proto,
				Address: s.Local.Addr().String(),
				Port:    int(s.Local.Port()),
				Inode:   s.Inode,
			})
		}
	}
	if !found {
		return nil, fmt.Errorf("no socket tables under %s/net (is /proc mounted?)", procRoot)
	}
	if len(out) > 0 {
		owners := SocketOwners(procRoot)
		for i := range out {
			if o, ok := owners[out[i].Inode]; ok {
				out[i].PID = o.PID
				out[i].Process = o.Name
			}
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Port != out[j].Port {
			return out[i].Port < out[j].Port
		}
		if out[i].Proto != out[j].Proto {
			return out[i].Proto < out[j].Proto
		}
		return out[i].Address < out[j].Address
	})
	return out, nil
}

// Owner is a process holding a socket.
type Owner struct {
	PID  int
	Name string
}

// SocketOwners maps socket inodes to the (lowest-PID) process that has them
// open, by reading the fd symlinks under procRoot/<pid>/fd. Unreadable
// processes are skipped.
func SocketOwners(procRoot string) map[uint64]Owner {
	owners := make(map[uint64]Owner)
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return owners
	}
	pids := make([]int, 0, len(ents))
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	for _, pid := range pids {
		dir := filepath.Join(procRoot, strconv.Itoa(pid))
		fds, err := os.ReadDir(filepath.Join(dir, "fd"))
		if err != nil {
			continue
		}
		var name string
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(dir, "fd", fd.Name()))
			if err != nil {
				continue
			}
			inode, ok := socketInode(link)
			if !ok {
				continue
			}
			if _, seen := owners[inode]; seen {
				continue
			}
			if name == "" {
				name = processName(dir)
			}
			owners[inode] = Owner{PID: pid, Name: name}
		}
	}
	return owners
}

// socketInode parses "socket:[12345]".
func socketInode(link string) (uint64, bool) {
	rest, ok := strings.CutPrefix(link, "socket:[")
	if !ok {
		return 0, false
	}
	rest, ok = strings.CutSuffix(rest, "]")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(rest, 10, 64)
	return n, err == nil
}

func processName(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, "comm"))
	if err != nil {
		return ""
	}
	return string(bytes.TrimSpace(b))
}
