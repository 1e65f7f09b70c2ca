// Package conntest serves listeners for tests' fake peers (agents, guests).
// It imports nothing of banger, so tests of any package can use it.
//
// Only test code may import this package.
package conntest

import (
	"net"
	"sync"
	"testing"
)

// ServeEach accepts on l until the test ends, calling handle on each
// connection in its own goroutine. At cleanup it closes l and waits for
// the accept loop and the handlers: a cleanup that unblocks the handlers
// (cancelling their context, say) must be registered after ServeEach, so
// that it runs first.
func ServeEach(t testing.TB, l net.Listener, handle func(net.Conn)) {
	t.Helper()
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				handle(c)
			}()
		}
	}()
}
