package kernel

import (
	"context"
	"strings"
	"testing"
)

func TestValidatePackageName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"linux-image-6.1.0-56-cloud-amd64-unsigned", true},
		{"libstdc++6", true},
		{"a0", true},
		{"x", false},
		{"-o", false},
		{"--option=1", false},
		{"Linux-Image", false},
		{"pkg name", false},
		{"pkg;rm", false},
		{"pkg/../x", false},
		{"pkg=1.0", false},
		{"pkg:amd64", false},
		{"", false},
		{strings.Repeat("a", 201), false},
	}
	for _, tt := range tests {
		if err := ValidatePackageName(tt.name); (err == nil) != tt.ok {
			t.Errorf("ValidatePackageName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestFetchPackageRejectsBadNames(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"-o", "a b", "../x"} {
		if _, err := FetchPackage(context.Background(), name, dir); err == nil || !strings.Contains(err.Error(), "not a valid Debian package name") {
			t.Errorf("FetchPackage(%q) = %v", name, err)
		}
		if _, err := ResolveKernelPackage(context.Background(), name); err == nil || !strings.Contains(err.Error(), "not a valid Debian package name") {
			t.Errorf("ResolveKernelPackage(%q) = %v", name, err)
		}
	}
}

func TestParseKernelDepends(t *testing.T) {
	tests := []struct {
		name, out, want string
	}{
		{"bookworm", "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n", "linux-image-6.1.0-56-cloud-amd64-unsigned"},
		{"already unsigned", "linux-image-cloud-amd64\n  Depends: linux-image-6.12.9-cloud-amd64-unsigned\n", "linux-image-6.12.9-cloud-amd64-unsigned"},
		{"alternatives and extras", "linux-image-cloud-amd64\n  Depends: <linux-initramfs-tool>\n |Depends: linux-image-6.1.0-9-cloud-amd64\n  Recommends: firmware\n", "linux-image-6.1.0-9-cloud-amd64-unsigned"},
		{"arch qualified", "m\n  Depends: linux-image-6.1.0-56-cloud-amd64:amd64\n", "linux-image-6.1.0-56-cloud-amd64-unsigned"},
		{"none", "linux-image-cloud-amd64\n  Depends: kmod\n", ""},
		{"empty", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseKernelDepends([]byte(tt.out), CloudKernelMetaPackage)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("parseKernelDepends = %q, want an error", got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseKernelDepends = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}
