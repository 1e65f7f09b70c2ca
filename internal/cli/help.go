package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/paths"
)

// examples are the Example of every command that does not set its own,
// by command path without the leading "banger ". Every visible command has
// one (TestEveryCommandHasAnExample).
var examples = map[string]string{
	"":                      "  banger run --rm -- uname -a\n  banger vm create dev --workspace .\n  banger exec dev -- make test\n  banger vm ls",
	"cp":                    "  banger cp ./config.yaml dev:/etc/app/\n  banger cp -r dev:/var/log/app ./logs",
	"doctor":                "  banger doctor\n  banger doctor -o json",
	"image":                 "  banger image pull debian:bookworm\n  banger image ls",
	"image build":           "  banger image build --debootstrap bookworm --packages git,curl",
	"image import":          "  banger image import ./rootfs.ext4 --name mine\n  banger image import ./image.tar",
	"image pull":            "  banger image pull debian:bookworm\n  banger image pull ghcr.io/org/app:1.2 --name app",
	"image rm":              "  banger image rm mine",
	"kernel":                "  banger kernel import --package linux-image-cloud-amd64\n  banger kernel ls",
	"kernel import":         "  banger kernel import --package linux-image-cloud-amd64\n  banger kernel import ./vmlinux --name custom",
	"kernel rm":             "  banger kernel rm custom",
	"logs":                  "  banger logs dev\n  banger logs -f dev",
	"port-forward":          "  banger port-forward dev 8080\n  banger port-forward dev 127.0.0.1:9000:80",
	"snapshot":              "  banger snapshot create dev before-upgrade\n  banger snapshot ls",
	"snapshot create":       "  banger snapshot create dev before-upgrade\n  banger snapshot create --stop dev",
	"snapshot rm":           "  banger snapshot rm before-upgrade",
	"ssh-config":            "  banger ssh-config > ~/.ssh/banger.conf\n  ssh -F ~/.ssh/banger.conf dev",
	"system":                "  sudo banger system install\n  banger system install",
	"system install":        "  sudo banger system install   # the root helper, for you\n  banger system install        # bangerd as a user service",
	"system uninstall":      "  sudo banger system uninstall",
	"version":               "  banger version\n  banger version -o json",
	"vm":                    "  banger vm create dev\n  banger vm ls\n  banger vm rm dev",
	"vm create":             "  banger vm create dev\n  banger vm create dev --cpus 2 --memory 2G --workspace .",
	"vm delete":             "  banger vm rm dev\n  banger vm rm -f dev",
	"vm kill":               "  banger vm kill dev",
	"vm pause":              "  banger vm pause dev",
	"vm restart":            "  banger vm restart dev",
	"vm resume":             "  banger vm resume dev",
	"vm set":                "  banger vm set dev --cpus 4 --memory 4G\n  banger vm set dev --disk 20G",
	"vm start":              "  banger vm start dev",
	"vm stop":               "  banger vm stop dev\n  banger vm stop --timeout 5s dev",
	"workspace":             "  banger workspace push dev\n  banger workspace pull dev",
	"workspace pull":        "  banger workspace pull dev\n  git log banger/dev",
	"workspace push":        "  banger workspace push dev\n  banger workspace push dev ../other-repo --dest /srv/app",
	"workspace status":      "  banger workspace status dev",
	"completion":            "  source <(banger completion bash)\n  banger completion zsh > \"${fpath[1]}/_banger\"",
	"completion bash":       "  source <(banger completion bash)",
	"completion zsh":        "  banger completion zsh > \"${fpath[1]}/_banger\"",
	"completion fish":       "  banger completion fish > ~/.config/fish/completions/banger.fish",
	"completion powershell": "  banger completion powershell | Out-String | Invoke-Expression",
}

// finishTree gives every command what the CLI promises of all of them: an
// Example, a failure (with a suggestion) on an unknown subcommand, and
// completion of VM, image, kernel and snapshot names.
func (a *App) finishTree(root *cobra.Command) {
	root.InitDefaultCompletionCmd()
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		path := strings.TrimPrefix(strings.TrimPrefix(c.CommandPath(), "banger"), " ")
		if c.Example == "" {
			c.Example = examples[path]
		}
		c.SuggestionsMinimumDistance = 2
		if c.HasSubCommands() && c.Run == nil && c.RunE == nil {
			c.Args = unknownSubcommand
			c.RunE = func(cmd *cobra.Command, args []string) error { return cmd.Help() }
		}
		if c.ValidArgsFunction == nil {
			c.ValidArgsFunction = a.argCompletion(c, path)
		}
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(root)
	for _, c := range []*cobra.Command{root} {
		c.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json"}, cobra.ShellCompDirectiveNoFileComp))
	}
	a.flagCompletions(root)
}

// unknownSubcommand rejects `banger vm lss`, suggesting `ls`.
func unknownSubcommand(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	var names []string
	for _, s := range cmd.Commands() {
		if s.IsAvailableCommand() {
			names = append(names, s.Name())
		}
	}
	sort.Strings(names)
	msg += " (commands: " + strings.Join(names, ", ") + ")"
	return usagef("%s", msg)
}

// ---- completion ----

// completionTimeout bounds what a completion may spend asking bangerd.
const completionTimeout = 800 * time.Millisecond

// completionClient reaches a running bangerd; it never starts one.
func (a *App) completionClient(ctx context.Context) (*client.Client, context.Context, context.CancelFunc, bool) {
	ctx, cancel := context.WithTimeout(ctx, completionTimeout)
	home := a.home
	if home == "" {
		home = os.Getenv("BANGER_HOME")
	}
	l, err := paths.Resolve(home)
	if err != nil {
		cancel()
		return nil, nil, nil, false
	}
	c, err := client.Dial(ctx, client.WithSocket(l.Socket()))
	if err != nil {
		cancel()
		return nil, nil, nil, false
	}
	return c, ctx, cancel, true
}

type nameKind int

const (
	kindVM nameKind = iota
	kindRunningVM
	kindImage
	kindKernel
	kindSnapshot
)

// names lists completion candidates of a kind, "" prefix-filtered by toComplete.
func (a *App) names(ctx context.Context, kind nameKind, toComplete string) []string {
	c, ctx, cancel, ok := a.completionClient(ctx)
	if !ok {
		return nil
	}
	defer cancel()
	var out []string
	add := func(name, desc string) {
		if strings.HasPrefix(name, toComplete) {
			out = append(out, name+"\t"+desc)
		}
	}
	switch kind {
	case kindVM, kindRunningVM:
		vms, err := c.ListVMs(ctx)
		if err != nil {
			return nil
		}
		for _, v := range vms {
			if kind == kindRunningVM && v.State != api.StateRunning {
				continue
			}
			add(v.Name, v.State)
		}
	case kindImage:
		ims, err := c.ListImages(ctx)
		if err != nil {
			return nil
		}
		for _, im := range ims {
			add(im.Name, "image")
		}
	case kindKernel:
		ks, err := c.ListKernels(ctx)
		if err != nil {
			return nil
		}
		for _, k := range ks {
			add(k.Name, k.Version)
		}
	case kindSnapshot:
		var l []*api.Snapshot
		if err := c.Call(ctx, api.MethodSnapshotList, nil, &l); err != nil {
			return nil
		}
		for _, s := range l {
			add(s.Name, "snapshot of "+s.SourceVM)
		}
	}
	return out
}

func (a *App) completeNames(kind nameKind) cobra.CompletionFunc {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		return a.names(cmd.Context(), kind, toComplete), cobra.ShellCompDirectiveNoFileComp
	}
}

// argCompletion completes a command's first argument from its Use: VM,
// NAME under image/kernel/snapshot, and cp's VM: prefixes.
func (a *App) argCompletion(c *cobra.Command, path string) cobra.CompletionFunc {
	if path == "cp" {
		return a.completeCp
	}
	f := strings.Fields(c.Use)
	if len(f) < 2 {
		return nil
	}
	first := ""
	for _, w := range f[1:] {
		if !strings.HasPrefix(w, "[flags]") && !strings.HasPrefix(w, "-") {
			first = strings.Trim(w, "[]")
			break
		}
	}
	var kind nameKind
	switch {
	case first == "VM" && (path == "exec" || path == "ssh" || path == "ports" || path == "stats" || path == "port-forward" || strings.HasPrefix(path, "workspace ")):
		kind = kindRunningVM
	case first == "VM":
		kind = kindVM
	case first == "NAME" && strings.HasPrefix(path, "image "):
		kind = kindImage
	case first == "NAME" && strings.HasPrefix(path, "kernel "):
		kind = kindKernel
	case first == "NAME" && strings.HasPrefix(path, "snapshot "):
		kind = kindSnapshot
	default:
		return nil
	}
	multi := strings.HasSuffix(f[len(f)-1], "...") && first == "VM" && strings.HasPrefix(path, "vm ")
	return func(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		if len(args) > 0 && !multi {
			if kind == kindRunningVM || kind == kindVM {
				return nil, cobra.ShellCompDirectiveDefault
			}
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return a.names(cmd.Context(), kind, toComplete), cobra.ShellCompDirectiveNoFileComp
	}
}

// completeCp offers "VM:" for every running VM next to local files.
func (a *App) completeCp(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	if strings.Contains(toComplete, ":") || strings.HasPrefix(toComplete, "/") || strings.HasPrefix(toComplete, ".") {
		return nil, cobra.ShellCompDirectiveDefault
	}
	var out []cobra.Completion
	for _, n := range a.names(cmd.Context(), kindRunningVM, toComplete) {
		name, _, _ := strings.Cut(n, "\t")
		out = append(out, name+":\tfiles in "+name)
	}
	return out, cobra.ShellCompDirectiveNoSpace | cobra.ShellCompDirectiveDefault
}

// flagCompletions completes flag values everywhere they appear.
func (a *App) flagCompletions(root *cobra.Command) {
	fixed := map[string][]string{
		"vmm":    {"qemu", "firecracker"},
		"size":   {"small", "medium", "large"},
		"filter": {"state=running", "state=stopped", "state=error", "name=", "image=", "id="},
	}
	dynamic := map[string]nameKind{"image": kindImage, "kernel": kindKernel, "snapshot": kindSnapshot, "from": kindSnapshot}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for name, vals := range fixed {
			if c.Flags().Lookup(name) != nil {
				c.RegisterFlagCompletionFunc(name, cobra.FixedCompletions(vals, cobra.ShellCompDirectiveNoFileComp|cobra.ShellCompDirectiveNoSpace))
			}
		}
		for name, kind := range dynamic {
			if c.Flags().Lookup(name) != nil && c.Flags().Lookup(name).Value.Type() == "string" {
				c.RegisterFlagCompletionFunc(name, a.completeNames(kind))
			}
		}
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(root)
}

// ---- banger docs ----

func (a *App) docsCommand() *cobra.Command {
	var mdDir, manDir string
	cmd := &cobra.Command{
		Use:     "docs",
		Short:   "Write the command reference as markdown and man pages",
		Hidden:  true,
		Example: "  banger docs --markdown docs/cli --man /tmp/man",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if mdDir == "" && manDir == "" {
				return usagef("give --markdown DIR and/or --man DIR")
			}
			root := cmd.Root()
			root.DisableAutoGenTag = true
			if mdDir != "" {
				if err := os.MkdirAll(mdDir, 0o755); err != nil {
					return err
				}
				if err := writeDocTree(root, mdDir, "_", ".md", markdownPage); err != nil {
					return fmt.Errorf("write markdown: %w", err)
				}
			}
			if manDir != "" {
				if err := os.MkdirAll(manDir, 0o755); err != nil {
					return err
				}
				if err := writeDocTree(root, manDir, "-", ".1", manPage); err != nil {
					return fmt.Errorf("write man pages: %w", err)
				}
			}
			for _, d := range []string{mdDir, manDir} {
				if d != "" {
					n, _ := filepath.Glob(filepath.Join(d, "banger*"))
					fmt.Fprintf(a.Stderr, "wrote %d files to %s\n", len(n), d)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&mdDir, "markdown", "", "directory for the markdown reference")
	cmd.Flags().StringVar(&manDir, "man", "", "directory for man pages")
	return cmd
}
