package dnsfwd

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func q(id uint16, flags byte, qd, an uint16) []byte {
	b := make([]byte, 12, 64)
	binary.BigEndian.PutUint16(b, id)
	b[2] = flags
	binary.BigEndian.PutUint16(b[4:], qd)
	binary.BigEndian.PutUint16(b[6:], an)
	return append(b, 1, 'a', 0, 0, 1, 0, 1)
}

func TestValidQuery(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"standard query", q(1, 0x01, 1, 0), true},
		{"short", []byte{1, 2, 3}, false},
		{"a response", q(1, 0x81, 1, 0), false},
		{"opcode notify", q(1, 4<<3, 1, 0), false},
		{"no question", q(1, 0x01, 0, 0), false},
		{"two questions", q(1, 0x01, 2, 0), false},
		{"with answers", q(1, 0x01, 1, 1), false},
		{"oversized", append(q(1, 0x01, 1, 0), make([]byte, MaxQuery)...), false},
	} {
		if got := ValidQuery(tc.b); got != tc.want {
			t.Errorf("%s: ValidQuery = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func FuzzValidQuery(f *testing.F) {
	f.Add(q(1, 0x01, 1, 0))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		if ValidQuery(b) && (len(b) < 12 || len(b) > MaxQuery || b[2]&0x80 != 0) {
			t.Fatalf("accepted %x", b)
		}
		// The reply builder never panics on a valid query.
		if ValidQuery(b) {
			if r := servfail(b); len(r) != 12 || r[0] != b[0] || r[1] != b[1] || r[3]&0x0f != 2 {
				t.Fatalf("servfail %x for %x", r, b)
			}
		}
	})
}

func TestParseResolvConf(t *testing.T) {
	self := netip.MustParseAddr("172.30.0.1")
	got := ParseResolvConf("# c\nsearch x\nnameserver 127.0.0.53\nnameserver 172.30.0.1\nnameserver 0.0.0.0\nnameserver bogus\nnameserver ::1\nnameserver 9.9.9.9\nnameserver 1.1.1.1\n", self)
	want := []string{"127.0.0.53:53", "[::1]:53", "9.9.9.9:53"}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

func TestLimiter(t *testing.T) {
	l := newLimiter(10, 5, 2)
	a := netip.MustParseAddr("172.30.0.2")
	now := time.Unix(1000, 0)
	n := 0
	for range 100 {
		if l.allow(a, now) {
			n++
		}
	}
	if n != 5 {
		t.Fatalf("burst allowed %d, want 5", n)
	}
	if !l.allow(a, now.Add(200*time.Millisecond)) {
		t.Fatal("no token after 200ms at 10/s")
	}
	// The table stays bounded.
	for i := range 10 {
		l.allow(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), now)
	}
	if len(l.m) > 2 {
		t.Fatalf("limiter holds %d sources, cap 2", len(l.m))
	}
}

// TestForwarderRelays runs the forwarder on loopback in front of a fake
// upstream and checks relaying, SERVFAIL without upstreams, the client
// range and the rate limit.
func TestForwarderRelays(t *testing.T) {
	up := fakeUpstream(t)
	dir := t.TempDir()
	rc := filepath.Join(dir, "resolv.conf")
	os.WriteFile(rc, []byte("nameserver 127.0.0.1\n"), 0o644)
	// Port 53 needs privileges: find a free port for the test.
	port := freePort(t)
	f, err := Start(Config{Listen: netip.MustParseAddr("127.0.0.1"), Port: port, Clients: netip.MustParsePrefix("127.0.0.0/8"), ResolvConf: rc})
	if err != nil {
		t.Fatalf("start the forwarder on 127.0.0.1:%d: %v", port, err)
	}
	defer f.Close()
	pinUpstream(f, up)

	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(f.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ask := func(b []byte) ([]byte, error) {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write(b); err != nil {
			return nil, err
		}
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		return buf[:n], err
	}
	r, err := ask(q(7, 0x01, 1, 0))
	if err != nil || len(r) < 12 || r[1] != 7 || r[2]&0x80 == 0 {
		t.Fatalf("relayed query: %x %v", r, err)
	}
	if _, err := ask(q(8, 0x81, 1, 0)); err == nil {
		t.Fatal("a response sent as a query was answered")
	}
	// Upstreams gone: SERVFAIL.
	f.ups.mu.Lock()
	f.ups.list = nil
	f.ups.mu.Unlock()
	r, err = ask(q(9, 0x01, 1, 0))
	if err != nil || r[3]&0x0f != 2 {
		t.Fatalf("no upstream: %x %v, want SERVFAIL", r, err)
	}
	// Rate limit: of a flood, at most the burst (plus refill) is answered.
	answered := 0
	for i := range 3 * Burst {
		c.Write(q(uint16(i), 0x01, 1, 0))
	}
	buf := make([]byte, 1500)
	for {
		c.SetDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := c.Read(buf); err != nil {
			break
		}
		answered++
	}
	if answered > Burst+Rate {
		t.Fatalf("%d of %d flooded queries answered, want at most %d", answered, 3*Burst, Burst+Rate)
	}
	t.Logf("flood of %d queries: %d answered", 3*Burst, answered)
}

func TestClientsOutsideRangeIgnored(t *testing.T) {
	f, err := Start(Config{Listen: netip.MustParseAddr("127.0.0.1"), Port: freePort(t), Clients: netip.MustParsePrefix("172.30.0.0/24"), ResolvConf: "/nonexistent"})
	if err != nil {
		t.Fatalf("start the forwarder: %v", err)
	}
	defer f.Close()
	c, _ := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(f.Addr()))
	defer c.Close()
	c.Write(q(1, 0x01, 1, 0))
	c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c.Read(make([]byte, 100)); err == nil {
		t.Fatal("a source outside the client range got an answer")
	}
}

func freePort(tb testing.TB) int {
	tb.Helper()
	p, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	defer p.Close()
	return p.LocalAddr().(*net.UDPAddr).Port
}

// fakeUpstream is a DNS server on loopback that answers every query by
// echoing it with the response bit set; it stops with the test.
func fakeUpstream(tb testing.TB) netip.AddrPort {
	tb.Helper()
	up, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { up.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := up.ReadFromUDP(buf)
			if err != nil {
				return
			}
			buf[2] |= 0x80
			up.WriteToUDP(buf[:n], from)
		}
	}()
	return up.LocalAddr().(*net.UDPAddr).AddrPort()
}

// pinUpstream points f at up for the next hour: the fake upstream listens
// on its own port, not 53, so resolv.conf cannot name it.
func pinUpstream(f *Forwarder, up netip.AddrPort) {
	f.ups.mu.Lock()
	f.ups.list = []netip.AddrPort{up}
	f.ups.checked = time.Now().Add(time.Hour)
	f.ups.mu.Unlock()
}

// BenchmarkRelayUDP measures one query through the forwarder to a fake
// upstream on loopback and back (the forwarder's own cost per lookup).
func BenchmarkRelayUDP(b *testing.B) {
	up := fakeUpstream(b)
	f, err := Start(Config{Listen: netip.MustParseAddr("127.0.0.1"), Port: freePort(b), Clients: netip.MustParsePrefix("127.0.0.0/8"), ResolvConf: "/nonexistent"})
	if err != nil {
		b.Fatalf("start the forwarder: %v", err)
	}
	defer f.Close()
	pinUpstream(f, up)
	f.limiter = newLimiter(1e9, 1e9, maxSources) // measure the relay, not the limit
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(f.Addr()))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1500)
	query := q(1, 0x01, 1, 0)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		binary.BigEndian.PutUint16(query, uint16(i))
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write(query); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
	}
}
