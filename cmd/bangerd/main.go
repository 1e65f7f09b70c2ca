// Command bangerd is banger's per-user daemon. It runs in the foreground and
// logs JSON to stderr. `bangerd mcp` is `banger mcp`'s MCP server on stdio
// instead (kept out of the banger binary, which every command starts).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/bangerdev/banger/internal/daemon"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/mcpserver"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/version"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == mcpserver.StdioArg {
		// `banger mcp` runs the MCP server here (see mcpserver.StdioArg).
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		code := mcpserver.ServeStdio(ctx, os.Args[2:], version.String(), os.Stdin, os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	tuneGC()
	home := flag.String("home", "", "keep all state under this directory (default: $BANGER_HOME, else XDG directories)")
	debug := flag.Bool("debug", false, "log at debug level")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(version.String())
		return
	}
	level := slog.LevelInfo
	if *debug || os.Getenv("BANGER_DEBUG") != "" {
		level = slog.LevelDebug
	}
	log := logging.New(os.Stderr, level)
	slog.SetDefault(log)
	layout, err := paths.Resolve(*home)
	if err != nil {
		log.Error("cannot start", "error", err.Error())
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := daemon.Run(ctx, daemon.Config{Layout: layout, Version: version.String(), Logger: log}); err != nil {
		log.Error("bangerd failed", "error", err.Error())
		fmt.Fprintf(os.Stderr, "bangerd: %v\n", err)
		os.Exit(1)
	}
}

// daemonGCPercent is bangerd's GOGC unless the environment sets one. The
// daemon's live heap is small (a few MiB) and its bursts (a VM's start,
// streams proxied) leave garbage that, at Go's default of 100, the heap
// keeps until the next collection: with 50, bangerd's RSS with 8 VMs just
// started measured 23.5-26.4 MiB against 30.9-36.7 (docs/BENCHMARKS.md).
const daemonGCPercent = 50

// tuneGC sets bangerd's GC target (GOGC in the environment wins).
func tuneGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(daemonGCPercent)
	}
}
