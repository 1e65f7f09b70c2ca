package rpc

import (
	"encoding/json"
	"regexp"
	"strings"
	"testing"
)

// A client-supplied op_id ends up in every log record and error of its
// request, so only a short plain word is adopted: anything else (control
// bytes, terminal escapes, a fake JSON key, a megabyte) is refused with
// bad_request under a fresh id, and never reaches the log.
func TestMalformedOpIDRefused(t *testing.T) {
	sock, _, logs := startServer(t)
	for _, id := range []string{
		"op\nfake log line",
		"op\x1b]52;c;aGk=\x07",
		`op","level":"ERROR`,
		"op id",
		"-leading-dash",
		"op/../x",
		strings.Repeat("a", 65),
		"op-é",
	} {
		b, _ := json.Marshal(map[string]any{"version": 1, "method": "echo", "op_id": id})
		resp := rawExchange(t, sock, string(b))[0]
		code, msg, op := errOf(resp)
		if code != CodeBadRequest || !strings.Contains(msg, "op_id") || !opIDRe.MatchString(op) {
			t.Errorf("op_id %q: %v, want bad_request under a fresh op id", id, resp)
		}
		if enc, _ := json.Marshal(id); strings.Contains(logs.String(), strings.Trim(string(enc), `"`)) {
			t.Errorf("op_id %q reached the log", id)
		}
	}
	if !ValidOpID(strings.Repeat("a", 64)) || !ValidOpID("op-c0ffee.1_x") {
		t.Error("plain ids of up to 64 characters must be adopted")
	}
}

// FuzzValidOpID: the hand-written check accepts exactly what the pattern
// in the protocol's documentation does.
func FuzzValidOpID(f *testing.F) {
	re := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	for _, s := range []string{"", "a", "op-c0ffee.1_x", "-a", ".a", "_a", "a b", "op\n", strings.Repeat("a", 64), strings.Repeat("a", 65), "é", "a\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := ValidOpID(s), re.MatchString(s); got != want {
			t.Fatalf("ValidOpID(%q) = %v, the pattern says %v", s, got, want)
		}
	})
}
