package nettest

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"
)

func TestEnvLifecycle(t *testing.T) {
	Require(t)
	var name, outside string
	t.Run("env", func(t *testing.T) {
		e := New(t)
		name, outside = e.Name, e.OutsideName
		for _, n := range []string{name, outside} {
			if _, err := os.Stat("/var/run/netns/" + n); err != nil {
				t.Fatalf("named namespace %s: %v", n, err)
			}
		}
		// The host namespace reaches the internet listener, which sees the
		// uplink address.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		line, err := Dial(ctx, e.Host, netip.AddrPortFrom(e.InternetAddr, uint16(e.InternetPort)), 5*time.Second)
		if err != nil || line != "hello "+e.HostAddr.Addr().String() {
			t.Fatalf("host → internet: %q %v", line, err)
		}
		if p := e.Peers(); len(p) != 1 || p[0] != e.HostAddr.Addr() {
			t.Fatalf("peers = %v", p)
		}
		// sysfs as the namespace sees it.
		if v, err := e.ReadSys(Uplink, "operstate"); err != nil || v != "up" {
			t.Fatalf("ReadSys(uplink0/operstate) = %q %v", v, err)
		}
		if _, err := e.ReadSys(Uplink, "../../../etc/passwd"); err == nil {
			t.Fatal("ReadSys accepted ..")
		}
		// The main namespace does not have the uplink.
		if _, err := os.Stat("/sys/class/net/" + Uplink); err == nil {
			t.Fatal("uplink0 visible in the main namespace")
		}
	})
	for _, n := range []string{name, outside} {
		if _, err := os.Stat("/var/run/netns/" + n); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("namespace %s left behind: %v", n, err)
		}
	}
}
