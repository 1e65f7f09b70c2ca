package main

import (
	"runtime/debug"
	"testing"
)

// TestTuneGC: bangerd runs with daemonGCPercent unless GOGC is set in its
// environment, which wins.
func TestTuneGC(t *testing.T) {
	orig := debug.SetGCPercent(100)
	defer debug.SetGCPercent(orig)
	for _, tc := range []struct {
		env  string
		want int
	}{{"", daemonGCPercent}, {"100", 100}, {"off", 100}} {
		t.Setenv("GOGC", tc.env)
		debug.SetGCPercent(100)
		tuneGC()
		if got := debug.SetGCPercent(100); got != tc.want {
			t.Errorf("GOGC=%q: GC percent %d, want %d", tc.env, got, tc.want)
		}
	}
}
