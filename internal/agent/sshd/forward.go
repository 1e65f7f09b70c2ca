package sshd

import (
	"context"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// directTCPIPMsg is the payload of a "direct-tcpip" channel open (RFC 4254 7.2).
type directTCPIPMsg struct {
	DestAddr string
	DestPort uint32
	OrigAddr string
	OrigPort uint32
}

// dialTimeout bounds connecting to a forwarding destination.
const dialTimeout = 10 * time.Second

// handleDirectTCPIP connects to the requested address from inside the guest
// and splices it to the channel (ssh -L, and bangerd's port forwards).
func (s *Server) handleDirectTCPIP(ctx context.Context, nc ssh.NewChannel, log *slog.Logger) {
	var m directTCPIPMsg
	if err := ssh.Unmarshal(nc.ExtraData(), &m); err != nil || m.DestPort == 0 || m.DestPort > 65535 {
		_ = nc.Reject(ssh.ConnectionFailed, "malformed direct-tcpip request")
		return
	}
	addr := net.JoinHostPort(m.DestAddr, strconv.Itoa(int(m.DestPort)))
	d := net.Dialer{Timeout: dialTimeout}
	tc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		log.Debug("direct-tcpip dial failed", "addr", addr, "error", err)
		_ = nc.Reject(ssh.ConnectionFailed, err.Error())
		return
	}
	ch, reqs, err := nc.Accept()
	if err != nil {
		tc.Close()
		return
	}
	go ssh.DiscardRequests(reqs)
	// When the SSH connection ends, end the forward too (an idle TCP peer
	// would otherwise keep it open forever).
	stop := context.AfterFunc(ctx, func() {
		ch.Close()
		tc.Close()
	})
	defer stop()
	splice(ch, tc.(*net.TCPConn))
}

// splice copies both ways with half-closes and returns when both are done.
func splice(ch ssh.Channel, tc *net.TCPConn) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		_, _ = io.Copy(tc, ch)
		_ = tc.CloseWrite()
	}()
	go func() {
		defer wg.Done()
		_, _ = io.Copy(ch, tc)
		_ = ch.CloseWrite()
	}()
	wg.Wait()
	ch.Close()
	tc.Close()
}
