package bootcfg

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	seed, err := NewSeed()
	if err != nil {
		t.Fatal(err)
	}
	cfg := &Config{
		Version: 1, VMID: "abc", Hostname: "web",
		HostKey:        "-----BEGIN OPENSSH PRIVATE KEY-----\n...\n",
		AuthorizedKeys: []string{"ssh-ed25519 AAAA x"},
		Channel:        Channel{Kind: "serial", Name: "banger.agent"},
		Network:        &Network{MAC: "06:00:ac:1e:00:05", Address: "172.30.0.5/24", Gateway: "172.30.0.1", DNS: []string{"1.1.1.1"}, MTU: 1500},
		Env:            []string{"A=b"}, WorkDir: "/w", User: "dev",
		RNGSeed: seed,
	}
	b, err := Encode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(b)%4096 != 0 {
		t.Fatalf("encoded size %d is not a multiple of 4096", len(b))
	}
	got, err := Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, cfg) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, cfg)
	}
}

func TestDecodeErrors(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		noCfg bool
	}{
		{"empty", "", true},
		{"ext4-ish", strings.Repeat("\x00", 2048), true},
		{"other magic", "SOMETHING 1 2\n{}", true},
		{"bad version", "BANGER-BOOTCFG 2 2\n{}", false},
		{"bad length", "BANGER-BOOTCFG 1 x\n{}", false},
		{"huge length", "BANGER-BOOTCFG 1 99999999\n{}", false},
		{"short body", "BANGER-BOOTCFG 1 100\n{}", false},
		{"bad json", "BANGER-BOOTCFG 1 2\n{[", false},
		{"bad config version", "BANGER-BOOTCFG 1 13\n{\"version\":7}", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decode(strings.NewReader(tt.in))
			if err == nil {
				t.Fatal("decode succeeded")
			}
			if errors.Is(err, ErrNoConfig) != tt.noCfg {
				t.Fatalf("err = %v; ErrNoConfig expected: %v", err, tt.noCfg)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	good, _ := Encode(&Config{Version: 1, Hostname: "h"})
	f.Add(good[:200])
	f.Add([]byte("BANGER-BOOTCFG 1 2\n{}"))
	f.Add([]byte("BANGER-BOOTCFG 1 -1\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, err := Decode(bytes.NewReader(b))
		if err != nil {
			return
		}
		if _, err := Encode(cfg); err != nil {
			t.Fatalf("decoded config does not encode: %v", err)
		}
	})
}
