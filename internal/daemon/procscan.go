package daemon

import (
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
)

// vmmProc is a VMM process of this home found in /proc.
type vmmProc struct {
	pid       int
	startTime uint64
	vmID      string
}

var vmIDInPath = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// findVMMs scans /proc for VMM processes (qemu-system-*, firecracker, jailer)
// of this user whose command line names a path under vmsDir: that path says
// which home started them and for which VM. It finds VMMs whether or not
// their VM has a record or a handles.json.
func findVMMs(vmsDir string) ([]vmmProc, error) {
	return findVMMsIn("/proc", vmsDir, os.Getuid())
}

func findVMMsIn(procDir, vmsDir string, uid int) ([]vmmProc, error) {
	ents, err := os.ReadDir(procDir)
	if err != nil {
		return nil, err
	}
	prefix := filepath.Clean(vmsDir) + "/"
	self := os.Getpid()
	var out []vmmProc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		dir := filepath.Join(procDir, e.Name())
		fi, err := os.Stat(dir)
		if err != nil {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != uid {
			continue
		}
		b, err := readBounded(filepath.Join(dir, "cmdline"), 64<<10)
		if err != nil || len(b) == 0 {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if !isVMMBinary(argv[0]) {
			continue
		}
		id := vmIDFromArgs(argv[1:], prefix)
		if id == "" {
			continue
		}
		stat, err := readBounded(filepath.Join(dir, "stat"), 4096)
		if err != nil {
			continue
		}
		_, start, err := parseProcStat(stat)
		if err != nil {
			continue
		}
		out = append(out, vmmProc{pid: pid, startTime: start, vmID: id})
	}
	return out, nil
}

func isVMMBinary(arg0 string) bool {
	b := filepath.Base(arg0)
	return strings.HasPrefix(b, "qemu-system") || b == "firecracker" || b == "jailer"
}

// vmIDFromArgs returns the VM id of the first argument naming a path
// prefix/<id>/..., or "".
func vmIDFromArgs(args []string, prefix string) string {
	for _, a := range args {
		i := strings.Index(a, prefix)
		if i < 0 {
			continue
		}
		rest := a[i+len(prefix):]
		id, _, ok := strings.Cut(rest, "/")
		if ok && vmIDInPath.MatchString(id) && id != "." && id != ".." {
			return id
		}
	}
	return ""
}

func readBounded(p string, max int64) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, max))
}
