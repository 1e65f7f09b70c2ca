package cli

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// The command reference (`banger docs`), written here rather than with
// cobra/doc: that package links a markdown engine, a roff converter and a
// YAML library into banger, whose package initialisers every banger command
// paid at start (about half a millisecond of each `banger exec`) for a
// hidden command. The markdown is cobra/doc's format (docs/cli is
// unchanged by the switch); the man pages are roff written directly.

// documented lists cmd's subcommands that get a page, by name.
func documented(cmd *cobra.Command) []*cobra.Command {
	var out []*cobra.Command
	for _, c := range cmd.Commands() {
		if c.IsAvailableCommand() && !c.IsAdditionalHelpTopicCommand() {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name() < out[j].Name() })
	return out
}

// writeDocTree writes one file per documented command under dir, named by
// its path joined with sep and ext, with page's content.
func writeDocTree(cmd *cobra.Command, dir, sep, ext string, page func(*cobra.Command) []byte) error {
	for _, c := range documented(cmd) {
		if err := writeDocTree(c, dir, sep, ext, page); err != nil {
			return err
		}
	}
	name := strings.ReplaceAll(cmd.CommandPath(), " ", sep) + ext
	return os.WriteFile(filepath.Join(dir, name), page(cmd), 0o644)
}

// markdownPage is cmd's page in markdown.
func markdownPage(cmd *cobra.Command) []byte {
	cmd.InitDefaultHelpCmd()
	cmd.InitDefaultHelpFlag()
	var b bytes.Buffer
	path := cmd.CommandPath()
	fmt.Fprintf(&b, "## %s\n\n%s\n\n", path, cmd.Short)
	if cmd.Long != "" {
		fmt.Fprintf(&b, "### Synopsis\n\n%s\n\n", cmd.Long)
	}
	if cmd.Runnable() {
		fmt.Fprintf(&b, "```\n%s\n```\n\n", cmd.UseLine())
	}
	if cmd.Example != "" {
		fmt.Fprintf(&b, "### Examples\n\n```\n%s\n```\n\n", cmd.Example)
	}
	for _, fs := range []struct {
		title string
		set   *pflag.FlagSet
	}{{"Options", cmd.NonInheritedFlags()}, {"Options inherited from parent commands", cmd.InheritedFlags()}} {
		if fs.set.HasAvailableFlags() {
			fmt.Fprintf(&b, "### %s\n\n```\n%s```\n\n", fs.title, fs.set.FlagUsages())
		}
	}
	link := func(c *cobra.Command) string {
		return fmt.Sprintf("* [%s](%s.md)\t - %s\n", c.CommandPath(), strings.ReplaceAll(c.CommandPath(), " ", "_"), c.Short)
	}
	subs := documented(cmd)
	if cmd.HasParent() || len(subs) > 0 {
		b.WriteString("### SEE ALSO\n\n")
		if cmd.HasParent() {
			b.WriteString(link(cmd.Parent()))
		}
		for _, c := range subs {
			b.WriteString(link(c))
		}
		b.WriteString("\n")
	}
	return b.Bytes()
}

// roff escapes s for a man page: backslashes, and a leading . or ' that
// would make a line a request.
func roff(s string) string {
	s = strings.ReplaceAll(s, `\`, `\e`)
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, ".") || strings.HasPrefix(l, "'") {
			lines[i] = `\&` + l
		}
	}
	return strings.Join(lines, "\n")
}

// manPage is cmd's page in roff (section 1).
func manPage(cmd *cobra.Command) []byte {
	cmd.InitDefaultHelpCmd()
	cmd.InitDefaultHelpFlag()
	var b bytes.Buffer
	dashed := strings.ReplaceAll(cmd.CommandPath(), " ", "-")
	fmt.Fprintf(&b, ".TH \"%s\" \"1\" \"\" \"banger\" \"banger manual\"\n", strings.ToUpper(dashed))
	fmt.Fprintf(&b, ".SH NAME\n%s \\- %s\n", dashed, roff(cmd.Short))
	fmt.Fprintf(&b, ".SH SYNOPSIS\n.nf\n%s\n.fi\n", roff(cmd.UseLine()))
	desc := cmd.Long
	if desc == "" {
		desc = cmd.Short
	}
	fmt.Fprintf(&b, ".SH DESCRIPTION\n%s\n", roff(desc))
	for _, fs := range []struct {
		title string
		set   *pflag.FlagSet
	}{{"OPTIONS", cmd.NonInheritedFlags()}, {"OPTIONS INHERITED FROM PARENT COMMANDS", cmd.InheritedFlags()}} {
		if !fs.set.HasAvailableFlags() {
			continue
		}
		fmt.Fprintf(&b, ".SH %s\n", fs.title)
		fs.set.VisitAll(func(f *pflag.Flag) {
			if f.Hidden {
				return
			}
			varname, usage := pflag.UnquoteUsage(f)
			name := "--" + f.Name
			if f.Shorthand != "" {
				name = "-" + f.Shorthand + ", " + name
			}
			if varname != "" {
				name += " " + varname
			}
			if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "[]" && f.DefValue != "0" {
				usage += fmt.Sprintf(" (default %s)", f.DefValue)
			}
			fmt.Fprintf(&b, ".TP\n\\fB%s\\fR\n%s\n", strings.ReplaceAll(roff(name), "-", `\-`), roff(usage))
		})
	}
	if cmd.Example != "" {
		fmt.Fprintf(&b, ".SH EXAMPLE\n.nf\n%s\n.fi\n", roff(cmd.Example))
	}
	var see []string
	if cmd.HasParent() {
		see = append(see, strings.ReplaceAll(cmd.Parent().CommandPath(), " ", "-"))
	}
	for _, c := range documented(cmd) {
		see = append(see, strings.ReplaceAll(c.CommandPath(), " ", "-"))
	}
	if len(see) > 0 {
		b.WriteString(".SH SEE ALSO\n")
		for i, s := range see {
			sep := ","
			if i == len(see)-1 {
				sep = ""
			}
			fmt.Fprintf(&b, ".BR %s (1)%s\n", s, sep)
		}
	}
	return b.Bytes()
}
