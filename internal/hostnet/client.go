package hostnet

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/rpc"
)

// Client calls banger-helper. Each call dials the socket afresh (the helper
// is cheap to reach and holds no per-connection state); the context's
// operation id is forwarded, so the helper's log line for the call carries it.
type Client struct {
	// Socket is the helper's socket; "" means SocketPath().
	Socket string
}

// NewClient returns a client for the helper at SocketPath().
func NewClient() *Client { return &Client{Socket: SocketPath()} }

func (c *Client) socket() string {
	if c == nil || c.Socket == "" {
		return SocketPath()
	}
	return c.Socket
}

// ErrHelperUnavailable is wrapped by errors of calls that could not reach
// the helper at all.
var ErrHelperUnavailable = errors.New("banger-helper is not reachable")

// BusyRetry bounds how long a call waits, retrying, while the helper turns
// its connections away as over its limits (code unavailable).
const BusyRetry = 30 * time.Second

func (c *Client) call(ctx context.Context, method string, params, result any) error {
	sock := c.socket()
	err := rpc.Call(ctx, sock, method, params, result)
	// The helper caps connections per uid: many VMs starting at once may
	// meet the cap; wait for a slot (bounded) rather than fail the start.
	for wait, start := 10*time.Millisecond, time.Now(); rpc.IsCode(err, rpc.CodeUnavailable) && time.Since(start) < BusyRetry; wait = min(2*wait, 500*time.Millisecond) {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("banger-helper %s: %w (while it was busy: %w)", method, ctx.Err(), err)
		case <-t.C:
		}
		err = rpc.Call(ctx, sock, method, params, result)
	}
	if err == nil {
		return nil
	}
	var er *rpc.ErrorResponse
	if errors.As(err, &er) {
		return fmt.Errorf("banger-helper %s: %w", method, err)
	}
	if ctx.Err() != nil {
		return fmt.Errorf("banger-helper %s: %w", method, err)
	}
	hint := "is it running? Set it up with `sudo banger system install`, or run `sudo banger-helper --allow-user $USER` in another terminal"
	switch {
	case errors.Is(err, os.ErrNotExist), errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w at %s (%s): %w", ErrHelperUnavailable, sock, hint, err)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("%w at %s: permission denied on the socket (it should be mode 0666): %w", ErrHelperUnavailable, sock, err)
	}
	return fmt.Errorf("banger-helper %s at %s: %w", method, sock, err)
}

// Ping checks that the helper answers and accepts this caller, and returns
// its configuration.
func (c *Client) Ping(ctx context.Context) (PingResult, error) {
	var r PingResult
	err := c.call(ctx, MethodPing, nil, &r)
	return r, err
}

// Info returns the network the helper's configuration gives banger (the
// subnet to allocate guest addresses from).
func (c *Client) Info(ctx context.Context) (InfoResult, error) {
	var r InfoResult
	err := c.call(ctx, MethodInfo, nil, &r)
	return r, err
}

// EnsureBridge creates banger's bridge if missing, with the helper's
// gateway address, and brings it up. gw, when valid, must be that address
// (as net.info reports it); the helper refuses any other.
func (c *Client) EnsureBridge(ctx context.Context, bridge string, gw netip.Prefix) (BridgeResult, error) {
	var r BridgeResult
	p := EnsureBridgeParams{Bridge: bridge}
	if gw.IsValid() {
		p.CIDR = gw.String()
	}
	err := c.call(ctx, MethodEnsureBridge, p, &r)
	return r, err
}

// DeleteBridge deletes banger's bridge if present.
func (c *Client) DeleteBridge(ctx context.Context, bridge string) (bool, error) {
	var r DeletedResult
	err := c.call(ctx, MethodDeleteBridge, BridgeParams{Bridge: bridge}, &r)
	return r.Deleted, err
}

// CreateTap creates (or converges) the tap of a VM, owned by the caller,
// attached to bridge; mtu 0 keeps the default.
func (c *Client) CreateTap(ctx context.Context, tap, bridge string, mtu int) (TapInfo, error) {
	var r TapInfo
	err := c.call(ctx, MethodCreateTap, CreateTapParams{Tap: tap, Bridge: bridge, MTU: mtu}, &r)
	return r, err
}

// CreateTapFor is CreateTap with an explicit owner (only root may name
// another user).
func (c *Client) CreateTapFor(ctx context.Context, tap, bridge string, owner uint32, mtu int) (TapInfo, error) {
	var r TapInfo
	err := c.call(ctx, MethodCreateTap, CreateTapParams{Tap: tap, Bridge: bridge, OwnerUID: &owner, MTU: mtu}, &r)
	return r, err
}

// CreateTapWith creates (or converges) a tap with all of net.create_tap's
// params, the guest's MAC and IP among them (a tap without them passes no
// traffic).
func (c *Client) CreateTapWith(ctx context.Context, p CreateTapParams) (TapInfo, error) {
	var r TapInfo
	err := c.call(ctx, MethodCreateTap, p, &r)
	return r, err
}

// DeleteTap deletes a tap; deleting one that does not exist succeeds with
// false.
func (c *Client) DeleteTap(ctx context.Context, tap string) (bool, error) {
	var r DeletedResult
	err := c.call(ctx, MethodDeleteTap, DeleteTapParams{Tap: tap}, &r)
	return r.Deleted, err
}

// EnsureNAT installs (or converges) banger's nftables tables for the bridge.
func (c *Client) EnsureNAT(ctx context.Context, p EnsureNATParams) (NATResult, error) {
	var r NATResult
	err := c.call(ctx, MethodEnsureNAT, p, &r)
	return r, err
}

// RemoveNAT deletes banger's nftables tables.
func (c *Client) RemoveNAT(ctx context.Context, bridge string) (bool, error) {
	var r DeletedResult
	err := c.call(ctx, MethodRemoveNAT, BridgeParams{Bridge: bridge}, &r)
	return r.Deleted, err
}

// List reports banger's taps (those the caller owns, unless it is root) and
// whether the bridge and the NAT table exist.
func (c *Client) List(ctx context.Context) (ListResult, error) {
	var r ListResult
	err := c.call(ctx, MethodList, nil, &r)
	return r, err
}
