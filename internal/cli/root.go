// Package cli is the banger command line: thin cobra commands that turn
// flags into bangerd RPCs and results into tables or JSON.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/termsafe"
	"github.com/bangerdev/banger/internal/version"
)

// App holds what every command shares.
type App struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer

	output string // table|json
	debug  bool
	home   string
}

// UsageError marks errors caused by wrong usage (exit status 2).
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// ExitError carries an exit status without printing anything (e.g. the guest
// command's own status for exec/ssh).
type ExitError struct{ Code int }

func (e *ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

func usagef(format string, args ...any) error { return &UsageError{fmt.Errorf(format, args...)} }

// Main runs the CLI with os arguments and returns the process exit status.
func Main() int {
	app := &App{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return app.Run(ctx, os.Args[1:])
}

// Run executes args and returns the exit status.
func (a *App) Run(ctx context.Context, args []string) int {
	root := a.newRoot()
	root.SetArgs(args)
	root.SetIn(a.Stdin)
	root.SetOut(a.Stdout)
	root.SetErr(a.Stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	a.printError(err)
	if cmd != nil && cmd.Annotations[annotationDockerExit] != "" {
		// exec, run and ssh pass the guest command's status through; their
		// own failures must not look like it.
		return exitOwnFailure
	}
	var ue *UsageError
	if errors.As(err, &ue) || isCobraUsageError(err) {
		return 2
	}
	return 1
}

// printError prints a command's error. Errors can quote what a guest said,
// so terminal control sequences are removed.
//
// Under -o json it is one JSON object on stderr,
// {"error":{"code","message","op_id"}}, for programs; with --debug the text
// form adds the code, the op id and where bangerd logged it.
func (a *App) printError(err error) {
	code, msg, op := errorParts(err)
	if a.output == "json" {
		b, _ := json.Marshal(map[string]any{"error": map[string]string{"code": code, "message": msg, "op_id": op}})
		fmt.Fprintf(a.Stderr, "%s\n", termsafe.EscapeJSON(b))
		return
	}
	fmt.Fprintf(a.Stderr, "error: %s\n", termsafe.String(err.Error()))
	if a.debug {
		fmt.Fprintf(a.Stderr, "  code: %s\n", code)
		if op != "" {
			where := "bangerd's log"
			if l, lerr := paths.Resolve(""); lerr == nil {
				where = l.DaemonLog()
			}
			fmt.Fprintf(a.Stderr, "  op id: %s (grep %s %s)\n", op, op, where)
		}
		for e := errors.Unwrap(err); e != nil; e = errors.Unwrap(e) {
			fmt.Fprintf(a.Stderr, "  cause: %T: %s\n", e, termsafe.String(e.Error()))
		}
	}
}

// errorParts splits an error into its code ("usage" for wrong usage), its
// message without the op id suffix, and the op id.
func errorParts(err error) (code, msg, op string) {
	var e *client.Error
	if errors.As(err, &e) {
		msg = err.Error()
		if e.OpID != "" {
			msg = strings.TrimSuffix(msg, " ("+e.OpID+")")
		}
		return e.Code, msg, e.OpID
	}
	var ue *UsageError
	if errors.As(err, &ue) || isCobraUsageError(err) {
		return "usage", err.Error(), ""
	}
	return client.Code(err), err.Error(), ""
}

func isCobraUsageError(err error) bool {
	s := err.Error()
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand flag", "accepts ", "requires at least", "requires at most", "flag needs an argument", "invalid argument"} {
		if strings.HasPrefix(s, p) || strings.Contains(s, " "+p) {
			return true
		}
	}
	return false
}

func (a *App) newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "banger",
		Short:         "Disposable microVMs for developers and coding agents",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if a.output != "table" && a.output != "json" {
				return usagef("-o must be table or json, not %q", a.output)
			}
			if a.home != "" {
				os.Setenv("BANGER_HOME", a.home)
			}
			return nil
		},
	}
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		if c.Annotations[annotationDockerExit] != "" {
			return commandHint(c, err)
		}
		return &UsageError{err}
	})
	pf := root.PersistentFlags()
	pf.StringVarP(&a.output, "output", "o", "table", "output format: table or json")
	pf.BoolVar(&a.debug, "debug", false, "verbose diagnostics")
	pf.StringVar(&a.home, "home", "", "state directory (default $BANGER_HOME, else XDG directories)")

	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print banger's version",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if a.output == "json" {
				return a.printJSON(map[string]string{"version": version.String()})
			}
			fmt.Fprintln(a.Stdout, version.String())
			return nil
		},
	})
	root.AddCommand(a.vmCommand())
	root.AddCommand(a.snapshotCommand())
	root.AddCommand(a.poolCommand())
	root.AddCommand(a.systemCommand())
	a.addServiceCommands(root)
	root.AddCommand(a.eventsCommands()...)
	root.AddCommand(a.docsCommand(), a.configCommand())
	a.finishTree(root)
	return root
}

// Argument validators that produce usage errors.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %q", cmd.CommandPath(), args[0])
	}
	return nil
}

func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("usage: %s %s", cmd.CommandPath(), what)
		}
		return nil
	}
}
