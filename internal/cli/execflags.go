package cli

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/bangerdev/banger/client"
)

// Exit statuses of the commands that pass a guest command's status through
// (exec, run, ssh), as docker uses them: 125 when banger itself failed, so a
// script can tell that from the command's own 1; 126 and 127 come from the
// guest (cannot execute, not found).
const (
	exitOwnFailure = 125
)

// annotationDockerExit marks commands whose own failures exit 125.
const annotationDockerExit = "banger.exit-codes"

// execFlags are docker exec's -e, --env-file, -w, -u, -i and -t.
type execFlags struct {
	env         []string
	envFiles    []string
	workdir     string
	user        string
	interactive bool
	tty         bool
}

func (f *execFlags) add(fl *pflag.FlagSet, withInteractive bool) {
	fl.StringArrayVarP(&f.env, "env", "e", nil, "set an environment variable in the guest: KEY=VALUE, or KEY to pass this one's (repeatable)")
	fl.StringArrayVar(&f.envFiles, "env-file", nil, "read environment variables from a file of KEY=VALUE lines (repeatable)")
	fl.StringVarP(&f.workdir, "workdir", "w", "", "working directory in the guest")
	fl.StringVarP(&f.user, "user", "u", "", "guest user to run as (default root)")
	if withInteractive {
		fl.BoolVarP(&f.interactive, "interactive", "i", false, "attach stdin to the command")
	}
	fl.BoolVarP(&f.tty, "tty", "t", false, "allocate a terminal")
}

var envKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// environment resolves --env-file then -e into KEY=VALUE, later ones winning
// as in docker; a bare KEY takes this process's value (skipped when unset).
func (f *execFlags) environment() ([]string, error) {
	var out []string
	add := func(kv, where string) error {
		k, _, hasValue := strings.Cut(kv, "=")
		if !envKey.MatchString(k) {
			return usagef("%s: bad environment variable %q (want KEY=VALUE; KEY is letters, digits and _)", where, kv)
		}
		if !hasValue {
			v, ok := os.LookupEnv(k)
			if !ok {
				return nil
			}
			kv = k + "=" + v
		}
		out = append(out, kv)
		return nil
	}
	for _, p := range f.envFiles {
		fh, err := os.Open(p)
		if err != nil {
			return nil, usagef("--env-file: %v", err)
		}
		lines, err := envFileLines(fh)
		fh.Close()
		if err != nil {
			return nil, usagef("--env-file %s: %v", p, err)
		}
		for i, l := range lines {
			if err := add(l, fmt.Sprintf("--env-file %s line %d", p, i+1)); err != nil {
				return nil, err
			}
		}
	}
	for _, kv := range f.env {
		if err := add(kv, "-e"); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// envFileLines reads docker's env-file format: KEY=VALUE or KEY per line,
// blank lines and lines starting with # skipped, values taken literally.
func envFileLines(r io.Reader) ([]string, error) {
	var out []string
	sc := bufio.NewScanner(io.LimitReader(r, 4<<20))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := strings.TrimRight(sc.Text(), "\r")
		if t := strings.TrimSpace(l); t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		out = append(out, strings.TrimLeft(l, " \t"))
	}
	return out, sc.Err()
}

// options builds client.ExecOptions from the flags.
func (f *execFlags) options() (client.ExecOptions, error) {
	env, err := f.environment()
	if err != nil {
		return client.ExecOptions{}, err
	}
	return client.ExecOptions{Env: env, Dir: f.workdir, User: f.user, TTY: f.tty}, nil
}

// vmAndCommand splits exec's positional arguments into the VM and the
// command. Flags end at the VM name (as docker's do), so a flag-like word
// right after it is a misplaced flag: say where things go.
func vmAndCommand(cmd *cobra.Command, args []string, needCommand bool) (string, []string, error) {
	usage := "usage: " + cmd.CommandPath() + " [flags] VM -- CMD [ARGS...]"
	if !needCommand {
		usage = "usage: " + cmd.CommandPath() + " [flags] VM [-- CMD [ARGS...]]"
	}
	if len(args) == 0 {
		return "", nil, usagef("%s", usage)
	}
	vm, rest := args[0], args[1:]
	if len(rest) > 0 && rest[0] == "--" {
		rest = rest[1:]
	} else if len(rest) > 0 && strings.HasPrefix(rest[0], "-") {
		return "", nil, usagef("%q after the VM name is taken as the command; flags go before the VM name, and the command after --: %s", rest[0], usage)
	}
	if needCommand && len(rest) == 0 {
		return "", nil, usagef("no command given; put the command after --: %s", usage)
	}
	return vm, rest, nil
}

// commandHint adds "put the command after --" to a flag error of a command
// that runs a guest command.
func commandHint(cmd *cobra.Command, err error) error {
	if cmd.Annotations[annotationDockerExit] == "" {
		return err
	}
	return &UsageError{fmt.Errorf("%w (banger's flags go first; put the command after --: banger %s)", err, cmd.Use)}
}
