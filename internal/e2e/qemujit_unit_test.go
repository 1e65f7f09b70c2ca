package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// QEMU 7.2's `info jit` under TCG (abridged).
const jitSample = "Translation buffer state:\r\n" +
	"gen code size       40551619/1073741824\r\n" +
	"TB count            25012\r\n" +
	"TB avg target size  17 max=1024 bytes\r\n" +
	"TB avg host size    291 bytes (expansion ratio: 16.7)\r\n" +
	"\r\nStatistics:\r\n" +
	"TB flush count      0\r\n" +
	"TB invalidate count 512\r\n"

func TestParseJIT(t *testing.T) {
	for _, c := range []struct {
		name, out string
		want      jitStats
		err       string
	}{
		{"qemu 7.2", jitSample, jitStats{TBs: 25012, Flushes: 0}, ""},
		{"no flush line", "TB count 7\n", jitStats{TBs: 7, Flushes: -1}, ""},
		{"first of two", "TB count 7\nTB count 9\nTB flush count 2\n", jitStats{TBs: 7, Flushes: 2}, ""},
		{"not tcg", "JIT information is only available with accel=tcg\r\n", jitStats{}, `no "TB count" line`},
		{"empty", "", jitStats{}, `no "TB count" line`},
		{"no number", "TB count\n", jitStats{}, "unexpected line"},
		{"two numbers", "TB count 5 6\n", jitStats{}, "unexpected line"},
		{"not a number", "TB count 5x\n", jitStats{}, "not a count"},
		{"negative", "TB count -5\n", jitStats{}, "not a count"},
		{"overflow", "TB count 99999999999999999999\n", jitStats{}, "not a count"},
		{"bad flush count", "TB count 5\nTB flush count x\n", jitStats{}, "not a count"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := parseJIT(c.out)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("parseJIT(%q) = %+v, %v; want an error with %q", c.out, got, err, c.err)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("parseJIT(%q) = %+v, %v; want %+v", c.out, got, err, c.want)
			}
		})
	}
	// what an error quotes of QEMU's output is bounded
	_, err := parseJIT(strings.Repeat("x", 1<<20))
	if err == nil || len(err.Error()) > 400 {
		t.Fatalf("an error quoting 1 MiB of output: %d bytes", len(fmt.Sprint(err)))
	}
}

func FuzzParseJIT(f *testing.F) {
	f.Add(jitSample)
	f.Add("TB count 1\nTB flush count 1\n")
	f.Add("JIT information is only available with accel=tcg")
	f.Fuzz(func(t *testing.T, out string) {
		s, err := parseJIT(out)
		if err == nil && (s.TBs < 0 || s.Flushes < -1) {
			t.Fatalf("parseJIT(%q) = %+v without an error", out, s)
		}
	})
}

func TestJITDelta(t *testing.T) {
	for _, c := range []struct {
		a, b jitStats
		n    int64
		ok   bool
	}{
		{jitStats{100, 0}, jitStats{150, 0}, 50, true},
		{jitStats{100, -1}, jitStats{100, -1}, 0, true},
		{jitStats{100, 0}, jitStats{150, 1}, 0, false}, // flushed in between
		{jitStats{100, 0}, jitStats{90, 0}, 0, false},
	} {
		if n, ok := jitDelta(c.a, c.b); n != c.n || ok != c.ok {
			t.Errorf("jitDelta(%+v, %+v) = %d, %v; want %d, %v", c.a, c.b, n, ok, c.n, c.ok)
		}
	}
}

// fakeMonitor listens on a unix socket and runs handle for each connection
// (i counts them from 0), as a QEMU QMP socket would be served.
func fakeMonitor(t *testing.T, handle func(i int, c net.Conn)) (string, *atomic.Int32) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			i := int(n.Add(1)) - 1
			go func() {
				defer c.Close()
				handle(i, c)
			}()
		}
	}()
	return sock, &n
}

// serveQMP is QEMU's side of one QMP connection: the greeting, then a reply
// to each command; hmp is the reply to human-monitor-command without its id
// (`"return": …` or `"error": …`).
func serveQMP(c net.Conn, hmp string) {
	fmt.Fprintln(c, `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}`)
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		var req struct {
			Execute string          `json:"execute"`
			ID      json.RawMessage `json:"id"`
		}
		if json.Unmarshal(sc.Bytes(), &req) != nil {
			return
		}
		switch req.Execute {
		case "qmp_capabilities":
			fmt.Fprintf(c, "{\"return\": {}, \"id\": %s}\n", req.ID)
		case "human-monitor-command":
			fmt.Fprintf(c, "{%s, \"id\": %s}\n", hmp, req.ID)
		default:
			fmt.Fprintf(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}, \"id\": %s}\n", req.ID)
		}
	}
}

func hmpReturn(s string) string {
	b, _ := json.Marshal(s)
	return `"return": ` + string(b)
}

func TestReadJIT(t *testing.T) {
	ctx := func(t *testing.T, d time.Duration) context.Context {
		c, cancel := context.WithTimeout(context.Background(), d)
		t.Cleanup(cancel)
		return c
	}
	t.Run("answers", func(t *testing.T) {
		sock, n := fakeMonitor(t, func(_ int, c net.Conn) { serveQMP(c, hmpReturn(jitSample)) })
		s, err := readJIT(ctx(t, 10*time.Second), sock)
		if err != nil || s.TBs != 25012 || n.Load() != 1 {
			t.Fatalf("got %+v, %v after %d connections", s, err, n.Load())
		}
	})
	t.Run("a dropped connection is tried again", func(t *testing.T) {
		sock, n := fakeMonitor(t, func(i int, c net.Conn) {
			if i > 0 {
				serveQMP(c, hmpReturn(jitSample))
			}
		})
		s, err := readJIT(ctx(t, 10*time.Second), sock)
		if err != nil || s.TBs != 25012 || n.Load() != 2 {
			t.Fatalf("got %+v, %v after %d connections", s, err, n.Load())
		}
	})
	// QEMU serves one client at a time: a second waits for the first
	// (bangerd's) to close.
	busy := func(t *testing.T) (string, net.Conn, chan struct{}) {
		released, waiting := make(chan struct{}), make(chan struct{}, 8)
		sock, _ := fakeMonitor(t, func(i int, c net.Conn) {
			if i == 0 {
				serveQMP(c, hmpReturn(jitSample))
				close(released)
				return
			}
			waiting <- struct{}{}
			<-released
			serveQMP(c, hmpReturn(jitSample))
		})
		holder, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { holder.Close() })
		if _, err := bufio.NewReader(holder).ReadString('\n'); err != nil {
			t.Fatal(err)
		}
		return sock, holder, waiting
	}
	t.Run("waits for the monitor's one client", func(t *testing.T) {
		sock, holder, waiting := busy(t)
		type res struct {
			s   jitStats
			err error
		}
		done := make(chan res, 1)
		go func() {
			s, err := readJIT(ctx(t, 10*time.Second), sock)
			done <- res{s, err}
		}()
		select {
		case <-waiting:
		case r := <-done:
			t.Fatalf("answered while the monitor was busy: %+v", r)
		}
		holder.Close()
		if r := <-done; r.err != nil || r.s.TBs != 25012 {
			t.Fatalf("got %+v", r)
		}
	})
	t.Run("gives up at the deadline", func(t *testing.T) {
		sock, _, _ := busy(t)
		s := time.Now()
		_, err := readJIT(ctx(t, 200*time.Millisecond), sock)
		if err == nil || !strings.Contains(err.Error(), "did not answer `info jit` in time") {
			t.Fatalf("a monitor busy throughout: %v", err)
		}
		if d := time.Since(s); d > 5*time.Second {
			t.Fatalf("gave up after %v", d)
		}
	})
	for _, c := range []struct{ name, hmp, err string }{
		{"a refused command is not tried again", `"error": {"class": "CommandNotFound", "desc": "The command human-monitor-command has not been found"}`, "has not been found"},
		{"no TCG is not tried again", hmpReturn("JIT information is only available with accel=tcg\r\n"), `no "TB count" line`},
		{"not a string", `"return": {"tb": 5}`, "decode"},
	} {
		t.Run(c.name, func(t *testing.T) {
			sock, n := fakeMonitor(t, func(_ int, conn net.Conn) { serveQMP(conn, c.hmp) })
			_, err := readJIT(ctx(t, 10*time.Second), sock)
			if err == nil || !strings.Contains(err.Error(), c.err) || n.Load() != 1 {
				t.Fatalf("got %v after %d connections; want an error with %q after 1", err, n.Load(), c.err)
			}
		})
	}
}
