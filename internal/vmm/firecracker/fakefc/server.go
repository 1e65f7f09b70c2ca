// Package fakefc is a fake Firecracker: it serves the Firecracker API on a
// unix socket, checks every request against the pinned firecracker.yaml
// (fcspec) and against the order rules Firecracker's documentation states, and
// "boots" a pretend guest: a console line on stdout, a hybrid-vsock unix
// socket that answers CONNECT, power-off on SendCtrlAltDel.
//
// It exists to test banger's Firecracker driver on machines where no
// firecracker binary can run. Every request is appended to a record file
// (FAKEFC_RECORD) with a verdict; a driver that deviates from the spec shows up
// as a "violation" there and as a 400 with a fault_message on the wire, like
// Firecracker itself answers.
//
// The program lives in ./cmd/fakefirecracker; the fakefctest package builds it
// for tests. Its environment:
//
//	FAKEFC_SPEC            path of firecracker.yaml (required)
//	FAKEFC_RECORD          JSON-lines record of every request (optional)
//	FAKEFC_FAIL            failure injection, ";"-separated (see ParseFailures)
//	FAKEFC_VSOCK_FORWARD   unix socket to forward accepted vsock streams to (default: echo)
//	FAKEFC_VSOCK_PORTS     comma-separated guest ports that accept (default: all)
//	FAKEFC_POWEROFF_DELAY  delay between SendCtrlAltDel and exit 0 (default 100ms)
//	FAKEFC_MAX_LIFETIME    the fake exits 3 after this long, whatever happens (default 10m)
//	FAKEFC_ROOT            simulated chroot (set by the fake jailer)
package fakefc

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fcspec"
)

// Version is the Firecracker version the fake pretends to be.
const Version = "1.16.1"

// MaxUnixPath is the longest unix socket path Linux accepts (sun_path less the NUL).
const MaxUnixPath = paths.MaxSocketPath

// Failure is one injected failure.
type Failure struct {
	// Target selects requests: an API path without its leading slash
	// ("boot-source", "drives/rootfs"), its first segment ("drives": every
	// drive), or an action type ("InstanceStart", "SendCtrlAltDel"); or one of
	// the behaviours "crash-after-start", "exit-at-launch", "no-api-socket",
	// "ignore-ctrl-alt-del".
	Target  string
	Message string
}

// Behaviours selectable in FAKEFC_FAIL.
const (
	FailCrashAfterStart  = "crash-after-start"   // exit 1 shortly after InstanceStart succeeded
	FailExitAtLaunch     = "exit-at-launch"      // print Message on stderr and exit 1 before serving
	FailNoAPISocket      = "no-api-socket"       // never create the API socket
	FailIgnoreCtrlAltDel = "ignore-ctrl-alt-del" // accept SendCtrlAltDel, never power off
)

// ParseFailures parses FAKEFC_FAIL: entries separated by ";", each
// "target" or "target:message", e.g.
// "boot-source:Invalid kernel image;crash-after-start".
func ParseFailures(s string) []Failure {
	var out []Failure
	for _, e := range strings.Split(s, ";") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		t, m, _ := strings.Cut(e, ":")
		out = append(out, Failure{Target: strings.TrimSpace(t), Message: m})
	}
	return out
}

// Options configure a Server.
type Options struct {
	Spec       *fcspec.Spec
	ID         string
	Root       string // simulated chroot: absolute paths in requests resolve under it
	RecordPath string
	Failures   []Failure
	Console    io.Writer // the guest's serial console (firecracker's stdout)
	Stderr     io.Writer

	PowerOffDelay time.Duration
	CrashDelay    time.Duration
	VsockForward  string // unix socket to forward vsock streams to; "" echoes
	// VsockPreamble makes each forwarded stream start with the line
	// "FAKEFC bootcfg=<path of the drive with id bootcfg>\n", so that one
	// pretend guest behind VsockForward can serve many VMs.
	VsockPreamble bool
	VsockPorts    []uint32 // ports the pretend guest listens on; nil = all
	ConsoleSpew   int64    // bytes of console output the guest writes once running
}

type drive struct {
	ID       string
	Path     string
	ReadOnly bool
	Root     bool
}

// Server is one fake Firecracker instance.
type Server struct {
	opts Options
	rec  *recorder

	mu        sync.Mutex
	started   bool
	paused    bool
	logger    map[string]any
	logFile   string
	metrics   string
	machine   map[string]any
	boot      map[string]any
	drives    map[string]drive
	netIfs    map[string]map[string]any
	vsock     map[string]any
	vsockPath string
	other     bool // something else than logger/metrics configured
	vsockLn   net.Listener
	hostPort  uint32
	exitOnce  sync.Once
	exit      chan int
	closed    chan struct{}
	closeOnce sync.Once
}

// NewServer makes a Server; it serves nothing until Handler is mounted.
func NewServer(opts Options) (*Server, error) {
	if opts.Spec == nil {
		return nil, errors.New("fakefc: no spec")
	}
	if opts.Console == nil {
		opts.Console = io.Discard
	}
	if opts.Stderr == nil {
		opts.Stderr = io.Discard
	}
	if opts.PowerOffDelay <= 0 {
		opts.PowerOffDelay = 100 * time.Millisecond
	}
	if opts.CrashDelay <= 0 {
		opts.CrashDelay = 200 * time.Millisecond
	}
	rec, err := openRecorder(opts.RecordPath, opts.ID)
	if err != nil {
		return nil, err
	}
	return &Server{
		opts:     opts,
		rec:      rec,
		drives:   map[string]drive{},
		netIfs:   map[string]map[string]any{},
		hostPort: 1 << 30,
		exit:     make(chan int, 1),
		closed:   make(chan struct{}),
	}, nil
}

// Exit yields the exit code once the pretend machine wants the process to end
// (guest power-off, simulated crash).
func (s *Server) Exit() <-chan int { return s.exit }

// Close stops the vsock listener and closes the record file.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		close(s.closed)
		s.mu.Lock()
		if s.vsockLn != nil {
			s.vsockLn.Close()
		}
		s.mu.Unlock()
		s.rec.close()
	})
}

func (s *Server) requestExit(code int, after time.Duration) {
	go func() {
		select {
		case <-time.After(after):
		case <-s.closed:
			return
		}
		s.exitOnce.Do(func() { s.exit <- code })
	}()
}

func (s *Server) failure(target string) (Failure, bool) {
	for _, f := range s.opts.Failures {
		if f.Target == target {
			return f, true
		}
	}
	return Failure{}, false
}

// Failing reports whether a behaviour (e.g. FailCrashAfterStart) is injected.
func (s *Server) Failing(behaviour string) bool {
	_, ok := s.failure(behaviour)
	return ok
}

// resolve maps a path given in a request to the host path the fake opens,
// honouring the simulated chroot.
func (s *Server) resolve(p string) string {
	if s.opts.Root == "" {
		return p
	}
	return filepath.Join(s.opts.Root, filepath.Clean("/"+p))
}

// fault is a refusal with the verdict it gets in the record.
type fault struct {
	verdict string
	msg     string
}

func violation(format string, args ...any) *fault {
	return &fault{verdict: VerdictViolation, msg: fmt.Sprintf(format, args...)}
}

// Handler serves the Firecracker API.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(s.serveHTTP)
}

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, fcspec.MaxBody+1))
	if err != nil {
		writeFault(w, "reading request body: "+err.Error())
		return
	}
	rec := Record{Kind: KindAPI, Method: r.Method, Path: r.URL.RequestURI()}
	if len(body) > 0 {
		if json.Valid(body) {
			rec.Body = append(json.RawMessage(nil), body...)
		} else {
			rec.RawBody = string(body)
		}
	}
	status, resp, f := s.handle(r.Method, r.URL.Path, body)
	if f != nil {
		rec.Status = http.StatusBadRequest
		rec.Verdict = f.verdict
		rec.Fault = f.msg
		s.rec.add(rec)
		if f.verdict == VerdictViolation {
			fmt.Fprintf(s.opts.Stderr, "fakefc: spec violation: %s %s: %s\n", r.Method, r.URL.Path, f.msg)
		}
		writeFault(w, f.msg)
		return
	}
	rec.Status = status
	rec.Verdict = VerdictOK
	s.rec.add(rec)
	if resp == nil {
		w.WriteHeader(status)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(resp)
}

func writeFault(w http.ResponseWriter, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusBadRequest)
	_ = json.NewEncoder(w).Encode(map[string]string{"fault_message": msg})
}

func (s *Server) handle(method, path string, body []byte) (int, any, *fault) {
	op, params, probs := s.opts.Spec.CheckRequest(method, path, body)
	if len(probs) > 0 {
		msgs := make([]string, len(probs))
		for i, p := range probs {
			msgs[i] = p.String()
		}
		return 0, nil, violation("Invalid request: %s", strings.Join(msgs, "; "))
	}
	var obj map[string]any
	if len(strings.TrimSpace(string(body))) > 0 {
		_ = json.Unmarshal(body, &obj) // shape already checked
	}
	// A path parameter repeated in the body must agree with it.
	for name, val := range params {
		if bv, ok := obj[name]; ok && bv != val {
			return 0, nil, violation("The id from the path does not match the id from the body: %s %q in the path, %v in the body", name, val, bv)
		}
	}
	// Injected failures.
	target := strings.TrimPrefix(path, "/")
	first, _, _ := strings.Cut(target, "/")
	action, _ := obj["action_type"].(string)
	for _, t := range []string{target, first, action} {
		if t == "" {
			continue
		}
		if f, ok := s.failure(t); ok && !isBehaviour(t) {
			return 0, nil, &fault{verdict: VerdictInjected, msg: f.Message}
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if op.PreBootOnly() && s.started {
		return 0, nil, violation("The requested operation is not supported after starting the microVM: %s %s is pre-boot only", op.Method, op.Template)
	}
	if op.PostBootOnly() && !s.started {
		return 0, nil, violation("The requested operation is not supported before starting the microVM: %s %s is post-boot only", op.Method, op.Template)
	}
	key := op.Method + " " + op.Template
	switch key {
	case "GET /":
		return s.instanceInfo()
	case "GET /version":
		return http.StatusOK, map[string]any{"firecracker_version": Version}, nil
	case "GET /machine-config":
		if s.machine == nil {
			return http.StatusOK, map[string]any{"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false}, nil
		}
		return http.StatusOK, s.machine, nil
	case "GET /vm/config":
		return s.vmConfig()
	case "PUT /logger":
		return s.putLogger(obj)
	case "PUT /metrics":
		return s.putMetrics(obj)
	case "PUT /machine-config", "PATCH /machine-config":
		return s.putMachine(op.Method, obj)
	case "PUT /boot-source":
		return s.putBoot(obj)
	case "PUT /drives/{drive_id}":
		return s.putDrive(obj)
	case "PUT /network-interfaces/{iface_id}":
		return s.putNet(obj)
	case "PUT /vsock":
		return s.putVsock(obj)
	case "PUT /actions":
		return s.action(action)
	case "PATCH /vm":
		return s.vmState(obj)
	case "PUT /snapshot/create":
		return s.createSnapshot(obj)
	case "PUT /snapshot/load":
		return s.loadSnapshot(obj)
	}
	if op.Method == "GET" {
		return 0, nil, &fault{verdict: VerdictUnsimulated, msg: "fakefc: " + key + " is not simulated"}
	}
	// A valid configuration request the fake does not model further.
	if !s.started {
		s.other = true
	}
	return http.StatusNoContent, nil, nil
}

func isBehaviour(t string) bool {
	switch t {
	case FailCrashAfterStart, FailExitAtLaunch, FailNoAPISocket, FailIgnoreCtrlAltDel:
		return true
	}
	return false
}

func (s *Server) instanceInfo() (int, any, *fault) {
	state := "Not started"
	if s.started {
		state = "Running"
		if s.paused {
			state = "Paused"
		}
	}
	info := map[string]any{"app_name": "Firecracker", "id": s.opts.ID, "state": state, "vmm_version": Version}
	return http.StatusOK, s.selfCheck("InstanceInfo", info), nil
}

func (s *Server) vmConfig() (int, any, *fault) {
	cfg := map[string]any{}
	if s.boot != nil {
		cfg["boot-source"] = s.boot
	}
	if s.machine != nil {
		cfg["machine-config"] = s.machine
	}
	if s.logger != nil {
		cfg["logger"] = s.logger
	}
	if s.metrics != "" {
		cfg["metrics"] = map[string]any{"metrics_path": s.metrics}
	}
	if s.vsock != nil {
		cfg["vsock"] = s.vsock
	}
	ids := make([]string, 0, len(s.drives))
	for id := range s.drives {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var drives []any
	for _, id := range ids {
		d := s.drives[id]
		drives = append(drives, map[string]any{"drive_id": d.ID, "path_on_host": d.Path, "is_read_only": d.ReadOnly, "is_root_device": d.Root})
	}
	if drives != nil {
		cfg["drives"] = drives
	}
	var nets []any
	for _, n := range s.netIfs {
		nets = append(nets, n)
	}
	if nets != nil {
		cfg["network-interfaces"] = nets
	}
	return http.StatusOK, s.selfCheck("FullVmConfiguration", cfg), nil
}

// selfCheck validates the fake's own responses against the spec, so the fake
// cannot teach a driver something Firecracker would never say.
func (s *Server) selfCheck(def string, v any) any {
	b, _ := json.Marshal(v)
	if probs := s.opts.Spec.CheckDefinition(def, b); len(probs) > 0 {
		fmt.Fprintf(s.opts.Stderr, "fakefc: BUG: response does not match %s: %v\n", def, probs)
		s.rec.add(Record{Kind: KindEvent, Verdict: VerdictViolation, Fault: fmt.Sprintf("fake response does not match %s: %v", def, probs)})
	}
	return v
}

func str(obj map[string]any, k string) string {
	v, _ := obj[k].(string)
	return v
}

func num(obj map[string]any, k string) (int64, bool) {
	switch v := obj[k].(type) {
	case float64:
		return int64(v), true
	}
	return 0, false
}

// existingFile checks that a file named in a request exists (Firecracker opens
// it when the request arrives) and, for writable use, that it can be written.
func (s *Server) existingFile(field, p string, write bool) *fault {
	if p == "" {
		return violation("%s is empty", field)
	}
	hp := s.resolve(p)
	flag := os.O_RDONLY
	if write {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(hp, flag|syscall.O_NONBLOCK, 0)
	if err != nil {
		return violation("Cannot open %s %q: %v", field, p, err)
	}
	defer f.Close()
	return nil
}

func (s *Server) putLogger(obj map[string]any) (int, any, *fault) {
	if s.logger != nil {
		return 0, nil, violation("Logger can only be configured once")
	}
	if p := str(obj, "log_path"); p != "" {
		// Firecracker opens the log file without creating it: it must exist.
		if f := s.existingFile("log_path", p, true); f != nil {
			return 0, nil, f
		}
		s.logFile = s.resolve(p)
	}
	s.logger = obj
	s.log("Info", "API server started; logger configured")
	return http.StatusNoContent, nil, nil
}

func (s *Server) putMetrics(obj map[string]any) (int, any, *fault) {
	if s.metrics != "" {
		return 0, nil, violation("Reinitialization of metrics not allowed.")
	}
	p := str(obj, "metrics_path")
	if f := s.existingFile("metrics_path", p, true); f != nil {
		return 0, nil, f
	}
	s.metrics = p
	return http.StatusNoContent, nil, nil
}

func (s *Server) putMachine(method string, obj map[string]any) (int, any, *fault) {
	m := map[string]any{}
	if method == "PATCH" {
		if s.machine == nil {
			m["vcpu_count"], m["mem_size_mib"] = float64(1), float64(128)
		}
		for k, v := range s.machine {
			m[k] = v
		}
	}
	for k, v := range obj {
		m[k] = v
	}
	vcpus, _ := num(m, "vcpu_count")
	mem, _ := num(m, "mem_size_mib")
	smt, _ := m["smt"].(bool)
	if vcpus < 1 || vcpus > 32 {
		return 0, nil, violation("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
	}
	if smt && vcpus > 1 && vcpus%2 != 0 {
		return 0, nil, violation("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
	}
	if mem < 1 {
		return 0, nil, violation("The memory size (MiB) is invalid.")
	}
	if m["huge_pages"] == "2M" && mem%2 != 0 {
		return 0, nil, violation("The memory size (MiB) is not a multiple of the huge page size.")
	}
	s.machine = m
	s.other = true
	return http.StatusNoContent, nil, nil
}

func (s *Server) putBoot(obj map[string]any) (int, any, *fault) {
	if f := s.existingFile("kernel_image_path", str(obj, "kernel_image_path"), false); f != nil {
		return 0, nil, f
	}
	if p, ok := obj["initrd_path"]; ok {
		if f := s.existingFile("initrd_path", p.(string), false); f != nil {
			return 0, nil, f
		}
	}
	if len(str(obj, "boot_args")) > 2048 {
		return 0, nil, violation("Boot source error: kernel command line longer than 2048 bytes")
	}
	s.boot = obj
	s.other = true
	return http.StatusNoContent, nil, nil
}

var (
	driveIDRe = regexp.MustCompile(`^[a-zA-Z0-9_]{1,64}$`)
	ifaceIDRe = regexp.MustCompile(`^[a-zA-Z0-9_]{1,64}$`)
	macRe     = regexp.MustCompile(`^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$`)
)

func (s *Server) putDrive(obj map[string]any) (int, any, *fault) {
	id := str(obj, "drive_id")
	if !driveIDRe.MatchString(id) {
		return 0, nil, violation("Invalid drive ID %q: only alphanumeric characters and underscores, at most 64", id)
	}
	d := drive{ID: id}
	d.Root, _ = obj["is_root_device"].(bool)
	if _, vhost := obj["socket"]; vhost {
		return 0, nil, &fault{verdict: VerdictUnsimulated, msg: "fakefc: vhost-user-block drives are not simulated"}
	}
	// The spec's descriptions: required for virtio-block config.
	if _, ok := obj["path_on_host"]; !ok {
		return 0, nil, violation("path_on_host is required for a virtio-block drive")
	}
	ro, ok := obj["is_read_only"].(bool)
	if !ok {
		return 0, nil, violation("is_read_only is required for a virtio-block drive")
	}
	d.ReadOnly, d.Path = ro, str(obj, "path_on_host")
	if f := s.existingFile("path_on_host", d.Path, !ro); f != nil {
		return 0, nil, f
	}
	if d.Root {
		for _, o := range s.drives {
			if o.Root && o.ID != id {
				return 0, nil, violation("A root block device already exists!")
			}
		}
	}
	s.drives[id] = d
	s.other = true
	return http.StatusNoContent, nil, nil
}

func (s *Server) putNet(obj map[string]any) (int, any, *fault) {
	id := str(obj, "iface_id")
	if !ifaceIDRe.MatchString(id) {
		return 0, nil, violation("Invalid network interface ID %q", id)
	}
	tap := str(obj, "host_dev_name")
	if tap == "" || len(tap) > 15 || strings.ContainsAny(tap, "/ \x00") {
		return 0, nil, violation("Could not create the network device: Open tap device failed: invalid interface name %q", tap)
	}
	mac, hasMAC := obj["guest_mac"].(string)
	if hasMAC && !macRe.MatchString(mac) {
		return 0, nil, violation("Invalid MAC address %q", mac)
	}
	for oid, o := range s.netIfs {
		if oid == id {
			continue
		}
		if o["host_dev_name"] == tap {
			return 0, nil, violation("The host device name %s is already in use.", tap)
		}
		if hasMAC && strings.EqualFold(str(o, "guest_mac"), mac) {
			return 0, nil, violation("The guest MAC address %s is already in use.", mac)
		}
	}
	s.netIfs[id] = obj
	s.other = true
	return http.StatusNoContent, nil, nil
}

func (s *Server) putVsock(obj map[string]any) (int, any, *fault) {
	p := str(obj, "uds_path")
	hp := s.resolve(p)
	if p == "" || len(hp) > MaxUnixPath {
		return 0, nil, violation("Cannot create backend for vsock device: uds_path %q is empty or longer than %d bytes", hp, MaxUnixPath)
	}
	if _, err := os.Lstat(hp); err == nil {
		return 0, nil, violation("Cannot create backend for vsock device: Error binding to the host-side Unix socket: Address in use (%s exists)", p)
	}
	if st, err := os.Stat(filepath.Dir(hp)); err != nil || !st.IsDir() {
		return 0, nil, violation("Cannot create backend for vsock device: directory of uds_path %q does not exist", p)
	}
	s.vsock = obj
	s.vsockPath = hp
	s.other = true
	return http.StatusNoContent, nil, nil
}

func (s *Server) action(action string) (int, any, *fault) {
	switch action {
	case "InstanceStart":
		return s.start()
	case "SendCtrlAltDel":
		if !s.started {
			return 0, nil, violation("The requested operation is not supported before starting the microVM: SendCtrlAltDel")
		}
		fmt.Fprintln(s.opts.Console, "fakefc: guest received Ctrl-Alt-Del")
		s.log("Info", "Sending CTRL+ALT+DEL to the guest")
		if s.Failing(FailIgnoreCtrlAltDel) {
			fmt.Fprintln(s.opts.Console, "fakefc: guest ignores Ctrl-Alt-Del")
			return http.StatusNoContent, nil, nil
		}
		fmt.Fprintln(s.opts.Console, "reboot: Power down")
		s.rec.add(Record{Kind: KindEvent, Verdict: VerdictOK, Fault: "guest powers off"})
		s.requestExit(0, s.opts.PowerOffDelay)
		return http.StatusNoContent, nil, nil
	case "FlushMetrics":
		if s.metrics == "" {
			return 0, nil, violation("The metrics system is not initialized.")
		}
		s.writeMetrics()
		return http.StatusNoContent, nil, nil
	}
	return 0, nil, violation("unknown action_type %q", action)
}

func (s *Server) start() (int, any, *fault) {
	if s.started {
		return 0, nil, violation("The requested operation is not supported after starting the microVM: InstanceStart")
	}
	if s.boot == nil {
		return 0, nil, violation("Cannot start microvm without kernel configuration.")
	}
	if s.machine == nil {
		// Firecracker would default to 1 vCPU / 128 MiB; banger must always say what it wants.
		return 0, nil, violation("InstanceStart before PUT /machine-config (banger must set the machine configuration explicitly)")
	}
	if _, initrd := s.boot["initrd_path"]; initrd {
		for _, d := range s.drives {
			if d.Root {
				return 0, nil, violation("drive %q is_root_device together with an initrd: Firecracker's initrd guide says not to", d.ID)
			}
		}
	}
	if s.vsockPath != "" {
		ln, err := net.Listen("unix", s.vsockPath)
		if err != nil {
			return 0, nil, violation("Cannot create backend for vsock device: %v", err)
		}
		s.vsockLn = ln
		go s.serveVsock(ln)
	}
	s.started = true
	s.log("Info", "Successfully started microvm that was configured from one single json")
	s.writeMetrics()
	args := str(s.boot, "boot_args")
	fmt.Fprintf(s.opts.Console, "fakefc: booting %s (initrd %s) with %q\n", str(s.boot, "kernel_image_path"), str(s.boot, "initrd_path"), args)
	fmt.Fprintf(s.opts.Console, "fakefc: guest %s running, %v vCPUs, %v MiB\n", s.opts.ID, s.machine["vcpu_count"], s.machine["mem_size_mib"])
	s.rec.add(Record{Kind: KindEvent, Verdict: VerdictOK, Fault: "guest started"})
	s.spewConsole()
	if f, ok := s.failure(FailCrashAfterStart); ok {
		msg := f.Message
		if msg == "" {
			msg = "simulated VMM crash"
		}
		go func() {
			select {
			case <-time.After(s.opts.CrashDelay):
			case <-s.closed:
				return
			}
			fmt.Fprintf(s.opts.Stderr, "fakefc: %s\n", msg)
			s.mu.Lock()
			s.log("Error", msg)
			s.mu.Unlock()
			s.rec.add(Record{Kind: KindEvent, Verdict: VerdictOK, Fault: "crash: " + msg})
			s.exitOnce.Do(func() { s.exit <- 1 })
		}()
	}
	return http.StatusNoContent, nil, nil
}

// spewConsole writes Options.ConsoleSpew bytes of console output in the
// background, as a chatty guest would. Write errors (nobody reading) drop the
// output, like Firecracker's serial device does.
func (s *Server) spewConsole() {
	n := s.opts.ConsoleSpew
	if n <= 0 {
		return
	}
	go func() {
		line := []byte(strings.Repeat("fakefc: guest console spam ", 40) + "\n")
		for n > 0 {
			chunk := line
			if int64(len(chunk)) > n {
				chunk = chunk[:n]
			}
			_, _ = s.opts.Console.Write(chunk)
			n -= int64(len(chunk))
			select {
			case <-s.closed:
				return
			default:
			}
		}
		fmt.Fprintln(s.opts.Console, "fakefc: console spew done")
	}()
}

// log appends a Firecracker-style line to the configured log file. s.mu held.
func (s *Server) log(level, msg string) {
	if s.logFile == "" {
		return
	}
	f, err := os.OpenFile(s.logFile, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s [%s:main] %s: %s\n", time.Now().UTC().Format("2006-01-02T15:04:05.000000000"), s.opts.ID, level, msg)
}

func (s *Server) writeMetrics() {
	if s.metrics == "" {
		return
	}
	f, err := os.OpenFile(s.resolve(s.metrics), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "{\"utc_timestamp_ms\":%d,\"api_server\":{\"process_startup_time_us\":0}}\n", time.Now().UnixMilli())
}

func (s *Server) portAllowed(p uint32) bool {
	if s.opts.VsockPorts == nil {
		return true
	}
	for _, q := range s.opts.VsockPorts {
		if q == p {
			return true
		}
	}
	return false
}

func (s *Server) serveVsock(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go s.vsockConn(c)
	}
}

// vsockConn speaks the host side of Firecracker's hybrid vsock: read
// "CONNECT <port>\n", answer "OK <host port>\n", then hand the stream to the
// pretend guest (echo, or a forward to FAKEFC_VSOCK_FORWARD). A bad or
// refused request closes the connection, as Firecracker does.
func (s *Server) vsockConn(c net.Conn) {
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReaderSize(c, 64)
	line, err := br.ReadString('\n')
	rec := Record{Kind: KindVsock, Method: "CONNECT", Path: strings.TrimSpace(line)}
	if err != nil {
		rec.Verdict, rec.Fault = VerdictViolation, "reading CONNECT line: "+err.Error()
		s.rec.add(rec)
		return
	}
	portStr, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "CONNECT ")
	port, perr := strconv.ParseUint(portStr, 10, 32)
	if !ok || perr != nil {
		rec.Verdict, rec.Fault = VerdictViolation, fmt.Sprintf("malformed vsock request %q, want \"CONNECT <port>\\n\"", line)
		s.rec.add(rec)
		return
	}
	if !s.portAllowed(uint32(port)) {
		rec.Verdict, rec.Fault = VerdictOK, "no guest listener on port "+portStr
		s.rec.add(rec)
		return
	}
	var fwd net.Conn
	if s.opts.VsockForward != "" {
		fwd, err = net.DialTimeout("unix", s.opts.VsockForward, 5*time.Second)
		if err != nil {
			rec.Verdict, rec.Fault = VerdictOK, "guest side refused: "+err.Error()
			s.rec.add(rec)
			return
		}
		defer fwd.Close()
		if s.opts.VsockPreamble {
			s.mu.Lock()
			p := ""
			if d, ok := s.drives["bootcfg"]; ok {
				p = d.Path
			}
			if ap, err := filepath.Abs(p); err == nil && p != "" {
				p = ap // drives may be named relative to the VMM's directory
			}
			s.mu.Unlock()
			if _, err := fmt.Fprintf(fwd, "FAKEFC bootcfg=%s\n", p); err != nil {
				return
			}
		}
	}
	s.mu.Lock()
	s.hostPort++
	hp := s.hostPort
	s.mu.Unlock()
	if _, err := fmt.Fprintf(c, "OK %d\n", hp); err != nil {
		return
	}
	rec.Verdict = VerdictOK
	s.rec.add(rec)
	_ = c.SetReadDeadline(time.Time{})
	// Anything the host sent after its CONNECT line is already buffered in br.
	if fwd == nil {
		_, _ = io.Copy(c, br)
		return
	}
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(fwd, br); closeWrite(fwd); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, fwd); closeWrite(c); done <- struct{}{} }()
	select {
	case <-done:
		<-done
	case <-s.closed:
	}
}

func closeWrite(c net.Conn) {
	if uc, ok := c.(*net.UnixConn); ok {
		_ = uc.CloseWrite()
	}
}

// ServeAPI serves the API on ln until ctx is done or the machine exits, and
// returns the process exit code.
func (s *Server) ServeAPI(ctx context.Context, ln net.Listener) int {
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	code := 0
	select {
	case code = <-s.exit:
	case <-ctx.Done():
		code = 3
		fmt.Fprintln(s.opts.Stderr, "fakefc: lifetime limit reached, exiting")
	case err := <-errc:
		fmt.Fprintf(s.opts.Stderr, "fakefc: API server: %v\n", err)
		code = 1
	}
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	s.Close()
	return code
}
