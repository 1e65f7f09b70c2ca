// Command banger is the banger command line.
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/cli"
)

func main() { os.Exit(cli.Main()) }
