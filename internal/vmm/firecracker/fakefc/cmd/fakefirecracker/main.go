// Command fakefirecracker is a fake Firecracker (and, when invoked as
// "jailer", a fake jailer) that validates every API request against the pinned
// firecracker.yaml. See package fakefc. Tests build it; it is never installed.
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/vmm/firecracker/fakefc"
)

func main() {
	os.Exit(fakefc.Main(os.Args, os.Getenv, os.Stdout, os.Stderr))
}
