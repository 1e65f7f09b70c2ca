package bulk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

func key(b byte) []byte { return bytes.Repeat([]byte{b}, KeySize) }

// TestHelloKey plays the local user who can reach the agent's vsock port:
// without the VM's key (wrong, short, none, or an agent that has none) the
// stream is refused before any operation runs.
func TestHelloKey(t *testing.T) {
	tests := []struct {
		name     string
		agentKey []byte
		send     []byte // raw hello bytes
		wantErr  error
	}{
		{"right key", key(7), append([]byte(Magic), key(7)...), nil},
		{"wrong key", key(7), append([]byte(Magic), key(8)...), ErrRefused},
		{"one bit off", key(7), append([]byte(Magic), append(key(7)[:KeySize-1], 6)...), ErrRefused},
		{"agent without a key", nil, append([]byte(Magic), make([]byte, KeySize)...), ErrRefused},
		{"agent without a key, empty key sent", nil, []byte(Magic + strings.Repeat("\x00", KeySize)), ErrRefused},
		{"bad magic", key(7), append([]byte("BANGERBULK2\n"), key(7)...), ErrRefused},
		{"short hello", key(7), []byte(Magic + "abc"), ErrRefused},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, agent := net.Pipe()
			defer host.Close()
			accepted := make(chan error, 1)
			go func() {
				isBulk, c := Classify(agent, time.Second)
				if !isBulk {
					accepted <- errors.New("not classified as bulk")
					agent.Close()
					return
				}
				accepted <- Accept(c, tt.agentKey, time.Second)
			}()
			host.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := host.Write(tt.send); err != nil && tt.wantErr == nil {
				t.Fatal(err)
			}
			if len(tt.send) < len(Magic)+KeySize {
				host.Close() // the agent's read ends
			}
			var ans [4]byte
			_, rerr := io.ReadFull(host, ans[:])
			aerr := <-accepted
			if tt.wantErr == nil {
				if rerr != nil || string(ans[:]) != Accepted || aerr != nil {
					t.Fatalf("answer %q %v, agent %v", ans, rerr, aerr)
				}
				return
			}
			if aerr == nil {
				t.Fatal("the agent accepted the stream")
			}
			if rerr == nil && string(ans[:]) == Accepted {
				t.Fatal("the agent answered Accepted")
			}
		})
	}
}

func TestHelloClient(t *testing.T) {
	for _, tt := range []struct {
		answer string
		want   error
	}{{Accepted, nil}, {Refused, ErrRefused}, {"SSH-2.0-x\r\n", ErrUnsupported}, {"", ErrRefused}} {
		host, agent := net.Pipe()
		go func() {
			buf := make([]byte, len(Magic)+KeySize)
			io.ReadFull(agent, buf)
			agent.Write([]byte(tt.answer))
			agent.Close()
		}()
		err := Hello(host, key(1))
		if !errors.Is(err, tt.want) && !(tt.want == nil && err == nil) {
			t.Errorf("answer %q: %v, want %v", tt.answer, err, tt.want)
		}
		host.Close()
	}
	if err := Hello(&bytes.Buffer{}, nil); err == nil {
		t.Error("Hello with no key succeeded")
	}
}

func TestClassifySSH(t *testing.T) {
	host, agent := net.Pipe()
	defer host.Close()
	go host.Write([]byte("SSH-2.0-Go\r\n"))
	isBulk, c := Classify(agent, time.Second)
	if isBulk {
		t.Fatal("an SSH client was classified as bulk")
	}
	buf := make([]byte, 12)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "SSH-2.0-Go\r\n" {
		t.Fatalf("peeked bytes lost: %q %v", buf, err)
	}
	// A client that waits for the server's identification is SSH too.
	h2, a2 := net.Pipe()
	defer h2.Close()
	if isBulk, _ := Classify(a2, 20*time.Millisecond); isBulk {
		t.Fatal("a silent client was classified as bulk")
	}
}

// TestReadFrameBounds plays a hostile peer: an oversized length is refused
// before anything is allocated, a truncated frame is an error.
func TestReadFrameBounds(t *testing.T) {
	var big [5]byte
	big[0] = FrameData
	binary.BigEndian.PutUint32(big[1:], MaxFrame+1)
	if _, _, err := ReadFrame(bytes.NewReader(big[:]), nil); err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Fatalf("oversized frame: %v", err)
	}
	binary.BigEndian.PutUint32(big[1:], 0xffffffff)
	if _, _, err := ReadFrame(bytes.NewReader(big[:]), nil); err == nil {
		t.Fatal("4 GiB frame accepted")
	}
	var b bytes.Buffer
	WriteFrame(&b, FrameData, []byte("hello"))
	if _, _, err := ReadFrame(bytes.NewReader(b.Bytes()[:7]), nil); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated frame: %v", err)
	}
	typ, p, err := ReadFrame(bytes.NewReader(b.Bytes()), nil)
	if err != nil || typ != FrameData || string(p) != "hello" {
		t.Fatalf("frame: %d %q %v", typ, p, err)
	}
	if err := WriteFrame(io.Discard, FrameData, make([]byte, MaxFrame+1)); err == nil {
		t.Fatal("wrote an oversized frame")
	}
	if _, err := ReadOpen(bytes.NewReader(b.Bytes())); err == nil {
		t.Fatal("a stream starting with data was opened")
	}
}

// TestChanRoundTrip runs both ends of a session: requests with and without
// replies, data both ways in more than one frame, stderr, EOF and close.
func TestChanRoundTrip(t *testing.T) {
	a, b := net.Pipe()
	host, agent := NewChan(a), NewChan(b)
	defer host.Close()
	payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB: several frames
	go func() {
		for r := range agent.Requests() {
			if r.WantReply {
				agent.SendReply(r.Type == "ok", nil)
			}
			if r.Type == "go" {
				got, _ := io.ReadAll(agent)
				agent.Write(got)
				agent.Stderr().Write([]byte("err"))
				agent.CloseWrite()
				agent.SendRequest("exit-status", false, []byte{0, 0, 0, 3})
				agent.Close()
			}
		}
	}()
	if ok, err := host.SendRequest("ok", true, nil); !ok || err != nil {
		t.Fatalf("request ok: %v %v", ok, err)
	}
	if ok, err := host.SendRequest("no", true, nil); ok || err != nil {
		t.Fatalf("request no: %v %v", ok, err)
	}
	host.SendRequest("go", false, nil)
	go func() {
		host.ReadFrom(bytes.NewReader(payload))
		host.CloseWrite()
	}()
	var out, errOut []byte
	done := make(chan struct{})
	go func() { errOut, _ = io.ReadAll(host.Stderr()); close(done) }()
	out, err := io.ReadAll(host)
	<-done
	if err != nil || !bytes.Equal(out, payload) || string(errOut) != "err" {
		t.Fatalf("echo: %d bytes (want %d) %v, stderr %q", len(out), len(payload), err, errOut)
	}
	var reqs []string
	for r := range host.Requests() {
		reqs = append(reqs, r.Type)
	}
	if len(reqs) != 1 || reqs[0] != "exit-status" {
		t.Fatalf("requests from the agent: %q", reqs)
	}
}

// FuzzChan feeds hostile frames to a Chan: it must never panic, and must
// end when the stream does.
func FuzzChan(f *testing.F) {
	var b bytes.Buffer
	WriteFrame(&b, FrameData, []byte("x"))
	WriteFrame(&b, FrameRequest, []byte{0, 0, 0, 1, 'a', 1, 0, 0, 0, 0})
	WriteFrame(&b, FrameReply, []byte{1, 0, 0, 0, 0})
	WriteFrame(&b, FrameEOF, nil)
	WriteFrame(&b, FrameClose, nil)
	f.Add(b.Bytes())
	f.Add([]byte{FrameData, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{9, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		a, peer := net.Pipe()
		c := NewChan(a)
		go func() {
			peer.Write(in)
			peer.Close()
		}()
		go io.Copy(io.Discard, c)
		go io.Copy(io.Discard, c.Stderr())
		for range c.Requests() {
		}
		<-c.Done()
		c.Close()
	})
}

// TestReadManifestHostile plays a guest answering a push: names that are
// not plain relative paths are dropped (the host never sends or deletes
// them), an oversized frame or a refusal ends the push, and the manifest
// is bounded.
func TestReadManifestHostile(t *testing.T) {
	var b bytes.Buffer
	WriteFrame(&b, FrameData, []byte(`[{"p":"../escape","t":"f","w":true},{"p":"/etc/passwd","t":"f","w":true},{"p":"a/../../b","t":"d","w":true},{"p":"","t":"f"},{"p":"ok/file","t":"f","s":3}]`))
	WriteFrame(&b, FrameEOF, nil)
	m, err := ReadManifest(&b)
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || m["ok/file"].S != 3 {
		t.Fatalf("manifest kept %v, want only ok/file", m)
	}
	var big [5]byte
	big[0] = FrameData
	binary.BigEndian.PutUint32(big[1:], MaxFrame+1)
	if _, err := ReadManifest(bytes.NewReader(big[:])); err == nil {
		t.Fatal("an oversized manifest frame was read")
	}
	b.Reset()
	WriteFrame(&b, FrameData, []byte(`not json`))
	if _, err := ReadManifest(&b); err == nil {
		t.Fatal("garbage manifest accepted")
	}
	b.Reset()
	WriteFrame(&b, FrameReply, ssh.Marshal(&Reply{OK: false, Payload: []byte("nope")}))
	if _, err := ReadManifest(&b); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("refusal: %v", err)
	}
	// more than the bound in total
	defer func(n int) { manifestBytes = n }(manifestBytes)
	manifestBytes = 4 << 20
	chunk := []byte(`[` + strings.Repeat(`{"p":"x","t":"f"},`, 40000) + `{"p":"y","t":"f"}]`)
	pr, pw := io.Pipe()
	go func() {
		for range manifestBytes/len(chunk) + 2 {
			if WriteFrame(pw, FrameData, chunk) != nil {
				return
			}
		}
		pw.Close()
	}()
	if _, err := ReadManifest(pr); err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Fatalf("unbounded manifest: %v", err)
	}
	pr.Close()
}

// TestChanCloseWithUnreadRequests plays a guest that floods a session with
// requests its peer does not read, and never replies: Close (which the host
// calls when the context ends) must end the stream's reader and a
// SendRequest waiting for a reply, not leave them blocked for good.
func TestChanCloseWithUnreadRequests(t *testing.T) {
	host, guest := net.Pipe()
	defer guest.Close()
	ch := NewChan(host)
	go func() {
		req := ssh.Marshal(&Request{Type: "exit-status", Payload: make([]byte, 4)})
		for i := 0; i < 100; i++ {
			if WriteFrame(guest, FrameRequest, req) != nil {
				return
			}
		}
	}()
	go io.Copy(io.Discard, guest) // the host's own frames
	replied := make(chan error, 1)
	go func() {
		_, err := ch.SendRequest("workdir", true, nil)
		replied <- err
	}()
	// let the flood fill the request queue
	deadline := time.Now().Add(10 * time.Second)
	for len(ch.reqs) < cap(ch.reqs) {
		if time.Now().After(deadline) {
			t.Fatal("the request queue never filled")
		}
		time.Sleep(time.Millisecond)
	}
	ch.Close()
	select {
	case <-ch.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Close left the reader blocked on the unread request queue")
	}
	select {
	case err := <-replied:
		if err == nil {
			t.Fatal("SendRequest succeeded with no reply")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close left SendRequest waiting for a reply")
	}
}

// TestChanCloseWithStalledPeer plays a guest that stops reading: a write
// blocked on it holds the write lock, and Close (the host's cancel) must
// still return and end the stream.
func TestChanCloseWithStalledPeer(t *testing.T) {
	host, guest := net.Pipe()
	defer guest.Close()
	ch := NewChan(host)
	go ch.Write(make([]byte, 1<<20)) // never read by the guest
	// poll until the writer holds the lock
	deadline := time.Now().Add(10 * time.Second)
	for ch.wmu.TryLock() {
		ch.wmu.Unlock()
		if time.Now().After(deadline) {
			t.Fatal("the write never started")
		}
		time.Sleep(time.Millisecond)
	}
	closed := make(chan struct{})
	go func() { ch.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close blocked behind a write the peer never reads")
	}
}

// readLog is a net.Conn that serves data and records the size of every
// Read asked of it. Its first Read returns one byte (the stream's first
// byte arrives alone), later ones as much as asked.
type readLog struct {
	net.Conn
	data  []byte
	asks  []int
	calls int
}

func (r *readLog) SetReadDeadline(time.Time) error { return nil }

func (r *readLog) Read(p []byte) (int, error) {
	r.asks = append(r.asks, len(p))
	r.calls++
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	if r.calls == 1 {
		p = p[:1]
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

// TestClassifyReadsPastThePeek: a classified stream yields every byte, and
// once what the peek buffered is read, reads go straight to the stream with
// the reader's own size, split at SplitReads: a frame's 5-byte header asks
// the stream for 5 bytes, not for a buffer's worth of the payload after it
// (which would then be copied a second time), and a payload is asked for
// in pieces of at most SplitReads (see there why). Whole does not split.
func TestClassifyReadsPastThePeek(t *testing.T) {
	var frames bytes.Buffer
	payload := bytes.Repeat([]byte("p"), 300<<10)
	for range 2 {
		if err := WriteFrame(&frames, FrameData, payload); err != nil {
			t.Fatal(err)
		}
	}
	want := append([]byte{Magic[0]}, frames.Bytes()...)
	split := func(n, at int) []int {
		var asks []int
		for ; n > 0; n -= at {
			asks = append(asks, min(n, at))
		}
		return asks
	}
	for _, tt := range []struct {
		name  string
		split int
		whole bool
		asks  []int
	}{
		{name: "no split (AVX)", split: 0, asks: []int{5, len(payload), 5, len(payload)}},
		{name: "split at 2048 (qemu64)", split: 2048,
			asks: append(append(append([]int{5}, split(len(payload), 2048)...), 5), split(len(payload), 2048)...)},
		{name: "whole", split: 2048, whole: true, asks: []int{5, len(payload), 5, len(payload)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			defer func(s int) { SplitReads = s }(SplitReads)
			SplitReads = tt.split
			conn := &readLog{data: bytes.Clone(want)}
			_, c := Classify(conn, time.Second)
			var first [1]byte
			if _, err := io.ReadFull(c, first[:]); err != nil || first[0] != Magic[0] {
				t.Fatalf("peeked byte: %q %v", first, err)
			}
			conn.asks = nil
			r := c.(*PeekConn).R
			if tt.whole {
				r = c.(*PeekConn).Whole()
			}
			for i := range 2 {
				typ, n, err := readHeader(r)
				if err != nil || typ != FrameData || n != len(payload) {
					t.Fatalf("frame %d: header %d %d %v", i, typ, n, err)
				}
				got := make([]byte, n)
				if err := readPayload(r, got); err != nil || !bytes.Equal(got, payload) {
					t.Fatalf("frame %d: payload differs (%v)", i, err)
				}
			}
			// The peek read one byte (the stream then had no more
			// buffered), so every later read came from the stream.
			if fmt.Sprint(conn.asks) != fmt.Sprint(tt.asks) {
				t.Fatalf("the stream was asked for %v, want %v", conn.asks, tt.asks)
			}
		})
	}
}

// TestClassifyDrainsThePeekBuffer: bytes the peek buffered beyond the
// first come out before any read of the stream, whatever the reads' sizes.
func TestClassifyDrainsThePeekBuffer(t *testing.T) {
	for _, size := range []int{1, 3, 4096, 1 << 20} {
		host, agent := net.Pipe()
		want := []byte{Magic[0]}
		for i := range 200 << 10 {
			want = append(want, byte(i*7))
		}
		go func() { host.Write(want); host.Close() }()
		_, c := Classify(agent, time.Second)
		var got []byte
		buf := make([]byte, size)
		for {
			n, err := c.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil {
				break
			}
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("reads of %d: got %d bytes, want %d, or they differ", size, len(got), len(want))
		}
	}
}
