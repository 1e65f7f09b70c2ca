package vmmproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Console log limits: the log is at most ConsoleFiles files of
// ConsoleFileMax bytes each (console.log and console.log.1).
const (
	ConsoleFileMax = 4 << 20
	ConsoleFiles   = 2
)

// RotatedName is where the previous part of a console log goes when the
// current one is full.
func RotatedName(path string) string { return path + ".1" }

// ConsoleLog is a size-capped, rotated log file: writes go to path until it
// holds max bytes, then path becomes path.1 (replacing the older part) and a
// new path starts. Whatever a guest writes, at most 2×max bytes stay on disk.
// Not safe for concurrent use.
type ConsoleLog struct {
	path string
	max  int64
	f    *os.File
	size int64
}

// OpenConsoleLog opens (appending to) the console log at path. A log already
// at its cap (left by an earlier bangerd) is rotated at once.
func OpenConsoleLog(path string, max int64) (*ConsoleLog, error) {
	if max <= 0 {
		max = ConsoleFileMax
	}
	c := &ConsoleLog{path: path, max: max}
	if err := c.open(false); err != nil {
		return nil, err
	}
	if c.size >= c.max {
		if err := c.rotate(); err != nil {
			c.f.Close()
			return nil, err
		}
	}
	return c, nil
}

func (c *ConsoleLog) open(truncate bool) error {
	flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND | noFollow
	if truncate {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(c.path, flags, 0o600)
	if err != nil {
		return fmt.Errorf("open console log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open console log: %w", err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return fmt.Errorf("console log %s is not a regular file", c.path)
	}
	c.f, c.size = f, fi.Size()
	return nil
}

func (c *ConsoleLog) rotate() error {
	if err := c.f.Close(); err != nil {
		return err
	}
	if err := os.Rename(c.path, RotatedName(c.path)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rotate console log: %w", err)
	}
	return c.open(true)
}

// Write implements io.Writer; it never writes more than the cap to one file.
func (c *ConsoleLog) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		if c.size >= c.max {
			if err := c.rotate(); err != nil {
				return written, err
			}
		}
		chunk := p
		if room := c.max - c.size; int64(len(chunk)) > room {
			chunk = chunk[:room]
		}
		n, err := c.f.Write(chunk)
		written += n
		c.size += int64(n)
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

// Close closes the current file.
func (c *ConsoleLog) Close() error { return c.f.Close() }

// Console copies a VMM's serial console (a stream bangerd reads: a unix
// socket QEMU serves, a FIFO Firecracker writes) into a ConsoleLog.
type Console struct {
	src  io.ReadCloser
	done chan struct{}
	once sync.Once
}

// StartConsole copies src into the capped log at path until src ends or
// Stop is called.
func StartConsole(src io.ReadCloser, path string, max int64, log *slog.Logger) (*Console, error) {
	cl, err := OpenConsoleLog(path, max)
	if err != nil {
		src.Close()
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	c := &Console{src: src, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		defer cl.Close()
		buf := make([]byte, 64<<10)
		for {
			n, rerr := src.Read(buf)
			if n > 0 {
				if _, err := cl.Write(buf[:n]); err != nil {
					log.Warn("console log write failed; console output is dropped from now on", "path", path, "error", err)
					// Keep draining so the VMM never blocks on its console.
					_, _ = io.Copy(io.Discard, src)
					return
				}
			}
			if rerr != nil {
				return
			}
		}
	}()
	return c, nil
}

// consoleDrain bounds how long Stop lets the reader drain what the VMM wrote
// last before it exited.
const consoleDrain = 200 * time.Millisecond

// Stop ends the copy once the source has nothing more to give: what the VMM
// wrote before it exited is still read (a socket ends by itself when the VMM
// exits; a FIFO that bangerd also holds open never does, so reads stop at a
// short deadline), then the source is closed.
func (c *Console) Stop() {
	c.once.Do(func() {
		if d, ok := c.src.(interface{ SetReadDeadline(time.Time) error }); ok && d.SetReadDeadline(time.Now().Add(consoleDrain)) == nil {
			select {
			case <-c.done:
			case <-time.After(2 * consoleDrain):
			}
		}
		c.src.Close()
		<-c.done
	})
}

// Done is closed once the copy has ended.
func (c *Console) Done() <-chan struct{} { return c.done }

// Console dial polls: a VMM binds its sockets ~20-40 ms after it is
// spawned, and a restore waits on this (the guest is not running yet), so
// for the first dialPollFastFor it is tried every millisecond (a refused unix
// connect costs microseconds), then every dialPoll.
const (
	dialPollFast    = time.Millisecond
	dialPollFastFor = 250 * time.Millisecond
	dialPoll        = 10 * time.Millisecond
)

// DialConsole connects to a unix socket the VMM serves (its console), polling
// until it accepts, the VMM exits (exited closes) or ctx ends.
func DialConsole(ctx context.Context, path string, exited <-chan struct{}) (net.Conn, error) {
	t := time.NewTimer(0)
	defer t.Stop()
	began := time.Now()
	var lastErr error
	for {
		select {
		case <-exited:
			return nil, errors.New("the VMM exited before its console socket accepted a connection")
		case <-ctx.Done():
			return nil, fmt.Errorf("the VMM's console socket %s did not accept a connection: %w (last error: %v)", path, ctx.Err(), lastErr)
		case <-t.C:
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return c, nil
		}
		lastErr = err
		if time.Since(began) < dialPollFastFor {
			t.Reset(dialPollFast)
		} else {
			t.Reset(dialPoll)
		}
	}
}

// OpenConsoleFIFO makes (or reuses) the FIFO at path that a VMM writes its
// console to, and opens bangerd's end of it read-write: a reader that never
// sees EOF and never blocks the open, so the VMM's write end can be opened
// (and reopened after a bangerd restart) at any time. While no bangerd holds
// it, the VMM's writes fail with EPIPE and the output is lost.
func OpenConsoleFIFO(path string, create bool) (*os.File, error) {
	fi, err := os.Lstat(path)
	switch {
	case err == nil && fi.Mode().Type() == os.ModeNamedPipe:
	case err == nil:
		return nil, fmt.Errorf("%s exists and is not a FIFO; remove it or pick another VM directory", path)
	case errors.Is(err, os.ErrNotExist) && create:
		if err := syscall.Mkfifo(path, 0o600); err != nil {
			return nil, fmt.Errorf("create console FIFO: %w", err)
		}
	default:
		return nil, fmt.Errorf("console FIFO: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|noFollow, 0)
	if err != nil {
		return nil, fmt.Errorf("open console FIFO: %w", err)
	}
	return f, nil
}
