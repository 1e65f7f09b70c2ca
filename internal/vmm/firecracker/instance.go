package firecracker

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
)

// instance is one running Firecracker.
type instance struct {
	d       *Driver
	h       vmm.Handles
	proc    *system.Process
	api     *client
	adopted bool
	jailDir string
	fcLog   string

	exited chan struct{} // closed after the process exited and its leftovers are gone
	exitAt time.Time

	mu     sync.Mutex
	killed bool
}

var _ vmm.Instance = (*instance)(nil)

func (d *Driver) newInstance(h vmm.Handles, proc *system.Process, adopted bool, jailDir, fcLog string) *instance {
	in := &instance{
		d:       d,
		h:       h,
		proc:    proc,
		api:     newClient(h.APISocket),
		adopted: adopted,
		jailDir: jailDir,
		fcLog:   fcLog,
		exited:  make(chan struct{}),
	}
	go in.watch()
	return in
}

// watch records the exit and removes what the dead VMM leaves behind (its
// sockets, the jail), before announcing the exit, so that a new start in the
// same directory never races with this cleanup.
func (in *instance) watch() {
	<-in.proc.Done()
	in.mu.Lock()
	in.exitAt = time.Now()
	in.mu.Unlock()
	for _, p := range []string{in.h.APISocket, in.h.Channel.Path} {
		if p != "" {
			if err := removeStaleSocket(p); err != nil {
				in.d.log.Debug("leftover firecracker socket", "path", p, "err", err)
			}
		}
	}
	in.d.removeJail(in.jailDir)
	close(in.exited)
}

// Handles implements vmm.Instance.
func (in *instance) Handles() vmm.Handles { return in.h }

// Exited implements vmm.Instance.
func (in *instance) Exited() <-chan struct{} { return in.exited }

func (in *instance) hasExited() bool {
	select {
	case <-in.exited:
		return true
	default:
		return false
	}
}

// Shutdown implements vmm.Instance: it sends Ctrl-Alt-Del, which the guest
// turns into a power-off; Firecracker then exits. It does not wait.
func (in *instance) Shutdown(ctx context.Context) error {
	if in.hasExited() {
		return nil
	}
	err := in.api.put(ctx, "/actions", "SendCtrlAltDel", apiAction{ActionType: "SendCtrlAltDel"})
	if err != nil && in.hasExited() {
		return nil
	}
	if err != nil {
		return fmt.Errorf("ask the guest to power off: %w", err)
	}
	return nil
}

// Kill implements vmm.Instance: SIGKILL, then wait (bounded) for the exit.
func (in *instance) Kill(ctx context.Context) error {
	if in.hasExited() {
		return nil
	}
	in.mu.Lock()
	in.killed = true
	in.mu.Unlock()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	if err := in.proc.KillAndWait(ctx); err != nil {
		return fmt.Errorf("kill firecracker (pid %d): %w", in.h.PID, err)
	}
	select {
	case <-in.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("firecracker (pid %d) exited but its cleanup did not finish: %w", in.h.PID, ctx.Err())
	}
}

// Wait implements vmm.Instance.
func (in *instance) Wait(ctx context.Context) (vmm.ExitStatus, error) {
	select {
	case <-in.exited:
	case <-ctx.Done():
		return vmm.ExitStatus{}, ctx.Err()
	}
	code, sig := in.proc.Exit()
	in.mu.Lock()
	st := vmm.ExitStatus{Code: code, Signal: sig, At: in.exitAt}
	killed := in.killed
	in.mu.Unlock()
	switch {
	case in.adopted:
		st.Code = -1
		st.Reason = "firecracker exited (its exit status is unknown: the process was adopted after a bangerd restart)"
		if killed {
			st.Reason = "firecracker was killed by banger"
		}
	case sig != "":
		st.Code = -1
		if killed {
			st.Reason = "firecracker was killed by banger"
		} else {
			st.Reason = "firecracker was killed by signal: " + sig
		}
	case code == 0:
		st.Reason = "the guest powered off"
	default:
		st.Reason = fmt.Sprintf("firecracker exited with status %d", code)
	}
	if !killed && (in.adopted || code != 0) {
		if why := in.lastWords(); why != "" {
			st.Reason += ": " + why
		}
	}
	return st, nil
}

// lastWords is what Firecracker said last on stderr, else its last error
// lines in the log file.
func (in *instance) lastWords() string {
	lines := tail(in.h.VMMLog, 3, nil)
	if len(lines) == 0 && in.fcLog != "" {
		lines = tail(in.fcLog, 3, func(s string) bool { return strings.Contains(s, "Error") || strings.Contains(s, "ERROR") })
	}
	s := strings.Join(lines, " | ")
	if len(s) > 600 {
		s = s[len(s)-600:]
	}
	return s
}

// exitError describes an exit during start.
func (in *instance) exitError(when string) error {
	code, sig := in.proc.Exit()
	how := fmt.Sprintf("status %d", code)
	if sig != "" {
		how = "signal " + sig
	}
	msg := fmt.Sprintf("firecracker exited %s (%s)", when, how)
	if why := in.lastWords(); why != "" {
		msg += ": " + why
	}
	return fmt.Errorf("%s (see %s)", msg, in.h.VMMLog)
}

// explain turns an API failure into the user's error: a refusal keeps
// Firecracker's fault_message; a transport error after the process died says so.
func (in *instance) explain(err error) error {
	if isAPIError(err) {
		return err
	}
	select {
	case <-in.exited:
		return in.exitError("while being configured")
	case <-time.After(200 * time.Millisecond):
		// The connection may have failed because the process is dying; give it a moment.
		select {
		case <-in.exited:
			return in.exitError("while being configured")
		default:
		}
	}
	return err
}

// State implements vmm.Instance.
func (in *instance) State(ctx context.Context) (vmm.State, error) {
	if in.hasExited() {
		return vmm.StateExited, nil
	}
	var info apiInstanceInfo
	if err := in.api.do(ctx, "GET", "/", "instance info", nil, &info); err != nil {
		if in.hasExited() {
			return vmm.StateExited, nil
		}
		return vmm.StateUnknown, err
	}
	switch info.State {
	case "Running":
		return vmm.StateRunning, nil
	case "Paused":
		return vmm.StatePaused, nil
	}
	return vmm.StateUnknown, nil
}

// Adopt implements vmm.Driver. The process must be alive with the recorded
// start time, and its command line must be a Firecracker serving the recorded
// API socket (directly, or inside this driver's jail for its --id); otherwise
// the error wraps vmm.ErrGone.
func (d *Driver) Adopt(ctx context.Context, h vmm.Handles) (vmm.Instance, error) {
	if h.Driver != "" && h.Driver != DriverName {
		return nil, fmt.Errorf("handles belong to the %q driver, not %q", h.Driver, DriverName)
	}
	if h.PID <= 0 || h.APISocket == "" {
		return nil, fmt.Errorf("%w: handles name no process or API socket", vmm.ErrGone)
	}
	if !system.SameProcess(h.PID, h.StartTime) {
		return nil, fmt.Errorf("%w: pid %d is not running (or was reused)", vmm.ErrGone, h.PID)
	}
	args, err := system.ProcessCmdline(h.PID)
	if err != nil {
		return nil, fmt.Errorf("%w: read command line of pid %d: %v", vmm.ErrGone, h.PID, err)
	}
	id, sock := flagValue(args, "--id"), flagValue(args, "--api-sock")
	if !instanceIDRe.MatchString(id) || sock == "" {
		return nil, fmt.Errorf("%w: pid %d is not a firecracker started by banger (%q)", vmm.ErrGone, h.PID, strings.Join(args, " "))
	}
	if h.VMID != "" && id != h.VMID {
		return nil, fmt.Errorf("%w: pid %d runs VM %s, not %s", vmm.ErrGone, h.PID, id, h.VMID)
	}
	jailDir := ""
	if d.opts.Jailer != nil {
		// The jailed firecracker names its socket inside the jail.
		jailDir = d.jailDir(id)
		sock = filepath.Join(jailDir, "root", sock)
	}
	if filepath.Clean(sock) != filepath.Clean(h.APISocket) {
		return nil, fmt.Errorf("%w: pid %d serves %s, not %s", vmm.ErrGone, h.PID, sock, h.APISocket)
	}
	proc, err := system.Adopt(h.PID, h.StartTime)
	if err != nil {
		if errors.Is(err, system.ErrNotSameProcess) {
			return nil, fmt.Errorf("%w: %v", vmm.ErrGone, err)
		}
		return nil, err
	}
	fcLog := ""
	if h.VMMLog != "" {
		fcLog = filepath.Join(filepath.Dir(h.VMMLog), FCLogName)
	}
	in := d.newInstance(h, proc, true, jailDir, fcLog)
	d.log.Info("adopted firecracker", "pid", h.PID, "vm", id)
	return in, nil
}

// flagValue finds "--name value" or "--name=value" in args.
func flagValue(args []string, name string) string {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}
