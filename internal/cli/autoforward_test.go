package cli

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/testenv"
)

// `port-forward --auto` opens host listeners for the ports the guest
// listens on: the guest chooses them, so their number is capped, however
// many sockets it reports.
func TestAutoForwardIsCapped(t *testing.T) {
	home := fakeBangerdHome(t, "bgauto")
	var ports []api.Port
	for i := range 300 {
		ports = append(ports, api.Port{Proto: "tcp", Address: "0.0.0.0", Port: 0, PID: 1, Process: "x"})
		ports[i].Port = 62000 + i
	}
	m := rpc.NewMux()
	rpc.Handle(m, api.MethodPing, func(ctx context.Context, _ struct{}) (string, error) { return "pong", nil })
	rpc.Handle(m, "vm.ports", func(ctx context.Context, p api.VMRef) (api.PortsResult, error) {
		return api.PortsResult{VM: p.VM, Ports: ports}, nil
	})
	serveFakeBangerd(t, home, m)

	out, errOut := &testenv.LockedBuffer{}, &testenv.LockedBuffer{}
	a := &App{Stdin: strings.NewReader(""), Stdout: out, Stderr: errOut, output: "json"}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := &forwarder{a: a, vm: "vm1"}
	var wg sync.WaitGroup
	done := make(chan error, 1)
	go func() { done <- a.followPorts(ctx, f, map[int]bool{}, &wg) }()
	// the first round of the guest's ports is handled before the warning
	// or the 300th listener: wait for one of them
	for !strings.Contains(errOut.String(), "forwarding only") && strings.Count(out.String(), `"event":"forwarding"`) < len(ports) {
		if ctx.Err() != nil {
			t.Fatalf("no cap warning and %d forwards after 30 s", strings.Count(out.String(), `"event":"forwarding"`))
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	wg.Wait()
	if n := strings.Count(out.String(), `"event":"forwarding"`); n != maxAutoForwards {
		t.Fatalf("%d host listeners for a guest listing %d ports, want the cap %d", n, len(ports), maxAutoForwards)
	}
	if strings.Count(errOut.String(), "forwarding only") != 1 {
		t.Fatalf("stderr: %q, want one warning", errOut.String())
	}
}
