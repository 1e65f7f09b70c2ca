// Package reaper collects orphaned zombie processes when banger-agent runs as
// PID 1, without stealing the exit status of the children the agent itself
// starts and waits for with os/exec.
//
// A plain wait4(-1) loop would race with exec.Cmd.Wait. Instead the reaper
// lists this process's children (each thread's /proc/self/task/<tid>/children)
// and reaps, without waiting, those it was not told about. Starting a tracked
// child holds a read lock that the scan excludes, so a child that exits
// before it is registered cannot be mistaken for an orphan.
//
// The reaper runs on every SIGCHLD, so on every command the agent runs: it
// must cost little. Reading the stat file of every process on the system (as
// it once did; a guest has ~60 kernel threads) took ~3.7 ms of an emulated
// guest's CPU per command; the children lists are one small read per agent
// thread. A kernel without them (CONFIG_PROC_CHILDREN) gets the /proc scan.
package reaper

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Reaper reaps zombies that nobody waits for. A nil *Reaper is valid and
// does nothing (the agent is not PID 1).
type Reaper struct {
	procRoot string
	log      *slog.Logger

	startMu sync.RWMutex // held for reading while a tracked child starts
	mu      sync.Mutex
	tracked map[int]int
}

// New returns a reaper reading procRoot (normally "/proc").
func New(procRoot string, log *slog.Logger) *Reaper {
	if log == nil {
		log = slog.Default()
	}
	return &Reaper{procRoot: procRoot, log: log, tracked: make(map[int]int)}
}

// Start calls start, which must start exactly one child process and return
// its PID, and tracks that PID until Forget: the reaper leaves it to its
// owner's Wait.
func (r *Reaper) Start(start func() (pid int, err error)) error {
	if r == nil {
		_, err := start()
		return err
	}
	r.startMu.RLock()
	defer r.startMu.RUnlock()
	pid, err := start()
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.tracked[pid]++
	r.mu.Unlock()
	return nil
}

// Forget stops tracking pid; call it after the owner's Wait returned.
func (r *Reaper) Forget(pid int) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tracked[pid] <= 1 {
		delete(r.tracked, pid)
	} else {
		r.tracked[pid]--
	}
}

// Run reaps on every SIGCHLD (and every interval as a safety net) until ctx
// is done.
func (r *Reaper) Run(ctx context.Context, interval time.Duration) {
	if r == nil {
		return
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, unix.SIGCHLD)
	defer signal.Stop(sig)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		r.ReapOnce()
		select {
		case <-ctx.Done():
			return
		case <-sig:
		case <-t.C:
		}
	}
}

// ReapOnce reaps every untracked zombie child and returns how many it reaped.
func (r *Reaper) ReapOnce() int {
	if r == nil {
		return 0
	}
	r.startMu.Lock()
	defer r.startMu.Unlock()
	pids, ok := childPIDs(r.procRoot)
	if !ok {
		pids = r.zombieChildren(os.Getpid())
	}
	n := 0
	for _, pid := range pids {
		r.mu.Lock()
		_, mine := r.tracked[pid]
		r.mu.Unlock()
		if mine {
			continue
		}
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err != nil {
			if !errors.Is(err, unix.ECHILD) {
				r.log.Debug("reap orphan", "pid", pid, "error", err)
			}
			continue
		}
		if got == pid {
			n++
		}
	}
	return n
}

// maxChildList bounds one thread's children list read (a PID is at most 7
// digits and a space).
const maxChildList = 1 << 20

// childPIDs lists the children of every thread of this process from
// procRoot/self/task/*/children; ok is false when the kernel has no such
// files. A child that is still running is listed too: wait4 with WNOHANG
// leaves it alone.
func childPIDs(procRoot string) (pids []int, ok bool) {
	dir := filepath.Join(procRoot, "self", "task")
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return nil, false
	}
	for _, t := range tasks {
		f, err := os.Open(filepath.Join(dir, t.Name(), "children"))
		if err != nil {
			continue // the thread ended, or the kernel has no children lists
		}
		ok = true
		list, _ := io.ReadAll(io.LimitReader(f, maxChildList))
		f.Close()
		for _, w := range strings.Fields(string(list)) {
			if pid, err := strconv.Atoi(w); err == nil && pid > 0 {
				pids = append(pids, pid)
			}
		}
	}
	return pids, ok
}

// zombieChildren lists PIDs in state Z whose parent is ppid, reading the
// stat file of every process (for kernels without children lists).
func (r *Reaper) zombieChildren(ppid int) []int {
	ents, err := os.ReadDir(r.procRoot)
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(r.procRoot, e.Name(), "stat"))
		if err != nil {
			continue
		}
		state, parent, ok := parseStat(string(b))
		if ok && state == "Z" && parent == ppid {
			out = append(out, pid)
		}
	}
	return out
}

// parseStat returns fields 3 (state) and 4 (ppid) of /proc/<pid>/stat.
func parseStat(s string) (state string, ppid int, ok bool) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return "", 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return "", 0, false
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return "", 0, false
	}
	return f[0], ppid, true
}
