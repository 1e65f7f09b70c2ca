// Package daemon is bangerd: the composition root. It owns the single-instance
// lock, the store, the RPC server and the services (VMs, images, kernels),
// wiring them together; nothing else constructs services.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// Config configures a daemon.
type Config struct {
	Layout  paths.Layout
	Version string
	Logger  *slog.Logger
	// ShutdownTimeout bounds how long in-flight requests may take at shutdown.
	ShutdownTimeout time.Duration
}

// Daemon is a running bangerd.
type Daemon struct {
	cfg     Config
	log     *slog.Logger
	store   *store.Store
	mux     *rpc.Mux
	started time.Time
	closers []namedCloser
	locks   store.LockSet
	fileCfg FileConfig
	vms     *vmService
	events  *eventBus
	// imageOps: image operations begun with *.begin and the work
	// directories of those running (images_oci.go).
	imageOps imageOps
}

type namedCloser struct {
	name string
	fn   func() error
}

// ErrAlreadyRunning is returned when another bangerd holds the home's lock.
var ErrAlreadyRunning = errors.New("another bangerd is already running")

// Run starts bangerd and serves until ctx is cancelled, then shuts down
// cleanly: the listener closes, in-flight requests finish, state is closed.
// VMs keep running.
func Run(ctx context.Context, cfg Config) error {
	d, ln, err := open(ctx, cfg)
	if err != nil {
		return err
	}
	defer d.close()
	srv := newRPCServer(d)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, ln) }()
	d.log.Info("bangerd ready", "socket", cfg.Layout.Socket(), "pid", os.Getpid(), "version", cfg.Version)
	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil && !errors.Is(err, rpc.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
	}
	d.log.Info("bangerd shutting down")
	timeout := cfg.ShutdownTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		d.log.Warn("in-flight requests did not finish before the shutdown deadline", "error", err.Error())
	}
	// Creates and image operations run on after their requests; they are
	// cancelled and undone rather than cut off half-way (a debootstrap would
	// be left running with proc mounted in its work directory).
	d.cancelRunningOps(sctx)
	os.Remove(cfg.Layout.Socket())
	return nil
}

func open(ctx context.Context, cfg Config) (_ *Daemon, _ net.Listener, err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger, mux: rpc.NewMux(), started: time.Now(), events: newEventBus()}
	defer func() {
		if err != nil {
			d.close()
		}
	}()
	l := cfg.Layout
	fixed, err := l.Repair()
	if err != nil {
		return nil, nil, err
	}
	for _, f := range fixed {
		d.log.WarnContext(ctx, "repaired the mode of a banger directory", "dir", f)
	}
	if err := paths.CheckSocketPath(l.Socket()); err != nil {
		return nil, nil, err
	}
	if err := d.lock(); err != nil {
		return nil, nil, err
	}
	st, err := store.Open(ctx, l.DB())
	if err != nil {
		return nil, nil, err
	}
	d.store = st
	d.addCloser("store", st.Close)
	if err := d.initServices(ctx); err != nil {
		return nil, nil, err
	}
	d.registerAPI()
	ln, err := listenUnix(l.Socket())
	if err != nil {
		return nil, nil, err
	}
	return d, ln, nil
}

// newRPCServer is bangerd's server on its socket: only its own user (and
// root) is served; a refused connection gets one answer and is closed.
func newRPCServer(d *Daemon) *rpc.Server {
	return &rpc.Server{Mux: d.mux, Logger: d.log, Authorize: authorizePeer(uint32(os.Getuid())), CloseOnRefusal: true}
}

func (d *Daemon) addCloser(name string, fn func() error) {
	d.closers = append(d.closers, namedCloser{name, fn})
}

// close runs the closers in reverse order, logging failures by name.
func (d *Daemon) close() {
	for i := len(d.closers) - 1; i >= 0; i-- {
		c := d.closers[i]
		if err := c.fn(); err != nil {
			d.log.Warn("close failed", "closer", c.name, "error", err.Error())
		}
	}
	d.closers = nil
}

// lock takes the single-instance lock for this home and records our PID in it.
func (d *Daemon) lock() error {
	path := d.cfg.Layout.LockFile()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open lock file: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		pid := strings.TrimSpace(string(b))
		if pid == "" {
			pid = "unknown"
		}
		return fmt.Errorf("%w for %s (pid %s); stop it first, or use another BANGER_HOME", ErrAlreadyRunning, d.cfg.Layout.DataDir, pid)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	d.addCloser("instance lock", func() error {
		f.Truncate(0)
		return f.Close()
	})
	return nil
}

// listenUnix removes a stale socket (we hold the instance lock, so nobody
// else serves it) and listens with mode 0600. The socket is made in the run
// directory, which is already 0700 (checked here), so nobody else can reach
// it before its own mode is set; the process umask is never touched (it is
// process-wide: another goroutine creating a directory meanwhile would get
// the wrong mode).
func listenUnix(path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %v: others could reach the socket; hint: chmod 700 %s", dir, fi.Mode().Perm(), dir)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	return ln, nil
}
