// Command banger is the banger command line.
//
// The command reference in docs/cli is generated from the commands:
//
//go:generate go run . docs --markdown ../../docs/cli
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/cli"
)

func main() { os.Exit(cli.Main()) }
