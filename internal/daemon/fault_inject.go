//go:build faultinject

package daemon

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

// With the faultinject tag, BANGER_FAULT=point[,point...] makes bangerd
// SIGKILL itself when it reaches one of those points (fault.go lists them).
func init() {
	want := map[string]bool{}
	for _, p := range strings.Split(os.Getenv("BANGER_FAULT"), ",") {
		if p = strings.TrimSpace(p); p != "" {
			want[p] = true
		}
	}
	if len(want) == 0 {
		return
	}
	faultHook = func(point string) {
		if want[point] {
			fmt.Fprintf(os.Stderr, "bangerd: fault injected at %s: SIGKILL\n", point)
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		}
	}
}
