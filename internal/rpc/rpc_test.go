package rpc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/logging"
)

var opIDRe = regexp.MustCompile(`^op-[0-9a-f]{6,}$`)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func startServer(t testing.TB, opts ...func(*Server)) (string, *Server, *syncBuf) {
	t.Helper()
	logs := &syncBuf{}
	log := logging.New(logs, slog.LevelDebug)
	mux := NewMux()
	Handle(mux, "echo", func(ctx context.Context, p map[string]any) (map[string]any, error) {
		log.InfoContext(ctx, "echo handler ran")
		return p, nil
	})
	Handle(mux, "fail", func(ctx context.Context, p struct{ Code string }) (any, error) {
		return nil, fmt.Errorf("doing the thing: %w", Errorf(p.Code, "it went wrong"))
	})
	Handle(mux, "plain", func(ctx context.Context, p struct{}) (any, error) {
		return nil, errors.New("boom")
	})
	Handle(mux, "panic", func(ctx context.Context, p struct{}) (any, error) { panic("oops") })
	Handle(mux, "system.ping", func(ctx context.Context, p struct{}) (string, error) { return "pong", nil })
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &Server{Mux: mux, Logger: log}
	for _, o := range opts {
		o(srv)
	}
	go srv.Serve(context.Background(), ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return sock, srv, logs
}

func rawExchange(t *testing.T, sock string, lines ...string) []map[string]any {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	var out []map[string]any
	for _, l := range lines {
		if _, err := c.Write([]byte(l + "\n")); err != nil {
			t.Fatal(err)
		}
		resp, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading response to %q: %v", l, err)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(resp), &m); err != nil {
			t.Fatalf("response %q is not JSON: %v", resp, err)
		}
		out = append(out, m)
	}
	return out
}

func errOf(m map[string]any) (code, msg, op string) {
	e, _ := m["error"].(map[string]any)
	if e == nil {
		return "", "", ""
	}
	code, _ = e["code"].(string)
	msg, _ = e["message"].(string)
	op, _ = e["op_id"].(string)
	return
}

func TestDispatchErrorsCarryOpID(t *testing.T) {
	sock, _, _ := startServer(t)
	cases := []struct {
		name, line, code string
	}{
		{"garbage", `this is not json`, CodeBadRequest},
		{"array", `[1,2,3]`, CodeBadRequest},
		{"no method", `{"version":1}`, CodeBadRequest},
		{"bad version", `{"version":99,"method":"system.ping"}`, CodeBadVersion},
		{"missing version", `{"method":"system.ping"}`, CodeBadVersion},
		{"unknown method", `{"version":1,"method":"nope"}`, CodeUnknownMethod},
		{"bad params", `{"version":1,"method":"fail","params":"str"}`, CodeInvalidArgument},
		{"handler code", `{"version":1,"method":"fail","params":{"Code":"not_found"}}`, CodeNotFound},
		{"plain error", `{"version":1,"method":"plain"}`, CodeInternal},
		{"panic", `{"version":1,"method":"panic"}`, CodeInternal},
		{"bad op id", `{"version":1,"method":"system.ping","op_id":"has space"}`, CodeBadRequest},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp := rawExchange(t, sock, tc.line)[0]
			code, msg, op := errOf(resp)
			if code != tc.code {
				t.Fatalf("code = %q (%q), want %q; resp %v", code, msg, tc.code, resp)
			}
			if !opIDRe.MatchString(op) {
				t.Fatalf("op_id %q does not match %s", op, opIDRe)
			}
			if msg == "" {
				t.Fatal("empty message")
			}
		})
	}
}

func TestWrappedHandlerErrorKeepsContext(t *testing.T) {
	sock, _, _ := startServer(t)
	_, msg, _ := errOf(rawExchange(t, sock, `{"version":1,"method":"fail","params":{"Code":"conflict"}}`)[0])
	if msg != "doing the thing: it went wrong" {
		t.Fatalf("message = %q", msg)
	}
}

func TestInboundOpIDAdoptedAndLogged(t *testing.T) {
	sock, _, logs := startServer(t)
	resp := rawExchange(t, sock, `{"version":1,"method":"echo","params":{"a":1},"op_id":"op-abc123def"}`)[0]
	if resp["op_id"] != "op-abc123def" {
		t.Fatalf("op_id = %v", resp["op_id"])
	}
	// the handler's own record and the per-call record carry the id
	deadline := time.Now().Add(5 * time.Second)
	for {
		var handler, call bool
		for _, l := range strings.Split(logs.String(), "\n") {
			if !strings.Contains(l, `"op_id":"op-abc123def"`) {
				continue
			}
			handler = handler || strings.Contains(l, "echo handler ran")
			call = call || strings.Contains(l, "rpc completed")
		}
		if handler && call {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("log records missing op_id; logs:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestManyRequestsOneConnectionInOrder(t *testing.T) {
	sock, _, _ := startServer(t)
	var lines []string
	for i := 0; i < 50; i++ {
		lines = append(lines, fmt.Sprintf(`{"version":1,"method":"echo","params":{"i":%d}}`, i))
	}
	lines = append(lines, `garbage`) // an error does not end the connection
	lines = append(lines, `{"version":1,"method":"echo","params":{"i":50}}`)
	resps := rawExchange(t, sock, lines...)
	seen := map[string]bool{}
	for i, r := range resps {
		if i == 50 {
			if c, _, _ := errOf(r); c != CodeBadRequest {
				t.Fatalf("resp %d: %v", i, r)
			}
			continue
		}
		want := float64(i)
		if i == 51 {
			want = 50
		}
		res, _ := r["result"].(map[string]any)
		if res["i"] != want {
			t.Fatalf("response %d out of order: %v", i, r)
		}
		id := r["op_id"].(string)
		if seen[id] {
			t.Fatalf("op id %s reused", id)
		}
		seen[id] = true
	}
}

func TestLineLimit(t *testing.T) {
	sock, _, _ := startServer(t)
	// exactly at the limit is parsed (and is garbage → bad_request, but read)
	big := `{"version":1,"method":"echo","params":{"s":"` + strings.Repeat("a", MaxLine-50) + `"}}`
	if len(big) > MaxLine {
		t.Fatal("test line too long")
	}
	resp := rawExchange(t, sock, big)[0]
	if resp["error"] != nil {
		t.Fatalf("line under the limit refused: %v", resp["error"])
	}
	huge := strings.Repeat("x", 5<<20)
	resps := rawExchange(t, sock, huge, `{"version":1,"method":"system.ping"}`)
	if resps[1]["result"] != "pong" {
		t.Fatalf("connection unusable after an over-long line: %v", resps[1])
	}
	resp = resps[0]
	if code, msg, op := errOf(resp); code != CodeBadRequest || !strings.Contains(msg, "exceeds") || !opIDRe.MatchString(op) {
		t.Fatalf("5 MiB line: %v", resp)
	}
}

func TestClientTypedError(t *testing.T) {
	sock, _, _ := startServer(t)
	ctx := WithOpID(context.Background(), "op-feedface01")
	err := Call(ctx, sock, "fail", map[string]string{"Code": CodeNotFound}, nil)
	var er *ErrorResponse
	if !errors.As(err, &er) {
		t.Fatalf("error %T %v is not *ErrorResponse", err, err)
	}
	if er.Code != CodeNotFound || er.OpID != "op-feedface01" {
		t.Fatalf("got %+v", er)
	}
	if !strings.HasSuffix(err.Error(), " (op-feedface01)") {
		t.Fatalf("Error() = %q", err.Error())
	}
	var out string
	if err := Call(context.Background(), sock, "system.ping", nil, &out); err != nil || out != "pong" {
		t.Fatalf("ping: %q %v", out, err)
	}
}

func TestShutdownFinishesInflight(t *testing.T) {
	mux := NewMux()
	started := make(chan struct{})
	release := make(chan struct{})
	Handle(mux, "slow", func(ctx context.Context, p struct{}) (string, error) {
		close(started)
		<-release
		return "done", nil
	})
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &Server{Mux: mux, Logger: logging.Discard()}
	go srv.Serve(context.Background(), ln)
	res := make(chan error, 1)
	var out string
	go func() { res <- Call(context.Background(), sock, "slow", nil, &out) }()
	<-started
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	// new connections are refused once shutting down
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := net.Dial("unix", sock); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("listener still accepting after Shutdown")
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(release)
	if err := <-res; err != nil || out != "done" {
		t.Fatalf("in-flight call: %q %v", out, err)
	}
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

func FuzzDispatch(f *testing.F) {
	for _, s := range []string{
		`{"version":1,"method":"echo","params":{"a":1}}`,
		`{"version":1,"method":"echo","op_id":"op-123456"}`,
		`{"version":99,"method":"x"}`, `garbage`, `{}`, `null`, `[]`, `{"method":1}`,
		`{"version":1,"method":"fail","params":{"Code":"x"}}`,
	} {
		f.Add([]byte(s))
	}
	mux := NewMux()
	Handle(mux, "echo", func(ctx context.Context, p map[string]any) (map[string]any, error) { return p, nil })
	Handle(mux, "fail", func(ctx context.Context, p struct{ Code string }) (any, error) {
		return nil, Errorf(p.Code, "x")
	})
	srv := &Server{Mux: mux, Logger: logging.Discard()}
	f.Fuzz(func(t *testing.T, line []byte) {
		resp := srv.dispatch(context.Background(), line, false, nil)
		id := resp.OpID
		if resp.Error != nil {
			id = resp.Error.OpID
			if resp.Error.Code == "" || resp.Error.Message == "" {
				t.Fatalf("error without code/message: %+v", resp.Error)
			}
		} else if resp.Result == nil {
			t.Fatalf("neither result nor error")
		}
		if id == "" {
			t.Fatalf("no op id for %q", line)
		}
		if _, err := json.Marshal(resp); err != nil {
			t.Fatalf("response not encodable: %v", err)
		}
	})
}

func benchPing(b *testing.B, fresh bool) {
	sock, _, _ := startServer(b)
	ctx := context.Background()
	c, err := Dial(ctx, sock)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if fresh {
			err = Call(ctx, sock, "system.ping", nil, nil)
		} else {
			err = c.Call(ctx, "system.ping", nil, nil)
		}
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	reportPercentiles(b, lat)
}

func reportPercentiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	sortDurations(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

func sortDurations(d []time.Duration) { slices.Sort(d) }

func BenchmarkPingOneConnection(b *testing.B)    { benchPing(b, false) }
func BenchmarkPingFreshConnections(b *testing.B) { benchPing(b, true) }

func TestUpgradeSplicesConnection(t *testing.T) {
	mux := NewMux()
	Handle(mux, "echo.stream", func(ctx context.Context, p struct{}) (*Upgrade, error) {
		return &Upgrade{Result: map[string]string{"op": OpID(ctx)}, Then: func(ctx context.Context, c net.Conn) {
			defer c.Close()
			buf := make([]byte, 1024)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					c.Write(bytes.ToUpper(buf[:n]))
				}
				if err != nil {
					return
				}
			}
		}}, nil
	})
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &Server{Mux: mux, Logger: logging.Discard()}
	go srv.Serve(context.Background(), ln)
	defer srv.Shutdown(context.Background())
	c, err := Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	var res map[string]string
	conn, err := c.Upgrade(WithOpID(context.Background(), "op-0a0b0c"), "echo.stream", nil, &res)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if res["op"] != "op-0a0b0c" {
		t.Fatalf("result %v", res)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	conn.Write([]byte("hello"))
	got := make([]byte, 5)
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != "HELLO" {
		t.Fatalf("spliced stream: %q %v", got, err)
	}
}
