package cli

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/userconfig"
)

func (a *App) configCommand() *cobra.Command {
	cfgCmd := &cobra.Command{
		Use:   "config",
		Short: "Show or change banger's settings (config.json)",
		Long: "Reads and writes banger's config file. Keys are dotted (network.mode,\n" +
			"sizes.medium.memory). bangerd reads its keys when it starts: restart it after a\n" +
			"change (banger system install restarts the service; else stop bangerd and the next\n" +
			"command starts it). Every key and BANGER_* variable: docs/CONFIG.md.",
		Example: "  banger config path\n  banger config get\n  banger config set default_size medium\n  banger config set sizes.medium.memory 4G",
	}
	file := func() (string, error) {
		l, err := paths.Resolve("")
		if err != nil {
			return "", err
		}
		return l.ConfigFile(), nil
	}
	cfgCmd.AddCommand(&cobra.Command{
		Use: "path", Short: "Print the config file's path", Args: noArgs,
		Example: "  banger config path\n  $EDITOR \"$(banger config path)\"",
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := file()
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(map[string]string{"path": p})
			}
			fmt.Fprintln(a.Stdout, p)
			return nil
		},
	})
	cfgCmd.AddCommand(&cobra.Command{
		Use: "get [KEY]", Short: "Print one setting, or every setting in the file", Args: cobra.MaximumNArgs(1),
		Example:           "  banger config get\n  banger config get vmm\n  banger config get sizes -o json",
		ValidArgsFunction: completeConfigKeys,
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := file()
			if err != nil {
				return err
			}
			m, err := userconfig.Load(p)
			if err != nil {
				return err
			}
			if len(args) == 0 {
				if a.output == "json" {
					return a.printJSON(m)
				}
				for _, kv := range userconfig.Flatten(m) {
					if kv[0] != "" {
						fmt.Fprintf(a.Stdout, "%s = %s\n", kv[0], kv[1])
					}
				}
				return nil
			}
			v, ok := userconfig.Get(m, args[0])
			if !ok && strings.HasPrefix(args[0], "sizes") {
				// the built-in profiles are there even when the file says nothing
				sizes, serr := userconfig.Sizes(m)
				if serr != nil {
					return serr
				}
				v, ok = userconfig.Get(map[string]any{"sizes": sizesMap(sizes)}, args[0])
			}
			if !ok {
				if _, known := userconfig.KnownKey(args[0]); !known {
					return usagef("unknown key %q (%s)", args[0], keyList())
				}
				return &ExitError{Code: 1} // known but unset: nothing printed, like git config
			}
			if a.output == "json" {
				return a.printJSON(v)
			}
			fmt.Fprintln(a.Stdout, userconfig.Format(v))
			return nil
		},
	})
	cfgCmd.AddCommand(&cobra.Command{
		Use: "set KEY VALUE", Short: "Change a setting", Args: exactArgs(2, "KEY VALUE"),
		Example:           "  banger config set vmm qemu\n  banger config set network.dns '[\"1.1.1.1\"]'\n  banger config set sizes.ci.cpus 2",
		ValidArgsFunction: completeConfigKeys,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.configSet(file, args[0], userconfig.ParseValue(args[1]))
		},
	})
	cfgCmd.AddCommand(&cobra.Command{
		Use: "unset KEY", Short: "Remove a setting (back to its default)", Args: exactArgs(1, "KEY"),
		Example:           "  banger config unset default_size",
		ValidArgsFunction: completeConfigKeys,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.configSet(file, args[0], nil)
		},
	})
	return cfgCmd
}

func sizesMap(s map[string]userconfig.Size) map[string]any {
	out := map[string]any{}
	for n, p := range s {
		out[n] = map[string]any{"cpus": p.CPUs, "memory": p.Memory, "disk": p.Disk}
	}
	return out
}

func keyList() string {
	names := make([]string, 0, len(userconfig.Keys))
	for _, k := range userconfig.Keys {
		names = append(names, k.Name)
	}
	return "keys: " + strings.Join(names, ", ")
}

func completeConfigKeys(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []string
	for _, k := range userconfig.Keys {
		if strings.HasPrefix(k.Name, toComplete) {
			out = append(out, k.Name+"\t"+k.Help)
		}
	}
	sort.Strings(out)
	return out, cobra.ShellCompDirectiveNoFileComp
}

// configSet validates and writes one key (value nil removes it).
func (a *App) configSet(file func() (string, error), key string, value any) error {
	k, known := userconfig.KnownKey(key)
	if !known {
		return usagef("unknown key %q (%s)", key, keyList())
	}
	if value != nil {
		if err := checkConfigValue(key, value); err != nil {
			return usagef("%s: %v", key, err)
		}
	}
	p, err := file()
	if err != nil {
		return err
	}
	m, err := userconfig.Load(p)
	if err != nil {
		return err
	}
	if err := userconfig.Set(m, key, value); err != nil {
		return err
	}
	if value != nil && key == "default_size" {
		if _, _, err := userconfig.Profile(m, ""); err != nil {
			return usagef("%v", err)
		}
	}
	if _, err := userconfig.Sizes(m); err != nil {
		return usagef("%v", err)
	}
	if err := userconfig.Save(p, m); err != nil {
		return err
	}
	if a.output == "json" {
		return a.printJSON(map[string]any{"key": key, "value": value, "path": p, "restart_bangerd": k.Daemon})
	}
	if value == nil {
		fmt.Fprintf(a.Stdout, "unset %s\n", key)
	} else {
		fmt.Fprintf(a.Stdout, "%s = %s\n", key, userconfig.Format(value))
	}
	if k.Daemon {
		fmt.Fprintln(a.Stdout, "bangerd reads this when it starts: restart it for the change to apply")
	}
	return nil
}

// checkConfigValue catches wrong values now rather than at bangerd's next start.
func checkConfigValue(key string, v any) error {
	str, isStr := v.(string)
	oneOf := func(vals ...string) error {
		for _, x := range vals {
			if str == x {
				return nil
			}
		}
		return fmt.Errorf("must be %s", strings.Join(vals, ", "))
	}
	switch {
	case key == "vmm":
		return oneOf("auto", "qemu", "firecracker")
	case key == "qemu_accel":
		return oneOf("auto", "kvm", "tcg")
	case key == "network.mode":
		return oneOf("auto", "helper", "none")
	case key == "boot_timeout":
		if d, err := time.ParseDuration(str); !isStr || err != nil || d <= 0 {
			return fmt.Errorf("must be a duration like 90s")
		}
	case key == "network.dns", key == "pool":
		if _, ok := v.([]any); !ok {
			return fmt.Errorf("must be a JSON list")
		}
	case key == "images.max_entries", key == "pool_memory_mib", strings.HasSuffix(key, ".cpus"):
		if n, ok := v.(int64); !ok || n <= 0 {
			return fmt.Errorf("must be a positive number")
		}
	case strings.HasPrefix(key, "sizes.") && (strings.HasSuffix(key, ".memory") || strings.HasSuffix(key, ".disk")):
		if !isStr {
			return fmt.Errorf("must be a size like 2G")
		}
		if _, err := userconfig.ParseMiB(str); err != nil {
			return err
		}
	case !isStr && key != "images.max_entries":
		return fmt.Errorf("must be text")
	}
	return nil
}
