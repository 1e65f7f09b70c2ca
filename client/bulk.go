package client

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"strings"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/api"
	agentapi "github.com/bangerdev/banger/internal/agent/api"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/guestfs"
)

// The bulk path (vm.bulk): an unencrypted, key-authenticated stream to the
// agent, spliced by bangerd, that carries non-interactive commands and file
// copies without SSH's cost (see internal/agent/bulk). Terminals, `banger
// ssh` and OpenSSH keep using SSH.

// openBulk opens a bulk stream to vm and sends its Open frame.
func (c *Client) openBulk(ctx context.Context, vm string, o bulk.Open) (net.Conn, error) {
	return c.openBulkWith(ctx, api.BulkParams{VM: vm}, o)
}

// openBulkWith is openBulk with vm.bulk's parameters.
func (c *Client) openBulkWith(ctx context.Context, p api.BulkParams, o bulk.Open) (net.Conn, error) {
	var b bulk.Batch
	b.Open(o)
	return c.openBulkBatch(ctx, p, &b)
}

// openBulkBatch opens a bulk stream and sends b (which starts with the
// Open frame) in one write.
func (c *Client) openBulkBatch(ctx context.Context, p api.BulkParams, b *bulk.Batch) (net.Conn, error) {
	first, err := b.Bytes()
	if err != nil {
		return nil, &Error{Code: CodeInvalidArgument, Message: err.Error()}
	}
	rc, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	var res api.BulkResult
	conn, err := rc.Upgrade(ctx, api.MethodVMBulk, p, &res)
	if err != nil {
		rc.Close()
		return nil, err
	}
	if _, err := conn.Write(first); err != nil {
		conn.Close()
		return nil, fmt.Errorf("open a bulk stream to %s: %w", p.VM, err)
	}
	return conn, nil
}

// noBulk reports whether err means this bangerd or this VM's agent has no
// bulk path (an older version), so that SSH should be used instead.
func noBulk(err error) bool {
	switch Code(err) {
	case CodeUnknownMethod:
		return true
	case CodeFailedPrecondition:
		return strings.Contains(err.Error(), "bulk")
	}
	return false
}

// bulkSession opens an OpSession bulk stream as user.
func (c *Client) bulkSession(ctx context.Context, vm, user string) (*bulk.Chan, error) {
	conn, err := c.openBulk(ctx, vm, bulk.Open{Op: bulk.OpSession, User: user})
	if err != nil {
		return nil, err
	}
	return bulk.NewChan(conn), nil
}

// Wire messages of the session requests (RFC 4254 and banger's own).
type (
	envReq        struct{ Name, Value string }
	execReq       struct{ Command string }
	subsysReq     struct{ Name string }
	signalReq     struct{ Signal string }
	workDirReq    struct{ Dir string }
	exitStatusMsg struct{ Status uint32 }
	exitSignalMsg struct {
		Signal     string
		CoreDumped bool
		Error      string
		Lang       string
	}
)

// execBulk is Exec over the bulk path (no terminal). fallback is set when
// the bulk path is not available and nothing was run.
//
// The session's Open, its env requests, the command and (without stdin) the
// EOF go in one write, the order SSH would send them in: no request waits
// for a reply except the working directory's, which must succeed before the
// command may start.
func (c *Client) execBulk(ctx context.Context, vm string, argv []string, o ExecOptions) (code int, fallback bool, err error) {
	var b bulk.Batch
	b.Open(bulk.Open{Op: bulk.OpSession, User: o.User})
	for _, kv := range o.Env {
		k, v, _ := strings.Cut(kv, "=")
		b.Request("env", ssh.Marshal(&envReq{k, v}))
	}
	startReq, startPayload := "shell", []byte(nil)
	if len(argv) > 0 {
		startReq, startPayload = "exec", ssh.Marshal(&execReq{guestfs.ShellJoin(argv)})
	}
	if o.Dir == "" {
		b.Request(startReq, startPayload)
		if o.Stdin == nil {
			b.EOF()
		}
	}
	conn, err := c.openBulkBatch(ctx, api.BulkParams{VM: vm, Spool: spoolStdin(o.Stdin)}, &b)
	if err != nil {
		if noBulk(err) {
			return 0, true, nil
		}
		return 0, false, err
	}
	ch := bulk.NewChanAfter(conn, &b)
	defer ch.Close()
	stop := context.AfterFunc(ctx, func() { ch.Close() })
	defer stop()
	if o.Dir != "" {
		ok, err := ch.SendRequest(agentapi.RequestWorkDir, true, ssh.Marshal(&workDirReq{o.Dir}))
		if err != nil {
			return ExitCodeConnectionLost, false, ctxErr(ctx, fmt.Errorf("set the working directory: %w", err))
		}
		if !ok {
			return 0, false, &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("working directory %q does not exist in %s", o.Dir, vm)}
		}
		if _, err := ch.SendRequest(startReq, false, startPayload); err != nil {
			return ExitCodeConnectionLost, false, ctxErr(ctx, fmt.Errorf("start the command in %s: %w", vm, err))
		}
	}
	if o.Stdin != nil {
		// Not waited for, as with SSH: the caller's stdin may never end.
		go func() {
			_, _ = ch.ReadFrom(o.Stdin)
			_ = ch.CloseWrite()
		}()
	} else {
		_ = ch.CloseWrite() // already in the batch unless a working directory was set
	}
	outDone := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(orDiscard(o.Stdout), ch)
		outDone <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(orDiscard(o.Stderr), ch.Stderr())
		outDone <- struct{}{}
	}()
	defer forwardSignals(o.Signals, func(name string) {
		_, _ = ch.SendRequest("signal", false, ssh.Marshal(&signalReq{name}))
	})()
	code, got := 0, false
	for r := range ch.Requests() {
		switch r.Type {
		case "exit-status":
			var m exitStatusMsg
			if ssh.Unmarshal(r.Payload, &m) == nil {
				code, got = int(m.Status), true
			}
		case "exit-signal":
			var m exitSignalMsg
			if ssh.Unmarshal(r.Payload, &m) == nil {
				code, got = 128+SignalNumber(m.Signal), true
			}
		}
	}
	<-outDone
	<-outDone
	if !got {
		if ctx.Err() != nil {
			return ExitCodeConnectionLost, false, ctxErr(ctx, errors.New("the command was hung up"))
		}
		return ExitCodeConnectionLost, false, fmt.Errorf("the connection to %s closed before the command finished", vm)
	}
	return code, false, nil
}

// spoolStdinMin is the smallest stdin file a session asks the VM's spool
// for (api.BulkParams.Spool): below it the spool's extra round trip to the
// agent costs more than the channel would.
const spoolStdinMin = 256 << 10

// spoolPipeMin is how much a stdin pipe must hold already, when the
// session opens, for it to ask for the spool.
const spoolPipeMin = 32 << 10

// spoolStdin says whether a session's stdin is worth the VM's spool: a
// file of spoolStdinMin bytes or more, a pipe that holds spoolPipeMin
// bytes already (a producer with a lot to send fills it at once; `echo
// … |` and a slow producer take the channel, which starts the command one
// round trip to the agent sooner), or an in-memory reader of
// spoolStdinMin or more. A terminal is not: a person typing would hold
// the VM's spool (one transfer at a time) for nothing.
func spoolStdin(r io.Reader) bool {
	switch v := r.(type) {
	case nil:
		return false
	case *os.File:
		fi, err := v.Stat()
		if err != nil {
			return false
		}
		switch m := fi.Mode(); {
		case m.IsRegular():
			return fi.Size() >= spoolStdinMin
		case m&os.ModeNamedPipe != 0:
			return pipeHolds(v) >= spoolPipeMin
		}
		return false
	case interface{ Len() int }: // bytes.Reader, strings.Reader, bytes.Buffer
		return v.Len() >= spoolStdinMin
	}
	return false
}

// pipeHolds is how many bytes the pipe f holds unread (TIOCINQ, that is
// FIONREAD; 0 when unknown).
func pipeHolds(f *os.File) int {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		if v, err := unix.IoctlGetInt(int(fd), unix.TIOCINQ); err == nil {
			n = v
		}
	})
	return n
}

// ChannelThroughput measures the raw channel to vm: n bytes, unframed and
// unencrypted, from the agent to this process (toGuest false) or back, and
// the time that took (from the stream's Open to the last byte). It is the
// ceiling of everything the bulk path carries.
func (c *Client) ChannelThroughput(ctx context.Context, vm string, toGuest bool, n int64) (time.Duration, error) {
	op := bulk.OpZero
	if toGuest {
		op = bulk.OpSink
	}
	conn, err := c.openBulk(ctx, vm, bulk.Open{Op: op, N: uint64(n)})
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	start := time.Now()
	buf := make([]byte, 256<<10)
	if !toGuest {
		got, err := io.CopyBuffer(io.Discard, conn, buf)
		d := time.Since(start)
		if err == nil && got != n {
			err = fmt.Errorf("the agent sent %d bytes, want %d", got, n)
		}
		return d, ctxErr(ctx, err)
	}
	for left := n; left > 0; {
		k := min(left, int64(len(buf)))
		if _, err := conn.Write(buf[:k]); err != nil {
			return 0, ctxErr(ctx, err)
		}
		left -= k
	}
	var b [8]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		return 0, ctxErr(ctx, fmt.Errorf("read the agent's count: %w", err))
	}
	d := time.Since(start)
	if got := binary.BigEndian.Uint64(b[:]); got != uint64(n) {
		return d, fmt.Errorf("the agent received %d bytes, want %d", got, n)
	}
	return d, nil
}

// sftpOptions are the SFTP client's options for copies: many requests in
// flight hide the channel's latency.
var sftpOptions = []sftp.ClientOption{sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(64)}

// bulkSFTP starts the agent's SFTP server (as root) on a bulk stream.
// Cancelling ctx closes it; so does the returned function.
func (c *Client) bulkSFTP(ctx context.Context, vm string) (*sftp.Client, func(), error) {
	ch, err := c.bulkSession(ctx, vm, "")
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { ch.Close() })
	fail := func(err error) (*sftp.Client, func(), error) {
		stop()
		ch.Close()
		return nil, nil, ctxErr(ctx, err)
	}
	ok, err := ch.SendRequest("subsystem", true, ssh.Marshal(&subsysReq{"sftp"}))
	if err != nil {
		return fail(fmt.Errorf("start sftp in %s: %w", vm, err))
	}
	if !ok {
		return fail(fmt.Errorf("start sftp in %s: refused", vm))
	}
	go func() { _, _ = io.Copy(io.Discard, io.LimitReader(ch.Stderr(), 1<<20)) }()
	sc, err := sftp.NewClientPipe(ch, ch, append(sftpOptions, sftp.MaxPacketUnchecked(agentapi.SFTPMaxPacket))...)
	if err != nil {
		return fail(fmt.Errorf("start sftp in %s: %w", vm, err))
	}
	return sc, func() { sc.Close(); stop(); ch.Close() }, nil
}

// SFTP opens an SFTP session to a running VM as root, over the bulk path
// when the VM has one (else SSH). Cancelling ctx closes it; so does the
// returned function.
func (c *Client) SFTP(ctx context.Context, vm string) (*sftp.Client, func(), error) {
	sc, closeFn, err := c.bulkSFTP(ctx, vm)
	if err == nil || !noBulk(err) {
		return sc, closeFn, err
	}
	cl, err := c.SSH(ctx, vm, "")
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { cl.Close() })
	sc, err = sftp.NewClient(cl, sftpOptions...)
	if err != nil {
		stop()
		cl.Close()
		return nil, nil, fmt.Errorf("start sftp in %s: %w", vm, err)
	}
	return sc, func() { sc.Close(); stop(); cl.Close() }, nil
}

// Run runs argv in a running VM as root with no input, and fails with the
// command's stderr when it exits non-zero.
func (c *Client) Run(ctx context.Context, vm string, argv []string) error {
	var stderr strings.Builder
	code, err := c.Exec(ctx, vm, argv, ExecOptions{Stderr: &guestfs.LimitWriter{W: &stderr, N: 4096}})
	if err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("%s in %s: exit status %d: %s", argv[0], vm, code, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// GuestFileWriter writes one file in a guest over the bulk path (OpPut).
// Write or ReadFrom send its contents; Finish ends it and returns the
// agent's verdict; Close finishes (when Finish was not called) and closes
// the stream.
type GuestFileWriter struct {
	p    *bulk.Putter
	conn net.Conn
	ctx  context.Context
	stop func() bool
}

// CreateGuestFile creates or truncates path in a running VM (relative to
// root's home), as root, and returns a writer for its contents. An error
// for which IsUnsupported is true means this VM's agent (or bangerd)
// cannot do it: use SFTP instead.
func (c *Client) CreateGuestFile(ctx context.Context, vm, path string) (*GuestFileWriter, error) {
	conn, stop, p, err := openFileStream(c, ctx, vm, path, bulk.OpPut, func(c net.Conn) (*bulk.Putter, error) { return bulk.StartPut(c) })
	if err != nil {
		return nil, err
	}
	return &GuestFileWriter{p: p, conn: conn, ctx: ctx, stop: stop}, nil
}

// openFileStream opens a bulk stream of op (OpPut, OpGet) on path and reads
// the agent's answer with start; the stream closes when ctx ends.
func openFileStream[T any](c *Client, ctx context.Context, vm, path, op string, start func(net.Conn) (T, error)) (net.Conn, func() bool, T, error) {
	var zero T
	// the contents may go through the VM's spool (api.BulkParams.Spool)
	conn, err := c.openBulkWith(ctx, api.BulkParams{VM: vm, Spool: true}, bulk.Open{Op: op, Arg: path})
	if err != nil {
		return nil, nil, zero, err
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	v, err := start(conn)
	if err != nil {
		stop()
		conn.Close()
		return nil, nil, zero, ctxErr(ctx, fmt.Errorf("%s:%s: %w", vm, path, err))
	}
	return conn, stop, v, nil
}

func (w *GuestFileWriter) Write(b []byte) (int, error) {
	n, err := w.p.Write(b)
	return n, fileErr(w.ctx, err)
}

// ReadFrom sends what r yields in 256 KiB frames.
func (w *GuestFileWriter) ReadFrom(r io.Reader) (int64, error) {
	n, err := w.p.ReadFrom(r)
	return n, fileErr(w.ctx, err)
}

// Finish ends the file and waits until the agent has written and closed it.
func (w *GuestFileWriter) Finish() error { return fileErr(w.ctx, w.p.Finish()) }

// Close finishes the file and closes the stream.
func (w *GuestFileWriter) Close() error {
	err := w.Finish()
	w.stop()
	w.conn.Close()
	return err
}

// GuestFileReader reads one regular file in a guest over the bulk path
// (OpGet). It yields exactly the size the agent announced, or fails: a
// guest cannot make it yield more.
type GuestFileReader struct {
	g    *bulk.Getter
	conn net.Conn
	ctx  context.Context
	stop func() bool
}

// OpenGuestFile opens the regular file path in a running VM (relative to
// root's home), as root. IsUnsupported errors as for CreateGuestFile.
func (c *Client) OpenGuestFile(ctx context.Context, vm, path string) (*GuestFileReader, error) {
	conn, stop, g, err := openFileStream(c, ctx, vm, path, bulk.OpGet, func(c net.Conn) (*bulk.Getter, error) { return bulk.StartGet(c) })
	if err != nil {
		return nil, err
	}
	return &GuestFileReader{g: g, conn: conn, ctx: ctx, stop: stop}, nil
}

// Size is the file's size as the agent announced it.
func (r *GuestFileReader) Size() int64 { return int64(r.g.Info.Size) }

func (r *GuestFileReader) Read(b []byte) (int, error) {
	n, err := r.g.Read(b)
	if errors.Is(err, io.EOF) {
		return n, err
	}
	return n, fileErr(r.ctx, err)
}

// WriteTo writes the file's contents to w, a frame per Write.
func (r *GuestFileReader) WriteTo(w io.Writer) (int64, error) {
	n, err := r.g.WriteTo(w)
	return n, fileErr(r.ctx, err)
}

// Close closes the stream.
func (r *GuestFileReader) Close() error {
	r.stop()
	return r.conn.Close()
}

// IsUnsupported reports whether err means the bulk path cannot do what was
// asked for this VM (an older bangerd or agent, or a user the agent's file
// operations do not serve), so that SFTP should be used.
func IsUnsupported(err error) bool {
	return errors.Is(err, bulk.ErrUnsupported) || noBulk(err)
}

// fileErr is ctxErr for a result that may be a success.
func fileErr(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	return ctxErr(ctx, err)
}

// PutGuestFile copies one regular file into a running VM as root in one
// bulk stream (bulk.OpPutFile), with mode (its permission, setuid, setgid
// and sticky bits) and mtime set by the agent on the descriptor: into dest
// as base when dest is an existing directory, else as dest (relative to
// root's home; a trailing '/' says dest must be a directory). A file of up
// to bulk.MaxInline bytes goes with the request, without waiting for the
// agent: one round trip in all. It returns the path the agent wrote (the
// guest's words: print it escaped) and, on failure, an error that names
// neither the VM nor the path. An error for which IsFallback is true means
// nothing was changed and the caller should copy over SFTP (an older agent
// or bangerd, another user, or a refusal SFTP will put in its own words).
func (c *Client) PutGuestFile(ctx context.Context, vm, dest, base string, mode fs.FileMode, mtime time.Time, r io.Reader) (string, error) {
	// Contents beyond bulk.MaxInline (not inline) may go through the VM's
	// spool (api.BulkParams.Spool); a small file's go with the request, and
	// bangerd need not look at its frames.
	br := bufio.NewReaderSize(r, bulk.MaxInline+1)
	head, _ := br.Peek(bulk.MaxInline + 1) // a short read is a small file (or an error PutFileHost meets)
	conn, err := c.openBulkWith(ctx, api.BulkParams{VM: vm, Spool: len(head) > bulk.MaxInline}, bulk.Open{Op: bulk.OpPutFile, Arg: dest})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	target, err := bulk.PutFileHost(conn, base, mode, mtime, br)
	return target, fileErr(ctx, err)
}

// GetGuestFile opens path in a running VM (relative to root's home), as
// root, in one bulk stream (bulk.OpGetFile), and returns what the agent
// said of it (checked: bulk.CheckFileMeta) and, for a regular file, a
// reader that yields exactly its size. For anything else (a directory,
// another kind of file) the reader is nil. IsFallback errors as for
// PutGuestFile.
func (c *Client) GetGuestFile(ctx context.Context, vm, path string) (*GuestFileReader, bulk.FileMeta, error) {
	var m bulk.FileMeta
	conn, stop, g, err := openFileStream(c, ctx, vm, path, bulk.OpGetFile, func(c net.Conn) (*bulk.Getter, error) {
		g, meta, err := bulk.StartGetFile(c)
		m = meta
		return g, err
	})
	if err != nil {
		return nil, m, err
	}
	if g == nil {
		stop()
		conn.Close()
		return nil, m, nil
	}
	return &GuestFileReader{g: g, conn: conn, ctx: ctx, stop: stop}, m, nil
}

// IsFallback reports whether a PutGuestFile or GetGuestFile error means
// nothing was done and the copy should go over SFTP: IsUnsupported, or
// the agent could not open the file (SFTP then says why in cp's words).
func IsFallback(err error) bool {
	return IsUnsupported(err) || errors.Is(err, bulk.ErrOpenRefused)
}
