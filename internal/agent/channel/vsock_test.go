package channel

import (
	"context"
	"io"
	"os"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/guest"
)

// TestVsockLoopback serves and dials AF_VSOCK on this machine through the
// local CID (1), when the kernel offers a loopback transport.
func TestVsockLoopback(t *testing.T) {
	if _, err := os.Stat("/dev/vsock"); err != nil {
		t.Skipf("no AF_VSOCK support on this machine: %v", err)
	}
	port := uint32(40000 + os.Getpid()%20000)
	l, err := ListenVsock(port)
	if err != nil {
		t.Skipf("cannot listen on AF_VSOCK here: %v", err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := guest.DialVsock(ctx, 1, port)
	if err != nil {
		t.Skipf("no vsock loopback transport (vsock_loopback) on this machine: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("vsock")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 5)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "vsock" {
		t.Fatalf("echo %q %v", b, err)
	}
}
