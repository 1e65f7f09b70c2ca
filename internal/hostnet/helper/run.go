package helper

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/logging"
)

// ShutdownGrace bounds how long in-flight calls may run after SIGTERM.
const ShutdownGrace = 10 * time.Second

// Listen prepares the helper's socket. Its directory must be owned by the
// helper's uid (root) and writable by nobody else, and may not be a
// symlink: the helper refuses it otherwise. It is created (0755) when
// missing, and the default /run/banger is made 0755 through its file
// descriptor, never through a path. The socket is bound inside that
// verified directory (through /proc/self/fd), a stale socket file is
// replaced, a live helper is not, and the socket is mode 0666:
// authorisation is per connection (SO_PEERCRED), not by file mode.
func Listen(ctx context.Context, path string) (*SocketListener, error) {
	if path == "" || !filepath.IsAbs(path) || filepath.Clean(path) != path {
		return nil, fmt.Errorf("socket path %q must be absolute and clean", path)
	}
	dir, name := filepath.Split(path)
	dir = filepath.Clean(dir)
	if name == "" || len(name) > 64 {
		return nil, fmt.Errorf("socket name %q must be 1-64 bytes", name)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		return nil, fmt.Errorf("socket directory %s is not a directory (a symlink?); refusing it", dir)
	}
	if err != nil {
		return nil, fmt.Errorf("open socket directory %s: %w", dir, err)
	}
	d := os.NewFile(uintptr(dfd), dir)
	ok := false
	defer func() {
		if !ok {
			d.Close()
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstat(dfd, &st); err != nil {
		return nil, fmt.Errorf("stat socket directory %s: %w", dir, err)
	}
	if int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("socket directory %s is owned by uid %d, not by the helper (uid %d); refusing it (hint: remove it, or choose another --socket)", dir, st.Uid, os.Geteuid())
	}
	if st.Mode&(unix.S_IWGRP|unix.S_IWOTH) != 0 {
		return nil, fmt.Errorf("socket directory %s is writable by group or others (mode %04o); refusing it", dir, st.Mode&0o7777)
	}
	if path == hostnet.DefaultSocket && st.Mode&0o777 != 0o755 {
		if err := unix.Fchmod(dfd, 0o755); err != nil {
			return nil, fmt.Errorf("chmod socket directory: %w", err)
		}
	}
	inDir := fmt.Sprintf("/proc/self/fd/%d/%s", dfd, name)
	var est unix.Stat_t
	if err := unix.Fstatat(dfd, name, &est, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		if est.Mode&unix.S_IFMT != unix.S_IFSOCK {
			return nil, fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
		}
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		var dl net.Dialer
		c, derr := dl.DialContext(dctx, "unix", inDir)
		cancel()
		if derr == nil {
			c.Close()
			return nil, fmt.Errorf("another banger-helper is already listening on %s", path)
		}
		if err := unix.Unlinkat(dfd, name, 0); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "unix", inDir)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	// The directory is the helper's alone, so the entry just bound is the
	// socket; chmod it relative to the directory's descriptor.
	if err := unix.Fstatat(dfd, name, &est, unix.AT_SYMLINK_NOFOLLOW); err != nil || est.Mode&unix.S_IFMT != unix.S_IFSOCK {
		ul.Close()
		return nil, fmt.Errorf("socket %s vanished or changed after bind: %v", path, err)
	}
	if err := unix.Fchmodat(dfd, name, 0o666, 0); err != nil {
		ul.Close()
		unix.Unlinkat(dfd, name, 0)
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	ok = true
	return &SocketListener{UnixListener: ul, dir: d, name: name}, nil
}

// SocketListener is the helper's listening socket; Close removes the
// socket file (relative to its directory's descriptor).
type SocketListener struct {
	*net.UnixListener
	dir  *os.File
	name string
	once sync.Once
}

// Close stops listening and removes the socket.
func (l *SocketListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		unix.Unlinkat(int(l.dir.Fd()), l.name, 0)
		l.dir.Close()
	})
	return err
}

// Run serves the helper on socket until ctx is done, then shuts down
// (in-flight calls get ShutdownGrace) and removes the socket.
func Run(ctx context.Context, socket string, cfg Config) error {
	srv, s, err := newServer(&cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	log := cfg.Logger
	ln, err := Listen(ctx, socket)
	if err != nil {
		return err
	}
	s.resume(ctx)
	lln := newLimitListener(ln.UnixListener, cfg.MaxConnsPerUser, cfg.MaxConns, s.refusals)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(context.WithoutCancel(ctx), lln) }()
	log.Info("banger-helper listening", "socket", socket, "bridge", cfg.Bridge, "tap_prefix", cfg.TapPrefix,
		"pool", cfg.Pool.String(), "max_taps_per_user", cfg.MaxTapsPerUser, "max_conns_per_user", cfg.MaxConnsPerUser,
		"max_conns", cfg.MaxConns, "request_timeout_s", cfg.RequestTimeout.Seconds(),
		"allow_uids", cfg.Policy.UIDs, "allow_gids", cfg.Policy.GIDs, "allow_cidrs", cfg.AllowCIDRs)
	select {
	case err := <-errc:
		ln.Close()
		return fmt.Errorf("serving %s: %w", socket, err)
	case <-ctx.Done():
	}
	log.Info("banger-helper shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), ShutdownGrace)
	defer cancel()
	serr := srv.Shutdown(sctx)
	ln.Close()
	<-errc
	s.refusals.flush()
	if serr != nil {
		return fmt.Errorf("shutdown: in-flight calls did not finish within %s: %w", ShutdownGrace, serr)
	}
	return nil
}

// callerHandler adds the caller's uid (from the context) to every record.
type callerHandler struct{ slog.Handler }

func (h callerHandler) Handle(ctx context.Context, r slog.Record) error {
	if c, ok := CallerFrom(ctx); ok {
		r.AddAttrs(slog.Uint64("caller_uid", uint64(c.UID)))
	}
	return h.Handler.Handle(ctx, r)
}

func (h callerHandler) WithAttrs(a []slog.Attr) slog.Handler {
	return callerHandler{h.Handler.WithAttrs(a)}
}

func (h callerHandler) WithGroup(n string) slog.Handler { return callerHandler{h.Handler.WithGroup(n)} }

// NewLogger returns the helper's JSON logger: op_id and caller_uid from the
// context on every record.
func NewLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(callerHandler{logging.NewHandler(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level}))})
}

type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error {
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}

// Main is banger-helper's command line: it parses args (without the program
// name), runs in the foreground until SIGTERM/SIGINT and returns the exit
// status (0 clean, 1 failure, 2 usage).
func Main(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("banger-helper", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var users, groups, allowCIDRs listFlag
	socket := fs.String("socket", hostnet.SocketPath(), "unix socket to listen on (env "+hostnet.SocketEnv+")")
	bridge := fs.String("bridge", hostnet.DefaultBridge, "the only bridge this helper manages")
	prefix := fs.String("tap-prefix", hostnet.DefaultTapPrefix, "prefix of every tap name this helper accepts")
	debug := fs.Bool("debug", false, "log at debug level")
	config := fs.String("config", hostnet.DefaultHelperConfig, "root-owned JSON `file` with the address pool and limits (missing: defaults)")
	resolvConf := fs.String("resolv-conf", "/etc/resolv.conf", "where the guests' DNS forwarder finds the host's name servers")
	fs.Var(&allowCIDRs, "allow-cidr", "IPv4 `CIDR` guests may reach although it is private, link-local or otherwise blocked (repeatable)")
	fs.Var(&users, "allow-user", "user `NAME|UID` allowed to call (repeatable); root always is")
	fs.Var(&groups, "allow-group", "members of group `NAME|GID` are allowed to call (repeatable)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: banger-helper [flags]\n\nbanger's root helper: creates banger's bridge, per-VM taps and NAT rules on behalf of allowed users.\nRuns in the foreground and logs JSON to stderr.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "banger-helper: unexpected arguments %q\n", fs.Args())
		return 2
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log := NewLogger(stderr, level)
	var pol Policy
	for _, u := range users {
		uid, err := ResolveUser(u)
		if err != nil {
			log.Error("bad --allow-user", "error", err.Error())
			return 2
		}
		pol.UIDs = append(pol.UIDs, uid)
	}
	for _, g := range groups {
		gid, err := ResolveGroup(g)
		if err != nil {
			log.Error("bad --allow-group", "error", err.Error())
			return 2
		}
		pol.GIDs = append(pol.GIDs, gid)
	}
	var allow []netip.Prefix
	for _, a := range allowCIDRs {
		p, err := netip.ParsePrefix(a)
		if err != nil || !p.Addr().Is4() {
			log.Error("bad --allow-cidr", "error", fmt.Sprintf("%q is not an IPv4 CIDR like 192.168.1.0/24", a))
			return 2
		}
		allow = append(allow, p.Masked())
	}
	if os.Geteuid() != 0 {
		log.Warn("banger-helper is not running as root; creating devices and rules will fail without CAP_NET_ADMIN")
	}
	if len(pol.UIDs) == 0 && len(pol.GIDs) == 0 {
		log.Warn("no --allow-user or --allow-group given: only root may call this helper")
	}
	cfg := Config{Bridge: *bridge, TapPrefix: *prefix, Policy: pol, Logger: log, AllowCIDRs: allow, ResolvConf: *resolvConf}
	fc, found, err := LoadConfigFile(*config)
	if err == nil {
		err = fc.Apply(&cfg)
	}
	if err != nil {
		log.Error("bad configuration", "error", err.Error())
		return 2
	}
	if !found {
		log.Info("no configuration file; using the defaults", "config", *config)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err = Run(ctx, *socket, cfg)
	if err != nil {
		log.Error("banger-helper failed", "error", err.Error())
		return 1
	}
	log.Info("banger-helper stopped")
	return 0
}
