// Package mcpserver is `banger mcp`: a Model Context Protocol server (over
// stdio, on the official Go SDK) whose tools drive banger VMs through the
// Go client. Every tool call gets an operation id; a tool error carries it,
// so that `grep op-… bangerd.log` tells the whole story.
package mcpserver

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/userconfig"
)

// Limits of the exec and file tools.
const (
	DefaultExecTimeout = 60 * time.Second
	MaxExecTimeout     = time.Hour
	DefaultOutputCap   = 64 << 10 // per stream
	MaxOutputCap       = 4 << 20
	DefaultReadMax     = 1 << 20
	MaxReadMax         = 16 << 20
	MaxWriteBytes      = 16 << 20
)

// Options configure the server.
type Options struct {
	Version string
	Logger  *slog.Logger // nil: discard
}

// New returns an MCP server whose tools use c.
func New(c *client.Client, o Options) *mcp.Server {
	return newServer(c, c, o)
}

// fileClient is what read_file and write_file call (client.Client; a fake in
// the package's benchmarks and tests, which need no VM).
type fileClient interface {
	ReadFile(ctx context.Context, vm, path string, max int64) ([]byte, error)
	WriteFile(ctx context.Context, vm, path string, data []byte, mode os.FileMode) error
}

func newServer(c *client.Client, files fileClient, o Options) *mcp.Server {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := mcp.NewServer(&mcp.Implementation{Name: "banger", Title: "banger microVMs", Version: o.Version}, &mcp.ServerOptions{
		Instructions: "banger runs disposable Linux microVMs. Create a VM with create_vm, run commands in it with exec " +
			"(argv, not a shell line: use [\"sh\",\"-c\",\"...\"] for shell syntax), move files with read_file/write_file, " +
			"and delete it with delete_vm when done. Errors end with an operation id (op-…) that names the request in bangerd's log.",
	})
	t := &tools{c: c, files: files, log: log}
	addTool(s, t, &mcp.Tool{Name: "create_vm", Description: "Create and boot a VM; returns when it runs. Optionally copies a host git repository into it (workspace)."}, t.createVM)
	addTool(s, t, &mcp.Tool{Name: "list_vms", Description: "List the VMs with their state, image, resources and address."}, t.listVMs)
	addTool(s, t, &mcp.Tool{Name: "exec", Description: "Run a command (argv) in a running VM and return its exit code and output. Output beyond max_output_bytes per stream is cut and marked truncated; past timeout_seconds the command is hung up and the call fails."}, t.exec)
	addTool(s, t, &mcp.Tool{Name: "read_file", Description: "Read a regular file in a running VM (UTF-8 text, else base64)."}, t.readFile)
	addTool(s, t, &mcp.Tool{Name: "write_file", Description: "Write a file in a running VM (created or truncated), from text or base64."}, t.writeFile)
	addTool(s, t, &mcp.Tool{Name: "list_ports", Description: "List the TCP and UDP sockets listening in a running VM."}, t.listPorts)
	addTool(s, t, &mcp.Tool{Name: "workspace_pull", Description: "Bring a VM's workspace (the git repository copied in at create) back into the host repository as branch banger/<vm>: the guest's commits plus one commit of its uncommitted changes. The host's working tree is not touched."}, t.workspacePull)
	addTool(s, t, &mcp.Tool{Name: "delete_vm", Description: "Delete a VM and its disks (stopping it first if it runs)."}, t.deleteVM)
	return s
}

type tools struct {
	c     *client.Client
	files fileClient
	log   *slog.Logger
}

// addTool registers h with an operation id on its context and its errors.
func addTool[In, Out any](s *mcp.Server, t *tools, tool *mcp.Tool, h func(context.Context, In) (Out, error)) {
	mcp.AddTool(s, tool, func(ctx context.Context, req *mcp.CallToolRequest, in In) (*mcp.CallToolResult, Out, error) {
		out, res := call(ctx, t, tool.Name, in, h)
		return res, out, nil
	})
}

// call runs h with an operation id on its context and its error; a failed
// call's result is the tool error (nil when h succeeded).
func call[In, Out any](ctx context.Context, t *tools, name string, in In, h func(context.Context, In) (Out, error)) (Out, *mcp.CallToolResult) {
	op := client.NewOpID()
	ctx = client.WithOpID(ctx, op)
	start := time.Now()
	out, err := h(ctx, in)
	if err != nil {
		t.log.InfoContext(ctx, "tool failed", "tool", name, "op_id", op, "error", err.Error(), "duration_ms", time.Since(start).Milliseconds())
		var zero Out
		return zero, toolError(err, op)
	}
	t.log.InfoContext(ctx, "tool done", "tool", name, "op_id", op, "duration_ms", time.Since(start).Milliseconds())
	return out, nil
}

// toolError is the result of a failed call: the message, ending with the op
// id, and the code and op id in _meta.
func toolError(err error, op string) *mcp.CallToolResult {
	if id := client.OpID(err); id != "" {
		op = id
	}
	msg := err.Error()
	if !strings.Contains(msg, op) {
		msg += " (" + op + ")"
	}
	code := client.Code(err)
	return &mcp.CallToolResult{
		IsError: true,
		Content: []mcp.Content{&mcp.TextContent{Text: "error: " + msg}},
		Meta:    mcp.Meta{"op_id": op, "code": code},
	}
}

func invalid(format string, args ...any) error {
	return &client.Error{Code: client.CodeInvalidArgument, Message: fmt.Sprintf(format, args...)}
}

// ---- create_vm, list_vms, delete_vm ----

type CreateVMInput struct {
	Name       string  `json:"name,omitempty" jsonschema:"VM name (letters, digits, -); default: a random one"`
	Image      string  `json:"image,omitempty" jsonschema:"image name; default: the configured one, else the newest"`
	Kernel     string  `json:"kernel,omitempty" jsonschema:"kernel name; default: the configured one, else the newest"`
	Size       string  `json:"size,omitempty" jsonschema:"size profile: small, medium, large or one from banger's config; cpus, memory_mib and disk_mib override it"`
	CPUs       int     `json:"cpus,omitempty" jsonschema:"virtual CPUs (default 1)"`
	MemoryMiB  int     `json:"memory_mib,omitempty" jsonschema:"memory in MiB (default 512)"`
	DiskMiB    int     `json:"disk_mib,omitempty" jsonschema:"writable disk in MiB (default 4096)"`
	Workspace  string  `json:"workspace,omitempty" jsonschema:"absolute path of a host git repository to copy into the VM at /root/<repository name>"`
	TTLSeconds float64 `json:"ttl_seconds,omitempty" jsonschema:"delete the VM this many seconds after creating it, even if delete_vm is never called (recommended)"`
}

type VMInfo struct {
	Name      string `json:"name"`
	ID        string `json:"id"`
	State     string `json:"state"`
	Image     string `json:"image,omitempty"`
	CPUs      int    `json:"cpus"`
	MemoryMiB int    `json:"memory_mib"`
	DiskMiB   int    `json:"disk_mib"`
	IP        string `json:"ip,omitempty"`
	Workspace string `json:"workspace,omitempty"`
	LastError string `json:"last_error,omitempty"`
	ExpiresAt string `json:"expires_at,omitempty" jsonschema:"when bangerd deletes the VM (RFC 3339)"`
}

func vmInfo(v *api.VM) VMInfo {
	i := VMInfo{Name: v.Name, ID: v.ID, State: v.State, Image: v.Image, CPUs: v.VCPUs, MemoryMiB: v.MemoryMiB,
		DiskMiB: v.DiskMiB, IP: v.IP, Workspace: v.Workspace, LastError: v.LastError}
	if v.ExpiresAt != nil {
		i.ExpiresAt = v.ExpiresAt.UTC().Format(time.RFC3339)
	}
	return i
}

type CreateVMOutput struct {
	VM            VMInfo `json:"vm"`
	WorkspaceDest string `json:"workspace_dest,omitempty" jsonschema:"where the workspace is in the guest"`
	OpID          string `json:"op_id"`
}

func (t *tools) createVM(ctx context.Context, in CreateVMInput) (CreateVMOutput, error) {
	p := api.CreateParams{Name: in.Name, Image: in.Image, Kernel: in.Kernel, VCPUs: in.CPUs, MemoryMiB: in.MemoryMiB, DiskMiB: in.DiskMiB,
		TTLSeconds: in.TTLSeconds}
	if err := applySize(&p, in.Size); err != nil {
		return CreateVMOutput{}, err
	}
	if in.Workspace != "" {
		root, err := client.WorkspaceRoot(ctx, in.Workspace)
		if err != nil {
			return CreateVMOutput{}, invalid("workspace: %v", err)
		}
		p.Workspace = root
	}
	st, err := t.c.BeginCreate(ctx, p)
	if err != nil {
		return CreateVMOutput{}, err
	}
	v, err := t.c.WaitCreate(ctx, st, nil)
	if err != nil {
		return CreateVMOutput{}, err
	}
	out := CreateVMOutput{VM: vmInfo(v), OpID: st.OpID}
	if p.Workspace != "" {
		dest, err := t.c.WorkspacePush(ctx, v.Name, p.Workspace, client.PushOptions{})
		if err != nil {
			return out, fmt.Errorf("%s is running, but its workspace push failed: %w", v.Name, err)
		}
		out.WorkspaceDest = dest
	}
	return out, nil
}

type ListVMsOutput struct {
	VMs []VMInfo `json:"vms"`
}

func (t *tools) listVMs(ctx context.Context, _ struct{}) (ListVMsOutput, error) {
	vms, err := t.c.ListVMs(ctx)
	if err != nil {
		return ListVMsOutput{}, err
	}
	out := ListVMsOutput{VMs: make([]VMInfo, 0, len(vms))}
	for _, v := range vms {
		out.VMs = append(out.VMs, vmInfo(v))
	}
	return out, nil
}

type VMInput struct {
	VM string `json:"vm" jsonschema:"VM name or id"`
}

type DeleteVMOutput struct {
	Deleted string `json:"deleted"`
	ID      string `json:"id"`
}

func (t *tools) deleteVM(ctx context.Context, in VMInput) (DeleteVMOutput, error) {
	if in.VM == "" {
		return DeleteVMOutput{}, invalid("vm is required")
	}
	r, err := t.c.DeleteVM(ctx, in.VM, true)
	return DeleteVMOutput{Deleted: r.Deleted, ID: r.ID}, err
}

// ---- exec ----

type ExecInput struct {
	VM             string   `json:"vm" jsonschema:"VM name or id"`
	Command        []string `json:"command" jsonschema:"argv to run, e.g. [\"make\",\"test\"]; use [\"sh\",\"-c\",\"...\"] for shell syntax"`
	Env            []string `json:"env,omitempty" jsonschema:"environment variables to add, each KEY=VALUE"`
	Workdir        string   `json:"workdir,omitempty" jsonschema:"working directory in the guest"`
	User           string   `json:"user,omitempty" jsonschema:"guest user (default root)"`
	Stdin          string   `json:"stdin,omitempty" jsonschema:"text given to the command on stdin"`
	TimeoutSeconds float64  `json:"timeout_seconds,omitempty" jsonschema:"hang the command up and fail after this many seconds (default 60, at most 3600)"`
	MaxOutputBytes int      `json:"max_output_bytes,omitempty" jsonschema:"keep at most this many bytes of stdout and of stderr (default 65536, at most 4194304)"`
}

type ExecOutput struct {
	ExitCode        int    `json:"exit_code" jsonschema:"the command's status: 126 cannot execute, 127 not found, 128+N killed by signal N"`
	Stdout          string `json:"stdout"`
	Stderr          string `json:"stderr"`
	StdoutTruncated bool   `json:"stdout_truncated,omitempty"`
	StderrTruncated bool   `json:"stderr_truncated,omitempty"`
	StdoutBytes     int64  `json:"stdout_bytes" jsonschema:"bytes the command wrote to stdout, kept or not"`
	StderrBytes     int64  `json:"stderr_bytes"`
	DurationMS      int64  `json:"duration_ms"`
}

func (t *tools) exec(ctx context.Context, in ExecInput) (ExecOutput, error) {
	if in.VM == "" || len(in.Command) == 0 {
		return ExecOutput{}, invalid("vm and command are required")
	}
	timeout := DefaultExecTimeout
	if in.TimeoutSeconds > 0 {
		timeout = time.Duration(in.TimeoutSeconds * float64(time.Second))
	}
	if timeout > MaxExecTimeout || in.TimeoutSeconds < 0 {
		return ExecOutput{}, invalid("timeout_seconds must be between 0 and %d", int(MaxExecTimeout.Seconds()))
	}
	capBytes := DefaultOutputCap
	if in.MaxOutputBytes > 0 {
		capBytes = min(in.MaxOutputBytes, MaxOutputCap)
	}
	stdout, stderr := &capped{max: capBytes}, &capped{max: capBytes}
	o := client.ExecOptions{Env: in.Env, Dir: in.Workdir, User: in.User, Stdout: stdout, Stderr: stderr}
	if in.Stdin != "" {
		o.Stdin = strings.NewReader(in.Stdin)
	}
	ectx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	code, err := t.c.Exec(ectx, in.VM, in.Command, o)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			return ExecOutput{}, fmt.Errorf("the command ran longer than its timeout (%s) and was hung up; output so far: %q", timeout, stdout.text())
		}
		return ExecOutput{}, err
	}
	return ExecOutput{ExitCode: code, Stdout: stdout.text(), Stderr: stderr.text(),
		StdoutTruncated: stdout.truncated(), StderrTruncated: stderr.truncated(),
		StdoutBytes: stdout.total, StderrBytes: stderr.total, DurationMS: time.Since(start).Milliseconds()}, nil
}

// capped keeps the first max bytes written and counts the rest.
type capped struct {
	mu    sync.Mutex
	max   int
	b     []byte
	total int64
}

func (c *capped) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total += int64(len(p))
	if room := c.max - len(c.b); room > 0 {
		c.b = append(c.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (c *capped) truncated() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total > int64(len(c.b))
}

// text is the kept bytes as valid UTF-8 (a cut rune is dropped).
func (c *capped) text() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.b
	for len(b) > 0 && !utf8.Valid(b) && len(c.b)-len(b) < utf8.UTFMax {
		r, _ := utf8.DecodeLastRune(b)
		if r != utf8.RuneError {
			break
		}
		b = b[:len(b)-1]
	}
	return strings.ToValidUTF8(string(b), "\uFFFD")
}

// ---- files ----

type ReadFileInput struct {
	VM       string `json:"vm" jsonschema:"VM name or id"`
	Path     string `json:"path" jsonschema:"absolute path in the guest"`
	MaxBytes int64  `json:"max_bytes,omitempty" jsonschema:"refuse a larger file (default 1048576, at most 16777216)"`
}

type ReadFileOutput struct {
	Content  string `json:"content"`
	Encoding string `json:"encoding" jsonschema:"utf-8 or base64"`
	Size     int    `json:"size"`
}

func (t *tools) readFile(ctx context.Context, in ReadFileInput) (ReadFileOutput, error) {
	if in.VM == "" || in.Path == "" {
		return ReadFileOutput{}, invalid("vm and path are required")
	}
	max := int64(DefaultReadMax)
	if in.MaxBytes > 0 {
		max = min(in.MaxBytes, MaxReadMax)
	}
	b, err := t.files.ReadFile(ctx, in.VM, in.Path, max)
	if err != nil {
		return ReadFileOutput{}, err
	}
	if utf8.Valid(b) {
		return ReadFileOutput{Content: string(b), Encoding: "utf-8", Size: len(b)}, nil
	}
	return ReadFileOutput{Content: base64.StdEncoding.EncodeToString(b), Encoding: "base64", Size: len(b)}, nil
}

type WriteFileInput struct {
	VM       string `json:"vm" jsonschema:"VM name or id"`
	Path     string `json:"path" jsonschema:"absolute path in the guest"`
	Content  string `json:"content" jsonschema:"the file's content"`
	Encoding string `json:"encoding,omitempty" jsonschema:"utf-8 (default) or base64"`
	Mode     string `json:"mode,omitempty" jsonschema:"octal permissions, e.g. 0755 (default 0644)"`
}

type WriteFileOutput struct {
	Path  string `json:"path"`
	Bytes int    `json:"bytes"`
}

func (t *tools) writeFile(ctx context.Context, in WriteFileInput) (WriteFileOutput, error) {
	if in.VM == "" || in.Path == "" {
		return WriteFileOutput{}, invalid("vm and path are required")
	}
	data := []byte(in.Content)
	switch in.Encoding {
	case "", "utf-8", "utf8", "text":
	case "base64":
		b, err := base64.StdEncoding.DecodeString(in.Content)
		if err != nil {
			return WriteFileOutput{}, invalid("content is not base64: %v", err)
		}
		data = b
	default:
		return WriteFileOutput{}, invalid("encoding must be utf-8 or base64, not %q", in.Encoding)
	}
	if len(data) > MaxWriteBytes {
		return WriteFileOutput{}, invalid("content is larger than %d bytes", MaxWriteBytes)
	}
	mode := os.FileMode(0o644)
	if in.Mode != "" {
		m, err := strconv.ParseUint(in.Mode, 8, 32)
		if err != nil || m > 0o7777 {
			return WriteFileOutput{}, invalid("mode %q is not octal permissions like 0644", in.Mode)
		}
		mode = os.FileMode(m)
	}
	if err := t.files.WriteFile(ctx, in.VM, in.Path, data, mode); err != nil {
		return WriteFileOutput{}, err
	}
	return WriteFileOutput{Path: in.Path, Bytes: len(data)}, nil
}

// ---- ports, workspace ----

type ListPortsOutput struct {
	VM    string     `json:"vm"`
	Ports []api.Port `json:"ports"`
}

func (t *tools) listPorts(ctx context.Context, in VMInput) (ListPortsOutput, error) {
	if in.VM == "" {
		return ListPortsOutput{}, invalid("vm is required")
	}
	r, err := t.c.Ports(ctx, in.VM)
	if err != nil {
		return ListPortsOutput{}, err
	}
	if r.Ports == nil {
		r.Ports = []api.Port{}
	}
	return ListPortsOutput{VM: r.VM, Ports: r.Ports}, nil
}

type WorkspacePullInput struct {
	VM   string `json:"vm" jsonschema:"VM name or id"`
	Repo string `json:"repo,omitempty" jsonschema:"host repository (default: the one the VM was created with)"`
	Dest string `json:"dest,omitempty" jsonschema:"workspace directory in the guest (default /root/<repository name>)"`
}

type WorkspacePullOutput struct {
	Branch      string `json:"branch"`
	Commit      string `json:"commit"`
	GuestHead   string `json:"guest_head"`
	Uncommitted bool   `json:"uncommitted" jsonschema:"the guest had uncommitted changes, committed on top of guest_head"`
	Repo        string `json:"repo"`
}

func (t *tools) workspacePull(ctx context.Context, in WorkspacePullInput) (WorkspacePullOutput, error) {
	if in.VM == "" {
		return WorkspacePullOutput{}, invalid("vm is required")
	}
	v, err := t.c.GetVM(ctx, in.VM)
	if err != nil {
		return WorkspacePullOutput{}, err
	}
	repo := in.Repo
	if repo == "" {
		repo = v.Workspace
	}
	if repo == "" {
		return WorkspacePullOutput{}, invalid("vm %s was created without a workspace: give repo", v.Name)
	}
	root, err := client.WorkspaceRoot(ctx, repo)
	if err != nil {
		return WorkspacePullOutput{}, invalid("repo: %v", err)
	}
	r, err := t.c.WorkspacePull(ctx, v.Name, v.Name, root, in.Dest)
	if err != nil {
		return WorkspacePullOutput{}, err
	}
	return WorkspacePullOutput{Branch: r.Branch, Commit: r.Commit, GuestHead: r.GuestHead, Uncommitted: r.Uncommitted, Repo: root}, nil
}

// applySize fills cpus, memory and disk left zero from the size profile
// (size, else the config's default_size).
func applySize(p *api.CreateParams, size string) error {
	l, err := paths.Resolve("")
	if err != nil {
		return err
	}
	cfg, err := userconfig.Load(l.ConfigFile())
	if err != nil {
		return err
	}
	prof, ok, err := userconfig.Profile(cfg, size)
	if err != nil {
		return invalid("%v", err)
	}
	if !ok {
		return nil
	}
	if p.VCPUs == 0 {
		p.VCPUs = prof.CPUs
	}
	if p.MemoryMiB == 0 && prof.Memory != "" {
		if p.MemoryMiB, err = userconfig.ParseMiB(prof.Memory); err != nil {
			return invalid("size %s: memory: %v", size, err)
		}
	}
	if p.DiskMiB == 0 && prof.Disk != "" {
		if p.DiskMiB, err = userconfig.ParseMiB(prof.Disk); err != nil {
			return invalid("size %s: disk: %v", size, err)
		}
	}
	return nil
}
