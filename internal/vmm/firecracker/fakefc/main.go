package fakefc

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/vmm/firecracker/fcspec"
)

// Environment variables the fake reads.
const (
	EnvSpec         = "FAKEFC_SPEC"
	EnvRecord       = "FAKEFC_RECORD"
	EnvFail         = "FAKEFC_FAIL"
	EnvVsockForward = "FAKEFC_VSOCK_FORWARD"
	// EnvVsockPreamble=1 sets Options.VsockPreamble.
	EnvVsockPreamble = "FAKEFC_VSOCK_PREAMBLE"
	EnvVsockPorts    = "FAKEFC_VSOCK_PORTS"
	EnvPowerOffDelay = "FAKEFC_POWEROFF_DELAY"
	EnvMaxLifetime   = "FAKEFC_MAX_LIFETIME"
	EnvRoot          = "FAKEFC_ROOT"
	// EnvConsoleBytes makes the pretend guest write that many bytes of
	// console output after InstanceStart (or a snapshot resume), then the
	// line "fakefc: console spew done".
	EnvConsoleBytes = "FAKEFC_CONSOLE_BYTES"
)

var instanceIDRe = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)

// Main is the fake's entry point: it acts as the jailer when invoked under
// the name "jailer", else as firecracker. It returns the exit code.
func Main(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 && filepath.Base(args[0]) == "jailer" {
		return jailerMain(args, getenv, stderr)
	}
	return firecrackerMain(args, getenv, stdout, stderr)
}

func firecrackerMain(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("firecracker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	apiSock := fs.String("api-sock", "/run/firecracker.socket", "path to the API unix socket")
	id := fs.String("id", "anonymous-instance", "microVM id")
	version := fs.Bool("version", false, "print the version")
	// Accepted for fidelity with Firecracker's command line; the fake ignores them.
	fs.Uint64("start-time-us", 0, "")
	fs.Uint64("start-time-cpu-us", 0, "")
	fs.Uint64("parent-cpu-time-us", 0, "")
	fs.Bool("enable-pci", false, "")
	fs.Bool("no-seccomp", false, "")
	fs.String("seccomp-filter", "", "")
	fs.Uint64("http-api-max-payload-size", fcspec.MaxBody, "")
	fs.Uint64("mmds-size-limit", 0, "")
	fs.Bool("boot-timer", false, "")
	// Would change behaviour the fake does not model: refuse rather than pretend.
	for _, n := range []string{"config-file", "metadata", "log-path", "level", "module", "metrics-path"} {
		fs.Func(n, "", func(string) error { return fmt.Errorf("not simulated by the fake firecracker") })
	}
	for _, n := range []string{"no-api", "show-level", "show-log-origin", "describe-snapshot", "snapshot-version"} {
		fs.BoolFunc(n, "", func(string) error { return fmt.Errorf("not simulated by the fake firecracker") })
	}
	if err := fs.Parse(args[1:]); err != nil {
		return 1
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "Arguments parsing error: unexpected argument %q\n", fs.Arg(0))
		return 1
	}
	if *version {
		fmt.Fprintf(stdout, "Firecracker v%s\n\n", Version)
		return 0
	}
	if !instanceIDRe.MatchString(*id) {
		fmt.Fprintf(stderr, "Invalid instance ID: %q: only alphanumeric characters and hyphens, at most 64\n", *id)
		return 1
	}
	failures := ParseFailures(getenv(EnvFail))
	for _, f := range failures {
		if f.Target == FailExitAtLaunch {
			fmt.Fprintln(stderr, f.Message)
			return 1
		}
	}
	specPath := getenv(EnvSpec)
	if specPath == "" {
		fmt.Fprintf(stderr, "fakefc: %s is not set\n", EnvSpec)
		return 2
	}
	spec, err := fcspec.Load(specPath)
	if err != nil {
		fmt.Fprintf(stderr, "fakefc: %v\n", err)
		return 2
	}
	lifetime := 10 * time.Minute
	if v := getenv(EnvMaxLifetime); v != "" {
		if lifetime, err = time.ParseDuration(v); err != nil {
			fmt.Fprintf(stderr, "fakefc: %s: %v\n", EnvMaxLifetime, err)
			return 2
		}
	}
	opts := Options{
		Spec:          spec,
		ID:            *id,
		Root:          getenv(EnvRoot),
		RecordPath:    getenv(EnvRecord),
		Failures:      failures,
		Console:       stdout,
		Stderr:        stderr,
		VsockForward:  getenv(EnvVsockForward),
		VsockPreamble: getenv(EnvVsockPreamble) == "1",
	}
	if v := getenv(EnvConsoleBytes); v != "" {
		if opts.ConsoleSpew, err = strconv.ParseInt(v, 10, 64); err != nil {
			fmt.Fprintf(stderr, "fakefc: %s: %v\n", EnvConsoleBytes, err)
			return 2
		}
	}
	// Like Firecracker (Rust ignores SIGPIPE): console writes nobody reads
	// fail with EPIPE and are dropped; they do not kill the VMM.
	signal.Ignore(syscall.SIGPIPE)
	if v := getenv(EnvPowerOffDelay); v != "" {
		if opts.PowerOffDelay, err = time.ParseDuration(v); err != nil {
			fmt.Fprintf(stderr, "fakefc: %s: %v\n", EnvPowerOffDelay, err)
			return 2
		}
	}
	if v := getenv(EnvVsockPorts); v != "" {
		opts.VsockPorts = []uint32{}
		for _, p := range strings.Split(v, ",") {
			n, err := strconv.ParseUint(strings.TrimSpace(p), 10, 32)
			if err != nil {
				fmt.Fprintf(stderr, "fakefc: %s: %v\n", EnvVsockPorts, err)
				return 2
			}
			opts.VsockPorts = append(opts.VsockPorts, uint32(n))
		}
	}
	srv, err := NewServer(opts)
	if err != nil {
		fmt.Fprintf(stderr, "fakefc: %v\n", err)
		return 2
	}
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), lifetime)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if srv.Failing(FailNoAPISocket) {
		fmt.Fprintln(stderr, "fakefc: injected failure: not creating the API socket")
		<-ctx.Done()
		return 3
	}
	sock := srv.resolve(*apiSock)
	if len(sock) > MaxUnixPath {
		fmt.Fprintf(stderr, "Failed to open the API socket at %s: path longer than %d bytes\n", sock, MaxUnixPath)
		return 1
	}
	// Firecracker refuses to start when the socket path exists.
	if _, err := os.Lstat(sock); err == nil {
		fmt.Fprintf(stderr, "Failed to open the API socket at %s: IO error: Address in use (os error 98)\n", sock)
		return 1
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintf(stderr, "Failed to open the API socket at %s: %v\n", sock, err)
		return 1
	}
	return srv.ServeAPI(ctx, ln)
}

// jailerMain imitates Firecracker's jailer closely enough to test a driver's
// jailer mode without root: it validates the documented arguments, builds
// <chroot-base>/<exec-name>/<id>/root, copies the exec file there and execs it
// as "<exec-name> --id=<id> --start-time-us=.. --start-time-cpu-us=..
// <args after -->" in the same process (same PID), with FAKEFC_ROOT set so the
// fake firecracker resolves paths inside the jail. It does not chroot, create
// cgroups or drop privileges.
func jailerMain(args []string, getenv func(string) string, stderr io.Writer) int {
	fs := flag.NewFlagSet("jailer", flag.ContinueOnError)
	fs.SetOutput(stderr)
	id := fs.String("id", "", "")
	execFile := fs.String("exec-file", "", "")
	uid := fs.Int("uid", -1, "")
	gid := fs.Int("gid", -1, "")
	base := fs.String("chroot-base-dir", "/srv/jailer", "")
	cgv := fs.Int("cgroup-version", 1, "")
	fs.String("parent-cgroup", "", "")
	fs.String("netns", "", "")
	fs.Func("resource-limit", "", func(v string) error {
		if k, _, ok := strings.Cut(v, "="); !ok || (k != "fsize" && k != "no-file") {
			return fmt.Errorf("invalid resource limit %q", v)
		}
		return nil
	})
	fs.Func("cgroup", "", func(string) error { return fmt.Errorf("cgroups are not simulated by the fake jailer") })
	fs.BoolFunc("daemonize", "", func(string) error { return fmt.Errorf("not simulated by the fake jailer") })
	fs.BoolFunc("new-pid-ns", "", func(string) error { return fmt.Errorf("not simulated by the fake jailer") })
	if err := fs.Parse(args[1:]); err != nil {
		return 1
	}
	if !instanceIDRe.MatchString(*id) {
		fmt.Fprintf(stderr, "Jailer error: invalid instance id %q\n", *id)
		return 1
	}
	if *uid < 0 || *gid < 0 {
		fmt.Fprintln(stderr, "Jailer error: --uid and --gid are required")
		return 1
	}
	if *cgv != 1 && *cgv != 2 {
		fmt.Fprintf(stderr, "Jailer error: invalid cgroup version %d\n", *cgv)
		return 1
	}
	if !filepath.IsAbs(*base) {
		fmt.Fprintf(stderr, "Jailer error: chroot base dir %q is not absolute\n", *base)
		return 1
	}
	st, err := os.Stat(*execFile)
	if err != nil || !st.Mode().IsRegular() || st.Mode()&0o111 == 0 {
		fmt.Fprintf(stderr, "Jailer error: invalid exec file %q\n", *execFile)
		return 1
	}
	name := filepath.Base(*execFile)
	root := filepath.Join(*base, name, *id, "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		fmt.Fprintf(stderr, "Jailer error: %v\n", err)
		return 1
	}
	target := filepath.Join(root, name)
	if err := copyExec(*execFile, target); err != nil {
		fmt.Fprintf(stderr, "Jailer error: copy exec file: %v\n", err)
		return 1
	}
	argv := []string{name, "--id=" + *id, "--start-time-us=0", "--start-time-cpu-us=0"}
	argv = append(argv, fs.Args()...)
	// The real jailer clears the environment; the fake keeps its own settings.
	var env []string
	for _, k := range []string{EnvSpec, EnvRecord, EnvFail, EnvVsockForward, EnvVsockPorts, EnvPowerOffDelay, EnvMaxLifetime} {
		if v := getenv(k); v != "" {
			env = append(env, k+"="+v)
		}
	}
	env = append(env, EnvRoot+"="+root)
	if err := os.Chdir(root); err != nil {
		fmt.Fprintf(stderr, "Jailer error: %v\n", err)
		return 1
	}
	err = syscall.Exec(target, argv, env)
	fmt.Fprintf(stderr, "Jailer error: exec %s: %v\n", target, err)
	return 1
}

func copyExec(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	_ = os.Remove(dst)
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
