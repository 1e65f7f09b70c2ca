package vmmproc

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// diskUse is the total size of the console log and its rotated part.
func diskUse(t *testing.T, path string) int64 {
	t.Helper()
	var total int64
	for _, p := range []string{path, RotatedName(path)} {
		fi, err := os.Stat(p)
		if err == nil {
			total += fi.Size()
		}
	}
	return total
}

func TestConsoleLogCapsAndKeepsTheEnd(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	const max = 64 << 10
	cl, err := OpenConsoleLog(path, max)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 1000) // odd size: writes straddle the cap
	for i := 0; i < 200; i++ {
		if _, err := cl.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	cl.Write([]byte("THE END\n"))
	cl.Close()
	if got := diskUse(t, path); got > ConsoleFiles*max {
		t.Fatalf("console log uses %d bytes, cap %d", got, ConsoleFiles*max)
	}
	b, _ := os.ReadFile(path)
	if !bytes.HasSuffix(b, []byte("THE END\n")) {
		t.Fatalf("the newest output is not at the end of %s", path)
	}
	// Reopening a full log (a restarted bangerd) rotates it first.
	os.WriteFile(path, bytes.Repeat([]byte("x"), max), 0o600)
	cl, err = OpenConsoleLog(path, max)
	if err != nil {
		t.Fatal(err)
	}
	cl.Write([]byte("after restart\n"))
	cl.Close()
	if b, _ := os.ReadFile(path); string(b) != "after restart\n" {
		t.Fatalf("after reopening a full log: %q", b)
	}
}

func TestConsoleLogRefusesSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "victim")
	os.WriteFile(target, []byte("keep"), 0o600)
	path := filepath.Join(dir, "console.log")
	os.Symlink(target, path)
	if _, err := OpenConsoleLog(path, 1024); err == nil {
		t.Fatal("opened a console log through a symlink")
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Fatalf("symlink target changed: %q", b)
	}
}

// A fake VMM serving its console on a unix socket writes 50 MiB; the console
// log on disk never holds more than the cap.
func TestConsoleFromSocket50MiB(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "console.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const total = 50 << 20
	served := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		line := bytes.Repeat([]byte("guest console spam "), 50)
		line = append(line, '\n')
		for n := 0; n < total; n += len(line) {
			if _, err := c.Write(line); err != nil {
				served <- err
				return
			}
		}
		_, err = c.Write([]byte("last words\n"))
		served <- err
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := DialConsole(ctx, sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "console.log")
	c, err := StartConsole(conn, path, ConsoleFileMax, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("console copy did not end when the VMM closed its console")
	}
	c.Stop()
	if got := diskUse(t, path); got > ConsoleFiles*ConsoleFileMax {
		t.Fatalf("console log uses %d bytes after 50 MiB of output, cap %d", got, ConsoleFiles*ConsoleFileMax)
	}
	b, _ := os.ReadFile(path)
	if !bytes.HasSuffix(b, []byte("last words\n")) {
		t.Fatal("the console's last words are missing")
	}
}

func TestDialConsoleGivesUpWhenTheVMMExits(t *testing.T) {
	exited := make(chan struct{})
	close(exited)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := DialConsole(ctx, filepath.Join(t.TempDir(), "none.sock"), exited); err == nil {
		t.Fatal("dialled a console that does not exist")
	}
}
