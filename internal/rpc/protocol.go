// Package rpc is banger's wire protocol, shared by bangerd and banger-helper:
// newline-delimited JSON over a unix stream socket, several requests per
// connection, each answered by exactly one response line in order. Every
// request gets an operation id at entry (adopted from the request or minted)
// that rides on the context, appears on every log record written while
// serving it, and comes back on every response, errors included.
package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/bangerdev/banger/internal/logging"
)

// Version is the protocol version this package speaks.
const Version = 1

// MaxLine is the largest request line a server accepts (4 MiB).
const MaxLine = 4 << 20

// Error codes.
const (
	CodeBadRequest         = "bad_request"
	CodeBadVersion         = "bad_version"
	CodeUnknownMethod      = "unknown_method"
	CodeInvalidArgument    = "invalid_argument"
	CodeNotFound           = "not_found"
	CodeConflict           = "conflict"
	CodeFailedPrecondition = "failed_precondition"
	CodePermissionDenied   = "permission_denied"
	CodeUnavailable        = "unavailable"
	CodeInternal           = "internal"
)

// Request is one request line.
type Request struct {
	Version int             `json:"version"`
	Method  string          `json:"method"`
	Params  json.RawMessage `json:"params,omitempty"`
	OpID    string          `json:"op_id,omitempty"`
}

// Response is one response line: either Result or Error is set.
type Response struct {
	Result json.RawMessage `json:"result,omitempty"`
	Error  *ErrorResponse  `json:"error,omitempty"`
	OpID   string          `json:"op_id,omitempty"`
}

// ErrorResponse is the error object of the protocol and the typed error the
// client returns (find it with errors.As). Handlers return it too, via Errorf.
type ErrorResponse struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	OpID    string `json:"op_id,omitempty"`
}

func (e *ErrorResponse) Error() string {
	if e.OpID != "" {
		return fmt.Sprintf("%s (%s)", e.Message, e.OpID)
	}
	return e.Message
}

// Errorf builds a protocol error with a code.
func Errorf(code, format string, args ...any) *ErrorResponse {
	return &ErrorResponse{Code: code, Message: fmt.Sprintf(format, args...)}
}

// CodeOf returns the protocol code of err ("" when err is nil, internal when
// err carries none).
func CodeOf(err error) string {
	if err == nil {
		return ""
	}
	var e *ErrorResponse
	if errors.As(err, &e) {
		return e.Code
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return CodeUnavailable
	}
	return CodeInternal
}

// ValidOpID reports whether an inbound op_id may be adopted.
func ValidOpID(id string) bool {
	// By hand, not a regexp: ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ compiles
	// to a large program at every start of every binary (about a
	// millisecond of banger exec's start under load).
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// WithOpID and OpID put the operation id on a context (see package logging).
func WithOpID(ctx context.Context, id string) context.Context { return logging.WithOpID(ctx, id) }

// OpID returns the operation id on ctx, or "".
func OpID(ctx context.Context) string { return logging.OpID(ctx) }

// NewOpID mints an operation id.
func NewOpID() string { return logging.NewOpID() }
