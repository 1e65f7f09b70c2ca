package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/portspec"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/system"
)

// Ports published with -p: the specs live in the VM's record (forwards,
// without the listening port); while the VM runs bangerd listens on each
// host port and carries connections to the guest port over the agent's SSH
// (direct-tcpip), so no guest network is needed. The housekeeping loop
// (ttl.go's) opens listeners for running VMs and closes them for the others.

const maxPorts = 64

// forwardSet is the listeners bangerd holds, by VM id.
type forwardSet struct {
	mu  sync.Mutex
	vms map[string]*vmForwards
}

type vmForwards struct {
	rt  *runtime
	fws []*liveForward
}

type liveForward struct {
	spec portspec.Spec
	ln   net.Listener
	port int
	err  string
}

// parsePorts validates a create's port specs.
func parsePorts(specs []string) ([]portspec.Spec, error) {
	if len(specs) > maxPorts {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "at most %d published ports", maxPorts)
	}
	out := make([]portspec.Spec, 0, len(specs))
	for _, s := range specs {
		sp, err := portspec.Parse(s)
		if err != nil {
			return nil, rpc.Errorf(rpc.CodeInvalidArgument, "%v", err)
		}
		out = append(out, sp)
	}
	return out, nil
}

// setPorts records a VM's published ports in its record and, when the VM
// already runs (a VM claimed from the ready pool), listens on them.
func (s *vmService) setPorts(ctx context.Context, id string, specs []portspec.Spec) error {
	if len(specs) == 0 {
		return nil
	}
	if err := s.store.SetVMForwards(ctx, id, forwardsOf(specs)); err != nil {
		return err
	}
	if rt := s.runtime(id); rt != nil {
		s.openForwards(ctx, id, rt)
	}
	return nil
}

// forwardsOf is the record's form of specs (no listening port yet).
func forwardsOf(specs []portspec.Spec) []api.Forward {
	fws := make([]api.Forward, len(specs))
	for i, sp := range specs {
		fws[i] = api.Forward{Spec: sp.String(), Host: sp.Host, GuestPort: sp.GuestPort}
	}
	return fws
}

// portsOf returns a VM's published ports from its record (nil when none).
func portsOf(vm *store.VM) []portspec.Spec {
	if len(vm.Forwards) == 0 {
		return nil
	}
	strs := make([]string, len(vm.Forwards))
	for i, f := range vm.Forwards {
		strs[i] = f.Spec
	}
	specs, err := parsePorts(strs)
	if err != nil {
		return nil
	}
	return specs
}

// syncForwards opens the listeners of running VMs with published ports and
// closes those of VMs that stopped or went.
func (s *vmService) syncForwards(ctx context.Context, vms []*store.VM) {
	want := map[string]bool{}
	for _, vm := range vms {
		specs := portsOf(vm)
		if len(specs) == 0 {
			continue
		}
		rt := s.runtime(vm.ID)
		if rt == nil || vm.State != store.StateRunning {
			continue
		}
		want[vm.ID] = true
		s.ensureForwards(ctx, vm, rt, specs)
	}
	s.forwards.mu.Lock()
	var stale []*vmForwards
	for id, vf := range s.forwards.vms {
		if !want[id] {
			stale = append(stale, vf)
			delete(s.forwards.vms, id)
		}
	}
	s.forwards.mu.Unlock()
	for _, vf := range stale {
		vf.close()
	}
}

func (vf *vmForwards) close() {
	for _, f := range vf.fws {
		if f.ln != nil {
			f.ln.Close()
		}
	}
}

// ensureForwards listens on vm's published ports for its current boot.
func (s *vmService) ensureForwards(ctx context.Context, vm *store.VM, rt *runtime, specs []portspec.Spec) {
	s.forwards.mu.Lock()
	defer s.forwards.mu.Unlock()
	if s.forwards.vms == nil {
		s.forwards.vms = map[string]*vmForwards{}
	}
	vf := s.forwards.vms[vm.ID]
	if vf != nil && vf.rt == rt {
		return
	}
	if vf != nil {
		vf.close()
	}
	vf = &vmForwards{rt: rt}
	s.forwards.vms[vm.ID] = vf
	for _, sp := range specs {
		lf := &liveForward{spec: sp}
		ln, err := net.Listen("tcp", net.JoinHostPort(sp.Host, strconv.Itoa(sp.Port)))
		if err != nil {
			lf.err = err.Error()
			s.log.WarnContext(ctx, "publish port", "vm", vm.Name, "spec", sp.String(), "error", err.Error())
		} else {
			lf.ln, lf.port = ln, ln.Addr().(*net.TCPAddr).Port
			go s.serveForward(context.WithoutCancel(ctx), vm.ID, vm.Name, rt, ln, sp.GuestPort)
		}
		vf.fws = append(vf.fws, lf)
	}
}

// serveForward carries connections on ln to guestPort until ln closes.
func (s *vmService) serveForward(ctx context.Context, id, name string, rt *runtime, ln net.Listener, guestPort int) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			g, err := s.dialGuestPort(ctx, id, rt, guestPort)
			if err != nil {
				s.log.InfoContext(ctx, "published port: dial guest", "vm", name, "guest_port", guestPort, "error", err.Error())
				return
			}
			defer g.Close()
			system.Splice(c, g)
		}()
	}
}

type sshAgent interface {
	SSH(ctx context.Context) (*ssh.Client, error)
}

func (s *vmService) dialGuestPort(ctx context.Context, id string, rt *runtime, port int) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	a, err := s.agent(ctx, id, rt)
	if err != nil {
		return nil, err
	}
	sa, ok := a.(sshAgent)
	if !ok {
		return nil, errors.New("the agent connection cannot carry TCP")
	}
	cl, err := sa.SSH(ctx)
	if err != nil {
		return nil, err
	}
	c, err := cl.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err == nil {
		return c, nil
	}
	if c6, err6 := cl.DialContext(ctx, "tcp", net.JoinHostPort("::1", strconv.Itoa(port))); err6 == nil {
		return c6, nil
	}
	return nil, fmt.Errorf("nothing accepts connections on port %d: %w", port, err)
}

// openForwards listens on a running VM's published ports, as its record
// has them (the end of its start, or when they are recorded after it runs);
// the reaper's syncForwards keeps them so afterwards.
func (s *vmService) openForwards(ctx context.Context, id string, rt *runtime) {
	vm, err := s.store.GetVM(ctx, id)
	if err != nil || vm.State != store.StateRunning {
		return
	}
	if specs := portsOf(vm); len(specs) > 0 {
		s.ensureForwards(ctx, vm, rt, specs)
	}
}

// markForwards fills the listening port (or why there is none) into
// vm.Forwards, which the record holds, from the listeners as they are:
// reading a VM never opens or closes one.
func (s *vmService) markForwards(vm *store.VM) {
	if len(vm.Forwards) == 0 {
		return
	}
	rt := s.runtime(vm.ID)
	s.forwards.mu.Lock()
	defer s.forwards.mu.Unlock()
	vf := s.forwards.vms[vm.ID]
	if vf == nil || rt == nil || vf.rt != rt {
		return
	}
	for i := range vm.Forwards {
		if i < len(vf.fws) {
			vm.Forwards[i].Port, vm.Forwards[i].Error = vf.fws[i].port, vf.fws[i].err
		}
	}
}

// closeForwards closes every listener (bangerd's shutdown).
func (s *vmService) closeForwards() {
	s.forwards.mu.Lock()
	vms := s.forwards.vms
	s.forwards.vms = nil
	s.forwards.mu.Unlock()
	for _, vf := range vms {
		vf.close()
	}
}

// listDecorated reports whether vm.list must add runtime state to the
// records: some VM is paused or has published ports listening. Everything
// else it reports (expiry, published ports, pool membership) is in the
// records, so SQLite's own JSON serves the common case.
func (s *vmService) listDecorated() bool {
	if s.anyPaused() {
		return true
	}
	s.forwards.mu.Lock()
	defer s.forwards.mu.Unlock()
	return len(s.forwards.vms) > 0
}
