package cli

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/bangerdev/banger/internal/termsafe"
)

// printJSON prints v as indented JSON. Strings may hold guest text, so the
// characters a terminal would act on that encoding/json leaves as they are
// (C1 controls, bidi formatting) are written as \u escapes: the value is
// unchanged for a program reading it.
func (a *App) printJSON(v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = a.Stdout.Write(append(termsafe.EscapeJSON(b), '\n'))
	return err
}

// table prints rows under a header, aligned. A cell may hold text bangerd
// relays from a guest (an error quoting its console), so each one passes
// through termsafe.Line: no control sequence, tab or newline reaches the
// terminal or breaks the columns.
func (a *App) table(header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(a.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		cells := make([]string, len(r))
		for i, c := range r {
			cells[i] = termsafe.Line(c)
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
