package firecracker

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/system"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmproc"
)

// instance is one running Firecracker.
type instance struct {
	*vmmproc.Proc
	d       *Driver
	h       vmm.Handles
	api     *client
	fcLog   string
	jailDir string
}

var _ vmm.Instance = (*instance)(nil)

func (d *Driver) newInstance(h vmm.Handles, proc *system.Process, adopted bool, jailDir, fcLog string, console *vmmproc.Console) *instance {
	in := &instance{d: d, h: h, api: newClient(h.APISocket), fcLog: fcLog, jailDir: jailDir}
	in.Proc = vmmproc.Watch(vmmproc.Config{
		Name: "firecracker", Handles: h, Proc: proc, Adopted: adopted, Log: d.log.With("vm", h.VMID, "pid", h.PID),
		Sockets:   []string{h.APISocket, h.Channel.Path},
		AfterExit: func() { d.removeJail(jailDir) },
		Status:    in.exitStatus,
		Console:   console,
	})
	return in
}

// Shutdown implements vmm.Instance: it sends Ctrl-Alt-Del, which the guest
// turns into a power-off; Firecracker then exits. It does not wait.
func (in *instance) Shutdown(ctx context.Context) error {
	if in.HasExited() {
		return nil
	}
	err := in.api.put(ctx, "/actions", "SendCtrlAltDel", apiAction{ActionType: "SendCtrlAltDel"})
	if err != nil && in.HasExited() {
		return nil
	}
	if err != nil {
		return fmt.Errorf("ask the guest to power off: %w", err)
	}
	return nil
}

// exitStatus phrases how Firecracker ended.
func (in *instance) exitStatus(e vmmproc.Exit) vmm.ExitStatus {
	code, sig, killed := e.Code, e.Signal, e.Killed
	st := vmm.ExitStatus{Code: code, Signal: sig, At: e.At}
	switch {
	case e.Adopted:
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
	if !killed && (e.Adopted || code != 0) {
		if why := in.lastWords(); why != "" {
			st.Reason += ": " + why
		}
	}
	return st
}

// lastWords is what Firecracker said last on stderr, else its last error
// lines in the log file.
func (in *instance) lastWords() string {
	lines := vmmproc.Tail(in.h.VMMLog, 3, nil)
	if len(lines) == 0 && in.fcLog != "" {
		lines = vmmproc.Tail(in.fcLog, 3, func(s string) bool { return strings.Contains(s, "Error") || strings.Contains(s, "ERROR") })
	}
	s := strings.Join(lines, " | ")
	if len(s) > 600 {
		s = s[len(s)-600:]
	}
	return s
}

// exitError describes an exit during start.
func (in *instance) exitError(when string) error {
	code, sig := in.Process().Exit()
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
	case <-in.Exited():
		return in.exitError("while being configured")
	case <-time.After(200 * time.Millisecond):
		// The connection may have failed because the process is dying; give it a moment.
		select {
		case <-in.Exited():
			return in.exitError("while being configured")
		default:
		}
	}
	return err
}

// State implements vmm.Instance.
func (in *instance) State(ctx context.Context) (vmm.State, error) {
	if in.HasExited() {
		return vmm.StateExited, nil
	}
	var info apiInstanceInfo
	if err := in.api.do(ctx, "GET", "/", "instance info", nil, &info); err != nil {
		if in.HasExited() {
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

// End ends the Firecracker h names if it is provably that VM's (the checks
// of Adopt, see vmmproc.End): SIGTERM, SIGKILL after grace. It is for a
// caller that holds no instance of it, such as a release retried from the
// VM's record; nil when no such process runs.
func (d *Driver) End(ctx context.Context, h vmm.Handles, grace time.Duration) error {
	if h.Driver != "" && h.Driver != DriverName {
		return fmt.Errorf("handles belong to the %q driver, not %q", h.Driver, DriverName)
	}
	return vmmproc.End(ctx, h, DriverName, d.adoptMatch(h), grace)
}

// adoptMatch is the command line check of Adopt and End: a Firecracker
// started by banger serving h's API socket; it returns its --id.
func (d *Driver) adoptMatch(h vmm.Handles) vmmproc.Match {
	return func(args []string) (string, error) {
		id, sock := flagValue(args, "--id"), flagValue(args, "--api-sock")
		if !instanceIDRe.MatchString(id) || sock == "" {
			return "", fmt.Errorf("not a firecracker started by banger (%q)", strings.Join(args, " "))
		}
		if d.opts.Jailer != nil {
			// The jailed firecracker names its socket inside the jail.
			sock = filepath.Join(d.jailDir(id), "root", sock)
		}
		if filepath.Clean(sock) != filepath.Clean(h.APISocket) {
			return "", fmt.Errorf("it serves %s, not %s", sock, h.APISocket)
		}
		return id, nil
	}
}

// Adopt implements vmm.Driver. The process must be alive with the recorded
// start time, and its command line must be a Firecracker serving the recorded
// API socket (directly, or inside this driver's jail for its --id); otherwise
// the error wraps vmm.ErrGone.
func (d *Driver) Adopt(ctx context.Context, h vmm.Handles) (vmm.Instance, error) {
	var id string
	match := d.adoptMatch(h)
	proc, err := vmmproc.AdoptProcess(h, DriverName, func(args []string) (vmID string, err error) {
		id, err = match(args)
		return id, err
	})
	if err != nil {
		return nil, err
	}
	jailDir := ""
	if d.opts.Jailer != nil {
		jailDir = d.jailDir(id)
	}
	fcLog := ""
	if h.VMMLog != "" {
		fcLog = filepath.Join(filepath.Dir(h.VMMLog), FCLogName)
	}
	// Console output written while no bangerd held the FIFO is lost.
	var con *vmmproc.Console
	if h.ConsoleLog != "" {
		f, err := vmmproc.OpenConsoleFIFO(filepath.Join(filepath.Dir(h.ConsoleLog), ConsoleFIFOName), false)
		if err == nil {
			con, err = vmmproc.StartConsole(f, h.ConsoleLog, d.opts.ConsoleMax, d.log)
		}
		if err != nil {
			d.log.WarnContext(ctx, "adopted firecracker: its console is not captured", "vm", id, "error", err)
		}
	}
	in := d.newInstance(h, proc, true, jailDir, fcLog, con)
	d.log.InfoContext(ctx, "adopted firecracker", "pid", h.PID, "vm", id)
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
