package daemon

import (
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/hostnet"
)

func TestForwardDetail(t *testing.T) {
	for _, tc := range []struct {
		f         hostnet.ForwardInfo
		want, not []string
	}{
		{hostnet.ForwardInfo{}, []string{"no iptables-nft FORWARD drop"}, []string{"warning"}},
		{hostnet.ForwardInfo{NftDrop: true}, []string{"adds accept rules for banger0 when a VM starts"}, []string{"warning"}},
		{hostnet.ForwardInfo{NftDrop: true, BangerAccepts: true}, []string{"are in place"}, []string{"warning"}},
		{hostnet.ForwardInfo{LegacyFilter: true}, []string{"warning: iptables-legacy",
			"sudo iptables-legacy -I FORWARD 1 -i banger0 -j ACCEPT && sudo iptables-legacy -I FORWARD 1 -o banger0 -j ACCEPT"}, nil},
		{hostnet.ForwardInfo{Firewalld: true}, []string{"warning: firewalld",
			"sudo firewall-cmd --permanent --zone=trusted --add-interface=banger0 && sudo firewall-cmd --reload"}, nil},
	} {
		got := forwardDetail("banger0", tc.f)
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("%+v: %q lacks %q", tc.f, got, w)
			}
		}
		for _, n := range tc.not {
			if strings.Contains(got, n) {
				t.Errorf("%+v: %q has %q", tc.f, got, n)
			}
		}
	}
}
