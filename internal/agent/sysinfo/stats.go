package sysinfo

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent/api"
)

// ReadStats reports memory, load, uptime (from procRoot, normally "/proc")
// and the use of the filesystem holding rootPath (normally "/").
func ReadStats(procRoot, rootPath string) (api.Stats, error) {
	var st api.Stats
	b, err := os.ReadFile(filepath.Join(procRoot, "meminfo"))
	if err != nil {
		return st, fmt.Errorf("read memory info: %w", err)
	}
	total, avail, err := ParseMeminfo(b)
	if err != nil {
		return st, err
	}
	st.MemTotalBytes = total
	if avail <= total {
		st.MemUsedBytes = total - avail
	}
	if b, err = os.ReadFile(filepath.Join(procRoot, "loadavg")); err != nil {
		return st, fmt.Errorf("read load average: %w", err)
	}
	if st.Load1, st.Load5, st.Load15, err = ParseLoadavg(b); err != nil {
		return st, err
	}
	if b, err = os.ReadFile(filepath.Join(procRoot, "uptime")); err != nil {
		return st, fmt.Errorf("read uptime: %w", err)
	}
	if st.Uptime, err = ParseUptime(b); err != nil {
		return st, err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(rootPath, &fs); err != nil {
		return st, fmt.Errorf("statfs %s: %w", rootPath, err)
	}
	bs := uint64(fs.Bsize)
	st.DiskTotalBytes = fs.Blocks * bs
	if fs.Blocks >= fs.Bfree {
		st.DiskUsedBytes = (fs.Blocks - fs.Bfree) * bs
	}
	if ents, err := os.ReadDir(procRoot); err == nil {
		for _, e := range ents {
			if _, err := strconv.Atoi(e.Name()); err == nil {
				st.Procs++
			}
		}
	}
	return st, nil
}

// ParseMeminfo returns MemTotal and MemAvailable in bytes. Kernels without
// MemAvailable (before 3.14) get MemFree+Buffers+Cached instead.
func ParseMeminfo(b []byte) (total, avail uint64, err error) {
	vals := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		if len(f) > 1 && f[1] == "kB" {
			n *= 1024
		}
		vals[key] = n
	}
	total, ok := vals["MemTotal"]
	if !ok {
		return 0, 0, fmt.Errorf("meminfo has no MemTotal")
	}
	if a, ok := vals["MemAvailable"]; ok {
		return total, a, nil
	}
	return total, vals["MemFree"] + vals["Buffers"] + vals["Cached"], nil
}

// ParseLoadavg parses /proc/loadavg.
func ParseLoadavg(b []byte) (l1, l5, l15 float64, err error) {
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return 0, 0, 0, fmt.Errorf("malformed loadavg %q", truncate(string(b)))
	}
	var v [3]float64
	for i := range v {
		if v[i], err = strconv.ParseFloat(f[i], 64); err != nil {
			return 0, 0, 0, fmt.Errorf("malformed loadavg %q", truncate(string(b)))
		}
	}
	return v[0], v[1], v[2], nil
}

// ParseUptime parses /proc/uptime.
func ParseUptime(b []byte) (time.Duration, error) {
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return 0, fmt.Errorf("malformed uptime %q", truncate(string(b)))
	}
	s, err := strconv.ParseFloat(f[0], 64)
	if err != nil || s < 0 {
		return 0, fmt.Errorf("malformed uptime %q", truncate(string(b)))
	}
	return time.Duration(s * float64(time.Second)), nil
}
