package client

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSpoolStdin: a session asks for the VM's spool for stdin that is a
// file of spoolStdinMin or more, a pipe that holds spoolPipeMin already, or
// a large in-memory reader; not for a small file, a pipe with a line in it
// or nothing yet, a device (a terminal is one), or no stdin.
func TestSpoolStdin(t *testing.T) {
	dir := t.TempDir()
	file := func(n int) *os.File {
		p := filepath.Join(dir, "f")
		if err := os.WriteFile(p, make([]byte, n), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	pipe := func(n int) *os.File {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		go func() { w.Write(make([]byte, n)); w.Close() }()
		// wait for what fits in the pipe to be in it
		deadline := time.Now().Add(10 * time.Second)
		for pipeHolds(r) < min(n, 64<<10) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		return r
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	for _, tt := range []struct {
		name string
		in   func() any
		want bool
	}{
		{"none", func() any { return nil }, false},
		{"a small file", func() any { return file(spoolStdinMin - 1) }, false},
		{"a large file", func() any { return file(spoolStdinMin) }, true},
		{"an empty pipe", func() any { return pipe(0) }, false},
		{"a pipe of a line", func() any { return pipe(8) }, false},
		{"a full pipe", func() any { return pipe(1 << 20) }, true},
		{"a device", func() any { return null }, false},
		{"a small reader", func() any { return strings.NewReader("echo hi\n") }, false},
		{"a large reader", func() any { return bytes.NewReader(make([]byte, spoolStdinMin)) }, true},
	} {
		var got bool
		switch v := tt.in().(type) {
		case nil:
			got = spoolStdin(nil)
		case *os.File:
			got = spoolStdin(v)
		case *strings.Reader:
			got = spoolStdin(v)
		case *bytes.Reader:
			got = spoolStdin(v)
		}
		if got != tt.want {
			t.Errorf("%s: spoolStdin %v, want %v", tt.name, got, tt.want)
		}
	}
}
