package guest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/vmm"
)

// fakeFirecrackerVsock serves a unix socket the way Firecracker's hybrid vsock
// device does (vsock.md, host-initiated connections): the host sends
// "CONNECT <port>\n"; when a guest listener exists on that port the device
// answers "OK <host side port>\n" and the stream is forwarded; otherwise the
// device closes the connection. Here guest "listeners" are functions.
type fakeFirecrackerVsock struct {
	listeners map[uint32]func(net.Conn)
	// reply overrides the acknowledgement line (for protocol error tests).
	reply string
	// silent makes the device accept CONNECT and never answer.
	silent bool
	// extra is written right after the OK line, in the same write, as a fast
	// guest would.
	extra string
}

func (f *fakeFirecrackerVsock) serve(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "v.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		hostPort := uint32(1 << 30)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			hostPort++
			go f.handle(c, hostPort)
		}
	}()
	return sock
}

func (f *fakeFirecrackerVsock) handle(c net.Conn, hostPort uint32) {
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		c.Close()
		return
	}
	var port uint32
	if n, err := fmt.Sscanf(line, "CONNECT %d\n", &port); n != 1 || err != nil {
		c.Close()
		return
	}
	if f.silent {
		_, _ = io.Copy(io.Discard, br)
		c.Close()
		return
	}
	fn, ok := f.listeners[port]
	if !ok {
		c.Close() // nobody listening: the device terminates the connection
		return
	}
	reply := f.reply
	if reply == "" {
		reply = fmt.Sprintf("OK %d\n", hostPort)
	}
	if _, err := io.WriteString(c, reply+f.extra); err != nil {
		c.Close()
		return
	}
	fn(c)
}

func echo(c net.Conn) {
	defer c.Close()
	_, _ = io.Copy(c, c)
}

func TestDialVsockUDS(t *testing.T) {
	ctx := func(d time.Duration) context.Context {
		c, cancel := context.WithTimeout(context.Background(), d)
		t.Cleanup(cancel)
		return c
	}
	t.Run("ok", func(t *testing.T) {
		f := &fakeFirecrackerVsock{listeners: map[uint32]func(net.Conn){52: echo}}
		sock := f.serve(t)
		c, err := DialVsockUDS(ctx(5*time.Second), sock, 52)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("ping\n")); err != nil {
			t.Fatal(err)
		}
		got, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || got != "ping\n" {
			t.Fatalf("echo %q %v", got, err)
		}
	})
	t.Run("bytes right after OK are kept", func(t *testing.T) {
		f := &fakeFirecrackerVsock{listeners: map[uint32]func(net.Conn){52: echo}, extra: "SSH-2.0-x\r\n"}
		sock := f.serve(t)
		c, err := DialVsockUDS(ctx(5*time.Second), sock, 52)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		got, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || got != "SSH-2.0-x\r\n" {
			t.Fatalf("first stream bytes %q %v", got, err)
		}
	})
	t.Run("nobody listening", func(t *testing.T) {
		f := &fakeFirecrackerVsock{listeners: map[uint32]func(net.Conn){52: echo}}
		sock := f.serve(t)
		_, err := DialVsockUDS(ctx(5*time.Second), sock, 53)
		if !errors.Is(err, ErrAgentNotListening) {
			t.Fatalf("err = %v, want ErrAgentNotListening", err)
		}
	})
	t.Run("bad reply", func(t *testing.T) {
		for _, reply := range []string{"NOPE 1\n", "OK\n", "OK x\n", "OK 1 2\n"} {
			f := &fakeFirecrackerVsock{listeners: map[uint32]func(net.Conn){52: echo}, reply: reply}
			sock := f.serve(t)
			_, err := DialVsockUDS(ctx(5*time.Second), sock, 52)
			if err == nil || !strings.Contains(err.Error(), "unexpected reply") {
				t.Fatalf("reply %q: err = %v", reply, err)
			}
		}
	})
	t.Run("overlong reply", func(t *testing.T) {
		f := &fakeFirecrackerVsock{listeners: map[uint32]func(net.Conn){52: echo}, reply: strings.Repeat("O", 200)}
		sock := f.serve(t)
		if _, err := DialVsockUDS(ctx(5*time.Second), sock, 52); err == nil {
			t.Fatal("overlong reply accepted")
		}
	})
	t.Run("no answer is bounded by ctx", func(t *testing.T) {
		f := &fakeFirecrackerVsock{silent: true}
		sock := f.serve(t)
		start := time.Now()
		_, err := DialVsockUDS(ctx(300*time.Millisecond), sock, 52)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want deadline exceeded", err)
		}
		if time.Since(start) > 5*time.Second {
			t.Fatal("dial was not bounded by its context")
		}
	})
	t.Run("no socket", func(t *testing.T) {
		_, err := DialVsockUDS(ctx(time.Second), filepath.Join(t.TempDir(), "missing.sock"), 52)
		if err == nil || !strings.Contains(err.Error(), "is the VM running") {
			t.Fatalf("err = %v", err)
		}
	})
}

// TestClientOverHybridVsock runs the SSH client through a Transport over the
// fake Firecracker device, forwarding to the in-process agent.
func TestClientOverHybridVsock(t *testing.T) {
	e := startAgent(t)
	f := &fakeFirecrackerVsock{listeners: map[uint32]func(net.Conn){52: func(c net.Conn) {
		defer c.Close()
		a, err := e.dialer.Dial(context.Background())
		if err != nil {
			return
		}
		defer a.Close()
		go func() { _, _ = io.Copy(a, c) }()
		_, _ = io.Copy(c, a)
	}}}
	sock := f.serve(t)
	tr, err := NewTransport(vmm.GuestChannel{Kind: vmm.ChannelVsockUDS, Path: sock, Port: 52}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	c := e.newClient(t, e.hostKey.Public, e.userKey.Signer)
	c.cfg.Dialer = tr
	ctx := testCtx(t)
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	code, err := c.Exec(ctx, []string{"echo", "over vsock"}, nil, &out, io.Discard, ExecOptions{})
	if err != nil || code != 0 || out.String() != "over vsock\n" {
		t.Fatalf("exec: %d %v %q", code, err, out.String())
	}
}

func TestNewTransportValidates(t *testing.T) {
	for _, ch := range []vmm.GuestChannel{
		{Kind: vmm.ChannelVsockUDS, Path: "/x"},
		{Kind: vmm.ChannelVsockUDS, Port: 52},
		{Kind: vmm.ChannelVsock, CID: 2, Port: 52},
		{Kind: vmm.ChannelSerial},
		{Kind: "carrier-pigeon"},
	} {
		if _, err := NewTransport(ch, nil); err == nil {
			t.Errorf("NewTransport(%+v) succeeded", ch)
		}
	}
	if _, err := Dial(context.Background(), vmm.GuestChannel{Kind: vmm.ChannelSerial, Path: "/x"}); err == nil {
		t.Error("package Dial accepted a serial channel")
	}
}

// TestHandshakeAnswersHello: after a restore, the clone's agent is still in
// its source's yamux session, which swallows the first preamble; the agent
// then starts over with a hello. The host answers that hello with a
// preamble at once (the resend interval here is an hour, so the handshake
// completes only through the hello).
func TestHandshakeAnswersHello(t *testing.T) {
	host, guest := net.Pipe()
	defer host.Close()
	defer guest.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- hostHandshake(ctx, host, bufio.NewReader(host), time.Hour) }()

	gr := bufio.NewReader(guest)
	guest.SetDeadline(time.Now().Add(10 * time.Second))
	if kind, _, err := api.ReadMuxLine(gr); err != nil || kind != api.MuxPreamble {
		t.Fatalf("first line %q, %v", kind, err)
	} // swallowed by the stale session
	if _, err := guest.Write(api.MuxLine(api.MuxHello, "-")); err != nil {
		t.Fatal(err)
	}
	kind, nonce, err := api.ReadMuxLine(gr)
	if err != nil || kind != api.MuxPreamble {
		t.Fatalf("after hello: %q, %v (want a preamble at once)", kind, err)
	}
	if _, err := guest.Write(api.MuxLine(api.MuxAck, nonce)); err != nil {
		t.Fatal(err)
	}
	if kind, got, err := api.ReadMuxLine(gr); err != nil || kind != api.MuxGo || got != nonce {
		t.Fatalf("after ack: %q %q, %v", kind, got, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
