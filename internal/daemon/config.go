package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"
)

// FileConfig is the user's config.json. Every field is optional.
type FileConfig struct {
	// VMM is "auto" (firecracker when on PATH, else qemu), "firecracker" or "qemu".
	VMM string `json:"vmm,omitempty"`
	// QEMUAccel is "auto", "kvm" or "tcg".
	QEMUAccel     string `json:"qemu_accel,omitempty"`
	DefaultImage  string `json:"default_image,omitempty"`
	DefaultKernel string `json:"default_kernel,omitempty"`
	// BootTimeout bounds a boot until the agent answers, e.g. "90s".
	BootTimeout string `json:"boot_timeout,omitempty"`
	// Network configures host networking through banger-helper.
	Network NetworkConfig `json:"network,omitempty"`
}

// NetworkConfig configures VM networking.
type NetworkConfig struct {
	// Mode is "auto" (use the helper when it answers), "helper" (require it) or "none".
	Mode string `json:"mode,omitempty"`
	// Pool is the private range /24 subnets are chosen from (default 172.30.0.0/16).
	Pool string   `json:"pool,omitempty"`
	DNS  []string `json:"dns,omitempty"`
}

func loadFileConfig(path string) (FileConfig, error) {
	var c FileConfig
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return c, err
	default:
		if err := json.Unmarshal(b, &c); err != nil {
			return c, fmt.Errorf("config %s: %w", path, err)
		}
	}
	if v := os.Getenv("BANGER_VMM"); v != "" {
		c.VMM = v
	}
	switch c.VMM {
	case "", "auto", "qemu", "firecracker":
	default:
		return c, fmt.Errorf("config %s: vmm must be auto, qemu or firecracker, not %q", path, c.VMM)
	}
	if c.BootTimeout != "" {
		if _, err := time.ParseDuration(c.BootTimeout); err != nil {
			return c, fmt.Errorf("config %s: boot_timeout: %w", path, err)
		}
	}
	return c, nil
}

func (c FileConfig) bootTimeout() time.Duration {
	if d, err := time.ParseDuration(c.BootTimeout); err == nil && d > 0 {
		return d
	}
	return 90 * time.Second
}
