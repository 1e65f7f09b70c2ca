package system

import (
	"io"
	"net"
	"sync"
)

// Splice copies a→b and b→a until both directions end, half-closing each
// direction as its source ends (so protocols that wait for EOF work), then
// closes both connections.
func Splice(a, b net.Conn) { SpliceBuffer(a, b, 0) }

// SpliceBuffer is Splice copying through a buffer of size bytes per
// direction (0: io.Copy's, 32 KiB, or the connections' own ReadFrom and
// WriteTo). A bulk stream wants its writes to a yamux stream as large as
// its frames: every yamux frame costs the guest a wakeup and a window
// update, and 32 KiB pieces cut each 256 KiB frame in eight.
func SpliceBuffer(a, b net.Conn, size int) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		if size > 0 {
			// hide ReadFrom/WriteTo, which would ignore the buffer
			io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, size))
		} else {
			io.Copy(dst, src)
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}
