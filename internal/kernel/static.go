package kernel

import (
	"debug/elf"
	"fmt"
	"strings"
)

// CheckStaticAgent returns an error, with the command that fixes it, unless
// the binary at path is a statically linked ELF executable. The agent is the
// guest's /init and the guest has no C library: a dynamically linked agent
// (what `go build` gives when cgo is on, as it is by default where a C
// compiler exists) makes every VM panic with "No working init found".
func CheckStaticAgent(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("banger-agent at %s is not an ELF executable: %w; build it with: %s", path, err, agentBuildCmd)
	}
	defer f.Close()
	var interp string
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			interp = "an interpreter"
			b := make([]byte, min(p.Filesz, 4096))
			if _, err := p.ReadAt(b, 0); err == nil {
				interp = strings.TrimRight(string(b), "\x00")
			}
		}
	}
	libs, _ := f.ImportedLibraries()
	if interp == "" && len(libs) == 0 {
		return nil
	}
	needs := interp
	if len(libs) > 0 {
		needs = strings.Join(libs, ", ")
	}
	return fmt.Errorf("banger-agent at %s is dynamically linked (it needs %s), but it runs as the guest's /init with no C library, so every VM would fail to boot (\"No working init found\"); build it static with: %s", path, needs, agentBuildCmd)
}

const agentBuildCmd = "CGO_ENABLED=0 go build -o banger-agent ./cmd/banger-agent"
