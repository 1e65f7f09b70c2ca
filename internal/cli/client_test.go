package cli

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/rpc"
)

// TestExecIsOneRequest: `banger exec VM -- true` against a running bangerd
// sends one request, vm.bulk (no ping first), and the session's start (its
// Open, the command and the EOF of no input) follows it without waiting
// for any reply: the fake agent here answers only once it holds all three.
// Exec is latency-bound; every round trip shows.
func TestExecIsOneRequest(t *testing.T) {
	home := fakeBangerdHome(t, "bgexec")
	var mu sync.Mutex
	var methods []string
	note := func(m string) {
		mu.Lock()
		methods = append(methods, m)
		mu.Unlock()
	}
	m := rpc.NewMux()
	rpc.Handle(m, api.MethodPing, func(ctx context.Context, _ struct{}) (string, error) {
		note(api.MethodPing)
		return "pong", nil
	})
	got := make(chan string, 1)
	rpc.Handle(m, api.MethodVMBulk, func(ctx context.Context, p api.BulkParams) (*rpc.Upgrade, error) {
		note(api.MethodVMBulk)
		return &rpc.Upgrade{Result: api.BulkResult{VM: p.VM}, Then: func(ctx context.Context, c net.Conn) {
			defer c.Close()
			o, err := bulk.ReadOpen(c)
			if err != nil || o.Op != bulk.OpSession {
				got <- "no session open"
				return
			}
			ch := bulk.NewChan(c)
			defer ch.Close()
			var cmd string
			for r := range ch.Requests() {
				if r.Type == "exec" {
					var e struct{ Command string }
					ssh.Unmarshal(r.Payload, &e)
					cmd = e.Command
					break
				}
			}
			if _, err := io.ReadAll(ch); err != nil { // no input: the EOF comes unasked
				got <- "no EOF: " + err.Error()
				return
			}
			got <- cmd
			ch.SendRequest("exit-status", false, ssh.Marshal(&struct{ Status uint32 }{3}))
		}}, nil
	})
	serveFakeBangerd(t, home, m)
	_, errOut, code := runCLI(t, "exec", "dev", "--", "true")
	if code != 3 {
		t.Fatalf("exit %d, want the command's 3: %s", code, errOut)
	}
	if cmd := <-got; cmd != "true" {
		t.Fatalf("the agent got command %q", cmd)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(methods) != 1 || methods[0] != api.MethodVMBulk {
		t.Fatalf("banger exec sent %v, want only %s", methods, api.MethodVMBulk)
	}
}
