package bulk

import (
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// Under TCG every message on the guest channel costs the guest a wakeup, and
// every wait for an answer a round trip through the emulated CPU. So a short
// command's stream is sent in as few writes as possible and nobody waits for
// what they can check later: the host writes the hello and, without waiting
// for the agent's answer, the frames that follow it (AfterHello); the client
// writes its Open, its requests and its EOF in one write (Batch).

// AfterHello returns c, on which WriteHello has just been sent, as a
// connection whose first Read reads and checks the agent's answer (within
// wait) before it yields the agent's frames, while writes go through at once.
// A refused, unsupported or missing answer fails that Read (and every later
// one) and is passed to onFail (which may be nil), so nothing the agent sent
// reaches the reader unless it accepted the key.
func AfterHello(c net.Conn, wait time.Duration, onFail func(error)) net.Conn {
	return &answerConn{Conn: c, wait: wait, onFail: onFail}
}

type answerConn struct {
	net.Conn
	wait   time.Duration
	once   sync.Once
	err    error
	onFail func(error)
}

func (a *answerConn) Read(p []byte) (int, error) {
	a.once.Do(func() {
		_ = a.Conn.SetReadDeadline(time.Now().Add(a.wait))
		a.err = ReadAnswer(a.Conn)
		_ = a.Conn.SetReadDeadline(time.Time{})
		if a.err != nil && a.onFail != nil {
			a.onFail(a.err)
		}
	})
	if a.err != nil {
		return 0, a.err
	}
	return a.Conn.Read(p)
}

// CloseWrite half-closes the connection when the underlying one can, and
// closes it otherwise.
func (a *answerConn) CloseWrite() error {
	if cw, ok := a.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return a.Conn.Close()
}

// Batch assembles the first frames of a stream (its Open, the requests that
// need no reply, the EOF of a command without input) so that they go in one
// write; NewChanAfter then serves the stream.
type Batch struct {
	buf []byte
	eof bool
	err error
}

func (b *Batch) frame(typ byte, payload []byte) {
	n := len(payload)
	if n > MaxFrame {
		b.err = fmt.Errorf("bulk frame of %d bytes exceeds %d", n, MaxFrame)
		return
	}
	b.buf = append(b.buf, typ, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	b.buf = append(b.buf, payload...)
}

// Open adds the stream's Open frame (it must come first).
func (b *Batch) Open(o Open) { b.frame(FrameOpen, ssh.Marshal(&o)) }

// Request adds a request that wants no reply.
func (b *Batch) Request(name string, payload []byte) {
	b.frame(FrameRequest, ssh.Marshal(&Request{Type: name, Payload: payload}))
}

// Data adds p as data frames of up to a chunk each.
func (b *Batch) Data(p []byte) {
	for len(p) > 0 {
		k := min(len(p), chunk)
		b.frame(FrameData, p[:k])
		p = p[k:]
	}
}

// EOF says no data will follow.
func (b *Batch) EOF() {
	b.frame(FrameEOF, nil)
	b.eof = true
}

// Bytes is what to write; it fails when a frame was too large.
func (b *Batch) Bytes() ([]byte, error) { return b.buf, b.err }

// NewChanAfter is NewChan for a stream whose first frames were sent as b.
func NewChanAfter(conn net.Conn, b *Batch) *Chan {
	c := NewChan(conn)
	c.sentEOF = b.eof
	return c
}
