package helper

import (
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/hostnet/netcfg"
	"github.com/bangerdev/banger/internal/rpc"
)

func TestDecodeStrict(t *testing.T) {
	cases := []struct {
		raw  string
		ok   bool
		want hostnet.CreateTapParams
	}{
		{``, true, hostnet.CreateTapParams{}},
		{`null`, true, hostnet.CreateTapParams{}},
		{`{}`, true, hostnet.CreateTapParams{}},
		{`{"tap":"bgt-a","bridge":"banger0","mtu":1400}`, true, hostnet.CreateTapParams{Tap: "bgt-a", Bridge: "banger0", MTU: 1400}},
		{`{"tap":"bgt-a","path":"/etc"}`, false, hostnet.CreateTapParams{}},
		{`{"Tap":"x","TAP":"y"}`, true, hostnet.CreateTapParams{Tap: "y"}}, // encoding/json matches case-insensitively
		{`{"tap":1}`, false, hostnet.CreateTapParams{}},
		{`{"tap":"a"} {"tap":"b"}`, false, hostnet.CreateTapParams{}},
		{`{"tap":"a"} x`, false, hostnet.CreateTapParams{}},
		{`"bgt-a"`, false, hostnet.CreateTapParams{}},
		{`[1]`, false, hostnet.CreateTapParams{}},
		{`{"owner_uid":-1}`, false, hostnet.CreateTapParams{}},
		{`{"owner_uid":4294967296}`, false, hostnet.CreateTapParams{}},
	}
	for _, tc := range cases {
		var p hostnet.CreateTapParams
		err := decodeStrict("m", json.RawMessage(tc.raw), &p)
		if (err == nil) != tc.ok {
			t.Errorf("decodeStrict(%q) = %v, want ok=%v", tc.raw, err, tc.ok)
			continue
		}
		if err != nil {
			if rpc.CodeOf(err) != rpc.CodeInvalidArgument {
				t.Errorf("decodeStrict(%q): code %s", tc.raw, rpc.CodeOf(err))
			}
			continue
		}
		if p.Tap != tc.want.Tap || p.Bridge != tc.want.Bridge || p.MTU != tc.want.MTU {
			t.Errorf("decodeStrict(%q) = %+v", tc.raw, p)
		}
	}
}

func FuzzDecodeStrict(f *testing.F) {
	for _, s := range []string{`{"tap":"bgt-a","bridge":"banger0"}`, `{"x":1}`, `null`, `[]`, `{"owner_uid":1}`, `{"tap":"a"}{}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var p hostnet.CreateTapParams
		err := decodeStrict("m", b, &p)
		if err != nil && rpc.CodeOf(err) != rpc.CodeInvalidArgument {
			t.Fatalf("code %s for %q", rpc.CodeOf(err), b)
		}
	})
}

func TestPolicy(t *testing.T) {
	groups := func(uid uint32) []uint32 {
		if uid == 1002 {
			return []uint32{1002, 500}
		}
		return nil
	}
	p := Policy{UIDs: []uint32{1000}, GIDs: []uint32{500}, groupsOf: groups}
	cases := []struct {
		c    Caller
		want bool
	}{
		{Caller{UID: 0, GID: 0}, true},
		{Caller{UID: 1000, GID: 1000}, true},
		{Caller{UID: 1001, GID: 1001}, false},
		{Caller{UID: 1001, GID: 500}, true},  // primary group
		{Caller{UID: 1002, GID: 1002}, true}, // supplementary group
		{Caller{UID: 65534, GID: 65534}, false},
	}
	for _, tc := range cases {
		if got := p.Allowed(tc.c); got != tc.want {
			t.Errorf("Allowed(%+v) = %v", tc.c, got)
		}
	}
	if (Policy{}).Allowed(Caller{UID: 1000}) {
		t.Error("empty policy allowed a user")
	}
}

func TestClassify(t *testing.T) {
	cases := []struct {
		err  error
		code string
	}{
		{fmt.Errorf("x: %w", netcfg.ErrConflict), rpc.CodeConflict},
		{fmt.Errorf("x: %w", netcfg.ErrPrecondition), rpc.CodeFailedPrecondition},
		{fmt.Errorf("x: %w", netcfg.ErrNotFound), rpc.CodeNotFound},
		{errors.New("netlink: boom"), rpc.CodeInternal},
		{rpc.Errorf(rpc.CodePermissionDenied, "no"), rpc.CodePermissionDenied},
	}
	for _, tc := range cases {
		if got := rpc.CodeOf(classify(tc.err)); got != tc.code {
			t.Errorf("classify(%v) = %s, want %s", tc.err, got, tc.code)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	for _, cfg := range []Config{
		{Bridge: "Banger0"},
		{Bridge: "eth0/../x"},
		{TapPrefix: "b"},
		{TapPrefix: "a-very-long-prefix"},
		{Bridge: "bgt-bridge", TapPrefix: "bgt-"},
	} {
		if _, err := NewServer(cfg); err == nil {
			t.Errorf("NewServer(%+v) accepted", cfg)
		}
	}
	if _, err := NewServer(Config{}); err != nil {
		t.Errorf("defaults refused: %v", err)
	}
}

func TestResolveUser(t *testing.T) {
	if uid, err := ResolveUser("1234"); err != nil || uid != 1234 {
		t.Fatalf("%d %v", uid, err)
	}
	if uid, err := ResolveUser("root"); err != nil || uid != 0 {
		t.Fatalf("root: %d %v", uid, err)
	}
	if _, err := ResolveUser("no-such-user-banger"); err == nil {
		t.Fatal("unknown user resolved")
	}
	if _, err := ResolveGroup("no-such-group-banger"); err == nil {
		t.Fatal("unknown group resolved")
	}
}
