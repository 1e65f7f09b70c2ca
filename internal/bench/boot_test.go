package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
)

const (
	benchMemMiB  = 256
	benchDiskMiB = 256
)

// rawSpec is a VM's QEMU command line, to boot again without banger.
type rawSpec struct {
	qemu    string
	args    []string
	vmDir   string
	bootcfg []byte
	spool   bool // the VM has a spool drive: the raw one gets its own
	diskMiB int
	channel vmm.GuestChannel
	hostKey ssh.PublicKey
	userKey ssh.Signer
}

// captureRaw reads the command line of a running VM's QEMU (from /proc) and
// what its agent needs (boot config device, pinned host key, user key).
func (b *bench) captureRaw(v *api.VM) (*rawSpec, error) {
	dir := filepath.Join(b.home, "vms", v.ID)
	hb, err := os.ReadFile(filepath.Join(dir, "handles.json"))
	if err != nil {
		return nil, err
	}
	var h vmm.Handles
	if err := json.Unmarshal(hb, &h); err != nil {
		return nil, err
	}
	if h.Channel.Kind != vmm.ChannelSerial {
		return nil, fmt.Errorf("the raw baseline drives a virtio-serial agent channel; this VM has %q", h.Channel.Kind)
	}
	cl, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", h.PID))
	if err != nil {
		return nil, err
	}
	argv := strings.Split(strings.TrimRight(string(cl), "\x00"), "\x00")
	s := &rawSpec{qemu: argv[0], args: argv[1:], vmDir: dir, diskMiB: v.DiskMiB, channel: h.Channel}
	if s.bootcfg, err = os.ReadFile(filepath.Join(dir, "bootcfg.img")); err != nil {
		return nil, err
	}
	for _, a := range s.args {
		s.spool = s.spool || strings.Contains(a, "id=spool,")
	}
	hk, err := os.ReadFile(filepath.Join(dir, "host_key.pub"))
	if err != nil {
		return nil, err
	}
	if s.hostKey, err = guest.ParsePublicKey(string(hk)); err != nil {
		return nil, err
	}
	l, _ := paths.Resolve(b.home)
	uk, err := guest.LoadOrCreateUserKey(l.UserKey())
	if err != nil {
		return nil, err
	}
	s.userKey = uk.Signer
	return s, nil
}

// rawVM is one QEMU started by the baseline.
type rawVM struct {
	dir    string
	memDir string // the tmpfs directory of its memory file, if the VM had one
	cmd    *exec.Cmd
	exited chan struct{} // closed once cmd has exited (waited for)
	tr     *guest.Transport
	gc     *guest.Client
}

// memPathRe finds a memory-backend-file's file in a QEMU argument.
var memPathRe = regexp.MustCompile(`mem-path=[^,]*`)

func (r *rawVM) stop() {
	if r.gc != nil {
		r.gc.Close()
	}
	if r.tr != nil {
		r.tr.Close()
	}
	if r.cmd != nil && r.cmd.Process != nil {
		r.cmd.Process.Kill()
		<-r.exited
	}
	os.RemoveAll(r.dir)
	if r.memDir != "" {
		os.RemoveAll(r.memDir)
	}
}

// prepareRaw makes a fresh directory with the VM's files: the boot config
// device and a fresh writable disk from the same template banger uses.
// None of this is timed: it stands for what a hand-written script has
// ready before it runs QEMU.
func (b *bench) prepareRaw(s *rawSpec) (*rawVM, error) {
	dir, err := os.MkdirTemp(b.tmp, "q")
	if err != nil {
		return nil, err
	}
	r := &rawVM{dir: dir}
	if err := os.WriteFile(filepath.Join(dir, "bootcfg.img"), s.bootcfg, 0o600); err != nil {
		r.stop()
		return nil, err
	}
	if s.spool {
		// as bangerd makes it: the magic, then holes
		sp := append([]byte(bulk.SpoolMagic), make([]byte, bulk.SpoolSize-len(bulk.SpoolMagic))...)
		if err := os.WriteFile(filepath.Join(dir, "spool.img"), sp, 0o600); err != nil {
			r.stop()
			return nil, err
		}
	}
	m := &disk.Maker{Dir: filepath.Join(b.home, "cache", "rwdisk"), Label: bootcfg.RWLabel}
	if err := m.Make(context.Background(), filepath.Join(dir, "rw.ext4"), int64(s.diskMiB)<<20); err != nil {
		r.stop()
		return nil, err
	}
	return r, nil
}

// bootRaw starts QEMU with the captured command line (paths moved to r.dir),
// reads its console, and pings the agent over the same channel and protocol
// bangerd uses. It returns the time from exec to the agent's answer.
func (b *bench) bootRaw(ctx context.Context, s *rawSpec, r *rawVM) (time.Duration, error) {
	args := make([]string, len(s.args))
	for i, a := range s.args {
		args[i] = strings.ReplaceAll(a, s.vmDir, r.dir)
		// The guest's memory file (share=on) is the VM's own: a raw QEMU
		// gets its own file on the same kind of filesystem (a tmpfs), never
		// the banger VM's, which would share one guest's memory between two.
		if memPathRe.MatchString(a) {
			if r.memDir == "" {
				d, err := os.MkdirTemp(filepath.Dir(memPathRe.FindString(a)[len("mem-path="):]), "bench-raw-")
				if err != nil {
					return 0, fmt.Errorf("raw QEMU: a directory for its memory file: %w", err)
				}
				r.memDir = d
			}
			args[i] = memPathRe.ReplaceAllLiteralString(args[i], "mem-path="+filepath.Join(r.memDir, "ram"))
		}
	}
	logf, err := os.Create(filepath.Join(r.dir, "vmm.log"))
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	start := time.Now()
	r.cmd = exec.Command(s.qemu, args...)
	r.cmd.Dir = r.dir
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		r.cmd = nil
		return 0, err
	}
	r.exited = make(chan struct{})
	go func() { r.cmd.Wait(); close(r.exited) }()
	// A QEMU that exits (a bad argument, a missing file) ends the wait
	// at once, not at ctx's deadline.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		select {
		case <-r.exited:
			cancel(errors.New("QEMU exited"))
		case <-ctx.Done():
		}
	}()
	// QEMU runs the guest once its console socket has a reader (wait=on).
	var conn net.Conn
	for {
		conn, err = net.Dial("unix", filepath.Join(r.dir, "console.sock"))
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return 0, fmt.Errorf("console socket: %w", err)
		}
		time.Sleep(time.Millisecond)
	}
	go func() { io.Copy(io.Discard, conn); conn.Close() }()
	ch := s.channel
	ch.Path = strings.ReplaceAll(ch.Path, s.vmDir, r.dir)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if r.tr, err = guest.NewTransport(ch, log); err != nil {
		return 0, err
	}
	if r.gc, err = guest.NewClient(guest.ClientConfig{Dialer: r.tr, HostKey: s.hostKey, UserKey: s.userKey, Logger: log}); err != nil {
		return 0, err
	}
	if err := r.gc.Ping(ctx); err != nil {
		out, _ := os.ReadFile(filepath.Join(r.dir, "vmm.log"))
		if cause := context.Cause(ctx); cause != nil {
			err = fmt.Errorf("%w (%v)", err, cause)
		}
		return 0, fmt.Errorf("raw QEMU: agent ping: %w (qemu log: %s)", err, bytes.TrimSpace(out))
	}
	return time.Since(start), nil
}

// rawBootOnce prepares, boots and stops one raw VM.
func (b *bench) rawBootOnce(s *rawSpec) (float64, error) {
	r, err := b.prepareRaw(s)
	if err != nil {
		return 0, err
	}
	defer r.stop()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d, err := b.bootRaw(ctx, s, r)
	return ms(d), err
}

// createVM creates a VM through the public client and returns the time to
// ready and each stage's duration.
//
// Two more figures go into stages: "before the VMM" (request sent to the
// boot stage starting: check, prepare host, configure and the RPCs) and
// "after the agent" (the agent answered to the client having the VM).
func (b *bench) createVM(name string, diskMiB int) (*api.VM, float64, map[string]float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	stages := map[string]float64{}
	var mu sync.Mutex
	var bootStart, agentEnd time.Time
	start := time.Now()
	v, err := b.cl.CreateVM(ctx, api.CreateParams{Name: name, Image: "busybox", Kernel: "debian", MemoryMiB: benchMemMiB, DiskMiB: diskMiB},
		func(st api.Stage) {
			if st.FinishedAt != nil {
				mu.Lock()
				stages[st.Name] = st.DurationMS
				switch st.Name {
				case "boot":
					bootStart = st.StartedAt
				case "wait for agent":
					agentEnd = *st.FinishedAt
				}
				mu.Unlock()
			}
		})
	end := time.Now()
	d := ms(end.Sub(start))
	if !bootStart.IsZero() && !agentEnd.IsZero() {
		stages["(before the VMM)"] = ms(bootStart.Sub(start))
		stages["(after the agent answered)"] = ms(end.Sub(agentEnd))
	}
	return v, d, stages, err
}

func (b *bench) deleteVM(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := b.cl.DeleteVM(ctx, name, true); err != nil {
		b.t.Logf("delete %s: %v", name, err)
	}
}

// rawSpec returns the captured command line, creating (and deleting) a
// warm-up VM the first time.
func (b *bench) spec() (*rawSpec, error) {
	if b.raw != nil {
		return b.raw, nil
	}
	v, _, _, err := b.createVM("warmup", benchDiskMiB)
	if err != nil {
		return nil, fmt.Errorf("warm-up create: %w", err)
	}
	defer b.deleteVM("warmup")
	b.raw, err = b.captureRaw(v)
	return b.raw, err
}

// benchCreate: create → ready through bangerd vs the same QEMU command line
// started by hand until the agent answers; banger's share is the difference.
func (b *bench) benchCreate() {
	s, err := b.spec()
	if err != nil {
		b.fail("create", "create → ready", err)
		return
	}
	var bt, rt []float64
	stageSamples := map[string][]float64{}
	for i := 0; i < b.boots(); i++ {
		name := fmt.Sprintf("c%d", i)
		_, d, stages, err := b.createVM(name, benchDiskMiB)
		b.deleteVM(name)
		if err != nil {
			b.fail("create", "create → ready", err)
			return
		}
		bt = append(bt, d)
		for k, v := range stages {
			stageSamples[k] = append(stageSamples[k], v)
		}
		r, err := b.rawBootOnce(s)
		if err != nil {
			b.fail("create", "raw QEMU boot", err)
			return
		}
		rt = append(rt, r)
	}
	bm, rm := testenv.Median(bt), testenv.Median(rt)
	b.add(Result{Group: "create", Metric: "create → agent ready", Unit: "ms", Banger: bm, Baseline: rm,
		Base: "the same QEMU command line, kernel, initrd and disks, started by hand until the agent answers a ping",
		N:    len(bt), Samples: bt, BaseSmp: rt})
	crit := make([]float64, len(bt))
	for i := range crit {
		crit[i] = stageSamples["(before the VMM)"][i] + stageSamples["(after the agent answered)"][i]
	}
	cm := testenv.Median(crit)
	b.add(Result{Group: "create", Metric: "banger's share of create: p50 difference", Unit: "ms", Banger: bm - rm, N: len(bt),
		Note: fmt.Sprintf("boots spread %.0f–%.0f ms (banger) and %.0f–%.0f ms (raw) on this machine: the difference is within that noise",
			minf(bt), maxf(bt), minf(rt), maxf(rt))})
	b.add(Result{Group: "create", Metric: "banger's share of create: its own critical path", Unit: "ms", Banger: cm,
		Target: "<30", Pass: passIf(cm < 30), N: len(crit), Samples: crit,
		Note: "request → VMM launch (check, prepare host, configure, RPCs) + agent answered → client has the VM; the VMM start and the guest boot run the same as raw"})
	var names []string
	for k := range stageSamples {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		b.add(Result{Group: "create", Metric: "  stage: " + k, Unit: "ms", Banger: testenv.Median(stageSamples[k]), N: len(stageSamples[k]), Samples: stageSamples[k]})
	}
}

// benchConcurrent: N creates at once vs N raw QEMU boots at once, and
// bangerd's RSS with N VMs running.
func (b *bench) benchConcurrent() {
	n := 8
	if b.quick {
		n = 2
	}
	s, err := b.spec()
	if err != nil {
		b.fail("concurrent", "concurrent creates", err)
		return
	}
	// Raw first: N prepared directories, N QEMUs at once.
	var raws []*rawVM
	for i := 0; i < n; i++ {
		r, err := b.prepareRaw(s)
		if err != nil {
			b.fail("concurrent", "concurrent raw boots", err)
			return
		}
		raws = append(raws, r)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, r := range raws {
		wg.Add(1)
		go func() { defer wg.Done(); _, errs[i] = b.bootRaw(ctx, s, r) }()
	}
	wg.Wait()
	rawWall := ms(time.Since(start))
	for _, r := range raws {
		r.stop()
	}
	for _, err := range errs {
		if err != nil {
			b.fail("concurrent", "concurrent raw boots", err)
			return
		}
	}
	start = time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); _, _, _, errs[i] = b.createVM(fmt.Sprintf("p%d", i), benchDiskMiB) }()
	}
	wg.Wait()
	wall := ms(time.Since(start))
	var rss float64
	if b.pid > 0 {
		rss, _ = rssMiB(b.pid)
	}
	for i := 0; i < n; i++ {
		b.deleteVM(fmt.Sprintf("p%d", i))
	}
	for _, err := range errs {
		if err != nil {
			b.fail("concurrent", "concurrent creates", err)
			return
		}
	}
	b.add(Result{Group: "concurrent", Metric: fmt.Sprintf("%d concurrent creates, wall", n), Unit: "ms", Banger: wall, Baseline: rawWall,
		Base: fmt.Sprintf("%d raw QEMU boots at once", n), Target: "≤1.1×", Pass: passIf(wall <= 1.1*rawWall), N: 1})
	if rss > 0 {
		lim := 30 + float64(n)
		b.add(Result{Group: "concurrent", Metric: fmt.Sprintf("bangerd RSS with %d VMs", n), Unit: "MiB", Banger: rss,
			Target: fmt.Sprintf("<%.0f", lim), Pass: passIf(rss < lim), N: 1})
	}
}

func minf(xs []float64) float64 {
	m := xs[0]
	for _, x := range xs {
		m = min(m, x)
	}
	return m
}

func maxf(xs []float64) float64 {
	m := xs[0]
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}
