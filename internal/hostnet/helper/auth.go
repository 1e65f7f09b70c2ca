package helper

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os/user"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/rpc"
)

// Caller is the peer of a connection as the kernel reports it (SO_PEERCRED).
type Caller struct {
	PID int32
	UID uint32
	GID uint32
}

// IsRoot reports whether the caller is uid 0.
func (c Caller) IsRoot() bool { return c.UID == 0 }

type callerKey struct{}

// CallerFrom returns the caller stored on ctx by the server.
func CallerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

func withCaller(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, callerKey{}, c)
}

// PeerCred reads SO_PEERCRED of a unix connection.
func PeerCred(c net.Conn) (Caller, error) {
	if pc, ok := c.(*peerConn); ok {
		return pc.cred, nil
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Caller{}, fmt.Errorf("connection is not a unix socket")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Caller{}, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Caller{}, err
	}
	if serr != nil {
		return Caller{}, fmt.Errorf("SO_PEERCRED: %w", serr)
	}
	return Caller{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

// Policy decides which callers may use the helper: root always; the listed
// uids; members (primary or supplementary, per the user database) of the
// listed groups.
type Policy struct {
	UIDs []uint32
	GIDs []uint32
	// groupsOf returns a uid's supplementary group ids (tests replace it).
	groupsOf func(uid uint32) []uint32
}

func userGroups(uid uint32) []uint32 {
	u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	if err != nil {
		return nil
	}
	ids, err := u.GroupIds()
	if err != nil {
		return nil
	}
	var out []uint32
	for _, s := range ids {
		if g, err := strconv.ParseUint(s, 10, 32); err == nil {
			out = append(out, uint32(g))
		}
	}
	return out
}

// Allowed reports whether c may call the helper.
func (p Policy) Allowed(c Caller) bool {
	if c.UID == 0 || slices.Contains(p.UIDs, c.UID) {
		return true
	}
	if len(p.GIDs) == 0 {
		return false
	}
	if slices.Contains(p.GIDs, c.GID) {
		return true
	}
	groups := p.groupsOf
	if groups == nil {
		groups = userGroups
	}
	for _, g := range groups(c.UID) {
		if slices.Contains(p.GIDs, g) {
			return true
		}
	}
	return false
}

// authorize is the rpc.Server hook: it records the caller on the context and
// refuses callers outside the policy. A refused connection gets one
// permission_denied response (with its op_id) and is closed; the refusal
// is logged through the rate-limited refusal log (refused).
func (s *server) authorize(ctx context.Context, c net.Conn) (context.Context, error) {
	cred, err := PeerCred(c)
	if err != nil {
		return ctx, rpc.Errorf(rpc.CodePermissionDenied, "cannot identify the caller: %v", err)
	}
	ctx = withCaller(ctx, cred)
	if !s.policy.Allowed(cred) {
		return ctx, rpc.Errorf(rpc.CodePermissionDenied,
			"uid %d is not allowed to use banger-helper (hint: start it with --allow-user %d, or run `sudo banger system install` as that user)", cred.UID, cred.UID)
	}
	return ctx, nil
}

// ResolveUser turns a user name or numeric uid into a uid.
func ResolveUser(s string) (uint32, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return uint32(n), nil
	}
	u, err := user.Lookup(s)
	if err != nil {
		return 0, fmt.Errorf("unknown user %q: %w", s, err)
	}
	n, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("user %q has a non-numeric uid %q", s, u.Uid)
	}
	return uint32(n), nil
}

// ResolveGroup turns a group name or numeric gid into a gid.
func ResolveGroup(s string) (uint32, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return uint32(n), nil
	}
	g, err := user.LookupGroup(s)
	if err != nil {
		return 0, fmt.Errorf("unknown group %q: %w", s, err)
	}
	n, err := strconv.ParseUint(g.Gid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("group %q has a non-numeric gid %q", s, g.Gid)
	}
	return uint32(n), nil
}

// refused is the rpc.Server's OnRefused hook: one rate-limited record per
// refused request (at most refusalBurst a minute, then a summary).
func (s *server) refused(ctx context.Context, method string, e *rpc.ErrorResponse) {
	s.refusals.record(ctx, FailedMsg, slog.String("method", method), slog.String("code", e.Code), slog.String("error", e.Message))
}
