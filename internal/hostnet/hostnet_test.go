package hostnet

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestValidTapName(t *testing.T) {
	cases := []struct {
		name string
		ok   bool
	}{
		{"bgt-0123456789a", true},
		{"bgt-a", true},
		{"bgt-a-b", true},
		{"bgt-", false},
		{"bgt-0123456789ab", false}, // 16 bytes
		{"eth0", false},
		{"lo", false},
		{"docker0", false},
		{"banger0", false},
		{"bgt-A", false},
		{"bgt-a b", false},
		{"bgt-a/b", false},
		{"bgt-a.b", false},
		{"bgt-a\x00", false},
		{"bgt-é", false},
		{"", false},
		{"-bgt", false},
		{"bg", false},
	}
	for _, tc := range cases {
		err := ValidTapName(DefaultTapPrefix, tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ValidTapName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestValidHostIfaceName(t *testing.T) {
	for name, ok := range map[string]bool{
		"eth0": true, "enp0s31f6": true, "wlp2s0": true, "br-lan": true, "eth0.100": true, "wg_0": true,
		"": false, ".": false, "..": false, "a/b": false, "a b": false, "0123456789abcdef": false, "eth0\n": false,
	} {
		if err := ValidHostIfaceName(name); (err == nil) != ok {
			t.Errorf("ValidHostIfaceName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
}

func TestParseGatewayCIDR(t *testing.T) {
	cases := []struct {
		in, want string // want "" = error
	}{
		{"172.30.0.1/24", "172.30.0.1/24"},
		{"10.0.0.1/16", "10.0.0.1/16"},
		{"192.168.200.254/24", "192.168.200.254/24"},
		{"172.31.255.1/29", "172.31.255.1/29"},
		{"172.30.0.0/24", ""},   // network address
		{"172.30.0.255/24", ""}, // broadcast
		{"172.30.0.1/30", ""},   // too small
		{"10.0.0.1/8", ""},      // too big
		{"8.8.8.1/24", ""},
		{"100.64.0.1/24", ""},
		{"172.32.0.1/24", ""},
		{"172.15.255.1/24", ""},
		{"192.169.0.1/24", ""},
		{"169.254.0.1/24", ""},
		{"127.0.0.1/24", ""},
		{"fd00::1/64", ""},
		{"::ffff:172.30.0.1/120", ""},
		{"172.30.0.1", ""},
		{"172.30.0.1/24 ", ""},
		{"", ""},
		{"garbage", ""},
	}
	for _, tc := range cases {
		got, err := ParseGatewayCIDR(tc.in)
		if tc.want == "" {
			if err == nil {
				t.Errorf("ParseGatewayCIDR(%q) = %v, want error", tc.in, got)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("ParseGatewayCIDR(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func FuzzParseGatewayCIDR(f *testing.F) {
	for _, s := range []string{"172.30.0.1/24", "10.1.2.3/16", "8.8.8.8/24", "fd00::1/64", "1.2.3.4/33", "", "/", "172.30.0.0/24"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseGatewayCIDR(s)
		if err != nil {
			return
		}
		if !p.Addr().Is4() || !IsPrivate(p) || p.Bits() < MinSubnetBits || p.Bits() > MaxSubnetBits {
			t.Fatalf("accepted %q → %v", s, p)
		}
		if p.Addr() == p.Masked().Addr() || p.Addr() == Broadcast(p) {
			t.Fatalf("accepted network/broadcast %q", s)
		}
	})
}

func FuzzValidTapName(f *testing.F) {
	for _, s := range []string{"bgt-0123456789a", "eth0", "bgt-a/b", "bgt-", "bgt-\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ValidTapName(DefaultTapPrefix, s) != nil {
			return
		}
		if len(s) > MaxIfaceName || !strings.HasPrefix(s, DefaultTapPrefix) || strings.ContainsAny(s, "/ .\x00\n") {
			t.Fatalf("accepted %q", s)
		}
	})
}

func TestTapNameAndMAC(t *testing.T) {
	id := "3f9a1c0d2e4b5a69"
	if got := TapName("", id); got != "bgt-3f9a1c0d2e4" {
		t.Fatalf("TapName = %q", got)
	}
	for _, id := range []string{id, "short", "NOT-HEX-AT-ALL-xyz", strings.Repeat("f", 64), ""} {
		n := TapName("", id)
		if err := ValidTapName(DefaultTapPrefix, n); err != nil || len(n) != 15 {
			t.Errorf("TapName(%q) = %q: %v", id, n, err)
		}
		m := MAC(id)
		if len(m) != 6 || m[0] != 0x06 || m[0]&1 != 0 || m[0]&2 == 0 {
			t.Errorf("MAC(%q) = %s: not locally administered unicast", id, m)
		}
		if MAC(id).String() != m.String() {
			t.Errorf("MAC not stable")
		}
	}
	if MAC("a").String() == MAC("b").String() {
		t.Error("different ids, same MAC")
	}
}

func TestChooseSubnet(t *testing.T) {
	pool := netip.MustParsePrefix("172.30.0.0/16")
	pp := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	cases := []struct {
		name  string
		taken []netip.Prefix
		want  string
	}{
		{"empty host", nil, "172.30.0.0/24"},
		{"first taken", pp("172.30.0.0/24"), "172.30.1.0/24"},
		{"covered by a wider route", pp("172.30.0.0/23", "192.168.1.0/24"), "172.30.2.0/24"},
		{"narrow address inside", pp("172.30.0.77/32"), "172.30.1.0/24"},
		{"whole pool taken", pp("172.16.0.0/12"), ""},
	}
	for _, tc := range cases {
		got, err := ChooseSubnet(pool, 24, tc.taken)
		if tc.want == "" {
			if err == nil {
				t.Errorf("%s: got %v, want error", tc.name, got)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("%s: %v %v, want %s", tc.name, got, err, tc.want)
		}
	}
	if _, err := ChooseSubnet(netip.MustParsePrefix("100.64.0.0/16"), 24, nil); err == nil {
		t.Error("non-private pool accepted")
	}
	if got := GatewayCIDR(netip.MustParsePrefix("172.30.5.0/24")); got.String() != "172.30.5.1/24" {
		t.Errorf("GatewayCIDR = %v", got)
	}
}

func TestAllocateAddr(t *testing.T) {
	sub := netip.MustParsePrefix("172.30.0.0/24")
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	if got, _ := AllocateAddr(sub, nil); got != a("172.30.0.2") {
		t.Fatalf("first = %v", got)
	}
	if got, _ := AllocateAddr(sub, []netip.Addr{a("172.30.0.2"), a("172.30.0.4")}); got != a("172.30.0.3") {
		t.Fatalf("gap = %v", got)
	}
	var all []netip.Addr
	for x := a("172.30.0.2"); x != a("172.30.0.255"); x = x.Next() {
		all = append(all, x)
	}
	if got, err := AllocateAddr(sub, all); err == nil {
		t.Fatalf("full subnet gave %v", got)
	}
	if got, _ := AllocateAddr(sub, all[:len(all)-1]); got != a("172.30.0.254") {
		t.Fatalf("last = %v", got)
	}
	if got, _ := AllocateAddr(netip.MustParsePrefix("10.9.0.0/29"), nil); got != a("10.9.0.2") {
		t.Fatalf("/29 = %v", got)
	}
}

func TestClientUnavailableHint(t *testing.T) {
	c := &Client{Socket: filepath.Join(t.TempDir(), "nope.sock")}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := c.Ping(ctx)
	if !errors.Is(err, ErrHelperUnavailable) || !strings.Contains(err.Error(), "banger system install") {
		t.Fatalf("err = %v", err)
	}
}

func TestSocketPathEnv(t *testing.T) {
	t.Setenv(SocketEnv, "")
	if SocketPath() != DefaultSocket {
		t.Fatal(SocketPath())
	}
	t.Setenv(SocketEnv, "/tmp/x.sock")
	if SocketPath() != "/tmp/x.sock" {
		t.Fatal(SocketPath())
	}
}
