package rpc

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// MaxResponse bounds a response line read by the client.
const MaxResponse = 256 << 20

// Client is one connection; calls on it are serialised (one request, one
// response, in order).
type Client struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
}

// Dial connects to the unix socket at path.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	return NewClient(c), nil
}

// NewClient wraps an established connection.
func NewClient(c net.Conn) *Client {
	return &Client{conn: c, r: bufio.NewReaderSize(c, 64<<10)}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Call sends one request and decodes the result into result (may be nil).
// The context's operation id, if any, is forwarded. A protocol error is
// returned as *ErrorResponse.
func (c *Client) Call(ctx context.Context, method string, params, result any) error {
	req := Request{Version: Version, Method: method, OpID: OpID(ctx)}
	if params != nil {
		b, err := json.Marshal(params)
		if err != nil {
			return fmt.Errorf("encode params for %s: %w", method, err)
		}
		req.Params = b
	}
	line, err := json.Marshal(req)
	if err != nil {
		return err
	}
	line = append(line, '\n')

	c.mu.Lock()
	defer c.mu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetDeadline(dl)
	} else {
		c.conn.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, werr := c.conn.Write(line); werr != nil {
		// A server that turns a connection away (a refusal, a connection
		// cap) answers and closes without reading: its answer may already
		// be here although the request could not be sent.
		c.conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		respLine, tooLong, err := readLine(c.r, MaxResponse)
		var resp Response
		if err == nil && !tooLong && json.Unmarshal(respLine, &resp) == nil && resp.Error != nil {
			return resp.Error
		}
		return c.ctxErr(ctx, fmt.Errorf("send %s: %w", method, werr))
	}
	respLine, tooLong, err := readLine(c.r, MaxResponse)
	if tooLong {
		return fmt.Errorf("response to %s exceeds %d bytes", method, MaxResponse)
	}
	if err != nil {
		return c.ctxErr(ctx, fmt.Errorf("read response to %s: %w", method, err))
	}
	if result != nil {
		// One pass: the result decodes straight into the caller's value
		// (a 1000-VM vm.list is ~400 KB; a RawMessage first costs a scan
		// and a copy of it). A null result leaves it untouched.
		resp := struct {
			Result any            `json:"result"`
			Error  *ErrorResponse `json:"error"`
		}{Result: result}
		err := json.Unmarshal(respLine, &resp)
		if resp.Error != nil {
			return resp.Error
		}
		if err != nil {
			var te *json.UnmarshalTypeError
			if errors.As(err, &te) {
				return fmt.Errorf("decode result of %s: %w", method, err)
			}
			return fmt.Errorf("malformed response to %s: %w", method, err)
		}
		return nil
	}
	var resp Response
	if err := json.Unmarshal(respLine, &resp); err != nil {
		return fmt.Errorf("malformed response to %s: %w", method, err)
	}
	if resp.Error != nil {
		return resp.Error
	}
	return nil
}

func (c *Client) ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %w", ctx.Err(), err)
	}
	return err
}

// Call dials path, performs one call and closes the connection.
func Call(ctx context.Context, path, method string, params, result any) error {
	c, err := Dial(ctx, path)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Call(ctx, method, params, result)
}

// IsCode reports whether err is a protocol error with the given code.
func IsCode(err error, code string) bool {
	var e *ErrorResponse
	return errors.As(err, &e) && e.Code == code
}

// Upgrade performs a call whose successful response turns the connection into
// a raw byte stream (see Upgrade on the server). The returned conn yields any
// bytes already buffered; the Client must not be used afterwards.
func (c *Client) Upgrade(ctx context.Context, method string, params, result any) (net.Conn, error) {
	if err := c.Call(ctx, method, params, result); err != nil {
		return nil, err
	}
	c.conn.SetDeadline(time.Time{})
	return &streamConn{Conn: c.conn, r: c.r}, nil
}
