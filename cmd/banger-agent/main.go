// Command banger-agent runs inside every banger guest: as /init of the
// initramfs it prepares the root filesystem and network, then serves the
// host over SSH (see package agent).
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/agent"
)

func main() {
	os.Exit(agent.Main(os.Args))
}
