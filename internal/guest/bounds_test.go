package guest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/api"
)

// hostileAgent is an SSH server that answers banger's global requests the
// way a compromised guest would: reply(type) returns the reply, or hang
// true to never answer.
type hostileAgent struct {
	reply func(reqType string) (ok bool, payload []byte, hang bool)
}

// start serves on a unix socket and returns a client for it.
func (h *hostileAgent) start(t *testing.T, maxReply int) *Client {
	t.Helper()
	dir := t.TempDir()
	hk, err := GenerateHostKey()
	if err != nil {
		t.Fatal(err)
	}
	uk, err := LoadOrCreateUserKey(filepath.Join(dir, "id_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(hk.PrivatePEM)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &ssh.ServerConfig{PublicKeyCallback: func(ssh.ConnMetadata, ssh.PublicKey) (*ssh.Permissions, error) { return nil, nil }}
	cfg.AddHostKey(signer)
	l, err := net.Listen("unix", filepath.Join(dir, "a.sock"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { l.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc, chans, reqs, err := ssh.NewServerConn(c, cfg)
				if err != nil {
					return
				}
				defer sc.Close()
				go ssh.DiscardRequests(nil)
				go func() {
					for nc := range chans {
						nc.Reject(ssh.Prohibited, "no")
					}
				}()
				for r := range reqs {
					ok, payload, hang := h.reply(r.Type)
					if hang {
						continue // never answered
					}
					r.Reply(ok, payload)
				}
			}()
		}
	}()
	c, err := NewClient(ClientConfig{Dialer: unixDialer(filepath.Join(dir, "a.sock")), HostKey: hk.Public, UserKey: uk.Signer, Logger: testLogger(t), MaxReply: maxReply})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func portsJSON(t *testing.T, ps []api.Port) []byte {
	b, err := json.Marshal(api.PortsReply{Ports: ps})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGuestRepliesAreBounded: a guest that says too much, or the wrong
// thing, gets a clear error; nothing it says is kept beyond the bounds.
func TestGuestRepliesAreBounded(t *testing.T) {
	good := api.Port{Proto: "tcp", Address: "0.0.0.0", Port: 22, PID: 1, Process: "sshd"}
	tests := []struct {
		name     string
		maxReply int
		payload  []byte
		ok       bool
		wantErr  string // "" = accepted
	}{
		{"honest reply at the agent's own limit", 0, portsJSON(t, repeatPort(good, 200<<10)), true, ""},
		{"oversized reply", 64 << 10, bytes.Repeat([]byte(" "), 100<<10), true, "over the limit of 65536"},
		{"too many sockets", 0, []byte(`{"ports":[` + strings.Repeat(`{"port":1},`, MaxPorts) + `{}]}`), true, fmt.Sprintf("%d sockets listed, at most %d accepted", MaxPorts+1, MaxPorts)},
		{"address is not an IP", 0, portsJSON(t, []api.Port{{Proto: "tcp", Address: "\x1b]52;c;eA==\x07", Port: 1}}), true, "is not an IP address"},
		{"unknown protocol", 0, portsJSON(t, []api.Port{{Proto: "sctp\x1b[2J", Address: "::", Port: 1}}), true, "unknown protocol"},
		{"port out of range", 0, portsJSON(t, []api.Port{{Proto: "tcp", Address: "::", Port: 70000}}), true, "out of range"},
		{"long process name", 0, portsJSON(t, []api.Port{{Proto: "tcp", Address: "::", Port: 1, Process: strings.Repeat("x", 1000)}}), true, "process name of 1000 bytes"},
		{"not JSON", 0, []byte("\x1b]0;pwned\x07"), true, "decode the guest's port list"},
		{"long refusal with escapes", 0, []byte("\x1b[2J" + strings.Repeat("r", 10000)), false, "refused"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := &hostileAgent{reply: func(string) (bool, []byte, bool) { return tc.ok, tc.payload, false }}
			c := a.start(t, tc.maxReply)
			ports, err := c.Ports(testCtx(t))
			if tc.wantErr == "" {
				if err != nil || len(ports) == 0 {
					t.Fatalf("honest reply refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			if len(err.Error()) > 1024 || strings.ContainsAny(err.Error(), "\x1b\x07") {
				t.Fatalf("error quotes the guest unbounded or raw: %d bytes %q", len(err.Error()), err.Error()[:min(80, len(err.Error()))])
			}
		})
	}
}

// repeatPort lists p as many times as fits in about n bytes of JSON.
func repeatPort(p api.Port, n int) []api.Port {
	b, _ := json.Marshal(p)
	k := n / (len(b) + 1)
	out := make([]api.Port, k)
	for i := range out {
		out[i] = p
	}
	return out
}

// TestGuestThatNeverRepliesIsBoundedByTheDeadline: an agent that accepts a
// request and never answers costs the caller its deadline, not more.
func TestGuestThatNeverRepliesIsBoundedByTheDeadline(t *testing.T) {
	a := &hostileAgent{reply: func(typ string) (bool, []byte, bool) {
		return true, nil, typ != api.RequestPing
	}}
	c := a.start(t, 0)
	if err := c.Ping(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	before := runtime.NumGoroutine()
	for _, call := range []func(context.Context) error{
		func(ctx context.Context) error { _, err := c.Ports(ctx); return err },
		func(ctx context.Context) error { _, err := c.Stats(ctx); return err },
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		start := time.Now()
		err := call(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "deadline") {
			t.Fatalf("err = %v, want a deadline error", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("returned after %s", d)
		}
	}
	// Closing the client releases what waited for the reply.
	c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines left waiting for the guest (had %d)", runtime.NumGoroutine(), before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
