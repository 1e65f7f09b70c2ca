package testenv

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/paths"
)

// KillVMMsUnder ends every process whose command line names a path under
// home/vms/ — the VMMs a test's bangerd started there. VMMs outlive bangerd
// by design, so a test that stops bangerd and removes its home must end them
// itself or they run on with their home gone. It waits (up to 10 s) until
// they are gone and returns the PIDs it killed.
func KillVMMsUnder(home string) ([]int, error) {
	needle := []byte(filepath.Clean(home) + "/vms/")
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	self := os.Getpid()
	var killed []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cl, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cl, needle) {
			continue
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
			killed = append(killed, pid)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range killed {
		for syscall.Kill(pid, 0) == nil && !isZombie(pid) {
			if time.Now().After(deadline) {
				return killed, fmt.Errorf("VMM %d under %s still alive 10 s after SIGKILL", pid, home)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return killed, nil
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}

// RemoveMemoryDirs removes the guest memory directories (paths.MemoryDirs)
// of the bangerd that ran with BANGER_HOME=home, as this user or as nobody
// (the e2e tests' bangerd): the memory files of the VMMs KillVMMsUnder
// ended are left there, on a tmpfs, by a bangerd that will not start again.
func RemoveMemoryDirs(home string) {
	l, err := paths.Resolve(home)
	if err != nil {
		return
	}
	for _, uid := range []int{os.Geteuid(), 65534} {
		for _, d := range l.MemoryDirsOf(uid) {
			os.RemoveAll(d)
		}
	}
}
