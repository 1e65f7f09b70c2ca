// Package api holds what banger-agent (in the guest) and bangerd (on the host)
// must agree on beyond the SSH protocol itself: the names of banger's custom
// SSH requests, their JSON payloads, and the resynchronisation lines of the
// virtio-serial multiplexer.
package api

import "time"

// Global SSH requests served by the agent. Replies carry JSON payloads (or none).
const (
	// RequestPing asks the agent whether it is ready. Reply: ok, no payload.
	RequestPing = "banger-ping@banger"
	// RequestShutdown asks the guest to power off. The agent replies first,
	// then powers the machine off; the connection drops shortly after.
	RequestShutdown = "banger-shutdown@banger"
	// RequestPorts lists listening sockets. Reply payload: PortsReply.
	RequestPorts = "banger-ports@banger"
	// RequestStats reports guest resource use. Reply payload: Stats.
	RequestStats = "banger-stats@banger"
	// RequestReidentify gives a guest restored from a snapshot (a clone) its
	// own identity. Payload: Reidentify (JSON, at most MaxReidentify bytes).
	// Reply: ok once applied, or a refusal with the reason. The SSH host key
	// changes for connections made after the reply.
	RequestReidentify = "banger-reidentify@banger"
)

// MaxReidentify bounds a RequestReidentify payload.
const MaxReidentify = 64 << 10

// Reidentify is a clone's new identity: everything a guest restored from a
// snapshot shares with its source until it is told otherwise.
type Reidentify struct {
	Hostname string `json:"hostname"`
	// HostKey is the agent's new SSH host key (OpenSSH PEM, ed25519);
	// empty keeps the current one.
	HostKey string `json:"host_key"`
	// MachineID is the new /etc/machine-id (32 lowercase hex digits).
	MachineID string `json:"machine_id"`
	// RNGSeed is fresh host randomness credited to the guest's entropy
	// pool (RNDADDENTROPY), so that the clone's RNG diverges from its source's.
	RNGSeed []byte `json:"rng_seed"`
	// TimeUnixNano is the host's clock when the request was made; the guest
	// clock is set to it (it stood still while the snapshot waited).
	TimeUnixNano int64 `json:"time_unix_nano"`
	// Network, when set, replaces the interface's MAC, address, gateway and
	// DNS (the interface is found by its current MAC, FromMAC).
	Network *ReidentifyNetwork `json:"network,omitempty"`
	// BulkKey, when set, replaces the key bulk streams must present (the
	// clone's own, from its start; a clone restored with its source's
	// memory would otherwise accept only its source's).
	BulkKey []byte `json:"bulk_key,omitempty"`
}

// ReidentifyNetwork is a clone's network identity.
type ReidentifyNetwork struct {
	FromMAC string   `json:"from_mac"` // the MAC the guest has now (its source's)
	MAC     string   `json:"mac"`
	Address string   `json:"address"` // CIDR
	Gateway string   `json:"gateway,omitempty"`
	DNS     []string `json:"dns,omitempty"`
}

// Session channel requests served by the agent in addition to the standard ones.
const (
	// RequestWorkDir sets the working directory of the command started next
	// on this session. Payload: SSH string (uint32 length + bytes). The agent
	// refuses it when the directory does not exist.
	RequestWorkDir = "banger-workdir@banger"
)

// The SSH algorithms the agent's server offers and banger's clients ask
// for: the set OpenSSH itself prefers, nothing older. No SHA-1 key
// exchange or MAC, no NIST curves, no encrypt-and-MAC MACs, no CTR or CBC
// ciphers. (The MACs only matter to a client that refuses every AEAD
// cipher; they are listed so that such a client gets an -etm one.)
var (
	// SSHKeyExchanges: hybrid post-quantum ML-KEM + X25519 first, then
	// X25519 (x/crypto adds its curve25519-sha256@libssh.org alias).
	SSHKeyExchanges = []string{"mlkem768x25519-sha256", "curve25519-sha256"}
	// SSHCiphers: chacha20-poly1305 first (OpenSSH's default order; guests
	// under emulation run it 2-3x faster than AES-GCM), then AES-GCM.
	SSHCiphers = []string{"chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com"}
	// SSHMACs: encrypt-then-MAC only.
	SSHMACs = []string{"hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"}
	// SSHHostKeyAlgorithms: host keys are ed25519, made by bangerd.
	SSHHostKeyAlgorithms = []string{"ssh-ed25519"}
	// SSHPublicKeyAuthAlgorithms: user keys are banger's ed25519 key.
	SSHPublicKeyAuthAlgorithms = []string{"ssh-ed25519"}
)

// SFTPMaxPacket is the largest read or write payload the agent's SFTP
// server handles (pkg/sftp's packets carry up to 256 KiB); banger's own
// clients use it over the bulk path, where fewer, larger requests save
// round trips through the emulated guest.
const SFTPMaxPacket = 128 << 10

// Defaults both sides use unless configured otherwise.
const (
	// DefaultVsockPort is the vsock port the agent listens on.
	DefaultVsockPort uint32 = 52
	// DefaultSerialName is the virtio-serial port name of the agent channel.
	DefaultSerialName = "banger.agent"
)

// Virtio-serial multiplexer resynchronisation. A virtio-serial port is a
// single byte stream that outlives host connections (bangerd restarts), and
// either end may hold stale bytes of an earlier session. So before every
// yamux session both ends synchronise with text lines "<KIND> 1 <nonce>\n",
// each side ignoring everything else (see ReadMuxLine):
//
//  1. the agent writes MuxHello (on virtio-serial this write blocks until a
//     host is connected, which is how the agent waits for one);
//  2. the host picks a fresh nonce and writes MuxPreamble every
//     MuxResendInterval, and at once when it reads MuxHello, until it
//     reads MuxAck with its nonce;
//  3. the agent answers the first MuxPreamble of each nonce with MuxAck
//     (repeats of that nonce are ignored; a new nonce starts over);
//  4. the host stops resending, writes MuxGo with its nonce and starts a
//     yamux client; the agent, on MuxGo with the nonce it acknowledged,
//     starts a yamux server. Every yamux stream carries one SSH connection.
//
// Resending makes the handshake converge even when a stale yamux session
// swallowed the first preamble.
const (
	MuxHello    = "BANGER-MUX-HELLO"
	MuxPreamble = "BANGER-MUX"
	MuxAck      = "BANGER-MUX-OK"
	MuxGo       = "BANGER-MUX-GO"

	MuxVersion        = "1"
	MuxResendInterval = 100 * time.Millisecond
)

// MuxWindow is each end's receive window per yamux stream (yamux's own is
// 256 KiB). With 256 KiB a bulk stream stalls for a window update every
// 128 KiB, a round trip through QEMU's chardev and both processes, and the
// guest vCPU, which bounds every transfer under TCG, sat idle ~30% of a
// 100 MiB cp. The window only grows as the receiver reads, so a stream
// nobody reads still holds at most 256 KiB.
const MuxWindow = 4 << 20

// Port is one listening socket in the guest.
type Port struct {
	Proto   string `json:"proto"`   // "tcp", "tcp6", "udp", "udp6"
	Address string `json:"address"` // local address, e.g. "0.0.0.0", "::", "127.0.0.1"
	Port    int    `json:"port"`
	PID     int    `json:"pid,omitempty"`     // 0 when unknown
	Process string `json:"process,omitempty"` // process name (comm)
	Inode   uint64 `json:"inode,omitempty"`
}

// PortsReply is the payload of the RequestPorts reply.
type PortsReply struct {
	Ports []Port `json:"ports"`
	// Truncated says the list was cut to fit one SSH packet.
	Truncated bool `json:"truncated,omitempty"`
}

// Stats is the payload of the RequestStats reply.
type Stats struct {
	MemTotalBytes  uint64        `json:"mem_total_bytes"`
	MemUsedBytes   uint64        `json:"mem_used_bytes"` // total minus available
	Load1          float64       `json:"load1"`
	Load5          float64       `json:"load5"`
	Load15         float64       `json:"load15"`
	DiskTotalBytes uint64        `json:"disk_total_bytes"` // root filesystem
	DiskUsedBytes  uint64        `json:"disk_used_bytes"`
	Uptime         time.Duration `json:"uptime_ns"`
	Procs          int           `json:"procs,omitempty"` // number of processes
}
