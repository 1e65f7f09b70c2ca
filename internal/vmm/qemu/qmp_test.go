package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const testGreeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}`

// fakeQMP is an in-process QMP server. For each request it calls reply, which
// returns the raw lines to send back (events, replies, garbage).
type fakeQMP struct {
	t        *testing.T
	path     string
	ln       net.Listener
	greeting string
	reply    func(cmd string, id json.RawMessage, args json.RawMessage) []string

	mu       sync.Mutex
	commands []string
	wg       sync.WaitGroup
}

func newFakeQMP(t *testing.T, reply func(cmd string, id, args json.RawMessage) []string) *fakeQMP {
	t.Helper()
	return newFakeQMPGreeting(t, testGreeting, reply)
}

func newFakeQMPGreeting(t *testing.T, greeting string, reply func(cmd string, id, args json.RawMessage) []string) *fakeQMP {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeQMP{t: t, path: path, ln: ln, greeting: greeting, reply: reply}
	f.wg.Add(1)
	go f.serve()
	t.Cleanup(func() {
		ln.Close()
		f.wg.Wait()
	})
	return f
}

func (f *fakeQMP) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer c.Close()
			f.handle(c)
		}()
	}
}

func (f *fakeQMP) handle(c net.Conn) {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if f.greeting != "" {
		if _, err := c.Write([]byte(f.greeting + "\r\n")); err != nil {
			return
		}
	}
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		var req struct {
			Execute   string          `json:"execute"`
			Arguments json.RawMessage `json:"arguments"`
			ID        json.RawMessage `json:"id"`
		}
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			c.Write([]byte(`{"error": {"class": "GenericError", "desc": "JSON parse error"}}` + "\r\n"))
			continue
		}
		f.mu.Lock()
		f.commands = append(f.commands, req.Execute)
		f.mu.Unlock()
		var lines []string
		if req.Execute == "qmp_capabilities" && f.reply == nil {
			lines = []string{`{"return": {}, "id": ` + string(req.ID) + `}`}
		} else if f.reply != nil {
			lines = f.reply(req.Execute, req.ID, req.Arguments)
		}
		for _, l := range lines {
			if l == "<close>" {
				return
			}
			if _, err := c.Write([]byte(l + "\r\n")); err != nil {
				return
			}
		}
	}
}

func (f *fakeQMP) seen() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.commands...)
}

func ok(id json.RawMessage, ret string) string {
	return `{"return": ` + ret + `, "id": ` + string(id) + `}`
}

const event = `{"timestamp": {"seconds": 1700000000, "microseconds": 1}, "event": "RESUME"}`

func TestQMPExecute(t *testing.T) {
	tests := []struct {
		name    string
		reply   func(cmd string, id, args json.RawMessage) []string
		command string
		args    any
		want    string // status from the result, when no error
		wantErr string
	}{
		{
			name: "plain reply",
			reply: func(cmd string, id, _ json.RawMessage) []string {
				return []string{ok(id, `{"status": "running", "running": true}`)}
			},
			command: "query-status", want: "running",
		},
		{
			name: "events before the reply are skipped",
			reply: func(cmd string, id, _ json.RawMessage) []string {
				return []string{event, "", event, ok(id, `{"status": "paused", "running": false}`)}
			},
			command: "query-status", want: "paused",
		},
		{
			name: "stale reply with another id is skipped",
			reply: func(cmd string, id, _ json.RawMessage) []string {
				return []string{`{"return": {"status": "bogus"}, "id": "banger-999"}`, `{"return": {}, "id": 7}`, ok(id, `{"status": "running"}`)}
			},
			command: "query-status", want: "running",
		},
		{
			name: "error reply",
			reply: func(cmd string, id, _ json.RawMessage) []string {
				if cmd == "qmp_capabilities" {
					return []string{ok(id, `{}`)}
				}
				return []string{`{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": ` + string(id) + `}`}
			},
			command: "nope", wantErr: "The command nope has not been found (CommandNotFound)",
		},
		{
			name: "error reply without id",
			reply: func(cmd string, id, _ json.RawMessage) []string {
				if cmd == "qmp_capabilities" {
					return []string{ok(id, `{}`)}
				}
				return []string{`{"error": {"class": "GenericError", "desc": "JSON parse error"}}`}
			},
			command: "x", wantErr: "JSON parse error",
		},
		{
			name: "arguments are sent",
			reply: func(cmd string, id, args json.RawMessage) []string {
				if cmd == "qmp_capabilities" {
					return []string{ok(id, `{}`)}
				}
				var a struct {
					Device string `json:"device"`
				}
				json.Unmarshal(args, &a)
				return []string{ok(id, `{"status": "`+a.Device+`"}`)}
			},
			command: "echo", args: map[string]string{"device": "vda"}, want: "vda",
		},
		{
			name: "connection closed",
			reply: func(cmd string, id, _ json.RawMessage) []string {
				if cmd == "qmp_capabilities" {
					return []string{ok(id, `{}`)}
				}
				return []string{"<close>"}
			},
			command: "query-status", wantErr: "EOF",
		},
		{
			name: "garbage",
			reply: func(cmd string, id, _ json.RawMessage) []string {
				if cmd == "qmp_capabilities" {
					return []string{ok(id, `{}`)}
				}
				return []string{"{not json"}
			},
			command: "query-status", wantErr: "malformed qemu monitor message",
		},
		{
			name: "neither return nor error",
			reply: func(cmd string, id, _ json.RawMessage) []string {
				if cmd == "qmp_capabilities" {
					return []string{ok(id, `{}`)}
				}
				return []string{`{"id": ` + string(id) + `}`}
			},
			command: "query-status", wantErr: "neither return nor error",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reply := tc.reply
			f := newFakeQMP(t, func(cmd string, id, args json.RawMessage) []string {
				if cmd == "qmp_capabilities" {
					return []string{ok(id, `{}`)}
				}
				return reply(cmd, id, args)
			})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			q, err := DialQMP(ctx, f.path)
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			if got := q.Version().String(); got != "7.2.22" {
				t.Errorf("version %q, want 7.2.22", got)
			}
			var st statusInfo
			err = q.Execute(ctx, tc.command, tc.args, &st)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if st.Status != tc.want {
				t.Errorf("status %q, want %q", st.Status, tc.want)
			}
			if got := f.seen(); len(got) != 2 || got[0] != "qmp_capabilities" || got[1] != tc.command {
				t.Errorf("server saw %v", got)
			}
		})
	}
}

func TestQMPErrorType(t *testing.T) {
	f := newFakeQMP(t, func(cmd string, id, _ json.RawMessage) []string {
		if cmd == "qmp_capabilities" {
			return []string{ok(id, `{}`)}
		}
		return []string{`{"error": {"class": "DeviceNotActive", "desc": "no"}, "id": ` + string(id) + `}`}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, err := DialQMP(ctx, f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	err = q.Execute(ctx, "system_powerdown", nil, nil)
	var qe *QMPError
	if !errors.As(err, &qe) || qe.Class != "DeviceNotActive" || qe.Command != "system_powerdown" {
		t.Fatalf("err = %#v, want a *QMPError", err)
	}
}

func TestQMPHandshakeFailures(t *testing.T) {
	tests := []struct {
		name     string
		greeting string
		reply    func(cmd string, id, _ json.RawMessage) []string
		wantErr  string
	}{
		{"no greeting but a reply", `{"return": {}}`, nil, "sent no greeting"},
		{"capabilities refused", testGreeting, func(cmd string, id, _ json.RawMessage) []string {
			return []string{`{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation"}, "id": ` + string(id) + `}`}
		}, "Expecting capabilities negotiation"},
		{"closed after greeting", testGreeting, func(string, json.RawMessage, json.RawMessage) []string { return []string{"<close>"} }, "EOF"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeQMPGreeting(t, tc.greeting, tc.reply)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			q, err := DialQMP(ctx, f.path)
			if err == nil {
				q.Close()
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestQMPHonoursContext(t *testing.T) {
	// A server that greets and then never answers.
	f := newFakeQMP(t, func(cmd string, id, _ json.RawMessage) []string {
		if cmd == "qmp_capabilities" {
			return []string{ok(id, `{}`)}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, err := DialQMP(ctx, f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()

	t.Run("deadline", func(t *testing.T) {
		dctx, dcancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer dcancel()
		start := time.Now()
		err := q.Execute(dctx, "query-status", nil, nil)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want DeadlineExceeded", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %s", d)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		cctx, ccancel := context.WithCancel(ctx)
		go func() {
			time.AfterFunc(50*time.Millisecond, ccancel)
		}()
		err := q.Execute(cctx, "query-status", nil, nil)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want Canceled", err)
		}
	})
}

func TestQMPDialMissingSocket(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := DialQMP(ctx, filepath.Join(t.TempDir(), "nope.sock"))
	if err == nil || !strings.Contains(err.Error(), "connect to qemu monitor") {
		t.Fatalf("err = %v", err)
	}
}

func TestQMPLineTooLong(t *testing.T) {
	huge := `{"return": {"status": "` + strings.Repeat("a", maxQMPLine+10) + `"}}`
	f := newFakeQMP(t, func(cmd string, id, _ json.RawMessage) []string {
		if cmd == "qmp_capabilities" {
			return []string{ok(id, `{}`)}
		}
		return []string{huge}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, err := DialQMP(ctx, f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if err := q.Execute(ctx, "query-status", nil, nil); !errors.Is(err, errQMPLineTooLong) {
		t.Fatalf("err = %v, want errQMPLineTooLong", err)
	}
}

// FuzzQMPReply feeds arbitrary server output after a valid greeting: the client
// must return (an error or a result) and never panic or hang.
func FuzzQMPReply(f *testing.F) {
	f.Add(`{"return": {"status": "running"}, "id": "banger-2"}`)
	f.Add(event + "\n" + `{"return": {}, "id": "banger-2"}`)
	f.Add(`{"error": {"class": "GenericError", "desc": "x"}, "id": "banger-2"}`)
	f.Add(`{"error": null, "return": null, "id": "banger-2"}`)
	f.Add(`{"id": ["banger-2"]}` + "\n" + `{"return": 5, "id": "banger-2"}`)
	f.Add("\x00\xff{")
	f.Fuzz(func(t *testing.T, reply string) {
		server, client := net.Pipe()
		defer client.Close()
		go func() {
			defer server.Close()
			r := bufio.NewReader(server)
			server.Write([]byte(testGreeting + "\n"))
			r.ReadString('\n') // qmp_capabilities
			server.Write([]byte(`{"return": {}, "id": "banger-1"}` + "\n"))
			r.ReadString('\n')
			server.Write([]byte(reply + "\n"))
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		q := &QMP{conn: client, r: bufio.NewReader(client)}
		if err := q.handshake(ctx); err != nil {
			t.Fatalf("handshake: %v", err)
		}
		var st statusInfo
		_ = q.Execute(ctx, "query-status", nil, &st)
	})
}
