package guest

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/api"
)

// HostKey is a VM's SSH host key: the private half goes into the boot config
// (bootcfg.Config.HostKey), the public half is pinned by the host.
type HostKey struct {
	PrivatePEM []byte        // OpenSSH PEM private key
	Public     ssh.PublicKey // for ssh.FixedHostKey / known_hosts
}

// AuthorizedLine renders the public key as an authorized_keys / known_hosts
// key ("ssh-ed25519 AAAA...") without a trailing newline.
func (k HostKey) AuthorizedLine() string { return authorizedLine(k.Public) }

func authorizedLine(k ssh.PublicKey) string {
	b := ssh.MarshalAuthorizedKey(k)
	return string(b[:len(b)-1])
}

// GenerateHostKey makes a fresh ed25519 host key for a VM.
func GenerateHostKey() (HostKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return HostKey{}, fmt.Errorf("generate host key: %w", err)
	}
	blk, err := ssh.MarshalPrivateKey(priv, "banger guest host key")
	if err != nil {
		return HostKey{}, fmt.Errorf("encode host key: %w", err)
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		return HostKey{}, err
	}
	return HostKey{PrivatePEM: pem.EncodeToMemory(blk), Public: sp}, nil
}

// ParsePublicKey parses a public key in authorized_keys format (as stored by
// bangerd for pinning).
func ParsePublicKey(line string) (ssh.PublicKey, error) {
	k, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		return nil, fmt.Errorf("parse public key: %w", err)
	}
	return k, nil
}

// UserKey is the per-user banger client key.
type UserKey struct {
	Signer ssh.Signer
	Path   string // private key file (OpenSSH format, 0600); Path+".pub" holds the public key
}

// AuthorizedLine renders the public key for bootcfg.Config.AuthorizedKeys.
func (k UserKey) AuthorizedLine() string { return authorizedLine(k.Signer.PublicKey()) }

// LoadOrCreateUserKey loads the private key at path, or creates an ed25519
// key there (mode 0600, directory 0700, public key beside it as path.pub)
// when none exists. The key file is created exclusively, so two processes
// racing end up with the same key.
func LoadOrCreateUserKey(path string) (UserKey, error) {
	if b, err := os.ReadFile(path); err == nil {
		s, err := loadSigner(path, b)
		if err != nil {
			return UserKey{}, err
		}
		return UserKey{Signer: s, Path: path}, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return UserKey{}, fmt.Errorf("read banger key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return UserKey{}, fmt.Errorf("create key directory: %w", err)
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return UserKey{}, fmt.Errorf("generate banger key: %w", err)
	}
	blk, err := ssh.MarshalPrivateKey(priv, "banger")
	if err != nil {
		return UserKey{}, err
	}
	data := pem.EncodeToMemory(blk)
	// Write to a temporary file and hard-link it into place: the key appears
	// complete or not at all, and an existing key is never replaced.
	tmp, err := os.CreateTemp(filepath.Dir(path), ".banger-key-*")
	if err != nil {
		return UserKey{}, fmt.Errorf("create banger key: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return UserKey{}, err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return UserKey{}, fmt.Errorf("write banger key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return UserKey{}, err
	}
	if err := tmp.Close(); err != nil {
		return UserKey{}, err
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return LoadOrCreateUserKey(path) // someone else won the race
		}
		return UserKey{}, fmt.Errorf("install banger key at %s: %w", path, err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return UserKey{}, err
	}
	k := UserKey{Signer: signer, Path: path}
	if err := os.WriteFile(path+".pub", []byte(k.AuthorizedLine()+" banger\n"), 0o644); err != nil {
		return UserKey{}, fmt.Errorf("write banger public key: %w", err)
	}
	return k, nil
}

func loadSigner(path string, b []byte) (ssh.Signer, error) {
	fi, err := os.Stat(path)
	if err == nil && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("banger key %s is accessible by other users (mode %o); fix with: chmod 600 %s", path, fi.Mode().Perm(), path)
	}
	s, err := ssh.ParsePrivateKey(b)
	if err != nil {
		var pp *ssh.PassphraseMissingError
		if errors.As(err, &pp) {
			return nil, fmt.Errorf("banger key %s is passphrase-protected; banger needs an unencrypted key there", path)
		}
		return nil, fmt.Errorf("parse banger key %s: %w", path, err)
	}
	return s, nil
}

// SSHConfig is the algorithm configuration of banger's SSH clients: the
// modern set the agent offers (api.SSHKeyExchanges and friends), nothing
// older.
func SSHConfig() ssh.Config {
	return ssh.Config{
		KeyExchanges: slices.Clone(api.SSHKeyExchanges),
		Ciphers:      slices.Clone(api.SSHCiphers),
		MACs:         slices.Clone(api.SSHMACs),
	}
}
