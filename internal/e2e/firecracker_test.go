package e2e

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/sshd"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc/fakefctest"
)

// fakeGuest stands in for the guest behind the fake firecracker's vsock: for
// each forwarded connection it reads the VM's boot config device (as
// banger-agent would) and serves the agent's SSH server with it. Commands run
// on this host with a throwaway passwd file.
type fakeGuest struct {
	home      string
	shutdowns chan string
}

func (g *fakeGuest) serve(t *testing.T, ln net.Listener) {
	passwd := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(passwd, []byte("root:x:0:0:root:/tmp:/bin/sh\n"), 0o644)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			srv, err := g.server(passwd)
			if err != nil {
				t.Logf("fake guest: %v", err)
				c.Close()
				return
			}
			srv.ServeConn(ctx, c)
		}()
	}
}

func (g *fakeGuest) server(passwd string) (*sshd.Server, error) {
	// one VM at a time in this test: take the newest boot config
	cfgs, _ := filepath.Glob(filepath.Join(g.home, "vms", "*", "bootcfg.img"))
	var newest string
	var newestT time.Time
	for _, p := range cfgs {
		if st, err := os.Stat(p); err == nil && st.ModTime().After(newestT) {
			newest, newestT = p, st.ModTime()
		}
	}
	f, err := os.Open(newest)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cfg, err := bootcfg.Decode(f)
	if err != nil {
		return nil, err
	}
	hk, err := ssh.ParsePrivateKey([]byte(cfg.HostKey))
	if err != nil {
		return nil, err
	}
	keys, err := sshd.ParseAuthorizedKeys(cfg.AuthorizedKeys)
	if err != nil {
		return nil, err
	}
	vmDir := filepath.Dir(newest)
	return sshd.New(sshd.Config{
		HostKey: hk, AuthorizedKeys: keys, PasswdFile: passwd, Logger: logging.Discard(),
		OnShutdown: func() {
			// the guest powers off: its VMM exits
			var h struct{ PID int }
			if b, err := os.ReadFile(filepath.Join(vmDir, "handles.json")); err == nil && json.Unmarshal(b, &h) == nil && h.PID > 0 {
				syscall.Kill(h.PID, syscall.SIGTERM)
			}
			g.shutdowns <- cfg.VMID
		},
	})
}

// TestFirecrackerDriverThroughBangerd runs bangerd with (the fake)
// firecracker on PATH: auto selection picks it, the create drives the API
// (every request checked against the pinned firecracker.yaml), the agent is
// reached through the hybrid vsock socket, and stop/kill/delete work.
func TestFirecrackerDriverThroughBangerd(t *testing.T) {
	fc := fakefctest.Setup(t)
	k := testenv.GuestKernel(t)
	rootfs := testenv.BusyboxRootfs(t, 64)
	h := home(t)

	agentSock := filepath.Join(h, "fake-guest.sock")
	ln, err := net.Listen("unix", agentSock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	g := &fakeGuest{home: h, shutdowns: make(chan string, 4)}
	go g.serve(t, ln)

	d := startDaemon(t, h,
		"PATH="+filepath.Dir(fc.Binary)+":"+os.Getenv("PATH"),
		fakefc.EnvVsockForward+"="+agentSock)
	out, _, code := banger(t, h, "doctor", "-o", "json")
	if code != 1 { // no kernels or images yet
		t.Fatalf("doctor exit %d on an empty home", code)
	}
	var doc struct {
		Driver       string `json:"driver"`
		DriverReason string `json:"driver_reason"`
	}
	json.Unmarshal([]byte(out), &doc)
	if doc.Driver != "firecracker" || !strings.Contains(doc.DriverReason, "PATH") {
		t.Fatalf("doctor: %s", out)
	}
	mustBanger(t, h, "kernel", "import", k.VmlinuxPath, "--name", "plain")
	mustBanger(t, h, "image", "import", rootfs, "--name", "busybox")

	if _, errOut, code := banger(t, h, "vm", "create", "fc1", "--memory", "256M", "--disk", "256M"); code != 0 {
		t.Fatalf("create: %s\n%s", errOut, d.logs.String())
	}
	var v struct{ ID, State, Driver string }
	json.Unmarshal([]byte(mustBanger(t, h, "vm", "show", "fc1", "-o", "json")), &v)
	if v.State != "running" || v.Driver != "firecracker" {
		t.Fatalf("vm: %+v", v)
	}
	if out := mustBanger(t, h, "exec", "fc1", "--", "echo", "through-vsock"); strings.TrimSpace(out) != "through-vsock" {
		t.Fatalf("exec: %q", out)
	}
	seq := fakefctest.Sequence(fc.APIRequests(t))
	for _, want := range []string{"PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs", "PUT /drives/rw", "PUT /drives/bootcfg", "PUT /vsock", "PUT /actions"} {
		found := false
		for _, s := range seq {
			found = found || strings.HasPrefix(s, want)
		}
		if !found {
			t.Errorf("API sequence lacks %s: %v", want, seq)
		}
	}

	// graceful stop goes through the agent
	mustBanger(t, h, "vm", "stop", "fc1", "--timeout", "20s")
	select {
	case id := <-g.shutdowns:
		if id != v.ID {
			t.Fatalf("shutdown for %s", id)
		}
	default:
		t.Fatal("stop did not ask the agent to power off")
	}
	if s := showVM(t, h, "fc1"); s.State != "stopped" || s.LastError != "" {
		t.Fatalf("after stop: %+v", s)
	}
	mustBanger(t, h, "vm", "start", "fc1")
	pid := vmmPID(t, h, v.ID)
	mustBanger(t, h, "vm", "kill", "fc1")
	testenv.WaitFor(t, 10*time.Second, "fake firecracker to exit", func() bool { return syscall.Kill(pid, 0) != nil })
	mustBanger(t, h, "vm", "delete", "fc1")
}
