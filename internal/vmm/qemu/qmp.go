package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// maxQMPLine bounds one QMP message. QEMU's replies to the few commands banger
// sends are small; a peer that sends more is not QEMU.
const maxQMPLine = 1 << 20

// QMPError is an error reply from QEMU ({"error": {"class": ..., "desc": ...}}).
type QMPError struct {
	Command string
	Class   string
	Desc    string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qemu refused %s: %s (%s)", e.Command, e.Desc, e.Class)
}

// QMPVersion is the QEMU version announced in the QMP greeting.
type QMPVersion struct {
	Major, Minor, Micro int
	Package             string
}

func (v QMPVersion) String() string {
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
}

// QMP is a minimal client of the QEMU Machine Protocol: JSON messages, one per
// line, over a unix socket. Commands are executed one at a time; asynchronous
// events received in between are skipped. It is safe for concurrent use.
type QMP struct {
	conn    net.Conn
	r       *bufio.Reader
	mu      sync.Mutex
	nextID  uint64
	version QMPVersion
}

type qmpMessage struct {
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
	} `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string          `json:"event"`
	ID    json.RawMessage `json:"id"`
}

// DialQMP connects to the QMP socket at path, reads QEMU's greeting and leaves
// capabilities negotiation mode, so that the returned client accepts commands.
// The whole exchange is bounded by ctx.
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to qemu monitor %s: %w", path, err)
	}
	q := &QMP{conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}
	if err := q.handshake(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

func (q *QMP) handshake(ctx context.Context) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	stop := q.bound(ctx)
	defer stop()
	for {
		m, err := q.readMessage()
		if err != nil {
			return ctxErr(ctx, fmt.Errorf("read qemu monitor greeting: %w", err))
		}
		if m.Event != "" {
			continue
		}
		if m.QMP == nil {
			return fmt.Errorf("qemu monitor sent no greeting (is %s a QMP socket?)", q.conn.RemoteAddr())
		}
		v := m.QMP.Version
		q.version = QMPVersion{Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro, Package: v.Package}
		break
	}
	if _, err := q.execLocked("qmp_capabilities", nil); err != nil {
		return ctxErr(ctx, err)
	}
	return nil
}

// Version is the QEMU version from the greeting.
func (q *QMP) Version() QMPVersion { return q.version }

// Execute runs command with args (nil or a JSON-marshalable value) and decodes
// the "return" value into result (unless result is nil). An error reply is a
// *QMPError.
func (q *QMP) Execute(ctx context.Context, command string, args, result any) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	stop := q.bound(ctx)
	defer stop()
	ret, err := q.execLocked(command, args)
	if err != nil {
		return ctxErr(ctx, err)
	}
	if result != nil && len(ret) > 0 {
		if err := json.Unmarshal(ret, result); err != nil {
			return fmt.Errorf("decode qemu reply to %s: %w", command, err)
		}
	}
	return nil
}

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }

// bound interrupts blocked I/O on the connection when ctx ends (deadline or
// cancellation). The returned func must be called when the exchange is over.
// Using only ctx (not a socket deadline of its own) guarantees that ctx.Err is
// set whenever I/O was interrupted, so callers see DeadlineExceeded/Canceled.
func (q *QMP) bound(ctx context.Context) func() {
	_ = q.conn.SetDeadline(time.Time{})
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		_ = q.conn.SetDeadline(time.Unix(1, 0))
	})
	return func() {
		if !stop() {
			<-fired // let it finish so that it cannot hit a later exchange
		}
	}
}

func (q *QMP) execLocked(command string, args any) (json.RawMessage, error) {
	q.nextID++
	id := "banger-" + strconv.FormatUint(q.nextID, 10)
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{command, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode qemu command %s: %w", command, err)
	}
	b = append(b, '\n')
	if _, err := q.conn.Write(b); err != nil {
		return nil, fmt.Errorf("send %s to qemu monitor: %w", command, err)
	}
	for {
		m, err := q.readMessage()
		if err != nil {
			return nil, fmt.Errorf("read qemu reply to %s: %w", command, err)
		}
		if m.Event != "" || m.QMP != nil {
			continue
		}
		if len(m.ID) == 0 && m.Error != nil {
			// QEMU answers a request it could not parse without an id.
			return nil, &QMPError{Command: command, Class: m.Error.Class, Desc: m.Error.Desc}
		}
		var gotID string
		if len(m.ID) > 0 && json.Unmarshal(m.ID, &gotID) != nil {
			continue // not one of ours
		}
		if gotID != id {
			// A reply to an earlier command whose caller gave up: drop it.
			continue
		}
		if m.Error != nil {
			return nil, &QMPError{Command: command, Class: m.Error.Class, Desc: m.Error.Desc}
		}
		if m.Return == nil {
			return nil, fmt.Errorf("qemu reply to %s has neither return nor error", command)
		}
		return m.Return, nil
	}
}

var errQMPLineTooLong = errors.New("qemu monitor message too long")

func (q *QMP) readMessage() (*qmpMessage, error) {
	var line []byte
	for {
		chunk, isPrefix, err := q.r.ReadLine()
		if err != nil {
			return nil, err
		}
		line = append(line, chunk...)
		if len(line) > maxQMPLine {
			return nil, errQMPLineTooLong
		}
		if !isPrefix {
			break
		}
	}
	line = bytes.TrimSpace(line)
	if len(line) == 0 {
		return &qmpMessage{Event: "empty"}, nil
	}
	var m qmpMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, fmt.Errorf("malformed qemu monitor message: %w", err)
	}
	return &m, nil
}

// ctxErr prefers the context's error when the context ended, since the I/O
// error it caused ("i/o timeout") says less.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return err
}
