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
	// MaxStdout bounds what git may print on stdout (0: maxGitStdout);
	// past it git is stopped and runGit fails.
	MaxStdout int
}

// maxGitStdout bounds the stdout of one host git: what it prints is held in
// bangerd's memory, and a repository the guest wrote could make git print
// without end. The largest legitimate output is a listing of a host
// repository (ls-files -s of a million files is about 110 MiB).
const maxGitStdout = 256 << 20

// gitStderrTail is how much of git's stderr (the end, where git says why it
// failed) is kept for the error; the rest is dropped as it arrives.
const gitStderrTail = 4 << 10

// errGitOutputTooLarge is the error of a git whose stdout passed its bound.
var errGitOutputTooLarge = errors.New("git printed more than banger reads")

// cappedBuffer holds up to max bytes; a write past them fails (which stops
// the copy from git's pipe, and git with it) and sets over.
type cappedBuffer struct {
	buf  bytes.Buffer
	max  int
	over bool
}

func (c *cappedBuffer) Write(p []byte) (int, error) {
	if room := c.max - c.buf.Len(); len(p) > room {
		c.over = true
		c.buf.Write(p[:max(room, 0)])
		return max(room, 0), errGitOutputTooLarge
	}
	return c.buf.Write(p)
}

// tailBuffer keeps the last max bytes written to it; a write never fails.
type tailBuffer struct {
	buf     []byte
	max     int
	dropped bool
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if len(p) >= t.max {
		t.dropped = t.dropped || len(t.buf) > 0 || len(p) > t.max
		t.buf = append(t.buf[:0], p[len(p)-t.max:]...)
		return n, nil
	}
	if over := len(t.buf) + len(p) - t.max; over > 0 {
		t.dropped = true
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	t.buf = append(t.buf, p...)
	return n, nil
}

func (t *tailBuffer) String() string {
	s := strings.TrimSpace(strings.ToValidUTF8(string(t.buf), "?"))
	if t.dropped {
		s = "..." + s
	}
	return s
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
// this package runs git. Its output is bounded: stdout by o.MaxStdout (past
// it git is stopped and the call fails), stderr to its last gitStderrTail
// bytes, which go into the error.
func runGit(ctx context.Context, o gitOpts, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = o.Dir
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = gitEnv(o.UserConfig, o.Env)
	cmd.Stdin = o.Stdin
	out := &cappedBuffer{max: o.MaxStdout}
	if out.max <= 0 {
		out.max = maxGitStdout
	}
	errb := &tailBuffer{max: gitStderrTail}
	cmd.Stdout, cmd.Stderr = out, errb
	err := cmd.Run()
	switch {
	case out.over:
		return "", fmt.Errorf("git %s: %w (over %d bytes on stdout; the repository may be damaged or hostile)", strings.Join(args, " "), errGitOutputTooLarge, out.max)
	case errors.Is(err, exec.ErrNotFound):
		return "", fmt.Errorf("git is not installed on this host (install it, e.g. apt-get install git): %w", err)
	case err != nil:
		return strings.TrimSpace(out.buf.String()), fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, errb)
	}
	return strings.TrimSpace(out.buf.String()), nil
}

// git runs host git in dir, isolated from the user's config, with extra
// environment.
func git(ctx context.Context, dir string, env []string, stdin io.Reader, args ...string) (string, error) {
	return runGit(ctx, gitOpts{Dir: dir, Env: env, Stdin: stdin}, args...)
}
