package daemon

import (
	"context"
	"fmt"
	"net"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/rpc"
)

// peerUID reads the uid of the process at the other end of a unix
// connection (SO_PEERCRED: the credentials it had when it connected).
func peerUID(c net.Conn) (uint32, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, fmt.Errorf("connection is not a unix socket")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", serr)
	}
	return cred.Uid, nil
}

// peerAllowed: bangerd serves its own user, and root (who can act as that
// user anyway). Nobody else, whatever the socket's mode says.
func peerAllowed(peer, self uint32) bool { return peer == self || peer == 0 }

// authorizePeer is bangerd's rpc.Server.Authorize: the socket's 0600 mode in
// a 0700 directory is the first wall, this check the second, so a socket
// whose mode was loosened (by hand, a bind mount, a backup restore) still
// serves nobody but its user.
func authorizePeer(self uint32) func(ctx context.Context, c net.Conn) (context.Context, error) {
	return func(ctx context.Context, c net.Conn) (context.Context, error) {
		uid, err := peerUID(c)
		if err != nil {
			return ctx, rpc.Errorf(rpc.CodePermissionDenied, "cannot tell who is calling bangerd: %v", err)
		}
		if !peerAllowed(uid, self) {
			return ctx, rpc.Errorf(rpc.CodePermissionDenied, "bangerd of uid %d serves only its own user; you are uid %d (hint: each user runs their own bangerd with their own BANGER_HOME)", self, uid)
		}
		return ctx, nil
	}
}
