package mcpserver_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/mcpserver"
	"github.com/bangerdev/banger/internal/testenv"
)

var opIDRe = regexp.MustCompile(`\(op-[0-9a-f]{6,}\)`)

func call(t *testing.T, cs *mcp.ClientSession, name string, args map[string]any) (*mcp.CallToolResult, map[string]any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("call %s: %v", name, err)
	}
	var out map[string]any
	if res.StructuredContent != nil {
		b, _ := json.Marshal(res.StructuredContent)
		json.Unmarshal(b, &out)
	}
	return res, out
}

func text(res *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			b.WriteString(tc.Text)
		}
	}
	return b.String()
}

// TestToolErrorsCarryOpID runs the server in memory against a real bangerd
// (no VM): failed calls are tool errors with an op id, not protocol errors.
func TestToolErrorsCarryOpID(t *testing.T) {
	b := testenv.StartBangerd(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.Dial(ctx, client.WithSocket(b.Socket))
	if err != nil {
		t.Fatal(err)
	}
	st, ct := mcp.NewInMemoryTransports()
	srv := mcpserver.New(c, mcpserver.Options{Version: "test"})
	ss, err := srv.Connect(ctx, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ss.Close()
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "test"}, nil).Connect(ctx, ct, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	for _, tc := range []struct {
		tool string
		args map[string]any
		want string
	}{
		{"exec", map[string]any{"vm": "ghost", "command": []string{"true"}}, "not found"},
		{"read_file", map[string]any{"vm": "ghost", "path": "/etc/hostname"}, "not found"},
		{"delete_vm", map[string]any{"vm": "ghost"}, "not found"},
		{"exec", map[string]any{"vm": "ghost", "command": []string{"true"}, "timeout_seconds": 99999}, "timeout_seconds"},
		{"write_file", map[string]any{"vm": "ghost", "path": "/x", "content": "x", "mode": "99"}, "octal"},
		{"create_vm", map[string]any{"name": "bad name!"}, "name"},
	} {
		res, _ := call(t, cs, tc.tool, tc.args)
		msg := text(res)
		if !res.IsError || !strings.Contains(msg, tc.want) || !opIDRe.MatchString(msg) || res.Meta["op_id"] == nil {
			t.Errorf("%s %v: isError %v, %q, meta %v; want an error about %q with an op id", tc.tool, tc.args, res.IsError, msg, res.Meta, tc.want)
		}
	}
	_, out := call(t, cs, "list_vms", nil)
	if vms, ok := out["vms"].([]any); !ok || len(vms) != 0 {
		t.Errorf("list_vms: %v", out)
	}
}

// TestBangerMCP: `banger mcp` serves MCP on its stdio (through bangerd's
// server, `bangerd mcp`, which keeps the SDK out of the banger binary):
// initialize, the tool list and a call, with no VM.
func TestBangerMCP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := testenv.StartBangerd(t) // builds bangerd where banger is built, as installed
	cmd := exec.Command(testenv.Command(t, "banger"), "mcp")
	cmd.Env = append(os.Environ(), "BANGER_HOME="+b.Home)
	cmd.Stderr = os.Stderr
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "banger-test"}, nil).Connect(ctx, &mcp.CommandTransport{Command: cmd}, nil)
	if err != nil {
		t.Fatalf("initialize: %v", err)
	}
	defer cs.Close()
	if r := cs.InitializeResult(); r == nil || r.ServerInfo.Name != "banger" {
		t.Fatalf("initialize result: %+v", r)
	}
	lt, err := cs.ListTools(ctx, nil)
	if err != nil || len(lt.Tools) < 8 {
		t.Fatalf("tools: %v, %v", lt, err)
	}
	if res, out := call(t, cs, "list_vms", map[string]any{}); res.IsError {
		t.Fatalf("list_vms: %s", text(res))
	} else if vms, ok := out["vms"].([]any); !ok || len(vms) != 0 {
		t.Fatalf("list_vms: %v", out)
	}
}

// TestMCPRealGuest is the acceptance test: the SDK's client drives
// `banger mcp` over stdio through a VM's life.
func TestMCPRealGuest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	b, c := testenv.BangerdWithGuest(t, ctx)
	banger := testenv.Command(t, "banger")

	cmd := exec.Command(banger, "mcp")
	cmd.Env = append(os.Environ(), "BANGER_HOME="+b.Home)
	cmd.Stderr = os.Stderr
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "banger-test"}, nil).Connect(ctx, &mcp.CommandTransport{Command: cmd}, nil)
	if err != nil {
		t.Fatalf("initialize: %v", err)
	}
	defer cs.Close()
	if r := cs.InitializeResult(); r == nil || r.ServerInfo.Name != "banger" {
		t.Fatalf("initialize result: %+v", r)
	}
	lt, err := cs.ListTools(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tl := range lt.Tools {
		names = append(names, tl.Name)
	}
	sort.Strings(names)
	if want := "create_vm delete_vm exec list_ports list_vms read_file workspace_pull write_file"; strings.Join(names, " ") != want {
		t.Fatalf("tools %v, want %s", names, want)
	}

	t0 := time.Now()
	res, out := call(t, cs, "create_vm", map[string]any{"name": "agent1", "memory_mib": 256, "disk_mib": 512})
	if res.IsError {
		t.Fatalf("create_vm: %s\n%s", text(res), b.Logs())
	}
	t.Logf("MEASURE create_vm over MCP: %v", time.Since(t0).Round(time.Millisecond))
	if vm, _ := out["vm"].(map[string]any); vm["state"] != "running" {
		t.Fatalf("create_vm: %v", out)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c.DeleteVM(ctx, "agent1", true)
	})

	res, out = call(t, cs, "exec", map[string]any{"vm": "agent1", "command": []string{"echo", "hi"}})
	if res.IsError || out["exit_code"] != float64(0) || out["stdout"] != "hi\n" {
		t.Fatalf("exec echo hi: %s %v", text(res), out)
	}
	res, out = call(t, cs, "exec", map[string]any{"vm": "agent1", "command": []string{"sh", "-c", "echo $A; pwd; exit 3"}, "env": []string{"A=1"}, "workdir": "/tmp"})
	if res.IsError || out["exit_code"] != float64(3) || out["stdout"] != "1\n/tmp\n" {
		t.Fatalf("exec with env/workdir: %s %v", text(res), out)
	}
	res, out = call(t, cs, "exec", map[string]any{"vm": "agent1", "command": []string{"sh", "-c", "yes | head -c 100000"}, "max_output_bytes": 1000})
	if res.IsError || out["stdout_truncated"] != true || len(out["stdout"].(string)) != 1000 || out["stdout_bytes"] != float64(100000) {
		t.Fatalf("capped output: %s stdout %d bytes, %v %v", text(res), len(out["stdout"].(string)), out["stdout_truncated"], out["stdout_bytes"])
	}
	t1 := time.Now()
	res, _ = call(t, cs, "exec", map[string]any{"vm": "agent1", "command": []string{"sleep", "60"}, "timeout_seconds": 2})
	if !res.IsError || !strings.Contains(text(res), "timeout") || !opIDRe.MatchString(text(res)) || time.Since(t1) > 15*time.Second {
		t.Fatalf("exec past its timeout: %v after %v", text(res), time.Since(t1))
	}
	// the VM is still usable after a timed-out exec
	if res, out = call(t, cs, "exec", map[string]any{"vm": "agent1", "command": []string{"true"}}); res.IsError || out["exit_code"] != float64(0) {
		t.Fatalf("exec after a timeout: %s", text(res))
	}

	res, _ = call(t, cs, "write_file", map[string]any{"vm": "agent1", "path": "/root/note.txt", "content": "written by mcp\n", "mode": "0600"})
	if res.IsError {
		t.Fatalf("write_file: %s", text(res))
	}
	res, out = call(t, cs, "read_file", map[string]any{"vm": "agent1", "path": "/root/note.txt"})
	if res.IsError || out["content"] != "written by mcp\n" || out["encoding"] != "utf-8" {
		t.Fatalf("read_file: %s %v", text(res), out)
	}
	res, _ = call(t, cs, "write_file", map[string]any{"vm": "agent1", "path": "/root/bin.dat", "content": "AP8A/w==", "encoding": "base64"})
	if res.IsError {
		t.Fatalf("write_file base64: %s", text(res))
	}
	if res, out = call(t, cs, "read_file", map[string]any{"vm": "agent1", "path": "/root/bin.dat"}); out["encoding"] != "base64" || out["content"] != "AP8A/w==" {
		t.Fatalf("read_file binary: %s %v", text(res), out)
	}
	if res, out = call(t, cs, "list_ports", map[string]any{"vm": "agent1"}); res.IsError || out["vm"] != "agent1" {
		t.Fatalf("list_ports: %s %v", text(res), out)
	}
	if res, out = call(t, cs, "list_vms", nil); res.IsError || len(out["vms"].([]any)) != 1 {
		t.Fatalf("list_vms: %s %v", text(res), out)
	}
	if res, out = call(t, cs, "delete_vm", map[string]any{"vm": "agent1"}); res.IsError || out["deleted"] != "agent1" {
		t.Fatalf("delete_vm: %s %v", text(res), out)
	}
	if vms, _ := c.ListVMs(ctx); len(vms) != 0 {
		t.Fatalf("VMs left after delete_vm: %v", vms)
	}
}
