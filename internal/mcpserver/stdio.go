package mcpserver

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/bangerdev/banger/client"
)

// StdioArg is the first argument that makes bangerd serve MCP on its stdio
// instead of running as the daemon: `banger mcp` executes `bangerd mcp`, so
// that the banger binary, which every `banger exec` starts, does not link the
// MCP SDK (its package initialisers ran at every banger command's start).
const StdioArg = "mcp"

// ServeStdio runs the MCP server on stdin/stdout for a client of bangerd
// (which `banger mcp` has started if needed) until stdin ends or ctx is
// done. args are the flags after StdioArg: --debug logs at debug level (to
// stderr, as JSON). It returns the process's exit status.
func ServeStdio(ctx context.Context, args []string, version string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bangerd "+StdioArg, flag.ContinueOnError)
	fs.SetOutput(stderr)
	debug := fs.Bool("debug", false, "log at debug level")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	level := slog.LevelWarn
	if *debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	c, err := client.New() // BANGER_HOME's bangerd, as banger resolved it
	if err != nil {
		fmt.Fprintf(stderr, "error: %v\n", err)
		return 1
	}
	s := New(c, Options{Version: version, Logger: log})
	if err := s.Run(ctx, stdioTransport(stdin, stdout)); err != nil && ctx.Err() == nil {
		fmt.Fprintf(stderr, "error: %v\n", err)
		return 1
	}
	return 0
}

// MaxFrameBytes bounds one JSON-RPC message the server reads: room for a
// write_file of MaxWriteBytes in base64 (4/3 of it) or as text whose JSON
// escapes at most double it (newlines, quotes, backslashes), with 1 MiB for
// the rest of the call. Text with more escapes than that (control
// characters, \u00XX) goes in base64. The SDK's default, 16 MiB, refused
// a write_file of MaxWriteBytes in either encoding, and a refused message
// ends the session.
const MaxFrameBytes = 2*MaxWriteBytes + 1<<20

// stdioTransport is the server's side of `banger mcp`'s stdio.
func stdioTransport(stdin io.Reader, stdout io.Writer) *mcp.IOTransport {
	return &mcp.IOTransport{Reader: io.NopCloser(stdin), Writer: nopWriteCloser{stdout}, MaxLineLength: MaxFrameBytes}
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }
