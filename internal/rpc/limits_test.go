package rpc

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestServerLineLimitOption: a server with a small MaxLineBytes refuses a
// longer line (and stays usable), and the default stays 4 MiB.
func TestServerLineLimitOption(t *testing.T) {
	sock, _, _ := startServer(t, func(s *Server) { s.MaxLineBytes = 64 << 10 })
	long := `{"version":1,"method":"echo","params":{"s":"` + strings.Repeat("a", 70<<10) + `"}}`
	resps := rawExchange(t, sock, long, `{"version":1,"method":"system.ping"}`)
	if code, msg, _ := errOf(resps[0]); code != CodeBadRequest || !strings.Contains(msg, "65536") {
		t.Fatalf("70 KiB line with a 64 KiB limit: %v", resps[0])
	}
	if resps[1]["result"] != "pong" {
		t.Fatalf("connection unusable after an over-long line: %v", resps[1])
	}
	// The default server (bangerd's) still takes it.
	sock, _, _ = startServer(t)
	if resp := rawExchange(t, sock, long)[0]; resp["error"] != nil {
		t.Fatalf("default server refused a 70 KiB line: %v", resp)
	}
}

// TestServerReadTimeout: an idle connection is closed after ReadTimeout;
// without the option (bangerd) it stays open.
func TestServerReadTimeout(t *testing.T) {
	sock, _, _ := startServer(t, func(s *Server) { s.ReadTimeout = 200 * time.Millisecond })
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(`{"version":1,"met`)) // half a line, then silence
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue // the bad_request reply to the partial line
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("idle connection still open after %s", time.Since(start))
		}
		break // EOF: closed by the server
	}
	sock, _, _ = startServer(t)
	c2, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c2.Read(buf); err == nil || !isTimeout(err) {
		t.Fatalf("default server closed an idle connection: %v", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestServerCloseOnRefusal: a refused connection gets one reply, then EOF,
// however many requests it sends; OnRefused sees that one request only.
// Without the option every request gets its refusal (bangerd's behaviour).
func TestServerCloseOnRefusal(t *testing.T) {
	deny := func(ctx context.Context, c net.Conn) (context.Context, error) {
		return ctx, Errorf(CodePermissionDenied, "go away")
	}
	var refused atomic.Int64
	sock, _, logs := startServer(t, func(s *Server) {
		s.Authorize = deny
		s.CloseOnRefusal = true
		s.OnRefused = func(ctx context.Context, method string, e *ErrorResponse) { refused.Add(1) }
	})
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		w := bufio.NewWriter(c)
		for i := 0; i < 2000; i++ {
			if _, err := w.WriteString(`{"version":1,"method":"system.ping"}` + "\n"); err != nil {
				return
			}
		}
		w.Flush()
	}()
	r := bufio.NewReader(c)
	var replies int
	for {
		line, err := r.ReadString('\n')
		if line != "" {
			replies++
			if !strings.Contains(line, CodePermissionDenied) {
				t.Errorf("reply %q", line)
			}
		}
		if err != nil {
			if isTimeout(err) {
				t.Fatal("connection not closed after the refusal")
			}
			break
		}
	}
	if replies != 1 || refused.Load() != 1 {
		t.Fatalf("%d replies, %d OnRefused calls; want 1 and 1", replies, refused.Load())
	}
	if strings.Contains(logs.String(), "rpc failed") {
		t.Fatalf("refusal logged by the server despite OnRefused:\n%s", logs.String())
	}

	sock, _, _ = startServer(t, func(s *Server) { s.Authorize = deny })
	resps := rawExchange(t, sock, `{"version":1,"method":"system.ping"}`, `{"version":1,"method":"system.ping"}`)
	for _, r := range resps {
		if code, _, _ := errOf(r); code != CodePermissionDenied {
			t.Fatalf("without CloseOnRefusal: %v", r)
		}
	}
}

// TestClientReadsAnswerOfTurnedAwayConnection: a server that answers and
// closes without reading (a connection cap) is understood even when the
// request cannot be sent: the client returns the server's error, not a
// broken pipe.
func TestClientReadsAnswerOfTurnedAwayConnection(t *testing.T) {
	sock := t.TempDir() + "/s.sock"
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(`{"error":{"code":"unavailable","message":"too many connections","op_id":"op-abc123"}}` + "\n"))
			c.Close()
		}
	}()
	big := map[string]string{"s": strings.Repeat("x", 1<<20)} // larger than the socket buffer
	for i := 0; i < 20; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := Call(ctx, sock, "system.ping", big, nil)
		cancel()
		if !IsCode(err, CodeUnavailable) {
			t.Fatalf("call %d: %v, want the server's unavailable error", i, err)
		}
	}
}
