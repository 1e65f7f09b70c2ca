package sshd

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/latelog"
)

// TestReidentifySwapsTheHostKey: after an accepted reidentify, new
// connections see the new host key; refused payloads change nothing.
func TestReidentifySwapsTheHostKey(t *testing.T) {
	oldKey := ed25519Signer(t)
	_, upriv, _ := ed25519.GenerateKey(rand.Reader)
	user, _ := ssh.NewSignerFromKey(upriv)
	var applied []api.Reidentify
	applyErr := error(nil)
	srv, err := New(Config{HostKey: oldKey, AuthorizedKeys: []ssh.PublicKey{user.PublicKey()}, KeepAlive: -1,
		Logger: slog.New(slog.DiscardHandler),
		OnReidentify: func(p api.Reidentify) error {
			if applyErr != nil {
				return applyErr
			}
			applied = append(applied, p)
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	connect := func(want ssh.PublicKey) *ssh.Client {
		t.Helper()
		client, server := connPair(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); srv.ServeConn(ctx, server) }()
		t.Cleanup(func() { client.Close(); cancel(); <-done })
		_ = client.SetDeadline(time.Now().Add(10 * time.Second))
		c, chans, reqs, err := ssh.NewClientConn(client, "agent", &ssh.ClientConfig{
			User: "root", Auth: []ssh.AuthMethod{ssh.PublicKeys(user)}, HostKeyCallback: ssh.FixedHostKey(want),
		})
		if err != nil {
			t.Fatalf("connect expecting host key %s: %v", ssh.FingerprintSHA256(want), err)
		}
		_ = client.SetDeadline(time.Time{})
		return ssh.NewClient(c, chans, reqs)
	}
	newKeyPEM := func() (string, ssh.Signer) {
		_, priv, _ := ed25519.GenerateKey(rand.Reader)
		blk, err := ssh.MarshalPrivateKey(priv, "")
		if err != nil {
			t.Fatal(err)
		}
		s, _ := ssh.NewSignerFromKey(priv)
		return string(pemEncode(blk)), s
	}
	send := func(c *ssh.Client, p any) (bool, string) {
		t.Helper()
		b, _ := json.Marshal(p)
		ok, reply, err := c.SendRequest(api.RequestReidentify, true, b)
		if err != nil {
			t.Fatal(err)
		}
		return ok, string(reply)
	}
	c := connect(oldKey.PublicKey())
	pemKey, newKey := newKeyPEM()

	tests := []struct {
		name     string
		payload  any
		applyErr error
		want     string
	}{
		{"not JSON", "garbage", nil, "bad payload"},
		{"bad host key", api.Reidentify{Hostname: "x", HostKey: "not a key"}, nil, "host key"},
		{"apply fails", api.Reidentify{Hostname: "x", HostKey: pemKey}, errors.New("no netlink"), "no netlink"},
		{"too large", api.Reidentify{Hostname: strings.Repeat("x", api.MaxReidentify)}, nil, "too large"},
	}
	for _, tc := range tests {
		applyErr = tc.applyErr
		if ok, reply := send(c, tc.payload); ok || !strings.Contains(reply, tc.want) {
			t.Errorf("%s: ok=%v %q, want a refusal mentioning %q", tc.name, ok, reply, tc.want)
		}
	}
	applyErr = nil
	// Still the old key after refusals.
	connect(oldKey.PublicKey()).Close()

	if ok, reply := send(c, api.Reidentify{Hostname: "clone", HostKey: pemKey, MachineID: strings.Repeat("a", 32)}); !ok {
		t.Fatalf("reidentify refused: %s", reply)
	}
	if len(applied) != 1 || applied[0].Hostname != "clone" {
		t.Fatalf("applied %+v", applied)
	}
	connect(newKey.PublicKey()).Close()
	// The old key is gone for new connections.
	client, server := connPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.ServeConn(ctx, server) }()
	defer func() { client.Close(); cancel(); <-done }()
	_ = client.SetDeadline(time.Now().Add(10 * time.Second))
	if _, _, _, err := ssh.NewClientConn(client, "agent", &ssh.ClientConfig{
		User: "root", Auth: []ssh.AuthMethod{ssh.PublicKeys(user)}, HostKeyCallback: ssh.FixedHostKey(oldKey.PublicKey()),
	}); err == nil {
		t.Fatal("a new connection still got the old host key")
	}
}

func pemEncode(b *pem.Block) []byte { return pem.EncodeToMemory(b) }

// TestReidentifyLogsLater: the records of an accepted reidentify are not
// written by the reply's after-function itself (a console line costs a
// freshly restored clone milliseconds on its way to its first command) but
// queued, and written by latelog later (here: its Flush).
func TestReidentifyLogsLater(t *testing.T) {
	var buf strings.Builder
	log := slog.New(slog.NewTextHandler(&buf, nil))
	srv, err := New(Config{HostKey: ed25519Signer(t), AuthorizedKeys: []ssh.PublicKey{ed25519Signer(t).PublicKey()}, KeepAlive: -1, Logger: log,
		OnReidentify: func(api.Reidentify) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	blk, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(api.Reidentify{Hostname: "clone", HostKey: string(pemEncode(blk))})
	ok, reply, after := srv.reidentify(b, log)
	if !ok {
		t.Fatalf("reidentify refused: %s", reply)
	}
	if after == nil {
		t.Fatal("no after-function: the records would be written before the reply")
	}
	after()
	if s := buf.String(); strings.Contains(s, "host key replaced") || strings.Contains(s, "identity replaced") {
		t.Fatalf("written on the reply's path: %q", s)
	}
	latelog.Flush()
	if s := buf.String(); !strings.Contains(s, "host key replaced") || !strings.Contains(s, "hostname=clone") {
		t.Fatalf("after latelog's flush: %q", s)
	}
}
