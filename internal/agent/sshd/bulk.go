package sshd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
)

// bulkOpenTimeout bounds the wait for a bulk stream's Open frame.
const bulkOpenTimeout = 30 * time.Second

// maxZero bounds OpZero.
const maxZero = 64 << 30

// ServeBulk serves one bulk stream whose hello has been accepted (see
// package bulk) until it ends or ctx is done.
func (s *Server) ServeBulk(ctx context.Context, c net.Conn) {
	defer c.Close()
	defer s.recoverPanic(s.log, "bulk stream handler", nil)
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	_ = c.SetReadDeadline(time.Now().Add(bulkOpenTimeout))
	var r io.Reader = c
	if pc, ok := c.(*bulk.PeekConn); ok {
		r = pc.R
	}
	o, err := bulk.ReadOpen(r)
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		s.log.Info("bulk stream refused", "error", err)
		return
	}
	log := s.log.With("bulk", o.Op, "user", o.User)
	// A one-file operation in its spool form runs as the plain one with
	// its contents in the spool device's slots.
	var dev bulk.SpoolDev
	if op, spool := bulk.SpoolOp(o.Op); spool {
		d, release, err := s.openSpool()
		if err != nil {
			_ = bulk.WriteFrame(c, bulk.FrameReply, ssh.Marshal(&bulk.Reply{Payload: []byte(err.Error())}))
			log.Debug("spool refused", "error", err)
			return
		}
		defer release()
		o.Op, dev = op, d
		if bulk.SpoolStream(op) {
			// the whole stream from the host comes in slots
			sr, err := bulk.NewSpoolReader(r, c, dev)
			if err != nil {
				_ = bulk.WriteFrame(c, bulk.FrameReply, ssh.Marshal(&bulk.Reply{Payload: []byte(bulk.Unsupported + err.Error())}))
				return
			}
			defer sr.Close()
			r, dev = sr, nil
		}
	}
	switch o.Op {
	case bulk.OpSession:
		var ch *bulk.Chan
		if dev != nil {
			// the spool form: say it is taken, then the host's larger
			// data frames come in slots
			if err := bulk.SpoolAccept(c); err != nil {
				return
			}
			ch = bulk.NewSpoolChan(c, dev)
		} else {
			ch = bulk.NewChan(c)
		}
		ss := &session{srv: s, log: log, ch: ch, user: o.User, gate: make(chan struct{})}
		for r := range ch.Requests() {
			ss.serve(ctx, &ssh.Request{Type: r.Type, Payload: r.Payload}, r.WantReply, ch.SendReply)
		}
		ss.hangup()
		ch.Close()
	case bulk.OpControl:
		if err := bulk.ServeControl(r, c, func(name string, payload []byte) (bool, []byte, func()) {
			return s.control(name, payload, log)
		}); err != nil {
			log.Info("control stream ended", "error", err)
		}
	case bulk.OpZero:
		n := min(o.N, maxZero)
		buf := make([]byte, 256<<10)
		for n > 0 {
			k := min(n, uint64(len(buf)))
			if _, err := c.Write(buf[:k]); err != nil {
				log.Debug("bulk zero", "error", err)
				return
			}
			n -= k
		}
	case bulk.OpSink:
		src := r
		if pc, ok := c.(*bulk.PeekConn); ok {
			src = pc.Whole() // unframed: nothing to align, so no split reads
		}
		n, err := sink(src, min(o.N, maxZero))
		if err != nil {
			log.Debug("bulk sink", "error", err)
			return
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		_, _ = c.Write(b[:])
	case bulk.OpSync:
		sy := &bulk.Syncer{Dest: o.Arg, StateDir: s.cfg.WorkspaceState}
		if err := sy.Serve(c, r); err != nil {
			log.Info("workspace push failed", "dest", o.Arg, "error", err)
		}
	case bulk.OpPull:
		if err := bulk.ServePull(c, r, o.Arg, o.N); err != nil {
			log.Info("workspace pull failed", "dir", o.Arg, "error", err)
		}
	case bulk.OpPut, bulk.OpGet:
		p, err := s.filePath(o.User, o.Arg)
		if err != nil {
			_ = bulk.WriteFrame(c, bulk.FrameReply, ssh.Marshal(&bulk.Reply{Payload: []byte(err.Error())}))
			log.Info("bulk file refused", "path", o.Arg, "error", err)
			return
		}
		if o.Op == bulk.OpPut {
			err = bulk.ServePut(c, r, p, dev)
		} else {
			err = bulk.ServeGet(c, r, p, dev)
		}
		if err != nil {
			log.Info("bulk file copy failed", "op", o.Op, "path", p, "error", err)
		}
	case bulk.OpPutFile:
		req, err := bulk.ReadPutFile(r)
		if err != nil {
			log.Info("bulk file refused", "path", o.Arg, "error", err)
			return
		}
		p, err := s.filePath(o.User, o.Arg)
		if err != nil {
			_ = bulk.RefusePutFile(c, r, req, err)
			log.Info("bulk file refused", "path", o.Arg, "error", err)
			return
		}
		if err := bulk.ServePutFile(c, r, req, p, strings.HasSuffix(o.Arg, "/"), dev); err != nil {
			log.Info("bulk file copy failed", "op", o.Op, "path", p, "error", err)
		}
	case bulk.OpGetFile:
		p, err := s.filePath(o.User, o.Arg)
		if err == nil {
			err = bulk.ServeGetFile(c, r, p, dev)
		} else {
			_ = bulk.WriteFrame(c, bulk.FrameReply, ssh.Marshal(&bulk.Reply{Payload: []byte(err.Error())}))
		}
		if err != nil {
			log.Info("bulk file copy failed", "op", o.Op, "path", o.Arg, "error", err)
		}
	default:
		log.Info("bulk stream refused: unknown operation")
	}
}

// filePath resolves OpPut's and OpGet's path for user: relative to the
// user's home (else /), as SFTP resolves it. The agent does the file's I/O
// itself, so only the agent's own user is served here; for another the
// answer starts with bulk.Unsupported and the host uses SFTP (which runs
// as that user).
func (s *Server) filePath(user, p string) (string, error) {
	acct, err := s.userFor(user)
	if err != nil {
		return "", err
	}
	if acct.UID != uint32(os.Getuid()) {
		return "", fmt.Errorf("%suser %q is not the agent's own", bulk.Unsupported, acct.Name)
	}
	if p == "" || strings.IndexByte(p, 0) >= 0 {
		return "", fmt.Errorf("bad path %q", p)
	}
	if filepath.IsAbs(p) {
		return filepath.Clean(p), nil
	}
	home := "/"
	if acct.Home != "" && isDir(acct.Home) {
		home = acct.Home
	}
	return filepath.Join(home, p), nil
}

// sink reads and drops up to n bytes of r (until EOF), in reads of up to
// 256 KiB: the raw channel's far end, the least a consumer can do with
// the bytes. (io.Copy to io.Discard would read through its 8 KiB buffer.)
func sink(r io.Reader, n uint64) (int64, error) {
	buf := make([]byte, 256<<10)
	var got int64
	for uint64(got) < n {
		k, err := r.Read(buf[:min(uint64(len(buf)), n-uint64(got))])
		got += int64(k)
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			return got, err
		}
	}
	return got, nil
}

// openSpool opens the spool device and takes it for one operation: an
// error (no device, busy) starts with bulk.Unsupported, so the host takes
// the channel instead.
func (s *Server) openSpool() (bulk.SpoolDev, func(), error) {
	if s.cfg.OpenSpool == nil || (s.cfg.SpoolPresent != nil && !s.cfg.SpoolPresent()) {
		return nil, nil, errors.New(bulk.Unsupported + "no spool device")
	}
	release, err := bulk.AcquireSpool()
	if err != nil {
		return nil, nil, err
	}
	d := &lazyDev{open: s.cfg.OpenSpool}
	return d, func() { d.close(); release() }, nil
}

// lazyDev opens the spool device at its first use: an operation whose
// contents all go in frames (a small file) never opens it.
type lazyDev struct {
	open func() (*os.File, error)
	f    *os.File
	err  error
}

func (d *lazyDev) get() (*os.File, error) {
	if d.f == nil && d.err == nil {
		d.f, d.err = d.open()
		if d.err == nil && d.f == nil {
			d.err = errors.New("no spool device")
		}
	}
	return d.f, d.err
}

func (d *lazyDev) ReadAt(b []byte, off int64) (int, error) {
	f, err := d.get()
	if err != nil {
		return 0, err
	}
	return f.ReadAt(b, off)
}

// ReadvAt reads a slot into several buffers in one request
// (bulk.VectorDev).
func (d *lazyDev) ReadvAt(bufs [][]byte, off int64) error {
	f, err := d.get()
	if err != nil {
		return err
	}
	return bulk.ReadvFull(f, bufs, off)
}

func (d *lazyDev) WriteAt(b []byte, off int64) (int, error) {
	f, err := d.get()
	if err != nil {
		return 0, err
	}
	return f.WriteAt(b, off)
}

func (d *lazyDev) close() {
	if d.f != nil {
		d.f.Close()
	}
}
