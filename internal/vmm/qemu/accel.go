package qemu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Accelerator names accepted in Options.Accel.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// DefaultProbeTimeout bounds the KVM probe. A guest kernel reaches its
// root-mount panic in well under a second with working KVM.
const DefaultProbeTimeout = 4 * time.Second

// accelChoice is the accelerator chosen and why, in words for `banger doctor`.
type accelChoice struct {
	Accel  string
	Reason string
}

const tcgSlow = "using TCG software emulation (guests boot in seconds and run several times slower)"

// checkDevice opens path read-write to tell whether the user may use it.
func checkDevice(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// deviceProblem phrases why a device node cannot be used.
func deviceProblem(path string, err error, group string) string {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return path + " does not exist"
	case errors.Is(err, fs.ErrPermission):
		return fmt.Sprintf("no permission to open %s (hint: add your user to the %q group and log in again)", path, group)
	default:
		return fmt.Sprintf("cannot open %s: %v", path, err)
	}
}

// chooseAccel decides the accelerator once per Driver. With Accel "auto" and
// a usable /dev/kvm it boots kernelPath under KVM (see probeKVM); when
// kernelPath is empty and nothing is decided yet it returns an empty choice.
// Decisions are cached; a probe interrupted by ctx is not.
func (d *Driver) chooseAccel(ctx context.Context, bin, kernelPath string) (accelChoice, error) {
	select {
	case d.accelSem <- struct{}{}:
	case <-ctx.Done():
		return accelChoice{}, fmt.Errorf("waiting for the KVM probe: %w", ctx.Err())
	}
	defer func() { <-d.accelSem }()
	if d.accel != nil {
		return *d.accel, nil
	}
	decide := func(c accelChoice) (accelChoice, error) {
		d.accel = &c
		d.log.Info("qemu accelerator chosen", "accel", c.Accel, "reason", c.Reason)
		return c, nil
	}
	switch d.opts.Accel {
	case AccelTCG:
		return decide(accelChoice{AccelTCG, "TCG software emulation, as configured"})
	case AccelKVM:
		if err := checkDevice(d.kvmPath); err != nil {
			return accelChoice{}, fmt.Errorf("KVM was requested but %s; hint: set the accelerator to auto or tcg", deviceProblem(d.kvmPath, err, "kvm"))
		}
		return decide(accelChoice{AccelKVM, "KVM, as configured"})
	case AccelAuto:
	default:
		return accelChoice{}, fmt.Errorf("unknown qemu accelerator %q: want auto, kvm or tcg", d.opts.Accel)
	}
	if err := checkDevice(d.kvmPath); err != nil {
		return decide(accelChoice{AccelTCG, deviceProblem(d.kvmPath, err, "kvm") + "; " + tcgSlow})
	}
	if kernelPath == "" {
		kernelPath = d.opts.ProbeKernel
	}
	if kernelPath == "" {
		return accelChoice{}, nil
	}
	c, err := probeKVM(ctx, bin, kernelPath, d.opts.ProbeTimeout)
	if err != nil {
		return accelChoice{}, err
	}
	return decide(c)
}

// probeKVM tells whether KVM really runs a normal guest here. Some hosts (nested
// or software-only hypervisors) expose a /dev/kvm on which QEMU aborts ("failed
// to set MSR") or a normal guest hangs without a word, so opening the device
// proves nothing, and a tiny real-mode program runs fine where Linux does not.
// The probe boots the guest kernel itself, on the same machine type and CPU
// model as a real VM, with no disks and a root device that does not exist: a
// working KVM brings it through its whole initialisation to the "VFS: Unable to
// mount root fs" panic in well under a second. The probe is bounded by timeout
// and its QEMU is killed at the end. It returns an error only when ctx ends.
func probeKVM(ctx context.Context, bin, kernelPath string, timeout time.Duration) (accelChoice, error) {
	if timeout <= 0 {
		timeout = DefaultProbeTimeout
	}
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	args := []string{
		"-machine", machineOpts, "-accel", "kvm", "-cpu", "host",
		"-smp", "2", "-m", "128M",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "stdio",
		"-kernel", kernelPath,
		"-append", "console=ttyS0 panic=-1 reboot=t rdinit=/banger-kvm-probe init=/banger-kvm-probe root=/dev/banger-kvm-probe",
	}
	cmd := exec.CommandContext(pctx, bin, args...)
	out := newMarkerWriter("Kernel panic - not syncing")
	var stderr tailBuffer
	cmd.Stdout = out
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return accelChoice{AccelTCG, fmt.Sprintf("could not run %s to probe KVM: %v; %s", bin, err, tcgSlow)}, nil
	}
	waitDone := make(chan error, 1)
	go func() { waitDone <- cmd.Wait() }()
	var waitErr error
	exitedByItself := false
	select {
	case <-out.found:
		cancel()
		<-waitDone
	case waitErr = <-waitDone:
		exitedByItself = pctx.Err() == nil
	}
	elapsed := time.Since(start)
	if out.seen() || (exitedByItself && waitErr == nil && out.contains("Linux version")) {
		return accelChoice{AccelKVM, fmt.Sprintf("KVM works: a probe booted the guest kernel under KVM in %.2fs", elapsed.Seconds())}, nil
	}
	if ctx.Err() != nil {
		return accelChoice{}, fmt.Errorf("probing KVM: %w", ctx.Err())
	}
	var why string
	switch {
	case exitedByItself:
		msg := errorLine(stderr.String())
		if msg == "" {
			msg = fmt.Sprint(waitErr)
		}
		why = fmt.Sprintf("qemu failed under KVM: %s", msg)
	case out.contains("Linux version"):
		why = fmt.Sprintf("a probe guest kernel started under KVM but did not finish booting within %s", timeout)
	default:
		why = fmt.Sprintf("a probe guest kernel printed nothing within %s under KVM (typical of nested or software-only KVM)", timeout)
	}
	return accelChoice{AccelTCG, "KVM does not work here: " + why + "; " + tcgSlow}, nil
}

// markerWriter collects a bounded amount of console output and closes found
// when a marker appears.
type markerWriter struct {
	marker []byte
	found  chan struct{}
	mu     sync.Mutex
	buf    []byte
	hit    bool
}

const markerBufMax = 256 << 10

func newMarkerWriter(marker string) *markerWriter {
	return &markerWriter{marker: []byte(marker), found: make(chan struct{})}
}

func (w *markerWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) < markerBufMax {
		w.buf = append(w.buf, p[:min(len(p), markerBufMax-len(w.buf))]...)
	}
	if !w.hit && bytes.Contains(w.buf, w.marker) {
		w.hit = true
		close(w.found)
	}
	return len(p), nil
}

func (w *markerWriter) seen() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.hit
}

func (w *markerWriter) contains(s string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return bytes.Contains(w.buf, []byte(s))
}

// tailBuffer keeps the last few KiB written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

const tailMax = 8 << 10

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > tailMax {
		t.buf = append([]byte(nil), t.buf[len(t.buf)-tailMax:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

// errorLine picks QEMU's most telling line: the first "error:" line (an abort
// prints the assertion after it), else the last line.
func errorLine(s string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, "error:") {
			return strings.TrimSpace(l)
		}
	}
	return lastLine(s)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if l := strings.TrimSpace(lines[i]); l != "" {
			return l
		}
	}
	return ""
}

// cpuKHz returns the first "cpu MHz" of /proc/cpuinfo in kHz, or 0.
func cpuKHz(cpuinfo []byte) int {
	sc := bufio.NewScanner(bytes.NewReader(cpuinfo))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || mhz <= 0 || mhz > 100000 {
			return 0
		}
		return int(mhz * 1000)
	}
	return 0
}
