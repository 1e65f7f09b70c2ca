package daemon

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/guest"
)

// sshAgent is bangerd's control connection to a guest agent: one SSH
// connection over the VM's transport, host key pinned, reused for pings and
// shutdown requests.
type sshAgent struct {
	t       *guest.Transport
	hostKey ssh.PublicKey
	userKey string

	mu   sync.Mutex
	conn *ssh.Client
}

// newGuestAgent returns an agent factory that authenticates with the
// user's banger key at userKeyPath.
func newGuestAgent(userKeyPath string) func(t *guest.Transport, hostKeyLine string) (guestAgent, error) {
	return func(t *guest.Transport, hostKeyLine string) (guestAgent, error) {
		pub, err := guest.ParsePublicKey(hostKeyLine)
		if err != nil {
			return nil, fmt.Errorf("VM host key: %w", err)
		}
		return &sshAgent{t: t, hostKey: pub, userKey: userKeyPath}, nil
	}
}

func (a *sshAgent) client(ctx context.Context) (*ssh.Client, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.conn != nil {
		return a.conn, nil
	}
	uk, err := guest.LoadOrCreateUserKey(a.userKey)
	if err != nil {
		return nil, err
	}
	nc, err := a.t.Dial(ctx)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	cc, chans, reqs, err := ssh.NewClientConn(nc, "guest", &ssh.ClientConfig{
		User:            "root",
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(uk.Signer)},
		HostKeyCallback: ssh.FixedHostKey(a.hostKey),
		Timeout:         10 * time.Second,
	})
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	a.conn = ssh.NewClient(cc, chans, reqs)
	return a.conn, nil
}

func (a *sshAgent) request(ctx context.Context, name string) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	type result struct {
		ok  bool
		err error
	}
	ch := make(chan result, 1)
	go func() {
		ok, _, err := c.SendRequest(name, true, nil)
		ch <- result{ok, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			a.reset()
			return r.err
		}
		if !r.ok {
			return fmt.Errorf("agent refused %s", name)
		}
		return nil
	case <-ctx.Done():
		a.reset()
		return ctx.Err()
	}
}

func (a *sshAgent) reset() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.conn != nil {
		a.conn.Close()
		a.conn = nil
	}
}

func (a *sshAgent) Ping(ctx context.Context) error     { return a.request(ctx, api.RequestPing) }
func (a *sshAgent) Shutdown(ctx context.Context) error { return a.request(ctx, api.RequestShutdown) }
func (a *sshAgent) Close() error                       { a.reset(); return nil }
