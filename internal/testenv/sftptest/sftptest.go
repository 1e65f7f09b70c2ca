// Package sftptest runs in-process SFTP servers for tests: a server and a
// client joined by pipes, torn down at the end of the test. It imports
// nothing of banger, so tests of any package can use it.
//
// Only test code may import this package.
package sftptest

import (
	"io"
	"testing"

	"github.com/pkg/sftp"
)

// Server is what Client needs of a server: *sftp.Server and
// *sftp.RequestServer both are one.
type Server interface {
	Serve() error
	Close() error
}

// pipeEnds is the server's ends of the pipes; closing it closes both.
type pipeEnds struct {
	r *io.PipeReader
	w *io.PipeWriter
}

func (p pipeEnds) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p pipeEnds) Write(b []byte) (int, error) { return p.w.Write(b) }
func (p pipeEnds) Close() error {
	p.r.Close()
	p.w.Close()
	return nil
}

// Client runs the server newServer makes on one end of a pair of
// in-process pipes and returns a client, made with opts, on the other end.
// At the end of the test every pipe end, the client and the server are
// closed (closing every pipe end unblocks both sides).
func Client(t testing.TB, newServer func(conn io.ReadWriteCloser) (Server, error), opts ...sftp.ClientOption) *sftp.Client {
	t.Helper()
	c2sR, c2sW := io.Pipe()
	s2cR, s2cW := io.Pipe()
	srv, err := newServer(pipeEnds{c2sR, s2cW})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	c, err := sftp.NewClientPipe(s2cR, c2sW, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c2sR.Close()
		c2sW.Close()
		s2cR.Close()
		s2cW.Close()
		c.Close()
		srv.Close()
	})
	return c
}

// Local is a Client of this machine's filesystem, served by
// sftp.NewServer with srvOpts.
func Local(t testing.TB, srvOpts []sftp.ServerOption, opts ...sftp.ClientOption) *sftp.Client {
	t.Helper()
	return Client(t, func(conn io.ReadWriteCloser) (Server, error) {
		return sftp.NewServer(conn, srvOpts...)
	}, opts...)
}
