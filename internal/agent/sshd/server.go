// Package sshd is banger-agent's SSH server: the host's way into the guest.
//
// It speaks the SSH protocol (golang.org/x/crypto/ssh) over whatever
// transport the agent was given (vsock, or a yamux stream on virtio-serial),
// authenticates public keys only, and serves session channels (exec, shell,
// pty, env, signals, the sftp subsystem), direct-tcpip forwarding, and
// banger's own global requests (see package api).
package sshd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/latelog"
	"github.com/bangerdev/banger/internal/agent/reaper"
	"github.com/bangerdev/banger/internal/agent/sysinfo"
)

// SFTPServerArg is the argument that makes banger-agent serve SFTP on its
// stdin/stdout; the server starts it as the session's user when that user is
// not the agent's own.
const SFTPServerArg = "sftp-server"

// DefaultPath is PATH for commands unless the image sets one.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Config configures a Server.
type Config struct {
	HostKey        ssh.Signer
	AuthorizedKeys []ssh.PublicKey

	// Env ("K=V") and WorkDir are the image's defaults for commands.
	Env     []string
	WorkDir string
	// DefaultUser is used when a client sends an empty user name; "root" if empty.
	DefaultUser string

	PasswdFile string // default /etc/passwd
	GroupFile  string // default /etc/group
	ProcRoot   string // default /proc
	RootPath   string // filesystem reported by stats; default /
	SelfExe    string // this binary, for the sftp-server child; default /proc/self/exe
	// WorkspaceState is where workspace pushes remember the paths they
	// wrote; default /var/lib/banger-agent/workspaces.
	WorkspaceState string

	// Reaper tracks the children the server starts (nil unless PID 1).
	Reaper *reaper.Reaper
	// OnShutdown powers the guest off. It is called once, after the reply to
	// api.RequestShutdown has been sent. Nil: shutdown requests are refused.
	OnShutdown func()
	// OnReidentify applies a clone's new identity (hostname, network, RNG,
	// clock, machine-id); the server itself swaps the host key once it
	// returns nil. Nil: the request is refused.
	OnReidentify func(api.Reidentify) error
	// BeforeCommand, when set, is called before a session starts its
	// command (exec, shell, subsystem) and may block: the agent makes
	// commands wait for the files of a reidentify that it writes after
	// replying. An error refuses the command, with the error as the reason.
	BeforeCommand func() error
	// OpenSpool opens the spool device for a spool transfer (bulk
	// OpPutSpool, OpGetSpool), or returns nil when there is none (nor is
	// there with OpenSpool nil): the host then uses the channel.
	OpenSpool func() (*os.File, error)
	// SpoolPresent says, without opening it, whether there is a spool
	// device (nil: OpenSpool is tried at the first slot).
	SpoolPresent func() bool

	// KeepAlive is the interval of server-side keepalives; a client that
	// misses three is disconnected. Default 30s; negative disables.
	KeepAlive time.Duration
	// OutputGrace bounds how long a session waits, after its command exited,
	// for background processes that still hold its output open. Default 2s.
	OutputGrace time.Duration

	Logger *slog.Logger
}

// Server serves SSH connections.
type Server struct {
	cfg      Config
	allowed  map[string]bool
	sshCfg   atomic.Pointer[ssh.ServerConfig]
	log      *slog.Logger
	shutOnce sync.Once
	wg       sync.WaitGroup
}

// ParseAuthorizedKeys parses authorized_keys lines (options allowed but
// ignored), skipping comments and blank lines. A malformed line is an error
// naming it.
func ParseAuthorizedKeys(lines []string) ([]ssh.PublicKey, error) {
	var keys []ssh.PublicKey
	for i, l := range lines {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		k, _, _, _, err := ssh.ParseAuthorizedKey([]byte(l))
		if err != nil {
			return nil, fmt.Errorf("authorized key %d: %w", i+1, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// New checks cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.HostKey == nil {
		return nil, errors.New("ssh server: no host key")
	}
	if t := cfg.HostKey.PublicKey().Type(); !slices.Contains(api.SSHHostKeyAlgorithms, t) {
		return nil, fmt.Errorf("ssh server: host key type %s; banger's host keys are %v", t, api.SSHHostKeyAlgorithms)
	}
	if len(cfg.AuthorizedKeys) == 0 {
		return nil, errors.New("ssh server: no authorized keys; nobody could log in")
	}
	if cfg.PasswdFile == "" {
		cfg.PasswdFile = "/etc/passwd"
	}
	if cfg.GroupFile == "" {
		cfg.GroupFile = "/etc/group"
	}
	if cfg.ProcRoot == "" {
		cfg.ProcRoot = "/proc"
	}
	if cfg.RootPath == "" {
		cfg.RootPath = "/"
	}
	if cfg.SelfExe == "" {
		cfg.SelfExe = "/proc/self/exe"
	}
	if cfg.WorkspaceState == "" {
		cfg.WorkspaceState = "/var/lib/banger-agent/workspaces"
	}
	if cfg.DefaultUser == "" {
		cfg.DefaultUser = "root"
	}
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = 30 * time.Second
	}
	if cfg.OutputGrace <= 0 {
		cfg.OutputGrace = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{cfg: cfg, log: cfg.Logger, allowed: map[string]bool{}}
	for _, k := range cfg.AuthorizedKeys {
		s.allowed[string(k.Marshal())] = true
	}
	s.sshCfg.Store(s.serverConfig(cfg.HostKey))
	return s, nil
}

// serverConfig is the SSH configuration with host key hk (a fresh value:
// ssh.ServerConfig.AddHostKey would change a shared one in place).
func (s *Server) serverConfig(hk ssh.Signer) *ssh.ServerConfig {
	allowed := s.allowed
	c := &ssh.ServerConfig{
		Config: ssh.Config{
			KeyExchanges: api.SSHKeyExchanges,
			Ciphers:      api.SSHCiphers,
			MACs:         api.SSHMACs,
		},
		PublicKeyAuthAlgorithms: api.SSHPublicKeyAuthAlgorithms,
		ServerVersion:           "SSH-2.0-banger-agent",
		MaxAuthTries:            10,
		PublicKeyCallback: func(meta ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			if allowed[string(key.Marshal())] {
				return &ssh.Permissions{Extensions: map[string]string{"pubkey-fp": ssh.FingerprintSHA256(key)}}, nil
			}
			return nil, fmt.Errorf("public key %s is not authorized", ssh.FingerprintSHA256(key))
		},
	}
	c.AddHostKey(hk)
	return c
}

// Serve accepts connections from l until ctx is done or l fails, serving
// each in its own goroutine. It closes l when ctx is done.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var tempDelay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne interface{ Temporary() bool }
			if errors.As(err, &ne) && ne.Temporary() {
				// Back off briefly (as net/http does) rather than spin.
				if tempDelay == 0 {
					tempDelay = 5 * time.Millisecond
				} else if tempDelay *= 2; tempDelay > time.Second {
					tempDelay = time.Second
				}
				s.log.Warn("accept failed; retrying", "error", err, "delay", tempDelay)
				t := time.NewTimer(tempDelay)
				select {
				case <-ctx.Done():
					t.Stop()
					return ctx.Err()
				case <-t.C:
				}
				continue
			}
			return fmt.Errorf("accept ssh connection: %w", err)
		}
		tempDelay = 0
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.ServeConn(ctx, c)
		}()
	}
}

// handshakeTimeout bounds the SSH handshake of a new connection.
const handshakeTimeout = 30 * time.Second

// ServeConn serves one SSH connection until it ends or ctx is done.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) {
	defer c.Close()
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("ssh connection handler panicked", "panic", r)
		}
	}()
	_ = c.SetDeadline(time.Now().Add(handshakeTimeout))
	conn, chans, reqs, err := ssh.NewServerConn(c, s.sshCfg.Load())
	if err != nil {
		s.log.Info("ssh handshake failed", "remote", c.RemoteAddr().String(), "error", err)
		return
	}
	_ = c.SetDeadline(time.Time{})
	log := s.log.With("user", conn.User(), "remote", c.RemoteAddr().String())
	log.Debug("ssh connection opened", "key", conn.Permissions.Extensions["pubkey-fp"])
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(cctx, func() { conn.Close() })
	defer stop()
	if s.cfg.KeepAlive > 0 {
		go s.keepalive(cctx, conn, log)
	}
	go func() {
		defer s.recoverPanic(log, "global request handler", conn.Close)
		s.globalRequests(cctx, reqs, log)
	}()

	var wg sync.WaitGroup
	for nc := range chans {
		switch nc.ChannelType() {
		case "session":
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer s.recoverPanic(log, "session handler", nil)
				s.handleSession(cctx, conn, nc, log)
			}()
		case "direct-tcpip":
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer s.recoverPanic(log, "forwarding handler", nil)
				s.handleDirectTCPIP(cctx, nc, log)
			}()
		default:
			_ = nc.Reject(ssh.UnknownChannelType, "unsupported channel type "+nc.ChannelType())
		}
	}
	cancel()
	wg.Wait()
	log.Debug("ssh connection closed")
}

func (s *Server) keepalive(ctx context.Context, conn *ssh.ServerConn, log *slog.Logger) {
	t := time.NewTicker(s.cfg.KeepAlive)
	defer t.Stop()
	missed := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		done := make(chan error, 1)
		go func() {
			_, _, err := conn.SendRequest("keepalive@openssh.com", true, nil)
			done <- err
		}()
		select {
		case <-ctx.Done():
			return
		case err := <-done:
			if err != nil {
				return // connection gone
			}
			missed = 0
		case <-t.C:
			missed++
			if missed >= 3 {
				log.Info("ssh client stopped answering keepalives; closing connection")
				conn.Close()
				return
			}
		}
	}
}

// maxReplyPayload keeps a global reply within one SSH packet (32 KiB of
// payload is what every implementation must accept; x/crypto allows 256 KiB).
const maxReplyPayload = 200 << 10

func (s *Server) globalRequests(ctx context.Context, reqs <-chan *ssh.Request, log *slog.Logger) {
	for req := range reqs {
		ok, reply, after := s.control(req.Type, req.Payload, log)
		if req.WantReply {
			// Includes keepalive@openssh.com: a failure reply is what
			// OpenSSH's server sends and its client expects.
			_ = req.Reply(ok, reply)
		}
		if after != nil {
			after()
		}
	}
}

// control answers one of banger's control requests, whether it came as an
// SSH global request or on a bulk control stream (bulk.OpControl). after,
// when not nil, runs once the reply is sent.
func (s *Server) control(name string, payload []byte, log *slog.Logger) (ok bool, reply []byte, after func()) {
	switch name {
	case api.RequestPing:
		return true, nil, nil
	case api.RequestShutdown:
		if s.cfg.OnShutdown == nil {
			return false, []byte("shutdown is not available"), nil
		}
		return true, nil, func() {
			log.Info("shutdown requested by the host")
			s.shutOnce.Do(func() { go s.cfg.OnShutdown() })
		}
	case api.RequestPorts:
		ports, err := sysinfo.Ports(s.cfg.ProcRoot)
		if err != nil {
			log.Warn("list ports", "error", err)
			return false, []byte(err.Error()), nil
		}
		reply := api.PortsReply{Ports: ports}
		b, _ := json.Marshal(reply)
		for len(b) > maxReplyPayload && len(reply.Ports) > 0 {
			reply.Ports = reply.Ports[:len(reply.Ports)*3/4]
			reply.Truncated = true
			b, _ = json.Marshal(reply)
		}
		return true, b, nil
	case api.RequestReidentify:
		return s.reidentify(payload, log)
	case api.RequestStats:
		st, err := sysinfo.ReadStats(s.cfg.ProcRoot, s.cfg.RootPath)
		if err != nil {
			log.Warn("read stats", "error", err)
			return false, []byte(err.Error()), nil
		}
		b, _ := json.Marshal(st)
		return true, b, nil
	}
	return false, nil, nil
}

// reidentify applies a clone's new identity (Config.OnReidentify) and, once
// it is applied, serves new connections with the new host key.
func (s *Server) reidentify(payload []byte, log *slog.Logger) (bool, []byte, func()) {
	if s.cfg.OnReidentify == nil {
		return false, []byte("reidentify is not available"), nil
	}
	if len(payload) > api.MaxReidentify {
		return false, []byte("reidentify payload too large"), nil
	}
	var p api.Reidentify
	if err := json.Unmarshal(payload, &p); err != nil {
		return false, []byte("reidentify: bad payload: " + err.Error()), nil
	}
	var hk ssh.Signer
	if p.HostKey != "" { // empty: keep the host key (a renamed VM)
		var err error
		hk, err = ssh.ParsePrivateKey([]byte(p.HostKey))
		if err == nil && !slices.Contains(api.SSHHostKeyAlgorithms, hk.PublicKey().Type()) {
			err = fmt.Errorf("host key type %s", hk.PublicKey().Type())
		}
		if err != nil {
			return false, []byte("reidentify: host key: " + err.Error()), nil
		}
	}
	if err := s.cfg.OnReidentify(p); err != nil {
		log.Warn("reidentify failed", "error", err)
		return false, []byte(err.Error()), nil
	}
	if hk != nil {
		s.sshCfg.Store(s.serverConfig(hk))
	}
	// Logged after the reply, and a moment later (latelog): a console line
	// costs milliseconds in a clone just restored under emulation, and the
	// clone's first command waits on the same vCPU.
	return true, nil, func() {
		if hk != nil {
			latelog.Info(log, "host key replaced by the host", "host_key", ssh.FingerprintSHA256(hk.PublicKey()))
		}
		latelog.Info(log, "identity replaced by the host", "hostname", p.Hostname)
	}
}

// recoverPanic keeps a bug in one handler from taking the whole agent (and
// with it the host's only way in) down; cleanup runs after a panic.
func (s *Server) recoverPanic(log *slog.Logger, what string, cleanup func() error) {
	if r := recover(); r != nil {
		log.Error("internal error in the "+what+"; continuing", "panic", r, "stack", string(debug.Stack()))
		if cleanup != nil {
			_ = cleanup()
		}
	}
}

// Wait waits for the connections started by Serve to end.
func (s *Server) Wait() { s.wg.Wait() }

// userFor resolves the account a connection's user name maps to.
func (s *Server) userFor(name string) (account, error) {
	if name == "" {
		name = s.cfg.DefaultUser
	}
	acct, err := lookupAccount(s.cfg.PasswdFile, s.cfg.GroupFile, name)
	if err != nil {
		return account{}, fmt.Errorf("user %q: %w", name, err)
	}
	if self := uint32(os.Getuid()); acct.UID != self && self != 0 {
		return account{}, fmt.Errorf("cannot run commands as %q (uid %d): the agent runs as uid %d", name, acct.UID, self)
	}
	return acct, nil
}
