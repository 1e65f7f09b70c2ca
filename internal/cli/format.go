package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"text/template"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/termsafe"
)

// ---- units: one way to print sizes and ages (go-humanize) ----

// sizeBytes prints a byte count in IEC units: "512 MiB", "1.5 GiB".
func sizeBytes[T int | int64 | uint64](n T) string {
	if n < 0 {
		return "-"
	}
	return humanize.IBytes(uint64(n))
}

// mib prints a size given in MiB.
func mib(n int) string { return sizeBytes(int64(n) << 20) }

// ago prints how long ago t was: "3 minutes ago".
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return humanize.Time(t)
}

// ---- --format templates ----

var templateFuncs = template.FuncMap{
	"json": func(v any) (string, error) {
		b, err := json.Marshal(v)
		return string(termsafe.EscapeJSON(b)), err
	},
	"join":  strings.Join,
	"upper": strings.ToUpper,
	"lower": strings.ToLower,
	"size":  func(n int64) string { return sizeBytes(n) },
	"mib":   mib,
	"ago":   ago,
}

const formatHelp = "print each item with a Go template, e.g. '{{.Name}} {{.State}}' or '{{json .}}' (json is short for '{{json .}}')"

// addFormat adds --format to cmd.
func addFormat(cmd *cobra.Command, f *string) {
	cmd.Flags().StringVar(f, "format", "", formatHelp)
}

func parseFormat(format string) (*template.Template, error) {
	if format == "json" {
		format = "{{json .}}"
	}
	t, err := template.New("format").Funcs(templateFuncs).Option("missingkey=error").Parse(format)
	if err != nil {
		return nil, usagef("--format: %v", err)
	}
	return t, nil
}

// renderItems prints items with the template, one per line. Rendered text
// may hold guest strings, so terminal controls are removed.
func (a *App) renderItems(format string, items []any) error {
	t, err := parseFormat(format)
	if err != nil {
		return err
	}
	var b bytes.Buffer
	for _, it := range items {
		b.Reset()
		if err := t.Execute(&b, it); err != nil {
			return usagef("--format: %v", err)
		}
		if _, err := fmt.Fprintln(a.Stdout, termsafe.String(b.String())); err != nil {
			return err
		}
	}
	return nil
}

// listOutput prints a listing: ids with -q, the template with --format, JSON
// with -o json, else the table.
func listOutput[T any](a *App, items []T, quiet bool, format string, id func(T) string, table func() error) error {
	switch {
	case quiet:
		for _, it := range items {
			if _, err := fmt.Fprintln(a.Stdout, id(it)); err != nil {
				return err
			}
		}
		return nil
	case format != "":
		anys := make([]any, len(items))
		for i, it := range items {
			anys[i] = it
		}
		return a.renderItems(format, anys)
	case a.output == "json":
		if items == nil {
			items = []T{}
		}
		return a.printJSON(items)
	}
	return table()
}

// showOutput prints one item: the template, JSON, or the text form.
func (a *App) showOutput(item any, format string, text func() error) error {
	switch {
	case format != "":
		return a.renderItems(format, []any{item})
	case a.output == "json":
		return a.printJSON(item)
	}
	return text()
}

// ---- --filter ----

// vmFilter is vm ls/prune's --filter: KEY=VALUE, keys state, name
// (substring), image (name or id prefix), id (prefix). Values of one key
// are alternatives; different keys must all match (as docker's).
type vmFilter map[string][]string

func parseVMFilter(specs []string) (vmFilter, error) {
	f := vmFilter{}
	for _, s := range specs {
		k, v, ok := strings.Cut(s, "=")
		k = strings.ToLower(strings.TrimSpace(k))
		if !ok || v == "" {
			return nil, usagef("--filter %q: want KEY=VALUE (state=running, name=web, image=debian, id=9f3c)", s)
		}
		switch k {
		case "state", "status":
			k = "state"
		case "name", "image", "id":
		default:
			return nil, usagef("--filter %q: unknown key %q (state, name, image or id)", s, k)
		}
		f[k] = append(f[k], v)
	}
	return f, nil
}

func (f vmFilter) match(v *api.VM) bool {
	for k, vals := range f {
		ok := false
		for _, want := range vals {
			switch k {
			case "state":
				ok = ok || v.State == want
			case "name":
				ok = ok || strings.Contains(v.Name, want)
			case "image":
				ok = ok || v.Image == want || strings.HasPrefix(v.ImageID, want)
			case "id":
				ok = ok || strings.HasPrefix(v.ID, want)
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

func (f vmFilter) apply(vms []*api.VM) []*api.VM {
	out := make([]*api.VM, 0, len(vms))
	for _, v := range vms {
		if f.match(v) {
			out = append(out, v)
		}
	}
	return out
}
