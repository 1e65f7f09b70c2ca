// Command listvms lists banger VMs through the Go client.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/bangerdev/banger/client"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx) // $BANGER_HOME's bangerd, else the user's
	if err != nil {
		fmt.Fprintln(os.Stderr, "listvms:", err)
		os.Exit(1)
	}
	vms, err := c.ListVMs(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listvms:", err)
		os.Exit(1)
	}
	for _, v := range vms {
		fmt.Printf("%-20s %-9s %s\n", v.Name, v.State, v.IP)
	}
}
