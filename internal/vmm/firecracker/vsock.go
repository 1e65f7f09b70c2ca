package firecracker

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// DialVsock opens a host-initiated connection to a guest vsock port through
// Firecracker's hybrid vsock unix socket (vmm.ChannelVsockUDS): it writes
// "CONNECT <port>\n" and reads the "OK <host port>\n" acknowledgement. The
// acknowledgement is read byte by byte so that nothing the guest sends right
// after it (an SSH server speaks first) is swallowed. Firecracker closes the
// connection when nothing listens on the port; that is reported as an error
// saying so.
func DialVsock(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", udsPath)
	if err != nil {
		return nil, fmt.Errorf("connect to the guest's vsock socket: %w", err)
	}
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		c.Close()
		return nil, fmt.Errorf("vsock CONNECT %d: %w", port, err)
	}
	var line []byte
	b := make([]byte, 1)
	for len(line) < 64 {
		n, err := c.Read(b)
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
			continue
		}
		if err != nil {
			c.Close()
			if len(line) == 0 {
				return nil, fmt.Errorf("vsock CONNECT %d: connection closed without acknowledgement (is the guest agent listening on port %d?): %w", port, port, err)
			}
			return nil, fmt.Errorf("vsock CONNECT %d: reading acknowledgement: %w", port, err)
		}
	}
	hp, ok := strings.CutPrefix(string(line), "OK ")
	if _, perr := strconv.ParseUint(hp, 10, 32); !ok || perr != nil {
		c.Close()
		return nil, fmt.Errorf("vsock CONNECT %d: unexpected acknowledgement %q", port, line)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}
