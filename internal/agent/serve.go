package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/agent/channel"
	"github.com/bangerdev/banger/internal/agent/reaper"
	"github.com/bangerdev/banger/internal/agent/sshd"
)

// channelWait bounds the wait for the host channel device to appear.
const channelWait = 30 * time.Second

// SSHConfig turns a boot configuration into the SSH server's configuration.
// Unparsable authorized keys are skipped with a warning, so that one bad
// line does not lock everyone out; having no usable key is an error.
func SSHConfig(cfg *bootcfg.Config, log *slog.Logger) (sshd.Config, error) {
	signer, err := ssh.ParsePrivateKey([]byte(cfg.HostKey))
	if err != nil {
		return sshd.Config{}, fmt.Errorf("boot config host key: %w", err)
	}
	var keys []ssh.PublicKey
	for i, line := range cfg.AuthorizedKeys {
		k, err := sshd.ParseAuthorizedKeys([]string{line})
		if err != nil {
			log.Warn("skipping an unusable authorized key from the boot config", "index", i, "error", err)
			continue
		}
		keys = append(keys, k...)
	}
	if len(keys) == 0 {
		return sshd.Config{}, fmt.Errorf("boot config has no usable authorized key (%d given)", len(cfg.AuthorizedKeys))
	}
	return sshd.Config{
		HostKey:        signer,
		AuthorizedKeys: keys,
		Env:            cfg.Env,
		WorkDir:        cfg.WorkDir,
		DefaultUser:    cfg.User,
	}, nil
}

// serve runs the SSH server on the host channel until ctx is done. It
// returns an error only when the channel cannot be set up at all.
func serve(ctx context.Context, cfg *bootcfg.Config, r *reaper.Reaper, onShutdown func(), log *slog.Logger) error {
	sc, err := SSHConfig(cfg, log)
	if err != nil {
		return err
	}
	sc.Reaper = r
	sc.OnShutdown = onShutdown
	keys := newBulkKey(cfg.BulkKey)
	files := &background{}
	sc.OnReidentify = keys.onReidentify(func(p api.Reidentify) error { return reidentify("/", p, files, log) })
	go warmReidentifyDecoder() // its sample is checked by TestReidentifySampleComplete
	sc.BeforeCommand = files.wait
	sc.OpenSpool = openSpool
	sc.SpoolPresent = func() bool { return spoolDev() != "" }
	sc.Logger = log
	srv, err := sshd.New(sc)
	if err != nil {
		return err
	}
	for ctx.Err() == nil {
		l, err := listen(ctx, cfg.Channel, log)
		if err != nil {
			return err
		}
		d := newDispatchListener(ctx, l, keys, srv, log)
		err = srv.Serve(ctx, d)
		d.Close()
		if ctx.Err() != nil {
			return nil
		}
		log.Warn("serving the host failed; listening again", "error", err)
		t := time.NewTimer(time.Second)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
	return nil
}

// classifyWait bounds the wait for a new stream's first byte (an SSH client
// that waits for the server's identification is served after it).
const classifyWait = 2 * time.Second

// dispatchListener hands bulk streams (whose first byte is bulk.Magic's) to
// the SSH server's bulk handler after checking their key, and returns the
// rest, SSH connections, from Accept.
type dispatchListener struct {
	net.Listener
	ctx    context.Context
	conns  chan net.Conn
	errc   chan error
	closed chan struct{} // closed by Close
	once   sync.Once
}

// bulkKey is the key bulk streams must present: the boot config's, until a
// reidentify gives a clone its own.
type bulkKey struct{ p atomic.Pointer[[]byte] }

// reidentifySample is a reidentify payload with every field set, which
// warmReidentifyDecoder decodes.
const reidentifySample = `{"hostname":"h","host_key":"k","machine_id":"m","rng_seed":"AA==","time_unix_nano":1,` +
	`"network":{"from_mac":"m","mac":"m","address":"a","gateway":"g","dns":["d"]},"bulk_key":"AA=="}`

// warmReidentifyDecoder decodes reidentifySample once, so that
// encoding/json's per-type decoder state for a reidentify is built at boot
// and is in every snapshot of this guest: a clone, which decodes one as its
// first request, then does not build it on its way to its first command
// (guest memory outlives a snapshot; the emulator's translated code does
// not). Paired A/B (scripts/bench-clone, n=20 and 24): the reidentify
// request 7.2 and 5.6 ms shorter.
func warmReidentifyDecoder() error {
	var p api.Reidentify
	return json.Unmarshal([]byte(reidentifySample), &p)
}

func newBulkKey(k []byte) *bulkKey {
	b := &bulkKey{}
	b.p.Store(&k)
	return b
}

func (b *bulkKey) get() []byte { return *b.p.Load() }

// onReidentify wraps apply (the rest of a reidentify) so that a request
// carrying a bulk key replaces this one once apply succeeded. A key of the
// wrong size refuses the request before anything is applied.
func (b *bulkKey) onReidentify(apply func(api.Reidentify) error) func(api.Reidentify) error {
	return func(p api.Reidentify) error {
		if p.BulkKey != nil && len(p.BulkKey) != bulk.KeySize {
			return fmt.Errorf("bulk key has %d bytes, want %d", len(p.BulkKey), bulk.KeySize)
		}
		if err := apply(p); err != nil {
			return err
		}
		if p.BulkKey != nil {
			k := bytes.Clone(p.BulkKey)
			b.p.Store(&k)
		}
		return nil
	}
}

func newDispatchListener(ctx context.Context, l net.Listener, keys *bulkKey, srv *sshd.Server, log *slog.Logger) *dispatchListener {
	d := &dispatchListener{Listener: l, ctx: ctx, conns: make(chan net.Conn), errc: make(chan error, 1), closed: make(chan struct{})}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				d.errc <- err
				return
			}
			go func() {
				isBulk, pc := bulk.Classify(c, classifyWait)
				if !isBulk {
					select {
					case d.conns <- pc:
					case <-ctx.Done():
						pc.Close()
					case <-d.closed:
						pc.Close() // nobody will Accept it
					}
					return
				}
				if err := bulk.Accept(pc, keys.get(), classifyWait); err != nil {
					log.Warn("bulk stream refused", "error", err)
					return
				}
				srv.ServeBulk(ctx, pc)
			}()
		}
	}()
	return d
}

func (d *dispatchListener) Accept() (net.Conn, error) {
	select {
	case c := <-d.conns:
		return c, nil
	case err := <-d.errc:
		d.errc <- err
		return nil, err
	case <-d.ctx.Done():
		return nil, net.ErrClosed
	case <-d.closed:
		return nil, net.ErrClosed
	}
}

// Close closes the listener and the SSH connections classified but not yet
// accepted.
func (d *dispatchListener) Close() error {
	d.once.Do(func() { close(d.closed) })
	return d.Listener.Close()
}

// listen opens the host channel named by the boot config, waiting (bounded)
// for its device to appear.
func listen(ctx context.Context, ch bootcfg.Channel, log *slog.Logger) (net.Listener, error) {
	deadline := time.Now().Add(channelWait)
	switch ch.Kind {
	case "vsock":
		port := ch.Port
		if port == 0 {
			port = api.DefaultVsockPort
		}
		for {
			l, err := channel.ListenVsock(port)
			if err == nil {
				log.Info("serving the host", "channel", "vsock", "port", port)
				return l, nil
			}
			if time.Now().After(deadline) {
				return nil, err
			}
			if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
				return nil, err
			}
		}
	case "serial", "":
		name := ch.Name
		if name == "" {
			name = api.DefaultSerialName
		}
		for {
			dev, err := channel.FindSerialPort("/sys", "/dev", name)
			if err == nil {
				f, err := os.OpenFile(dev, os.O_RDWR, 0)
				if err != nil {
					return nil, fmt.Errorf("open the host channel %s: %w", dev, err)
				}
				log.Info("serving the host", "channel", "virtio-serial", "device", dev, "name", name)
				return &fileListener{SerialListener: channel.ListenSerial(f, log), f: f}, nil
			}
			if !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
				return nil, fmt.Errorf("%w (is virtio_console in the initrd and the VMM's virtserialport named %q?)", err, name)
			}
			if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
				return nil, err
			}
		}
	}
	return nil, fmt.Errorf("unknown host channel kind %q in the boot config", ch.Kind)
}

// fileListener closes the port device with the listener.
type fileListener struct {
	*channel.SerialListener
	f *os.File
}

func (l *fileListener) Close() error {
	err := l.SerialListener.Close()
	l.f.Close()
	return err
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// spoolDev is the spool device's path ("" when the guest has none), found
// by its magic at the first spool transfer (devices are not hot-plugged).
var spoolDev = sync.OnceValue(func() string {
	d, err := ScanDisks("/sys/block", "/dev")
	if err != nil || d.Spool == nil {
		return ""
	}
	return d.Spool.Path
})

// openSpool opens the spool device with O_DIRECT (the host writes and reads
// it behind the guest's back, so nothing of it may stay in the page cache),
// or returns nil when the guest has none.
func openSpool() (*os.File, error) {
	p := spoolDev()
	if p == "" {
		return nil, nil
	}
	return os.OpenFile(p, os.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
}
