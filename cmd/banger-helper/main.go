// Command banger-helper is banger's root helper: it creates banger's bridge,
// the per-VM taps and banger's NAT rules on behalf of allowed users, over a
// unix socket (default /run/banger/helper.sock). See package
// internal/hostnet/helper.
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/hostnet/helper"
)

func main() {
	os.Exit(helper.Main(os.Args[1:], os.Stderr))
}
