package bulk

import (
	"errors"
	"fmt"
	"io"
	"syscall"

	"golang.org/x/crypto/ssh"
)

// OpControl carries bangerd's control requests (ping, reidentify, ports,
// stats, shutdown: the names and payloads of the SSH global requests in
// package api) without an SSH handshake. After the Open frame the host
// sends one FrameRequest (a Request, WantReply set) at a time and waits for
// its FrameReply; FrameClose ends the stream. The stream is authenticated
// by the bulk key like every bulk stream, so it is refused without it.
const OpControl = "control"

// MaxControlRequest bounds a control request's payload (the largest,
// a reidentify, is at most api.MaxReidentify).
const MaxControlRequest = 128 << 10

// ErrControlClosed means the agent ended a control stream without
// answering: an agent that does not know OpControl closes the stream after
// the Open frame.
var ErrControlClosed = errors.New("the guest agent closed the control stream without answering")

// ControlCall sends one request on a control stream (after the hello and
// the Open frame) and returns the agent's reply. Everything the agent sends
// is bounded: a reply payload over maxReply bytes, a frame over MaxFrame or
// any frame but FrameReply is an error, and the stream must not be used
// again after an error. A deadline on the stream bounds the call.
func ControlCall(rw io.ReadWriter, name string, payload []byte, maxReply int) (bool, []byte, error) {
	if len(payload) > MaxControlRequest {
		return false, nil, fmt.Errorf("control request %s: a payload of %d bytes (at most %d)", name, len(payload), MaxControlRequest)
	}
	if err := WriteFrame(rw, FrameRequest, ssh.Marshal(&Request{Type: name, WantReply: true, Payload: payload})); err != nil {
		return false, nil, closed(err)
	}
	typ, p, err := ReadFrame(rw, nil)
	if err != nil {
		return false, nil, closed(err)
	}
	if typ == FrameClose {
		return false, nil, ErrControlClosed
	}
	if typ != FrameReply {
		return false, nil, fmt.Errorf("control request %s: the agent answered with frame type %d, not a reply", name, typ)
	}
	var r Reply
	if err := ssh.Unmarshal(p, &r); err != nil {
		return false, nil, fmt.Errorf("control request %s: undecodable reply: %w", name, err)
	}
	if len(r.Payload) > maxReply {
		return false, nil, fmt.Errorf("the guest agent's reply to %s is %d bytes, over the limit of %d: not decoding it (a broken or hostile guest)", name, len(r.Payload), maxReply)
	}
	return r.OK, r.Payload, nil
}

// closed wraps in ErrControlClosed the errors of a stream the agent closed
// (whether the request's write or the reply's read saw it first); other
// errors, a truncated frame among them, are returned as they are.
func closed(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("%w (%w)", ErrControlClosed, err)
	}
	return err
}

// ControlHandler answers one control request. after, when not nil, runs
// once the reply has been written (a shutdown, a log line that must not
// delay the reply).
type ControlHandler func(name string, payload []byte) (ok bool, reply []byte, after func())

// ServeControl serves a control stream (agent side, after the Open frame)
// until the host closes it, sends anything but a request, or the stream
// fails. r reads the stream (a PeekConn's reader), w writes it.
func ServeControl(r io.Reader, w io.Writer, handle ControlHandler) error {
	for {
		// a fresh buffer each time: a handler may keep the payload
		typ, p, err := ReadFrame(r, nil)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		switch typ {
		case FrameClose:
			return nil
		case FrameRequest:
		default:
			return fmt.Errorf("control stream: frame type %d, not a request", typ)
		}
		if len(p) > MaxControlRequest+1024 {
			return fmt.Errorf("control stream: a request of %d bytes (at most %d)", len(p), MaxControlRequest)
		}
		var req Request
		if err := ssh.Unmarshal(p, &req); err != nil {
			return fmt.Errorf("control stream: undecodable request: %w", err)
		}
		ok, reply, after := handle(req.Type, req.Payload)
		if req.WantReply {
			if err := WriteFrame(w, FrameReply, ssh.Marshal(&Reply{OK: ok, Payload: reply})); err != nil {
				return err
			}
		}
		if after != nil {
			after()
		}
	}
}
