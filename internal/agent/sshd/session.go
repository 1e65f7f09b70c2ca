package sshd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"

	"github.com/creack/pty"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/api"
)

// Payloads of the standard session requests (RFC 4254 section 6).
type ptyRequestMsg struct {
	Term     string
	Columns  uint32
	Rows     uint32
	Width    uint32
	Height   uint32
	Modelist string
}

type windowChangeMsg struct {
	Columns uint32
	Rows    uint32
	Width   uint32
	Height  uint32
}

type envMsg struct {
	Name  string
	Value string
}

type execMsg struct {
	Command string
}

type subsystemMsg struct {
	Name string
}

type signalMsg struct {
	Signal string
}

type exitStatusMsg struct {
	Status uint32
}

type exitSignalMsg struct {
	Signal     string
	CoreDumped bool
	Error      string
	Lang       string
}

type workDirMsg struct {
	Dir string
}

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// session is one "session" channel.
type session struct {
	srv  *Server
	log  *slog.Logger
	ch   ssh.Channel
	user string

	mu      sync.Mutex
	env     []string
	pty     *ptyRequestMsg
	dir     string
	ptmx    *os.File
	pid     int // process group leader of the started command, 0 before
	started bool
	exited  bool
	// startErr is set when the command could not start; reported after the
	// request's reply.
	startErr error
	// gate is closed once the request that started the command has been
	// replied to: the exit status and channel close must come after it.
	gate     chan struct{}
	gateOpen bool
}

func (s *Server) handleSession(ctx context.Context, conn *ssh.ServerConn, nc ssh.NewChannel, log *slog.Logger) {
	ch, reqs, err := nc.Accept()
	if err != nil {
		log.Debug("accept session channel", "error", err)
		return
	}
	ss := &session{srv: s, log: log, ch: ch, user: conn.User(), gate: make(chan struct{})}
	for req := range reqs {
		ss.serve(ctx, req, req.WantReply, req.Reply)
	}
	// The client closed the channel (or the connection died). Hang up a
	// command that is still running, as a terminal would.
	ss.hangup()
	ch.Close()
}

// serve handles one request and replies to it when the client wants a reply.
func (ss *session) serve(ctx context.Context, req *ssh.Request, wantReply bool, reply func(bool, []byte) error) {
	log := ss.log
	ok, msg := ss.handle(ctx, req)
	if wantReply {
		var payload []byte
		if !ok && msg != "" {
			payload = []byte(msg)
		}
		_ = reply(ok, payload)
	}
	if !ok && msg != "" {
		log.Info("session request refused", "type", req.Type, "reason", msg)
	}
	ss.mu.Lock()
	if ss.started && !ss.gateOpen {
		ss.gateOpen = true
		close(ss.gate)
	}
	ss.mu.Unlock()
	// A command that could not start is reported after the reply, so
	// that the client sees the request accepted, then the error on
	// stderr and exit status 127.
	ss.mu.Lock()
	failed := ss.startErr
	ss.startErr = nil
	ss.mu.Unlock()
	if failed != nil {
		log.Info("command failed to start", "error", failed)
		nl := "\n"
		if ss.pty != nil {
			nl = "\r\n"
		}
		fmt.Fprintf(ss.ch.Stderr(), "banger-agent: %v%s", failed, nl)
		ss.finish(exitStatusMsg{Status: 127}, nil)
	}
}

func (ss *session) handle(ctx context.Context, req *ssh.Request) (bool, string) {
	switch req.Type {
	case "env":
		var m envMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil || !envName.MatchString(m.Name) {
			return false, "bad env request"
		}
		ss.mu.Lock()
		ss.env = append(ss.env, m.Name+"="+m.Value)
		ss.mu.Unlock()
		return true, ""
	case "pty-req":
		var m ptyRequestMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, "bad pty request"
		}
		ss.mu.Lock()
		defer ss.mu.Unlock()
		if ss.started {
			return false, "pty requested after the command started"
		}
		ss.pty = &m
		return true, ""
	case "window-change":
		var m windowChangeMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, "bad window-change request"
		}
		ss.mu.Lock()
		defer ss.mu.Unlock()
		if ss.pty != nil {
			ss.pty.Columns, ss.pty.Rows = m.Columns, m.Rows
		}
		if ss.ptmx != nil {
			_ = pty.Setsize(ss.ptmx, &pty.Winsize{Rows: clamp16(m.Rows), Cols: clamp16(m.Columns)})
		}
		return true, ""
	case api.RequestWorkDir:
		var m workDirMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil || m.Dir == "" {
			return false, "bad working directory request"
		}
		if fi, err := os.Stat(m.Dir); err != nil || !fi.IsDir() {
			return false, fmt.Sprintf("working directory %q does not exist in the guest", m.Dir)
		}
		ss.mu.Lock()
		ss.dir = m.Dir
		ss.mu.Unlock()
		return true, ""
	case "exec":
		var m execMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, "bad exec request"
		}
		if err := ss.begin(); err != nil {
			return refuse(err)
		}
		if err := ss.startShell(m.Command, false); err != nil {
			ss.mu.Lock()
			ss.startErr = err
			ss.mu.Unlock()
		}
		return true, ""
	case "shell":
		if err := ss.begin(); err != nil {
			return refuse(err)
		}
		if err := ss.startShell("", true); err != nil {
			ss.mu.Lock()
			ss.startErr = err
			ss.mu.Unlock()
		}
		return true, ""
	case "subsystem":
		var m subsystemMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, "bad subsystem request"
		}
		if m.Name != "sftp" {
			return false, fmt.Sprintf("unknown subsystem %q", m.Name)
		}
		if err := ss.begin(); err != nil {
			return refuse(err)
		}
		if err := ss.startSFTP(); err != nil {
			ss.mu.Lock()
			ss.startErr = err
			ss.mu.Unlock()
		}
		return true, ""
	case "signal":
		var m signalMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, "bad signal request"
		}
		sig, ok := signalByName[m.Signal]
		if !ok {
			return false, fmt.Sprintf("unknown signal %q", m.Signal)
		}
		ss.signal(sig)
		return true, ""
	default:
		// x11-req, auth-agent-req@openssh.com, break, ...
		return false, ""
	}
}

// errNotStarted is begin's error when BeforeCommand refused the command: the
// request is accepted and the reason reported as the command's failure.
var errNotStarted = errors.New("command not started")

// refuse answers a command request whose begin failed.
func refuse(err error) (bool, string) {
	if errors.Is(err, errNotStarted) {
		return true, ""
	}
	return false, err.Error()
}

// begin marks the session started; a session runs one command only.
func (ss *session) begin() error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.started {
		return errors.New("a command already ran on this session")
	}
	ss.started = true
	if f := ss.srv.cfg.BeforeCommand; f != nil {
		ss.mu.Unlock()
		err := f()
		ss.mu.Lock()
		if err != nil {
			// reported like a command that could not start: on stderr,
			// exit status 127, which any client shows
			ss.startErr = err
			return errNotStarted
		}
	}
	return nil
}

// environment builds the command's environment: defaults, the image's Env,
// TERM from the pty request, then the client's env requests.
func (ss *session) environment(acct account, shell string) []string {
	env := []string{
		"HOME=" + acct.Home,
		"USER=" + acct.Name,
		"LOGNAME=" + acct.Name,
		"SHELL=" + shell,
		"PATH=" + DefaultPath,
	}
	env = append(env, ss.srv.cfg.Env...)
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.pty != nil && ss.pty.Term != "" {
		env = append(env, "TERM="+ss.pty.Term)
	}
	env = append(env, ss.env...)
	return dedupEnv(env)
}

// dedupEnv keeps the last value of every variable, in first-seen order.
func dedupEnv(env []string) []string {
	idx := make(map[string]int, len(env))
	out := make([]string, 0, len(env))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// workDir is where the command starts: the session's requested directory,
// else the image's WorkDir, else the user's home, else /.
func (ss *session) workDir(acct account) string {
	ss.mu.Lock()
	dir := ss.dir
	ss.mu.Unlock()
	if dir != "" {
		return dir
	}
	if d := ss.srv.cfg.WorkDir; d != "" && isDir(d) {
		return d
	}
	if acct.Home != "" && isDir(acct.Home) {
		return acct.Home
	}
	return "/"
}

// loginShell returns the account's shell when it is executable in the
// guest, else /bin/sh.
func loginShell(acct account) string {
	if acct.Shell != "" {
		if fi, err := os.Stat(acct.Shell); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return acct.Shell
		}
	}
	return "/bin/sh"
}

func (ss *session) credential(acct account) *syscall.Credential {
	if acct.UID == uint32(os.Getuid()) && acct.GID == uint32(os.Getgid()) {
		return nil
	}
	return &syscall.Credential{Uid: acct.UID, Gid: acct.GID, Groups: acct.Groups}
}

// startShell runs command with the user's shell (-c), or the login shell
// itself when login is set.
func (ss *session) startShell(command string, login bool) error {
	acct, err := ss.srv.userFor(ss.user)
	if err != nil {
		return err
	}
	shell := loginShell(acct)
	if _, err := os.Stat(shell); err != nil {
		return fmt.Errorf("no shell in the guest image (%s): %w", shell, err)
	}
	cmd := &exec.Cmd{Path: shell}
	if login {
		cmd.Args = []string{"-" + filepath.Base(shell)}
	} else {
		cmd.Args = []string{filepath.Base(shell), "-c", command}
	}
	cmd.Env = ss.environment(acct, shell)
	cmd.Dir = ss.workDir(acct)
	ss.mu.Lock()
	withPty := ss.pty != nil
	ss.mu.Unlock()
	if withPty {
		return ss.runPty(cmd, acct)
	}
	return ss.runPipes(cmd, acct)
}

// runPipes starts cmd with stdin, stdout and stderr on the channel.
func (ss *session) runPipes(cmd *exec.Cmd, acct account) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: ss.credential(acct)}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	growPipe(stdin)
	cmd.Stdout = ss.ch
	cmd.Stderr = ss.ch.Stderr()
	cmd.WaitDelay = ss.srv.cfg.OutputGrace
	if err := ss.startTracked(cmd); err != nil {
		stdin.Close()
		return err
	}
	go func() {
		_, _ = io.Copy(stdin, ss.ch)
		stdin.Close()
	}()
	go func() {
		err := cmd.Wait()
		ss.srv.cfg.Reaper.Forget(cmd.Process.Pid)
		if errors.Is(err, exec.ErrWaitDelay) {
			ss.log.Debug("command exited but its output stayed open; closed it", "pid", cmd.Process.Pid)
		}
		ss.exit(cmd.ProcessState)
	}()
	return nil
}

// runPty starts cmd on a new pseudo-terminal as its controlling terminal.
func (ss *session) runPty(cmd *exec.Cmd, acct account) error {
	ptmx, tty, err := pty.Open()
	if err != nil {
		return fmt.Errorf("allocate a pty: %w (is /dev/pts mounted?)", err)
	}
	if cred := ss.credential(acct); cred != nil {
		_ = tty.Chown(int(acct.UID), -1)
	}
	ss.mu.Lock()
	req := *ss.pty
	ss.mu.Unlock()
	_ = pty.Setsize(ptmx, &pty.Winsize{Rows: clamp16(req.Rows), Cols: clamp16(req.Columns)})
	cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0, Credential: ss.credential(acct)}
	err = ss.startTracked(cmd)
	tty.Close()
	if err != nil {
		ptmx.Close()
		return err
	}
	ss.mu.Lock()
	ss.ptmx = ptmx
	ss.mu.Unlock()
	go func() { _, _ = io.Copy(ptmx, ss.ch) }()
	outDone := make(chan struct{})
	go func() {
		_, _ = io.Copy(ss.ch, ptmx)
		close(outDone)
	}()
	go func() {
		_ = cmd.Wait()
		ss.srv.cfg.Reaper.Forget(cmd.Process.Pid)
		// Drain what the command wrote last; background processes that keep
		// the terminal open get OutputGrace.
		waitOrTimeout(outDone, ss.srv.cfg.OutputGrace)
		ss.mu.Lock()
		ss.ptmx = nil
		ss.mu.Unlock()
		ptmx.Close()
		<-outDone
		ss.exit(cmd.ProcessState)
	}()
	return nil
}

func (ss *session) startTracked(cmd *exec.Cmd) error {
	err := ss.srv.cfg.Reaper.Start(func() (int, error) {
		if err := cmd.Start(); err != nil {
			return 0, err
		}
		return cmd.Process.Pid, nil
	})
	if err != nil {
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	ss.mu.Lock()
	ss.pid = cmd.Process.Pid
	ss.mu.Unlock()
	ss.log.Debug("command started", "pid", cmd.Process.Pid, "args", cmd.Args)
	return nil
}

// startSFTP serves the sftp subsystem: in this process when the session's
// user is the agent's own, else in a child running as that user.
func (ss *session) startSFTP() error {
	acct, err := ss.srv.userFor(ss.user)
	if err != nil {
		return err
	}
	// Relative sftp paths start from home (as with OpenSSH), or from the
	// directory the client asked for.
	ss.mu.Lock()
	dir := ss.dir
	ss.mu.Unlock()
	if dir == "" {
		dir = "/"
		if acct.Home != "" && isDir(acct.Home) {
			dir = acct.Home
		}
	}
	// Always a child process, started in dir: pkg/sftp's in-process
	// working-directory option also rewrites relative symlink targets into
	// absolute ones, which breaks copied trees.
	cmd := exec.Command(ss.srv.cfg.SelfExe, SFTPServerArg)
	cmd.Dir = dir
	cmd.Env = ss.environment(acct, loginShell(acct))
	return ss.runPipes(cmd, acct)
}

// exit reports how the command ended and closes the channel.
func (ss *session) exit(ps *os.ProcessState) {
	if ps == nil {
		ss.finish(exitStatusMsg{Status: 255}, nil)
		return
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		name, ok := signalNames[ws.Signal()]
		if !ok {
			name = fmt.Sprintf("SIG%d", int(ws.Signal()))
		}
		ss.finish(exitStatusMsg{}, &exitSignalMsg{Signal: name, CoreDumped: ws.CoreDump(), Error: ws.Signal().String()})
		return
	}
	ss.finish(exitStatusMsg{Status: uint32(ps.ExitCode())}, nil)
}

func (ss *session) finish(st exitStatusMsg, sig *exitSignalMsg) {
	<-ss.gate
	ss.mu.Lock()
	ss.exited = true
	ss.mu.Unlock()
	_ = ss.ch.CloseWrite()
	if sig != nil {
		_, _ = ss.ch.SendRequest("exit-signal", false, ssh.Marshal(sig))
	} else {
		_, _ = ss.ch.SendRequest("exit-status", false, ssh.Marshal(&st))
	}
	_ = ss.ch.Close()
}

// signal delivers sig to the command's process group.
func (ss *session) signal(sig syscall.Signal) {
	ss.mu.Lock()
	pid, exited := ss.pid, ss.exited
	ss.mu.Unlock()
	if pid <= 0 || exited {
		return
	}
	if err := syscall.Kill(-pid, sig); err != nil {
		_ = syscall.Kill(pid, sig)
	}
}

// hangup sends SIGHUP to a command still running when its channel closed.
func (ss *session) hangup() {
	ss.signal(syscall.SIGHUP)
}

func clamp16(v uint32) uint16 {
	if v > 0xffff {
		return 0xffff
	}
	return uint16(v)
}

// stdinPipeSize is the stdin pipe's capacity: a bulk stream writes frames
// of 256 KiB, and a pipe of the default 64 KiB would switch between the
// agent and the command four times a frame (every switch is dear in an
// emulated guest).
const stdinPipeSize = 1 << 20

// growPipe asks for a stdinPipeSize pipe; the kernel may give less (an
// unprivileged user is held to /proc/sys/fs/pipe-max-size), which is fine.
func growPipe(w io.Writer) {
	sc, ok := w.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, stdinPipeSize)
	})
}
