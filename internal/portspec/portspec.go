// Package portspec parses port forwarding specs, [HOST:]PORT[:GUEST_PORT],
// as `banger port-forward` and `-p` take them and bangerd checks them.
package portspec

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Spec is a parsed [HOST:]PORT[:GUEST_PORT].
type Spec struct {
	Host      string
	Port      int // 0: any free port
	GuestPort int
}

// Parse parses [HOST:]PORT[:GUEST_PORT]. With two parts, a numeric
// first part means PORT:GUEST_PORT, else HOST:PORT. An IPv6 host goes in
// brackets: [::1]:8080:80.
func Parse(s string) (Spec, error) {
	bad := func(why string) (Spec, error) {
		return Spec{}, fmt.Errorf("bad forward %q: %s (want [HOST:]PORT[:GUEST_PORT], e.g. 8080, 8080:80 or 127.0.0.1:8080:80)", s, why)
	}
	var host string
	rest := s
	if strings.HasPrefix(s, "[") {
		i := strings.Index(s, "]:")
		if i < 0 {
			return bad("unterminated [IPv6 address]")
		}
		host, rest = s[1:i], s[i+2:]
		if net.ParseIP(host) == nil {
			return bad("not an IPv6 address in brackets")
		}
	}
	parts := strings.Split(rest, ":")
	if host == "" {
		switch {
		case len(parts) == 3:
			host, parts = parts[0], parts[1:]
		case len(parts) == 2 && !isDigits(parts[0]):
			host, parts = parts[0], parts[1:2]
		}
		if host == "" && len(parts) > 2 {
			return bad("too many ':'")
		}
	}
	if len(parts) > 2 || len(parts) == 0 {
		return bad("too many ':'")
	}
	port, err := parsePort(parts[0], true)
	if err != nil {
		return bad(err.Error())
	}
	guestPort := port
	if len(parts) == 2 {
		if guestPort, err = parsePort(parts[1], false); err != nil {
			return bad(err.Error())
		}
	} else if port == 0 {
		return bad("port 0 needs a GUEST_PORT")
	}
	if host == "" {
		host = "127.0.0.1"
	}
	if strings.ContainsAny(host, " /") {
		return bad("bad host")
	}
	return Spec{Host: host, Port: port, GuestPort: guestPort}, nil
}

func isDigits(s string) bool {
	return s != "" && strings.Trim(s, "0123456789") == ""
}

func parsePort(s string, zeroOK bool) (int, error) {
	if !isDigits(s) {
		return 0, fmt.Errorf("%q is not a port number", s)
	}
	n, err := strconv.Atoi(s)
	if err != nil || n > 65535 || n == 0 && !zeroOK {
		return 0, fmt.Errorf("port %s out of range", s)
	}
	return n, nil
}

// String is the spec in the form Parse reads.
func (s Spec) String() string {
	h := s.Host
	if strings.Contains(h, ":") {
		h = "[" + h + "]"
	}
	return fmt.Sprintf("%s:%d:%d", h, s.Port, s.GuestPort)
}
