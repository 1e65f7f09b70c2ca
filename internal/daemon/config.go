package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/image"
)

// FileConfig is the user's config.json. Every field is optional.
type FileConfig struct {
	// VMM is "auto" (firecracker when on PATH, else qemu), "firecracker" or "qemu".
	VMM string `json:"vmm,omitempty"`
	// QEMUAccel is "auto", "kvm" or "tcg".
	QEMUAccel string `json:"qemu_accel,omitempty"`
	// QEMUMemoryFile keeps each QEMU guest's memory in a file on a tmpfs
	// (memory-backend-file, share=on), so that a snapshot or fork copies
	// the file and its clones map it instead of loading a migration
	// stream. On by default (nil); false gives guests anonymous memory and
	// snapshots the whole stream. BANGER_QEMU_MEMORY_FILE=0/1 overrides.
	QEMUMemoryFile *bool `json:"qemu_memory_file,omitempty"`
	// FirecrackerKVMDevice is the KVM device the firecracker driver checks
	// (default /dev/kvm; the tests' fake firecracker needs none).
	FirecrackerKVMDevice string `json:"firecracker_kvm_device,omitempty"`
	DefaultImage         string `json:"default_image,omitempty"`
	DefaultKernel        string `json:"default_kernel,omitempty"`
	// BootTimeout bounds a boot until the agent answers, e.g. "90s".
	BootTimeout string `json:"boot_timeout,omitempty"`
	// Network configures host networking through banger-helper.
	Network NetworkConfig `json:"network,omitempty"`
	// Images bounds what one image may unpack to.
	Images ImagesConfig `json:"images,omitempty"`
	// Pool keeps VMs of these specs ready for `banger run` (`banger pool
	// set` changes it at run time; its state then wins over this list).
	Pool []api.PoolSpec `json:"pool,omitempty"`
	// PoolMemoryMiB bounds the guest memory of all pool VMs together
	// (default 2048).
	PoolMemoryMiB int `json:"pool_memory_mib,omitempty"`
}

// memoryFile reports whether QEMU guests get their memory in a tmpfs file
// (qemu_memory_file, on unless set false).
func (c FileConfig) memoryFile() bool { return c.QEMUMemoryFile == nil || *c.QEMUMemoryFile }

// ImagesConfig bounds image pull/import/build: layers are hostile, and these
// stop one from filling the disk or bangerd's memory.
type ImagesConfig struct {
	// MaxUnpackedSize bounds the uncompressed bytes of one image's layers
	// together, e.g. "64GiB" (the default); units B, KiB, MiB, GiB, TiB.
	MaxUnpackedSize string `json:"max_unpacked_size,omitempty"`
	// MaxEntries bounds the files, directories and links of one image's
	// layers together (default 1000000).
	MaxEntries int `json:"max_entries,omitempty"`
}

// imageLimits is the config's limits for the image builder (zero = default).
func (c FileConfig) imageLimits() image.Limits {
	n, _ := parseSize(c.Images.MaxUnpackedSize)
	return image.Limits{MaxBytes: n, MaxEntries: c.Images.MaxEntries}
}

// parseSize reads "123", "64GiB", "512 MiB" ("" = 0).
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	num := strings.TrimRight(s, "BKMGTi ")
	unit := strings.TrimSpace(s[len(num):])
	shift, ok := map[string]uint{"": 0, "B": 0, "KiB": 10, "MiB": 20, "GiB": 30, "TiB": 40}[unit]
	n, err := strconv.ParseInt(num, 10, 64)
	if !ok || err != nil || n <= 0 || n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("%q is not a size; write e.g. 64GiB (units B, KiB, MiB, GiB, TiB)", s)
	}
	return n << shift, nil
}

// NetworkConfig configures VM networking.
type NetworkConfig struct {
	// Mode is "auto" (use the helper when it answers), "helper" (require it) or "none".
	Mode string `json:"mode,omitempty"`
	// Pool is ignored (a warning says so): the guest range comes from the
	// root helper's configuration (`sudo banger system install --pool`).
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
	switch v := os.Getenv("BANGER_QEMU_MEMORY_FILE"); v {
	case "":
	case "1", "true", "0", "false":
		on := v == "1" || v == "true"
		c.QEMUMemoryFile = &on
	default:
		return c, fmt.Errorf("BANGER_QEMU_MEMORY_FILE must be 1 or 0, not %q", os.Getenv("BANGER_QEMU_MEMORY_FILE"))
	}
	switch c.VMM {
	case "", "auto", "qemu", "firecracker":
	default:
		return c, fmt.Errorf("config %s: vmm must be auto, qemu or firecracker, not %q", path, c.VMM)
	}
	if _, err := parseSize(c.Images.MaxUnpackedSize); err != nil {
		return c, fmt.Errorf("config %s: images.max_unpacked_size: %w", path, err)
	}
	if c.Images.MaxEntries < 0 {
		return c, fmt.Errorf("config %s: images.max_entries must be positive", path)
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
