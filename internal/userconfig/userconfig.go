// Package userconfig is the client side of banger's config file
// (config.json): reading and editing it as JSON by dotted keys, and the
// named size profiles (small, medium, large and the user's own) that
// `--size` and MCP's create_vm use. bangerd reads the same file for its own
// keys (internal/daemon/config.go) when it starts.
package userconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Key is one documented setting.
type Key struct {
	Name   string // dotted, e.g. network.mode
	Help   string
	Daemon bool // read by bangerd at start (restart it after a change)
}

// Keys are the settings `banger config` knows (docs/CONFIG.md describes them).
var Keys = []Key{
	{"vmm", "VMM driver: auto (firecracker when on PATH, else qemu), qemu or firecracker", true},
	{"qemu_accel", "QEMU acceleration: auto, kvm or tcg", true},
	{"firecracker_kvm_device", "the KVM device the firecracker driver checks (default /dev/kvm)", true},
	{"default_image", "image a VM gets when none is named (default: the newest)", true},
	{"default_kernel", "kernel a VM gets when none is named (default: the newest)", true},
	{"boot_timeout", "how long a boot may take until the agent answers, e.g. 90s", true},
	{"network.mode", "auto (use the root helper when it answers), helper (require it) or none", true},
	{"network.dns", "DNS servers for guests, a JSON list, e.g. [\"1.1.1.1\"]", true},
	{"images.max_unpacked_size", "the most one image's layers may unpack to, e.g. 64GiB", true},
	{"images.max_entries", "the most files one image's layers may hold", true},
	{"pool", "VM specs kept ready for banger run (a JSON list; see banger pool)", true},
	{"pool_memory_mib", "memory all pool VMs may use together, in MiB", true},
	{"default_size", "size profile for VMs created without --size/--cpus/--memory/--disk", false},
	{"sizes.NAME.cpus", "a size profile's vCPUs (NAME: small, medium, large or your own)", false},
	{"sizes.NAME.memory", "a size profile's memory, e.g. 2G", false},
	{"sizes.NAME.disk", "a size profile's disk, e.g. 20G", false},
}

// KnownKey reports whether name is a documented key (sizes.<any>.<field>
// included) and returns it.
func KnownKey(name string) (Key, bool) {
	for _, k := range Keys {
		if k.Name == name {
			return k, true
		}
		if strings.HasPrefix(k.Name, "sizes.NAME.") {
			p := strings.Split(name, ".")
			if len(p) == 3 && p[0] == "sizes" && validProfileName(p[1]) && "sizes.NAME."+p[2] == k.Name {
				return k, true
			}
		}
	}
	return Key{}, false
}

func validProfileName(s string) bool {
	if s == "" || len(s) > 32 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

const maxFile = 1 << 20

// Load reads the config file as a JSON object (empty when it does not exist).
func Load(path string) (map[string]any, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]any{}, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxFile {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxFile)
	}
	m := map[string]any{}
	if len(bytes.TrimSpace(b)) == 0 {
		return m, nil
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// Save writes m to path atomically (0600, directory 0700).
func Save(path string, m map[string]any) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".config.json.*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// Get returns the value at a dotted key.
func Get(m map[string]any, key string) (any, bool) {
	var cur any = m
	for _, p := range strings.Split(key, ".") {
		obj, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = obj[p]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// Set puts value at a dotted key, making objects on the way; a nil value
// removes the key.
func Set(m map[string]any, key string, value any) error {
	parts := strings.Split(key, ".")
	cur := m
	for _, p := range parts[:len(parts)-1] {
		next, ok := cur[p]
		if !ok || next == nil {
			if value == nil {
				return nil
			}
			n := map[string]any{}
			cur[p] = n
			cur = n
			continue
		}
		obj, ok := next.(map[string]any)
		if !ok {
			return fmt.Errorf("%s is not an object in the config", p)
		}
		cur = obj
	}
	last := parts[len(parts)-1]
	if value == nil {
		delete(cur, last)
		return nil
	}
	cur[last] = value
	return nil
}

// ParseValue reads a command-line value: JSON when it is a JSON number,
// boolean, list or object, else the string itself.
func ParseValue(s string) any {
	t := strings.TrimSpace(s)
	if t == "true" || t == "false" || strings.HasPrefix(t, "[") || strings.HasPrefix(t, "{") {
		var v any
		if json.Unmarshal([]byte(t), &v) == nil {
			return v
		}
	}
	if n, err := strconv.ParseInt(t, 10, 64); err == nil {
		return n
	}
	return s
}

// Flatten lists every leaf as dotted key = value, sorted.
func Flatten(m map[string]any) [][2]string {
	var out [][2]string
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		if obj, ok := v.(map[string]any); ok && len(obj) > 0 {
			for k, vv := range obj {
				p := k
				if prefix != "" {
					p = prefix + "." + k
				}
				walk(p, vv)
			}
			return
		}
		out = append(out, [2]string{prefix, Format(v)})
	}
	walk("", m)
	sort.Slice(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	return out
}

// Format prints a value as `config get` shows it: strings bare, the rest JSON.
func Format(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// Size is a size profile.
type Size struct {
	CPUs   int    `json:"cpus,omitempty"`
	Memory string `json:"memory,omitempty"`
	Disk   string `json:"disk,omitempty"`
}

// BuiltinSizes are the profiles every config has (a config may redefine them).
var BuiltinSizes = map[string]Size{
	"small":  {CPUs: 1, Memory: "512M", Disk: "4G"},
	"medium": {CPUs: 2, Memory: "2G", Disk: "10G"},
	"large":  {CPUs: 4, Memory: "8G", Disk: "40G"},
}

// Sizes returns the profiles: the built-in ones, overridden or extended
// field by field by the config's sizes.
func Sizes(m map[string]any) (map[string]Size, error) {
	out := map[string]Size{}
	for k, v := range BuiltinSizes {
		out[k] = v
	}
	raw, ok := m["sizes"]
	if !ok {
		return out, nil
	}
	b, _ := json.Marshal(raw)
	var user map[string]Size
	if err := json.Unmarshal(b, &user); err != nil {
		return nil, fmt.Errorf("config sizes: %w (want {\"NAME\": {\"cpus\": 2, \"memory\": \"2G\", \"disk\": \"10G\"}})", err)
	}
	for name, s := range user {
		base := out[name]
		if s.CPUs != 0 {
			base.CPUs = s.CPUs
		}
		if s.Memory != "" {
			base.Memory = s.Memory
		}
		if s.Disk != "" {
			base.Disk = s.Disk
		}
		out[name] = base
	}
	return out, nil
}

// Profile resolves a size name ("" means the config's default_size, which
// may be unset: ok is then false).
func Profile(m map[string]any, name string) (s Size, ok bool, err error) {
	if name == "" {
		d, _ := m["default_size"].(string)
		if d == "" {
			return Size{}, false, nil
		}
		name = d
	}
	all, err := Sizes(m)
	if err != nil {
		return Size{}, false, err
	}
	s, ok = all[name]
	if !ok {
		names := make([]string, 0, len(all))
		for n := range all {
			names = append(names, n)
		}
		sort.Strings(names)
		return Size{}, false, fmt.Errorf("no size %q (sizes: %s; add one with banger config set sizes.%s.memory 4G)", name, strings.Join(names, ", "), name)
	}
	return s, true, nil
}

// ParseMiB reads 512M, 2G, 1024 (MiB) into MiB.
func ParseMiB(s string) (int, error) {
	s = strings.TrimSpace(strings.ToUpper(s))
	s = strings.TrimSuffix(strings.TrimSuffix(s, "IB"), "B")
	mult := 1
	switch {
	case strings.HasSuffix(s, "G"):
		mult, s = 1024, strings.TrimSuffix(s, "G")
	case strings.HasSuffix(s, "T"):
		mult, s = 1024*1024, strings.TrimSuffix(s, "T")
	case strings.HasSuffix(s, "M"):
		s = strings.TrimSuffix(s, "M")
	}
	n, err := strconv.ParseFloat(s, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%q is not a size like 512M or 2G", s)
	}
	return int(n * float64(mult)), nil
}
