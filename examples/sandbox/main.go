// Command sandbox creates a VM, runs a command in it, reads back what the
// command wrote, and deletes the VM: what a coding agent does with banger.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sandbox:", err) // bangerd's errors end with their op id
		os.Exit(1)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := client.Dial(ctx)
	if err != nil {
		return err
	}
	vm, err := c.CreateVM(ctx, api.CreateParams{Name: "sandbox-example", MemoryMiB: 512}, func(s api.Stage) {
		fmt.Fprintf(os.Stderr, "  %-16s %6.0f ms\n", s.Name, s.DurationMS)
	})
	if err != nil {
		return err
	}
	defer c.DeleteVM(context.WithoutCancel(ctx), vm.ID, true)

	code, err := c.Exec(ctx, vm.Name, []string{"sh", "-c", `echo "hello from $WHO in $(pwd)" > result.txt`},
		client.ExecOptions{Env: []string{"WHO=sandbox"}, Dir: "/tmp", Stdout: os.Stdout, Stderr: os.Stderr})
	if err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("the command exited %d", code)
	}
	out, err := c.ReadFile(ctx, vm.Name, "/tmp/result.txt", 1<<20)
	if err != nil {
		return err
	}
	fmt.Print(string(out))
	return nil
}
