package sysinfo

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const tcpSample = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 23456 1 0000000000000000 100 0 0 10 0
   2: 0500A8C0:C350 0100A8C0:0016 01 00000000:00000000 02:000A7E2B 00000000  1000        0 34567 2 0000000000000000 20 4 30 10 -1
`

const tcp6Sample = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 45678 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 45679 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 45680 1 0000000000000000 100 0 0 10 0
`

const udpSample = `   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 56789 2 0000000000000000 0
  101: 0100007F:D431 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 56790 2 0000000000000000 0
`

func TestParseProcNet(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		proto  string
		want   []netip.AddrPort
		listen []bool
		inodes []uint64
	}{
		{"tcp", tcpSample, "tcp",
			[]netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:631"), netip.MustParseAddrPort("0.0.0.0:8080"), netip.MustParseAddrPort("192.168.0.5:50000")},
			[]bool{true, true, false}, []uint64{12345, 23456, 34567}},
		{"tcp6", tcp6Sample, "tcp6",
			[]netip.AddrPort{netip.MustParseAddrPort("[::]:80"), netip.MustParseAddrPort("[::1]:8081"), netip.MustParseAddrPort("127.0.0.1:8082")},
			[]bool{true, true, true}, []uint64{45678, 45679, 45680}},
		{"udp", udpSample, "udp",
			[]netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:68"), netip.MustParseAddrPort("127.0.0.1:54321")},
			[]bool{true, false}, []uint64{56789, 56790}},
		{"empty", "", "tcp", nil, nil, nil},
		{"header only", strings.SplitN(tcpSample, "\n", 2)[0] + "\n", "tcp", nil, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseProcNet(strings.NewReader(tt.in))
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %d sockets, want %d: %+v", len(got), len(tt.want), got)
			}
			for i, s := range got {
				if s.Local != tt.want[i] {
					t.Errorf("socket %d: local %v, want %v", i, s.Local, tt.want[i])
				}
				if s.listening(tt.proto) != tt.listen[i] {
					t.Errorf("socket %d: listening %v, want %v", i, s.listening(tt.proto), tt.listen[i])
				}
				if s.Inode != tt.inodes[i] {
					t.Errorf("socket %d: inode %d, want %d", i, s.Inode, tt.inodes[i])
				}
			}
		})
	}
}

func TestParseProcNetErrors(t *testing.T) {
	for _, in := range []string{
		"header local_address\n 0: zz:0000 00000000:0000 0A a b c d e 1\n",
		"header local_address\n 0: 0100007F:0277\n",
		"header local_address\n 0: 0100007F:0277 00000000:0000 0A 0 0 0 0 0 notanumber\n",
		"header local_address\n 0: 01007F:0277 00000000:0000 0A 0 0 0 0 0 1\n",
		"header local_address\n 0: 0100007F:10000 00000000:0000 0A 0 0 0 0 0 1\n",
		"header local_address\n x 0100007F:0277 00000000:0000 0A 0 0 0 0 0 1\n",
	} {
		if _, err := ParseProcNet(strings.NewReader(in)); err == nil {
			t.Errorf("ParseProcNet(%q) succeeded, want an error", in)
		}
	}
}

func FuzzParseProcNet(f *testing.F) {
	for _, s := range []string{tcpSample, tcp6Sample, udpSample, "", "\n\n", " 0: :", " 0: 0:0 0:0 0 0 0 0 0 0 0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		socks, err := ParseProcNet(strings.NewReader(in))
		if err != nil {
			return
		}
		for _, s := range socks {
			if !s.Local.IsValid() || !s.Remote.IsValid() {
				t.Fatalf("parsed an invalid address from %q", in)
			}
			_ = s.listening("tcp")
			_ = s.listening("udp")
		}
	})
}

func TestSocketInode(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"socket:[123]", 123, true},
		{"socket:[]", 0, false},
		{"pipe:[123]", 0, false},
		{"socket:[12a]", 0, false},
		{"/dev/null", 0, false},
	}
	for _, tt := range tests {
		got, ok := socketInode(tt.in)
		if got != tt.want || ok != tt.ok {
			t.Errorf("socketInode(%q) = %d, %v; want %d, %v", tt.in, got, ok, tt.want, tt.ok)
		}
	}
}

// TestPortsLive opens a listener in this process and expects Ports to find it
// with this process as its owner.
func TestPortsLive(t *testing.T) {
	if _, err := os.Stat("/proc/net/tcp"); err != nil {
		t.Skipf("/proc/net/tcp not readable: %v", err)
	}
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	u, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	tcpPort := l.Addr().(*net.TCPAddr).Port
	udpPort := u.LocalAddr().(*net.UDPAddr).Port
	ports, err := Ports("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var foundTCP, foundUDP bool
	for _, p := range ports {
		if p.Proto == "tcp" && p.Port == tcpPort && p.Address == "127.0.0.1" {
			foundTCP = true
			if p.PID != os.Getpid() {
				t.Errorf("tcp port %d owner pid %d, want %d", tcpPort, p.PID, os.Getpid())
			}
			if p.Process == "" {
				t.Errorf("tcp port %d has no process name", tcpPort)
			}
		}
		if p.Proto == "udp" && p.Port == udpPort {
			foundUDP = true
			if p.PID != os.Getpid() {
				t.Errorf("udp port %d owner pid %d, want %d", udpPort, p.PID, os.Getpid())
			}
		}
	}
	if !foundTCP || !foundUDP {
		t.Fatalf("listener tcp:%d found=%v, udp:%d found=%v in %+v", tcpPort, foundTCP, udpPort, foundUDP, ports)
	}
}

func TestPortsFakeProc(t *testing.T) {
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "net"), 0o755))
	must(os.WriteFile(filepath.Join(root, "net", "tcp"), []byte(tcpSample), 0o644))
	must(os.WriteFile(filepath.Join(root, "net", "udp"), []byte(udpSample), 0o644))
	must(os.MkdirAll(filepath.Join(root, "42", "fd"), 0o755))
	must(os.WriteFile(filepath.Join(root, "42", "comm"), []byte("nginx\n"), 0o644))
	must(os.Symlink("socket:[23456]", filepath.Join(root, "42", "fd", "3")))
	must(os.Symlink("/dev/null", filepath.Join(root, "42", "fd", "0")))
	ports, err := Ports(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(ports) != 3 {
		t.Fatalf("got %d ports, want 3: %+v", len(ports), ports)
	}
	// Sorted by port: 68/udp, 631/tcp, 8080/tcp.
	if ports[0].Port != 68 || ports[0].Proto != "udp" || ports[1].Port != 631 || ports[2].Port != 8080 {
		t.Fatalf("unexpected order: %+v", ports)
	}
	if ports[2].PID != 42 || ports[2].Process != "nginx" {
		t.Errorf("port 8080 owner = %d %q, want 42 nginx", ports[2].PID, ports[2].Process)
	}
	if ports[1].PID != 0 {
		t.Errorf("port 631 has owner %d, want none", ports[1].PID)
	}
}

func TestParseMeminfo(t *testing.T) {
	tests := []struct {
		in           string
		total, avail uint64
		wantErr      bool
	}{
		{"MemTotal:       16303412 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n", 16303412 * 1024, 12000000 * 1024, false},
		{"MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 20 kB\n", 1000 * 1024, 130 * 1024, false},
		{"MemFree: 1 kB\n", 0, 0, true},
	}
	for _, tt := range tests {
		total, avail, err := ParseMeminfo([]byte(tt.in))
		if (err != nil) != tt.wantErr || total != tt.total || avail != tt.avail {
			t.Errorf("ParseMeminfo(%q) = %d, %d, %v", tt.in, total, avail, err)
		}
	}
}

func TestParseLoadavgUptime(t *testing.T) {
	l1, l5, l15, err := ParseLoadavg([]byte("0.52 0.58 0.59 2/1234 5678\n"))
	if err != nil || l1 != 0.52 || l5 != 0.58 || l15 != 0.59 {
		t.Errorf("ParseLoadavg = %v %v %v %v", l1, l5, l15, err)
	}
	if _, _, _, err := ParseLoadavg([]byte("0.5 x")); err == nil {
		t.Error("ParseLoadavg accepted garbage")
	}
	up, err := ParseUptime([]byte("350735.47 234388.90\n"))
	if err != nil || up != 350735470*time.Millisecond {
		t.Errorf("ParseUptime = %v %v", up, err)
	}
	if _, err := ParseUptime([]byte("-1 2")); err == nil {
		t.Error("ParseUptime accepted a negative uptime")
	}
}

func TestReadStatsLive(t *testing.T) {
	st, err := ReadStats("/proc", "/")
	if err != nil {
		t.Fatal(err)
	}
	if st.MemTotalBytes == 0 || st.MemUsedBytes > st.MemTotalBytes || st.DiskTotalBytes == 0 || st.Uptime <= 0 || st.Procs == 0 {
		t.Fatalf("implausible stats %+v", st)
	}
}
