package workspace

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// hardConfig is the configuration every host git runs with, on top of system
// and global config being off: nothing a repository's own config or a work
// tree names can make git run a program (hooks, fsmonitor, ssh, a remote
// helper) or read a file outside the repository (attributes, excludes,
// replace refs), and no background maintenance starts.
var hardConfig = [][2]string{
	{"core.hooksPath", "/dev/null"},
	{"core.fsmonitor", "false"},
	{"core.useReplaceRefs", "false"},
	{"core.sshCommand", "false"},
	{"protocol.allow", "never"},
	{"protocol.file.allow", "always"},
	{"safe.bareRepository", "explicit"},
	{"gc.auto", "0"},
	{"maintenance.auto", "false"},
	{"fetch.writeCommitGraph", "false"},
	{"credential.helper", ""},
}

// isolatedConfig turns off the files git reads from the user's home, for
// commands that touch guest data.
var isolatedConfig = [][2]string{
	{"core.attributesFile", "/dev/null"},
	{"core.excludesFile", "/dev/null"},
}

// gitOpts says how runGit runs one host git.
type gitOpts struct {
	Dir   string    // working directory
	Env   []string  // extra variables (GIT_DIR, GIT_WORK_TREE, identity)
	Stdin io.Reader // nil: none
	// UserConfig reads the user's global config (identity, global excludes).
	// Only for commands on the user's own repository that touch no guest
	// data; hooks and fsmonitor stay off.
	UserConfig bool
}

// gitEnv is the environment of a host git: the caller's environment without
// any GIT_* variable (so none can redirect or configure it), system config
// off, global config and the home directory off unless userConfig, the
// hardened configuration, then extra.
func gitEnv(userConfig bool, extra []string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "GIT_"):
			continue
		case !userConfig && (k == "HOME" || k == "XDG_CONFIG_HOME"):
			continue
		}
		env = append(env, kv)
	}
	env = append(env, "GIT_CONFIG_NOSYSTEM=1", "GIT_NO_REPLACE_OBJECTS=1", "GIT_TERMINAL_PROMPT=0", "GIT_OPTIONAL_LOCKS=0")
	cfg := hardConfig
	if !userConfig {
		env = append(env, "GIT_CONFIG_GLOBAL=/dev/null")
		cfg = append(append([][2]string{}, hardConfig...), isolatedConfig...)
	}
	env = append(env, "GIT_CONFIG_COUNT="+strconv.Itoa(len(cfg)))
	for i, kv := range cfg {
		n := strconv.Itoa(i)
		env = append(env, "GIT_CONFIG_KEY_"+n+"="+kv[0], "GIT_CONFIG_VALUE_"+n+"="+kv[1])
	}
	return append(env, extra...)
}

// runGit runs host git and returns its trimmed stdout. It is the only way
// this package runs git.
func runGit(ctx context.Context, o gitOpts, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = o.Dir
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = gitEnv(o.UserConfig, o.Env)
	cmd.Stdin = o.Stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return "", fmt.Errorf("git is not installed on this host (install it, e.g. apt-get install git): %w", err)
		}
		return strings.TrimSpace(out.String()), fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// git runs host git in dir, isolated from the user's config, with extra
// environment.
func git(ctx context.Context, dir string, env []string, stdin io.Reader, args ...string) (string, error) {
	return runGit(ctx, gitOpts{Dir: dir, Env: env, Stdin: stdin}, args...)
}
