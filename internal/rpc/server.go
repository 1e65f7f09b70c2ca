package rpc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/logging"
)

// HandlerFunc serves one method. params is the raw "params" value (may be nil).
type HandlerFunc func(ctx context.Context, params json.RawMessage) (any, error)

// Mux routes methods to handlers.
type Mux struct {
	mu       sync.RWMutex
	handlers map[string]HandlerFunc
}

// NewMux returns an empty Mux.
func NewMux() *Mux { return &Mux{handlers: map[string]HandlerFunc{}} }

// HandleFunc registers h for method.
func (m *Mux) HandleFunc(method string, h HandlerFunc) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.handlers[method] = h
}

// Methods lists the registered methods.
func (m *Mux) Methods() []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]string, 0, len(m.handlers))
	for k := range m.handlers {
		out = append(out, k)
	}
	return out
}

func (m *Mux) lookup(method string) HandlerFunc {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.handlers[method]
}

// Handle registers a typed handler: params are decoded into P (unknown fields
// ignored, so newer clients work with older servers), the result is R.
func Handle[P, R any](m *Mux, method string, fn func(ctx context.Context, p P) (R, error)) {
	m.HandleFunc(method, func(ctx context.Context, raw json.RawMessage) (any, error) {
		var p P
		if len(bytes.TrimSpace(raw)) > 0 && !bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
			if err := json.Unmarshal(raw, &p); err != nil {
				return nil, Errorf(CodeInvalidArgument, "invalid params for %s: %v", method, err)
			}
		}
		return fn(ctx, p)
	})
}

// Server serves a Mux on a listener.
type Server struct {
	Mux    *Mux
	Logger *slog.Logger
	// Authorize, when set, is called once per connection (e.g. SO_PEERCRED
	// checks); its returned context is used for every request on it. An error
	// refuses every request on the connection with that error.
	Authorize func(ctx context.Context, c net.Conn) (context.Context, error)
	// LogEachCall makes the server log one "rpc completed"/"rpc failed"
	// record per request with method, duration_ms and op_id (at Info). Without
	// it, successful calls log at Debug.
	LogEachCall bool
	// CompletedMsg and FailedMsg override the per-call log messages.
	CompletedMsg, FailedMsg string
	// MaxLineBytes bounds a request line (0: MaxLine, 4 MiB). A longer line
	// gets bad_request and is discarded without being held in memory.
	MaxLineBytes int
	// ReadTimeout, when set, bounds the wait for each complete request line:
	// a connection that sends nothing (or too slowly) for that long is closed.
	ReadTimeout time.Duration
	// WriteTimeout, when set, bounds writing each response: a peer that does
	// not read its responses is disconnected.
	WriteTimeout time.Duration
	// CloseOnRefusal makes a connection that Authorize refused get exactly
	// one response (to its first request line, whatever it holds) and then
	// be closed, so that a refused peer cannot keep the server busy.
	CloseOnRefusal bool
	// OnRefused, when set, replaces the per-call log record of requests on
	// a refused connection (e.g. to rate-limit them).
	OnRefused func(ctx context.Context, method string, e *ErrorResponse)

	mu       sync.Mutex
	ln       []net.Listener
	conns    map[net.Conn]*connState
	inflight sync.WaitGroup
	closing  bool
}

type connState struct{ busy bool }

func (s *Server) log() *slog.Logger {
	if s.Logger == nil {
		return slog.Default()
	}
	return s.Logger
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("rpc: server closed")

// Serve accepts connections until the listener is closed or Shutdown is called.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.ln = append(s.ln, ln)
	if s.conns == nil {
		s.conns = map[net.Conn]*connState{}
	}
	s.mu.Unlock()
	var tempDelay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if tempDelay == 0 {
					tempDelay = 5 * time.Millisecond
				} else if tempDelay *= 2; tempDelay > time.Second {
					tempDelay = time.Second
				}
				time.Sleep(tempDelay)
				continue
			}
			return err
		}
		tempDelay = 0
		st := &connState{}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			c.Close()
			return ErrServerClosed
		}
		s.conns[c] = st
		s.mu.Unlock()
		go s.serveConn(ctx, c, st)
	}
}

// Shutdown stops accepting, closes idle connections, and waits (bounded by
// ctx) for in-flight requests to finish and their responses to be written.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for _, ln := range s.ln {
		ln.Close()
	}
	for c, st := range s.conns {
		if !st.busy {
			c.Close()
		}
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.inflight.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	return ctx.Err()
}

func (s *Server) serveConn(ctx context.Context, c net.Conn, st *connState) {
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	var authErr error
	if s.Authorize != nil {
		ctx, authErr = s.Authorize(ctx, c)
	}
	maxLine := s.maxLine()
	r := bufio.NewReaderSize(c, min(64<<10, maxLine+1))
	w := bufio.NewWriter(c)
	for {
		if s.ReadTimeout > 0 {
			c.SetReadDeadline(time.Now().Add(s.ReadTimeout))
		}
		line, tooLong, err := readLine(r, maxLine)
		if err != nil && len(line) == 0 && !tooLong {
			return
		}
		if len(bytes.TrimSpace(line)) == 0 && !tooLong {
			if err != nil {
				return
			}
			continue // blank lines are ignored
		}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			return
		}
		st.busy = true
		s.inflight.Add(1)
		s.mu.Unlock()

		resp, up := s.dispatchUpgrade(ctx, line, tooLong, authErr)
		if s.ReadTimeout > 0 && up != nil {
			c.SetReadDeadline(time.Time{}) // the upgrade's stream sets its own
		}
		if s.WriteTimeout > 0 {
			c.SetWriteDeadline(time.Now().Add(s.WriteTimeout))
		}
		b, merr := encodeResponse(resp)
		if merr != nil {
			b, _ = json.Marshal(Response{Error: &ErrorResponse{Code: CodeInternal, Message: "cannot encode result: " + merr.Error(), OpID: resp.OpID}})
		}
		b = append(b, '\n')
		_, werr := w.Write(b)
		if werr == nil {
			werr = w.Flush()
		}
		s.mu.Lock()
		st.busy = false
		closing := s.closing
		s.mu.Unlock()
		s.inflight.Done()
		if up != nil && werr == nil {
			// The connection now belongs to the upgrade; buffered bytes the
			// client sent after its request are handed over with it.
			up.Then(WithOpID(ctx, resp.OpID), &streamConn{Conn: c, r: r})
			return
		}
		if up != nil && up.Abandon != nil {
			up.Abandon()
		}
		if werr != nil || closing || err != nil || (authErr != nil && s.CloseOnRefusal) {
			return
		}
		if s.WriteTimeout > 0 {
			c.SetWriteDeadline(time.Time{})
		}
	}
}

func (s *Server) maxLine() int {
	if s.MaxLineBytes > 0 {
		return s.MaxLineBytes
	}
	return MaxLine
}

// readLine reads one '\n'-terminated line of at most max bytes. When the line
// is longer, it returns tooLong (the rest of the connection is not read).
func readLine(r *bufio.Reader, max int) (line []byte, tooLong bool, err error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(buf)+len(chunk) > max+1 { // +1 for the newline itself
			// Discard the rest of the line so the connection stays usable.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = r.ReadSlice('\n')
			}
			return []byte("x"), true, err
		}
		buf = append(buf, chunk...)
		if err == nil {
			return buf[:len(buf)-1], false, nil
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		return buf, false, err
	}
}

// Upgrade is a handler result that turns the connection into a raw byte
// stream after the response line: Result is sent as the result, then Then
// owns the connection (it must close it). Used to splice a client to a guest.
type Upgrade struct {
	Result any
	Then   func(ctx context.Context, conn net.Conn)
	// Abandon (optional) releases what the handler holds for Then when Then
	// will not run (the response could not be written).
	Abandon func()
}

// streamConn is a connection after an upgrade: reads first drain the bytes
// already buffered while reading the request or response line.
type streamConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *streamConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// CloseWrite half-closes when the underlying connection supports it.
func (b *streamConn) CloseWrite() error {
	if cw, ok := b.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (s *Server) dispatchUpgrade(ctx context.Context, line []byte, tooLong bool, authErr error) (Response, *Upgrade) {
	var up *Upgrade
	resp := s.dispatchWith(ctx, line, tooLong, authErr, &up)
	if resp.Error != nil {
		up = nil
	}
	return resp, up
}

func (s *Server) dispatch(ctx context.Context, line []byte, tooLong bool, authErr error) Response {
	return s.dispatchWith(ctx, line, tooLong, authErr, nil)
}

func (s *Server) dispatchWith(ctx context.Context, line []byte, tooLong bool, authErr error, upOut **Upgrade) (resp Response) {
	start := time.Now()
	opID := NewOpID()
	var req Request
	method := ""
	fail := func(e *ErrorResponse) Response {
		e.OpID = opID
		return Response{Error: e, OpID: ""}
	}
	defer func() {
		if p := recover(); p != nil {
			s.log().ErrorContext(WithOpID(ctx, opID), "rpc handler panicked", "method", method, "panic", fmt.Sprint(p))
			resp = fail(Errorf(CodeInternal, "internal error while serving %s", method))
		}
		if authErr != nil && s.OnRefused != nil && resp.Error != nil {
			s.OnRefused(WithOpID(ctx, opID), method, resp.Error)
			return
		}
		s.logCall(WithOpID(ctx, opID), method, start, resp)
	}()
	switch {
	case tooLong:
		return fail(Errorf(CodeBadRequest, "request line exceeds %d bytes", s.maxLine()))
	case json.Unmarshal(line, &req) != nil:
		return fail(Errorf(CodeBadRequest, "malformed request: not a JSON object"))
	}
	if req.OpID != "" {
		if !ValidOpID(req.OpID) {
			return fail(Errorf(CodeBadRequest, "malformed op_id: want 1-64 characters of [A-Za-z0-9._-]"))
		}
		opID = req.OpID
	}
	method = req.Method
	if req.Method == "" {
		return fail(Errorf(CodeBadRequest, "request has no method"))
	}
	if req.Version != Version {
		return fail(Errorf(CodeBadVersion, "protocol version %d is not supported (this server speaks version %d)", req.Version, Version))
	}
	if authErr != nil {
		var e *ErrorResponse
		if errors.As(authErr, &e) {
			return fail(&ErrorResponse{Code: e.Code, Message: e.Message})
		}
		return fail(Errorf(CodePermissionDenied, "%v", authErr))
	}
	h := s.Mux.lookup(req.Method)
	if h == nil {
		return fail(Errorf(CodeUnknownMethod, "unknown method %q", req.Method))
	}
	rctx := WithOpID(ctx, opID)
	result, err := h(rctx, req.Params)
	if err != nil {
		// The message keeps any context the handler wrapped around the error.
		return fail(&ErrorResponse{Code: CodeOf(err), Message: err.Error()})
	}
	if up, ok := result.(*Upgrade); ok {
		if upOut == nil {
			return fail(Errorf(CodeInternal, "%s cannot upgrade this connection", req.Method))
		}
		*upOut = up
		result = up.Result
	}
	var b []byte
	if raw, ok := result.(json.RawMessage); ok && len(raw) > 0 && bytes.IndexByte(raw, '\n') < 0 {
		// Already encoded by the handler, which vouches that it is valid
		// JSON: json.Marshal would scan it again. (A newline would end the
		// response line early: such a result goes through json.Marshal.)
		b = raw
	} else if b, err = json.Marshal(result); err != nil {
		return fail(Errorf(CodeInternal, "cannot encode result: %v", err))
	}
	return Response{Result: b, OpID: opID}
}

// encodeResponse is json.Marshal(resp) without re-scanning a successful
// result, which is already JSON (a 1000-VM vm.list is ~400 KB).
func encodeResponse(resp Response) ([]byte, error) {
	if resp.Error != nil || len(resp.Result) == 0 {
		return json.Marshal(resp)
	}
	b := make([]byte, 0, len(resp.Result)+64)
	b = append(b, `{"result":`...)
	b = append(b, resp.Result...)
	if resp.OpID != "" {
		id, err := json.Marshal(resp.OpID)
		if err != nil {
			return nil, err
		}
		b = append(b, `,"op_id":`...)
		b = append(b, id...)
	}
	return append(b, '}'), nil
}

func (s *Server) logCall(ctx context.Context, method string, start time.Time, resp Response) {
	d := logging.Ms(time.Since(start))
	if resp.Error != nil {
		msg := s.FailedMsg
		if msg == "" {
			msg = "rpc failed"
		}
		s.log().LogAttrs(ctx, slog.LevelInfo, msg, slog.String("method", method), slog.Float64("duration_ms", d),
			slog.String("code", resp.Error.Code), slog.String("error", resp.Error.Message))
		return
	}
	msg := s.CompletedMsg
	if msg == "" {
		msg = "rpc completed"
	}
	level := slog.LevelDebug
	if s.LogEachCall {
		level = slog.LevelInfo
	}
	s.log().LogAttrs(ctx, level, msg, slog.String("method", method), slog.Float64("duration_ms", d))
}
