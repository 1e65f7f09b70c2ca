package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/vmm/qemu"
)

// The benchmarks read how much guest code a QEMU under TCG has translated
// so far: the "TB count" line of the monitor's `info jit` (translation
// blocks in the code buffer since the last flush), asked over the VM's QMP
// socket with bangerd's own QMP client (greeting, capabilities, bounded
// lines). QEMU serves one QMP client at a time and bangerd connects for each
// operation, so a connection may wait until bangerd's closes: each attempt
// has its own deadline and attempts repeat, jitPoll apart, until ctx ends.
const (
	jitAttempt = time.Second
	jitPoll    = 5 * time.Millisecond
)

// jitStats is what the benchmarks take from `info jit`.
type jitStats struct {
	TBs     int64 // "TB count"
	Flushes int64 // "TB flush count" (-1 when QEMU did not say)
}

// readJIT asks the QEMU whose QMP socket is sock for `info jit`.
func readJIT(ctx context.Context, sock string) (jitStats, error) {
	for {
		s, retry, err := readJITOnce(ctx, sock)
		if err == nil || !retry {
			return s, err
		}
		t := time.NewTimer(jitPoll)
		select {
		case <-ctx.Done():
			t.Stop()
			return jitStats{}, fmt.Errorf("qemu monitor %s did not answer `info jit` in time: %w", sock, err)
		case <-t.C:
		}
	}
}

// readJITOnce is one connection; retry says whether another may succeed
// (the socket not there yet, busy, or the connection dropped), not when
// QEMU refused the command or its answer could not be decoded or parsed.
func readJITOnce(ctx context.Context, sock string) (jitStats, bool, error) {
	actx, cancel := context.WithTimeout(ctx, jitAttempt)
	defer cancel()
	q, err := qemu.DialQMP(actx, sock)
	if err != nil {
		return jitStats{}, true, err
	}
	defer q.Close()
	var out string
	err = q.Execute(actx, "human-monitor-command", map[string]string{"command-line": "info jit"}, &out)
	if err != nil {
		// the connection broke or this attempt's time ran out: another
		// may do; QEMU's refusal or a reply that does not decode will not
		var ne net.Error
		retry := errors.As(err, &ne) || errors.Is(err, io.EOF) || errors.Is(err, context.DeadlineExceeded)
		return jitStats{}, retry, fmt.Errorf("`info jit`: %w", err)
	}
	s, err := parseJIT(out)
	return s, false, err
}

// parseJIT takes "TB count" (required) and "TB flush count" (optional) from
// the text of `info jit`. It is QEMU's output: anything else is an error
// that quotes (a bounded part of) what came.
func parseJIT(out string) (jitStats, error) {
	s := jitStats{TBs: -1, Flushes: -1}
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimSpace(l)
		var dst *int64
		var rest string
		if r, ok := strings.CutPrefix(l, "TB count"); ok && s.TBs < 0 {
			dst, rest = &s.TBs, r
		} else if r, ok := strings.CutPrefix(l, "TB flush count"); ok && s.Flushes < 0 {
			dst, rest = &s.Flushes, r
		} else {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 1 {
			return jitStats{}, fmt.Errorf("`info jit`: unexpected line %q", clip(l))
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || n < 0 {
			return jitStats{}, fmt.Errorf("`info jit`: not a count in %q", clip(l))
		}
		*dst = n
	}
	if s.TBs < 0 {
		return jitStats{}, fmt.Errorf("`info jit` has no \"TB count\" line (QEMU not running TCG, or another format): %q", clip(out))
	}
	return s, nil
}

// jitDelta is the TBs translated between two readings of one QEMU; false
// when the code buffer was flushed in between (the count started again)
// or the count went down.
func jitDelta(a, b jitStats) (int64, bool) {
	if a.Flushes != b.Flushes || b.TBs < a.TBs {
		return 0, false
	}
	return b.TBs - a.TBs, true
}

// clip bounds what an error quotes of QEMU's output.
func clip(s string) string {
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}

// vmQMPSocket is the QMP socket of VM id under home h: handles.json's
// api_socket, or qmp.sock in the VM's directory.
func vmQMPSocket(h, id string) string {
	dir := filepath.Join(h, "vms", id)
	var hs struct {
		APISocket string `json:"api_socket"`
	}
	if b, err := os.ReadFile(filepath.Join(dir, "handles.json")); err == nil && json.Unmarshal(b, &hs) == nil && hs.APISocket != "" {
		return hs.APISocket
	}
	return filepath.Join(dir, "qmp.sock")
}
