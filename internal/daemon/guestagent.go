package daemon

import (
	"fmt"
	"log/slog"

	"github.com/bangerdev/banger/internal/guest"
)

// newGuestAgent returns an agent factory: a guest.Client over the VM's
// transport, pinning the VM's host key and authenticating with the user's
// banger key at userKeyPath. With the agent's bulk key (nil: unknown), the
// client's control requests go over a bulk control stream, no SSH
// handshake (see guest.ClientConfig.BulkKey).
func newGuestAgent(userKeyPath string, log *slog.Logger) func(t *guest.Transport, hostKeyLine string, bulkKey []byte) (guestAgent, error) {
	return func(t *guest.Transport, hostKeyLine string, bulkKey []byte) (guestAgent, error) {
		pub, err := guest.ParsePublicKey(hostKeyLine)
		if err != nil {
			return nil, fmt.Errorf("VM host key: %w", err)
		}
		uk, err := guest.LoadOrCreateUserKey(userKeyPath)
		if err != nil {
			return nil, err
		}
		return guest.NewClient(guest.ClientConfig{Dialer: t, HostKey: pub, UserKey: uk.Signer, Logger: log, BulkKey: bulkKey})
	}
}
