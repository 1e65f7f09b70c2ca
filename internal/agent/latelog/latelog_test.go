package latelog

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestInfoIsWrittenLaterInOrder: a queued record is not written by Info
// itself, then is written after Delay, the records of a batch in order.
func TestInfoIsWrittenLaterInOrder(t *testing.T) {
	old := Delay
	Delay = 50 * time.Millisecond
	defer func() { Delay = old }()
	var buf syncBuf
	l := slog.New(slog.NewTextHandler(&buf, nil))
	queuedAt := time.Now()
	Info(l, "first", "k", 1)
	Info(l, "second")
	if s := buf.String(); s != "" {
		t.Fatalf("Info wrote at once: %q", s)
	}
	waitFor(t, "the queued records", func() bool { return strings.Contains(buf.String(), "second") })
	if d := time.Since(queuedAt); d < Delay {
		t.Errorf("written %v after queueing, before Delay %v", d, Delay)
	}
	s := buf.String()
	if i, j := strings.Index(s, "msg=first k=1"), strings.Index(s, "msg=second"); i < 0 || j < i {
		t.Errorf("records out of order or missing: %q", s)
	}
	// a new batch after the first one was written
	Info(l, "third")
	waitFor(t, "the next batch", func() bool { return strings.Contains(buf.String(), "third") })
}

// TestFlushWritesNow: Flush writes what is queued without waiting for
// Delay (before a power-off), and the timer then writes nothing twice.
func TestFlushWritesNow(t *testing.T) {
	old := Delay
	Delay = time.Hour
	defer func() { Delay = old }()
	var buf syncBuf
	l := slog.New(slog.NewTextHandler(&buf, nil))
	Info(l, "queued")
	Flush()
	if s := buf.String(); strings.Count(s, "msg=queued") != 1 {
		t.Fatalf("after Flush: %q", s)
	}
	Flush()
	if s := buf.String(); strings.Count(s, "msg=queued") != 1 {
		t.Fatalf("a second Flush wrote again: %q", s)
	}
}

// TestInfoBelowLevel: a logger that drops Info queues nothing.
func TestInfoBelowLevel(t *testing.T) {
	var buf syncBuf
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelWarn}))
	Info(l, "dropped")
	mu.Lock()
	n := len(queue)
	mu.Unlock()
	Flush()
	if n != 0 || buf.String() != "" {
		t.Fatalf("queued %d, wrote %q", n, buf.String())
	}
}
