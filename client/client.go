// Package client is the Go client of bangerd, the per-user banger daemon.
// It is what the banger CLI and `banger mcp` are built on.
//
//	c, err := client.Dial(ctx)
//	vm, err := c.CreateVM(ctx, api.CreateParams{Name: "dev"}, nil)
//	code, err := c.Exec(ctx, "dev", []string{"uname", "-a"}, client.ExecOptions{Stdout: os.Stdout})
//
// Every method is one or a few calls on bangerd's socket (see docs/API.md);
// a Client holds no connection between calls and is safe for concurrent use.
// Errors from bangerd are *Error, which carries a code and the operation id
// that names the request in bangerd's log.
package client

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/rpc"
)

// Error is an error bangerd answered with: Code (e.g. CodeNotFound), the
// Message for people, and the OpID of the request. Its Error() ends with
// " (op-…)".
type Error = rpc.ErrorResponse

// Error codes bangerd uses.
const (
	CodeBadRequest         = rpc.CodeBadRequest
	CodeBadVersion         = rpc.CodeBadVersion
	CodeUnknownMethod      = rpc.CodeUnknownMethod
	CodeInvalidArgument    = rpc.CodeInvalidArgument
	CodeNotFound           = rpc.CodeNotFound
	CodeConflict           = rpc.CodeConflict
	CodeFailedPrecondition = rpc.CodeFailedPrecondition
	CodePermissionDenied   = rpc.CodePermissionDenied
	CodeUnavailable        = rpc.CodeUnavailable
	CodeInternal           = rpc.CodeInternal
)

// ErrNotRunning is returned (wrapped) by Dial when nothing listens on the
// socket. The banger CLI starts bangerd then; a library usually should not.
var ErrNotRunning = errors.New("bangerd is not running")

// Code returns the code of an error bangerd answered with, "" for nil, and
// CodeInternal for any other error.
func Code(err error) string { return rpc.CodeOf(err) }

// OpID returns the operation id carried by err, or "".
func OpID(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.OpID
	}
	return ""
}

// WithOpID returns a context whose calls carry id as their operation id, so
// that several calls share one id in bangerd's log. Ids match
// [A-Za-z0-9][A-Za-z0-9._-]{0,63}; bangerd mints one when none is given.
func WithOpID(ctx context.Context, id string) context.Context { return rpc.WithOpID(ctx, id) }

// NewOpID returns a fresh operation id.
func NewOpID() string { return rpc.NewOpID() }

// Client talks to one bangerd.
type Client struct {
	socket string
}

// Option changes how Dial finds bangerd.
type Option func(*options)

type options struct {
	socket, home string
}

// WithSocket dials the bangerd socket at path.
func WithSocket(path string) Option { return func(o *options) { o.socket = path } }

// WithHome dials the bangerd of a banger home (what BANGER_HOME names).
func WithHome(dir string) Option { return func(o *options) { o.home = dir } }

// DefaultSocket is the socket Dial uses without options: $BANGER_HOME's, else
// the one under $XDG_RUNTIME_DIR (or the user's state directory).
func DefaultSocket() (string, error) {
	l, err := paths.Resolve("")
	if err != nil {
		return "", err
	}
	return l.Socket(), nil
}

// New returns a client for the socket without contacting bangerd.
func New(opts ...Option) (*Client, error) {
	var o options
	for _, f := range opts {
		f(&o)
	}
	if o.socket == "" {
		l, err := paths.Resolve(o.home)
		if err != nil {
			return nil, err
		}
		o.socket = l.Socket()
	}
	return &Client{socket: o.socket}, nil
}

// Dial returns a client for bangerd after checking that it answers. When
// nothing listens on the socket the error wraps ErrNotRunning.
func Dial(ctx context.Context, opts ...Option) (*Client, error) {
	c, err := New(opts...)
	if err != nil {
		return nil, err
	}
	if err := c.Ping(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Socket is the path of bangerd's socket.
func (c *Client) Socket() string { return c.socket }

// Close releases the client. Calls hold no connection, so it does nothing
// today; it is there so that callers need not change if that changes.
func (c *Client) Close() error { return nil }

func (c *Client) dial(ctx context.Context) (*rpc.Client, error) {
	rc, err := rpc.Dial(ctx, c.socket)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%w (nothing answers on %s)", ErrNotRunning, c.socket)
		}
		return nil, fmt.Errorf("connect to bangerd at %s: %w", c.socket, err)
	}
	return rc, nil
}

// Call performs one request: method (an api.Method… name) with params, the
// result decoded into result (which may be nil).
func (c *Client) Call(ctx context.Context, method string, params, result any) error {
	rc, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer rc.Close()
	return rc.Call(ctx, method, params, result)
}

// Ping checks that bangerd answers.
func (c *Client) Ping(ctx context.Context) error {
	var s string
	if err := c.Call(ctx, api.MethodPing, nil, &s); err != nil {
		return err
	}
	if s != "pong" {
		return fmt.Errorf("unexpected answer to ping from %s: %q", c.socket, s)
	}
	return nil
}

// Info describes the running bangerd.
func (c *Client) Info(ctx context.Context) (api.Info, error) {
	var r api.Info
	err := c.Call(ctx, api.MethodInfo, nil, &r)
	return r, err
}

// Doctor checks the host and says which VMM bangerd uses.
func (c *Client) Doctor(ctx context.Context) (api.DoctorResult, error) {
	var r api.DoctorResult
	err := c.Call(ctx, api.MethodDoctor, nil, &r)
	return r, err
}
