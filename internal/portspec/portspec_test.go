package portspec

import (
	"testing"
)

func TestParseForward(t *testing.T) {
	tests := []struct {
		in      string
		want    Spec
		wantErr bool
	}{
		{"8080", Spec{"127.0.0.1", 8080, 8080}, false},
		{"8080:80", Spec{"127.0.0.1", 8080, 80}, false},
		{"0:80", Spec{"127.0.0.1", 0, 80}, false},
		{"localhost:8080", Spec{"localhost", 8080, 8080}, false},
		{"0.0.0.0:8080:80", Spec{"0.0.0.0", 8080, 80}, false},
		{"[::1]:8080:80", Spec{"::1", 8080, 80}, false},
		{"[::1]:8080", Spec{"::1", 8080, 8080}, false},
		{"0", Spec{}, true},
		{"", Spec{}, true},
		{"70000", Spec{}, true},
		{"8080:0", Spec{}, true},
		{"a:b:c:d", Spec{}, true},
		{"[::1:80", Spec{}, true},
		{"[nope]:80", Spec{}, true},
		{"host:x", Spec{}, true},
		{"-1", Spec{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Parse(tt.in)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("Parse(%q) = %+v, %v; want %+v (error %v)", tt.in, got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func FuzzParseForward(f *testing.F) {
	for _, s := range []string{"8080", "1:2", "h:1:2", "[::1]:1:2", "[", ":::", "0:0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		sp, err := Parse(s)
		if err != nil {
			return
		}
		if sp.Port < 0 || sp.Port > 65535 || sp.GuestPort < 1 || sp.GuestPort > 65535 || sp.Host == "" {
			t.Fatalf("Parse(%q) accepted %+v", s, sp)
		}
	})
}
