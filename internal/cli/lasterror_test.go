package cli

import (
	"context"
	"encoding/json"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/rpc"
)

// hostileConsoleError is what bangerd records when a guest's boot fails: the
// error quotes the last lines of the console, which the guest wrote.
const hostileConsoleError = "the guest agent did not answer within 30s; console (/x/console.log) ends with:\n  " +
	"login: " + clipboardWrite + cursorUp + "\u202eevil\r\x1b[2J"

// fakeDaemonWithFailures serves a VM whose last error and a stream of events
// whose reason quote a hostile guest's console.
func fakeDaemonWithFailures(t *testing.T) {
	t.Helper()
	home := fakeBangerdHome(t, "bgerr")
	vm := api.VM{ID: "0123456789abcdef", Name: "vm1", State: "error", LastError: hostileConsoleError, CreatedAt: time.Now(), UpdatedAt: time.Now()}
	m := rpc.NewMux()
	rpc.Handle(m, api.MethodPing, func(ctx context.Context, _ struct{}) (string, error) { return "pong", nil })
	m.HandleFunc(api.MethodVMGet, func(context.Context, json.RawMessage) (any, error) { return vm, nil })
	m.HandleFunc(api.MethodEventsSubscribe, func(context.Context, json.RawMessage) (any, error) {
		return &rpc.Upgrade{Result: api.EventsResult{}, Then: func(_ context.Context, c net.Conn) {
			defer c.Close()
			for _, ev := range []api.Event{
				{Time: time.Now(), Type: api.EventVMStartFailed, VM: "vm1", Reason: hostileConsoleError, OpID: "op-0123456789"},
				{Time: time.Now(), Type: api.EventVMStopped, VM: "vm1", Reason: "exited: " + clipboardWrite, OpID: "op-0123456789"},
			} {
				b, _ := json.Marshal(ev)
				c.Write(append(b, '\n'))
			}
		}}, nil
	})
	serveFakeBangerd(t, home, m)
}

// A VM's last error and an event's reason can quote the guest's console
// (bangerd's boot-failure hint); `vm show` and `events` strip them like
// every other guest string, in text and in JSON.
func TestGuestTextInLastErrorAndEventsIsStripped(t *testing.T) {
	fakeDaemonWithFailures(t)
	for _, args := range [][]string{
		{"vm", "show", "vm1"},
		{"events"},
		{"events", "-o", "json"},
		{"vm", "show", "vm1", "-o", "json"},
	} {
		out, errOut, code := runCLI(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, errOut)
		}
		terminalSafe(t, strings.Join(args, " "), out)
		if !strings.Contains(out, "login: ") || !strings.Contains(out, "evil") {
			t.Errorf("%v lost the harmless text:\n%s", args, out)
		}
	}
}
