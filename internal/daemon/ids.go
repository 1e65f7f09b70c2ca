package daemon

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"regexp"
)

// newID returns 16 random hex digits.
func newID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// validName checks a VM, image or kernel name: a DNS label.
func validName(kind, name string) error {
	if !dnsLabel.MatchString(name) {
		return fmt.Errorf("%s name %q is not valid: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'", kind, name)
	}
	return nil
}
