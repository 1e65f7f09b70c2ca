// Package version carries banger's version, set at build time with
// -ldflags "-X github.com/bangerdev/banger/internal/version.Version=...".
package version

import "runtime/debug"

// Version of this build.
var Version = "dev"

// String returns the version, with the VCS revision when known.
func String() string {
	v := Version
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += "+" + s.Value[:12]
			}
		}
	}
	return v
}
