package daemon

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"

	"github.com/bangerdev/banger/internal/sshconfig"
)

// bangerd keeps an OpenSSH config next to the known_hosts file it
// maintains, with a Host banger-<name> entry for every VM that has a pinned
// host key, so editors (VS Code Remote-SSH) and plain ssh see VMs come and
// go. `banger ssh-config --install` includes it from ~/.ssh/config.

func (s *vmService) sshConfigPath() string {
	return filepath.Join(filepath.Dir(s.layout.UserKey()), "config")
}

// bangerBinary finds the banger CLI for ProxyCommand: $BANGER_CLI, next to
// bangerd, else on PATH; "" when there is none.
func bangerBinary() string {
	if p := os.Getenv("BANGER_CLI"); p != "" && filepath.IsAbs(p) {
		return p
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "banger")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	if p, err := exec.LookPath("banger"); err == nil {
		if abs, err := filepath.Abs(p); err == nil {
			return abs
		}
	}
	return ""
}

// writeSSHConfig rewrites the config (atomically, only when it changed) for
// the VMs named.
func (s *vmService) writeSSHConfig(names []string) error {
	bin := bangerBinary()
	if bin == "" {
		return nil // no CLI to proxy through: nothing useful to write
	}
	names = append([]string(nil), names...)
	sort.Strings(names)
	content := []byte(sshconfig.Render(sshconfig.Params{
		Prefix: sshconfig.Prefix, User: "root", IdentityFile: s.layout.UserKey(), KnownHosts: s.knownHostsPath(),
		Banger: bin, BangerHome: os.Getenv("BANGER_HOME"),
		Header: "Written by bangerd: banger VMs as banger-<name>. Do not edit; see `banger ssh-config --install`.",
	}, names))
	p := s.sshConfigPath()
	if f, err := os.Open(p); err == nil {
		old, _ := io.ReadAll(io.LimitReader(f, int64(len(content))+1))
		f.Close()
		if bytes.Equal(old, content) {
			return nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(p), err)
	}
	if err := writeFileAtomic(p, content, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}
