// Package bootcfg is the boot configuration bangerd hands to banger-agent.
//
// It travels on a small raw block device (no filesystem): a header line
// "BANGER-BOOTCFG 1 <length>\n" followed by <length> bytes of JSON, zero padded
// to a multiple of 4096 bytes. bangerd rewrites it before every start, so
// changes (keys, network) apply at the next boot.
package bootcfg

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Magic starts every boot configuration device.
const Magic = "BANGER-BOOTCFG"

// MaxSize bounds the JSON payload.
const MaxSize = 1 << 20

// RWLabel is the ext4 volume label of the per-VM writable disk.
const RWLabel = "banger-rw"

// Network is the guest's static network configuration.
type Network struct {
	MAC     string   `json:"mac"`               // interface to configure, by MAC
	Address string   `json:"address"`           // CIDR, e.g. 172.30.0.5/24
	Gateway string   `json:"gateway,omitempty"` // e.g. 172.30.0.1
	DNS     []string `json:"dns,omitempty"`
	MTU     int      `json:"mtu,omitempty"`
}

// Channel says where the agent serves the host.
type Channel struct {
	Kind string `json:"kind"` // "vsock" or "serial"
	Port uint32 `json:"port,omitempty"`
	Name string `json:"name,omitempty"` // virtio-serial port name
}

// Config is the whole boot configuration.
type Config struct {
	Version        int      `json:"version"`
	VMID           string   `json:"vm_id"`
	Hostname       string   `json:"hostname"`
	HostKey        string   `json:"host_key"`        // OpenSSH PEM private key for the agent's SSH server
	AuthorizedKeys []string `json:"authorized_keys"` // authorized_keys lines
	Channel        Channel  `json:"channel"`
	Network        *Network `json:"network,omitempty"`
	// Env, WorkDir and User are the image's defaults for commands run in the guest.
	Env     []string `json:"env,omitempty"`
	WorkDir string   `json:"workdir,omitempty"`
	User    string   `json:"user,omitempty"`
	// RNGSeed is fresh random data (SeedSize bytes, see NewSeed) that the
	// agent credits to the guest's entropy pool at boot, so that the guest's
	// crypto (the agent's SSH server first) does not wait for the kernel to
	// gather entropy, which takes seconds without RDRAND or virtio-rng. The
	// host must write a new seed before every start.
	RNGSeed []byte `json:"rng_seed,omitempty"`
	// BulkKey (bulk.KeySize bytes, fresh at every start) authenticates the
	// host's unencrypted bulk streams (see package bulk). Without it the
	// agent refuses them.
	BulkKey []byte `json:"bulk_key,omitempty"`
}

// SeedSize is the size of a fresh RNGSeed.
const SeedSize = 64

// NewSeed returns SeedSize bytes from the host's CSPRNG for Config.RNGSeed.
func NewSeed() ([]byte, error) {
	b := make([]byte, SeedSize)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("random seed for the guest: %w", err)
	}
	return b, nil
}

// Encode renders cfg in the on-device format.
func Encode(cfg *Config) ([]byte, error) {
	js, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	if len(js) > MaxSize {
		return nil, fmt.Errorf("boot config is %d bytes, over the %d limit", len(js), MaxSize)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s 1 %d\n", Magic, len(js))
	b.Write(js)
	if pad := b.Len() % 4096; pad != 0 {
		b.Write(make([]byte, 4096-pad))
	}
	return b.Bytes(), nil
}

// ErrNoConfig means the device does not hold a boot configuration.
var ErrNoConfig = errors.New("not a banger boot config device")

// Decode reads a boot configuration from the start of r.
func Decode(r io.Reader) (*Config, error) {
	head := make([]byte, 64)
	n, err := io.ReadFull(r, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, err
	}
	head = head[:n]
	nl := bytes.IndexByte(head, '\n')
	if nl < 0 || !bytes.HasPrefix(head, []byte(Magic+" ")) {
		return nil, ErrNoConfig
	}
	fields := bytes.Fields(head[:nl])
	if len(fields) != 3 || string(fields[1]) != "1" {
		return nil, fmt.Errorf("unsupported boot config header %q", head[:nl])
	}
	size, err := strconv.Atoi(string(fields[2]))
	if err != nil || size < 0 || size > MaxSize {
		return nil, fmt.Errorf("bad boot config length %q", fields[2])
	}
	body := make([]byte, size)
	copied := copy(body, head[nl+1:])
	if _, err := io.ReadFull(r, body[copied:]); err != nil {
		return nil, fmt.Errorf("read boot config: %w", err)
	}
	var cfg Config
	if err := json.Unmarshal(body, &cfg); err != nil {
		return nil, fmt.Errorf("parse boot config: %w", err)
	}
	if cfg.Version != 1 {
		return nil, fmt.Errorf("unsupported boot config version %d", cfg.Version)
	}
	return &cfg, nil
}
