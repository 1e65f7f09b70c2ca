package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/termsafe"
)

// eventsCommands are `banger events` and `banger op cancel`.
func (a *App) eventsCommands() []*cobra.Command {
	var follow bool
	events := &cobra.Command{
		Use:   "events",
		Short: "Show bangerd's recent state changes (VMs created, started, stopped, deleted; images and kernels added)",
		Long: "Show bangerd's recent state changes, each with the op id of the operation that caused it.\n" +
			"With -f, keep following new ones until interrupted. With -o json, one JSON object per line.",
		Example: "  banger events\n  banger events -f -o json",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			err = c.Events(cmd.Context(), follow, func(ev api.Event) error {
				if a.output == "json" {
					b, err := json.Marshal(ev)
					if err != nil {
						return err
					}
					_, err = a.Stdout.Write(append(termsafe.EscapeJSON(b), '\n'))
					return err
				}
				_, err := fmt.Fprintln(a.Stdout, formatEvent(ev))
				return err
			})
			if follow && errors.Is(err, context.Canceled) {
				return nil // Ctrl-C ends a follow
			}
			return err
		},
	}
	events.Flags().BoolVarP(&follow, "follow", "f", false, "keep following new events")

	op := &cobra.Command{Use: "op", Short: "Operations running in bangerd", Example: "  banger op cancel op-3f2a9c1d0e4b"}
	op.AddCommand(&cobra.Command{
		Use:     "cancel OP_ID",
		Short:   "Cancel a running create or image operation; bangerd undoes what it made",
		Example: "  banger vm create dev --no-wait   # prints the op id\n  banger op cancel op-3f2a9c1d0e4b",
		Args:    exactArgs(1, "OP_ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			res, err := c.CancelOp(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			if res.Cancelled {
				fmt.Fprintf(a.Stdout, "cancelling %s operation %s; follow it with: banger events -f\n", res.Kind, res.OpID)
			} else {
				fmt.Fprintf(a.Stdout, "%s operation %s had already finished\n", res.Kind, res.OpID)
			}
			return nil
		},
	})
	return []*cobra.Command{events, op}
}

// formatEvent is one human line: time, type, subject, reason, op id.
func formatEvent(ev api.Event) string {
	subject := ev.VM
	if subject == "" {
		subject = ev.Name
	}
	s := fmt.Sprintf("%s  %-18s %s", ev.Time.Local().Format("2006-01-02 15:04:05"), termsafe.Line(ev.Type), termsafe.Line(subject))
	if ev.Reason != "" { // a failure's reason may quote the guest's console
		s += "  (" + termsafe.String(ev.Reason) + ")"
	}
	return s + "  op=" + ev.OpID
}
