package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// ---- RPC types ----

const (
	statsInterval = 2 * time.Second
	statsKeep     = 150 // five minutes at statsInterval
	statsTimeout  = 1500 * time.Millisecond
	clockTicks    = 100 // USER_HZ; fixed at 100 on every Linux architecture banger runs on
)

func (s *vmService) registerGuestAPI(m *rpc.Mux) {
	rpc.Handle(m, api.MethodVMPorts, s.ports)
	rpc.Handle(m, api.MethodVMStats, s.stats)
	rpc.Handle(m, api.MethodVMSSHConfig, s.sshConfig)
}

// runningVM resolves ref to a VM that runs (not paused) and its runtime.
func (s *vmService) runningVM(ctx context.Context, ref string) (*store.VM, *runtime, error) {
	vm, err := s.store.FindVM(ctx, ref)
	if err != nil {
		return nil, nil, storeErr(err)
	}
	rt := s.runtime(vm.ID)
	if rt == nil || vm.State != store.StateRunning {
		return nil, nil, notRunning(vm)
	}
	if rt.paused.Load() {
		return nil, nil, pausedErr(vm)
	}
	return vm, rt, nil
}

// runningAgent resolves ref to a running VM and its agent connection.
func (s *vmService) runningAgent(ctx context.Context, ref string) (*store.VM, *runtime, guestAgent, error) {
	vm, rt, err := s.runningVM(ctx, ref)
	if err != nil {
		return nil, nil, nil, err
	}
	a, err := s.agent(ctx, vm.ID, rt)
	if err != nil {
		return nil, nil, nil, rpc.Errorf(rpc.CodeUnavailable, "cannot reach the agent of %s: %v", vm.Name, err)
	}
	return vm, rt, a, nil
}

func (s *vmService) ports(ctx context.Context, p api.VMRef) (api.PortsResult, error) {
	vm, _, a, err := s.runningAgent(ctx, p.VM)
	if err != nil {
		return api.PortsResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ports, err := a.Ports(ctx)
	if err != nil {
		return api.PortsResult{}, rpc.Errorf(rpc.CodeUnavailable, "list the listening ports of %s: %v", vm.Name, err)
	}
	sortPorts(ports)
	if ports == nil {
		ports = []api.Port{}
	}
	return api.PortsResult{VM: vm.Name, Ports: ports}, nil
}

// sortPorts orders by port, then protocol, then address.
func sortPorts(ps []api.Port) {
	sort.SliceStable(ps, func(i, j int) bool {
		a, b := ps[i], ps[j]
		if a.Port != b.Port {
			return a.Port < b.Port
		}
		if a.Proto != b.Proto {
			return a.Proto < b.Proto
		}
		return a.Address < b.Address
	})
}

func (s *vmService) stats(ctx context.Context, p api.StatsParams) (api.StatsResult, error) {
	vm, err := s.store.FindVM(ctx, p.VM)
	if err != nil {
		return api.StatsResult{}, storeErr(err)
	}
	rt := s.runtime(vm.ID)
	if rt == nil || vm.State != store.StateRunning {
		return api.StatsResult{}, notRunning(vm)
	}
	sp := s.poller()
	h := sp.history(vm.ID, rt)
	if h.len() == 0 {
		// just started, or the poller has not come round yet
		sp.sampleVM(ctx, vm.ID, rt, h)
	}
	res := api.StatsResult{VM: vm.Name, ID: vm.ID, VCPUs: vm.VCPUs, MemoryMiB: vm.MemoryMiB, IntervalSeconds: sp.interval.Seconds()}
	samples := h.snapshot()
	res.Kept = len(samples)
	if len(samples) > 0 {
		last := samples[len(samples)-1]
		res.Latest = &last
	}
	if p.History {
		res.History = samples
	}
	return res, nil
}

func (s *vmService) sshConfig(ctx context.Context, p api.SSHConfigParams) (api.SSHConfigResult, error) {
	keyPath := s.layout.UserKey()
	if _, err := guest.LoadOrCreateUserKey(keyPath); err != nil {
		return api.SSHConfigResult{}, fmt.Errorf("user key: %w", err)
	}
	res := api.SSHConfigResult{User: "root", IdentityFile: keyPath, KnownHosts: s.knownHostsPath(), ConfigFile: s.sshConfigPath(), Hosts: []api.SSHHost{}}
	vms, err := s.store.ListVMs(ctx)
	if err != nil {
		return res, storeErr(err)
	}
	if err := s.poller().writeKnownHosts(vms); err != nil {
		return res, err
	}
	if p.VM != "" {
		vm, err := s.store.FindVM(ctx, p.VM)
		if err != nil {
			return res, storeErr(err)
		}
		if _, err := hostKeyPub(s.vmDir(vm.ID)); err != nil {
			return res, rpc.Errorf(rpc.CodeFailedPrecondition, "vm %q has no host key yet (it gets one when it first starts)", vm.Name)
		}
		res.Hosts = append(res.Hosts, api.SSHHost{Name: vm.Name, ID: vm.ID, State: string(vm.State)})
		return res, nil
	}
	for _, vm := range vms {
		if vm.State == store.StateRunning {
			res.Hosts = append(res.Hosts, api.SSHHost{Name: vm.Name, ID: vm.ID, State: string(vm.State)})
		}
	}
	return res, nil
}

func (s *vmService) knownHostsPath() string {
	return filepath.Join(filepath.Dir(s.layout.UserKey()), "known_hosts")
}

// ---- the stats poller ----

// statsPoller samples every running VM every interval, keeping a bounded
// history per VM, and keeps the known_hosts file in step with the VMs.
type statsPoller struct {
	s        *vmService
	interval time.Duration
	keep     int
	log      *slog.Logger

	mu  sync.Mutex
	vms map[string]*vmHistory

	khMu       sync.Mutex
	khWritten  []byte
	hostKeys   map[string]string // VM id → pinned key line, cached
	stopOnce   sync.Once
	cancel     context.CancelFunc
	loopDone   chan struct{}
	inFlightWG sync.WaitGroup
}

// vmHistory is one VM's samples and CPU baseline, for one boot (rt).
type vmHistory struct {
	rt       *runtime
	sampling sync.Mutex // one sample at a time

	mu        sync.Mutex
	samples   []api.StatsSample
	keep      int
	prevTicks uint64
	prevAt    time.Time
	havePrev  bool
}

func (h *vmHistory) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.samples)
}

func (h *vmHistory) snapshot() []api.StatsSample {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]api.StatsSample(nil), h.samples...)
}

func (h *vmHistory) add(st api.StatsSample) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.samples = append(h.samples, st)
	if over := len(h.samples) - h.keep; over > 0 {
		h.samples = append(h.samples[:0], h.samples[over:]...)
	}
}

// cpu turns a cumulative tick count into a percentage since the last call.
func (h *vmHistory) cpu(ticks uint64, at time.Time) *float64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	var pct *float64
	if h.havePrev && at.After(h.prevAt) && ticks >= h.prevTicks {
		v := cpuPercent(ticks-h.prevTicks, at.Sub(h.prevAt))
		pct = &v
	}
	h.prevTicks, h.prevAt, h.havePrev = ticks, at, true
	return pct
}

func cpuPercent(deltaTicks uint64, wall time.Duration) float64 {
	if wall <= 0 {
		return 0
	}
	return float64(deltaTicks) / clockTicks / wall.Seconds() * 100
}

// poller returns the service's stats poller (created on first use).
func (s *vmService) poller() *statsPoller {
	s.statsOnce.Do(func() {
		s.pollerVal = &statsPoller{s: s, interval: statsInterval, keep: statsKeep, log: s.log,
			vms: map[string]*vmHistory{}, hostKeys: map[string]string{}}
	})
	return s.pollerVal
}

// refreshKnownHosts rewrites known_hosts from the VMs in the store (after a
// start or a delete), so plain ssh sees a new VM at once.
func (s *vmService) refreshKnownHosts(ctx context.Context) {
	vms, err := s.store.ListVMs(context.WithoutCancel(ctx))
	if err == nil {
		err = s.poller().writeKnownHosts(vms)
	}
	if err != nil {
		s.log.WarnContext(ctx, "update known_hosts", "error", err.Error())
	}
}

// startStatsPoller starts sampling in the background; the caller stops it
// with poller().stop at shutdown.
func (s *vmService) startStatsPoller(ctx context.Context) {
	sp := s.poller()
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	sp.cancel = cancel
	sp.loopDone = make(chan struct{})
	go sp.loop(ctx)
}

func (sp *statsPoller) stop() error {
	sp.stopOnce.Do(func() {
		if sp.cancel != nil {
			sp.cancel()
			<-sp.loopDone
		}
		sp.inFlightWG.Wait()
	})
	return nil
}

func (sp *statsPoller) loop(ctx context.Context) {
	defer close(sp.loopDone)
	t := time.NewTicker(sp.interval)
	defer t.Stop()
	for {
		sp.tick(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// tick samples every running VM concurrently (skipping one whose previous
// sample is still in flight), forgets VMs that stopped, and refreshes
// known_hosts.
func (sp *statsPoller) tick(ctx context.Context) {
	vms, err := sp.s.store.ListVMs(ctx)
	if err != nil {
		if ctx.Err() == nil {
			sp.log.WarnContext(ctx, "stats: list VMs", "error", err.Error())
		}
		return
	}
	if err := sp.writeKnownHosts(vms); err != nil {
		sp.log.WarnContext(ctx, "update known_hosts", "error", err.Error())
	}
	ctx = logging.WithOpID(ctx, logging.NewOpID())
	live := map[string]bool{}
	for _, vm := range vms {
		rt := sp.s.runtime(vm.ID)
		if rt == nil || vm.State != store.StateRunning {
			continue
		}
		live[vm.ID] = true
		h := sp.history(vm.ID, rt)
		if !h.sampling.TryLock() {
			continue
		}
		h.sampling.Unlock()
		sp.inFlightWG.Add(1)
		go func(id string) {
			defer sp.inFlightWG.Done()
			sp.sampleVM(ctx, id, rt, h)
		}(vm.ID)
	}
	sp.mu.Lock()
	for id := range sp.vms {
		if !live[id] {
			delete(sp.vms, id)
		}
	}
	sp.mu.Unlock()
}

// history returns the history of the VM's current boot, starting a new one
// when the VM was restarted.
func (sp *statsPoller) history(id string, rt *runtime) *vmHistory {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	h := sp.vms[id]
	if h == nil || h.rt != rt {
		h = &vmHistory{rt: rt, keep: sp.keep}
		sp.vms[id] = h
	}
	return h
}

// sampleVM takes one sample of a running VM into h.
func (sp *statsPoller) sampleVM(ctx context.Context, id string, rt *runtime, h *vmHistory) {
	h.sampling.Lock()
	defer h.sampling.Unlock()
	now := time.Now()
	st := api.StatsSample{Time: now.UTC()}
	pid := rt.handles.PID
	if hs, ticks, err := readProcStats(pid, rt.handles.StartTime); err != nil {
		st.HostError = err.Error()
	} else {
		hs.CPUPercent = h.cpu(ticks, now)
		st.Host = hs
	}
	gctx, cancel := context.WithTimeout(ctx, statsTimeout)
	defer cancel()
	a, err := sp.s.agent(gctx, id, rt)
	if err == nil {
		var gs api.GuestStats
		gs, err = a.Stats(gctx)
		if err == nil {
			st.Guest = &gs
		}
	}
	if err != nil {
		st.GuestError = err.Error()
		sp.log.DebugContext(ctx, "stats: guest view unavailable", "vm_id", id, "error", err.Error())
	}
	h.add(st)
}

// readProcStats reads a VMM's cumulative CPU ticks and RSS from /proc,
// checking the process is still the one started (start time).
func readProcStats(pid int, startTime uint64) (*api.HostStats, uint64, error) {
	if pid <= 0 {
		return nil, 0, errors.New("no VMM process id")
	}
	dir := "/proc/" + strconv.Itoa(pid)
	stat, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return nil, 0, fmt.Errorf("read VMM process stats: %w", err)
	}
	ticks, start, err := parseProcStat(stat)
	if err != nil {
		return nil, 0, err
	}
	if startTime != 0 && start != startTime {
		return nil, 0, fmt.Errorf("process %d is no longer the VMM (start time changed)", pid)
	}
	status, err := os.ReadFile(dir + "/status")
	if err != nil {
		return nil, 0, fmt.Errorf("read VMM process status: %w", err)
	}
	rss, err := parseVmRSS(status)
	if err != nil {
		return nil, 0, err
	}
	return &api.HostStats{PID: pid, RSSBytes: rss}, ticks, nil
}

// parseProcStat returns utime+stime (fields 14 and 15) and the start time
// (field 22) of a /proc/<pid>/stat line. The command name (field 2) may hold
// spaces and parentheses, so fields are counted after its last ')'.
func parseProcStat(b []byte) (ticks, start uint64, err error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, errors.New("malformed /proc stat line: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state)
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("malformed /proc stat line: %d fields after the command name", len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	stt, err2 := strconv.ParseUint(f[12], 10, 64)
	st, err3 := strconv.ParseUint(f[19], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return 0, 0, fmt.Errorf("malformed /proc stat line: %w", err)
	}
	return ut + stt, st, nil
}

// parseVmRSS returns the VmRSS of a /proc/<pid>/status file in bytes.
func parseVmRSS(b []byte) (uint64, error) {
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, "VmRSS:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("malformed VmRSS line %q", line)
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil || kb > 1<<44 {
			return 0, fmt.Errorf("malformed VmRSS line %q", line)
		}
		return kb * 1024, nil
	}
	return 0, errors.New("no VmRSS in process status (a zombie?)")
}

// ---- known_hosts ----

// knownHostsContent renders known_hosts lines, "NAME KEY", sorted by name.
func knownHostsContent(entries map[string]string) []byte {
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var b bytes.Buffer
	b.WriteString("# Written by bangerd: the pinned host keys of banger VMs. Do not edit.\n")
	for _, n := range names {
		b.WriteString(n + " " + strings.TrimSpace(entries[n]) + "\n")
	}
	return b.Bytes()
}

// writeKnownHosts rewrites known_hosts (atomically, only when it changed)
// with the pinned key of every VM that has one.
func (sp *statsPoller) writeKnownHosts(vms []*store.VM) error {
	sp.khMu.Lock()
	defer sp.khMu.Unlock()
	entries := map[string]string{}
	seen := map[string]bool{}
	for _, vm := range vms {
		seen[vm.ID] = true
		key, ok := sp.hostKeys[vm.ID]
		if !ok {
			k, err := hostKeyPub(sp.s.vmDir(vm.ID))
			if err != nil {
				continue // not started yet
			}
			key = strings.TrimSpace(k)
			sp.hostKeys[vm.ID] = key
		}
		entries[vm.Name] = key
	}
	for id := range sp.hostKeys {
		if !seen[id] {
			delete(sp.hostKeys, id)
		}
	}
	content := knownHostsContent(entries)
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	if err := sp.s.writeSSHConfig(names); err != nil && sp.log != nil {
		sp.log.Warn("update ssh config", "error", err.Error())
	}
	p := sp.s.knownHostsPath()
	if bytes.Equal(content, sp.khWritten) {
		if _, err := os.Stat(p); err == nil {
			return nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(p), err)
	}
	if err := writeFileAtomic(p, content, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	sp.khWritten = content
	return nil
}
