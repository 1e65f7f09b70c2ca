package image

import (
	"os"
	"path/filepath"
	"testing"
)

func TestDefaultMirror(t *testing.T) {
	cases := []struct {
		name  string
		files map[string]string
		want  string
	}{
		{"none", nil, "http://deb.debian.org/debian"},
		{"one-line", map[string]string{"sources.list": "# c\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n"}, "http://mirror.example/debian"},
		{"deb822", map[string]string{"sources.list.d/debian.sources": "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: https://m.example/debian\nSuites: bookworm\n"}, "https://m.example/debian"},
		{"third party only", map[string]string{"sources.list.d/x.list": "deb https://packages.cloud.google.com/apt cloud-sdk main\n"}, "http://deb.debian.org/debian"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			root := t.TempDir()
			for p, body := range c.files {
				f := filepath.Join(root, "etc/apt", p)
				os.MkdirAll(filepath.Dir(f), 0o755)
				os.WriteFile(f, []byte(body), 0o644)
			}
			if got := DefaultMirror(root); got != c.want {
				t.Fatalf("DefaultMirror = %q, want %q", got, c.want)
			}
		})
	}
}

func TestValidateNames(t *testing.T) {
	for _, s := range []string{"bookworm", "trixie", "stable"} {
		if err := ValidateSuite(s); err != nil {
			t.Error(err)
		}
	}
	for _, s := range []string{"", "../x", "book worm", "-x"} {
		if ValidateSuite(s) == nil {
			t.Errorf("suite %q accepted", s)
		}
	}
	for _, s := range []string{"openssh-server", "libc6", "g++"} {
		if err := ValidatePackage(s); err != nil {
			t.Error(err)
		}
	}
	for _, s := range []string{"", "-o", "a b", "x;y"} {
		if ValidatePackage(s) == nil {
			t.Errorf("package %q accepted", s)
		}
	}
}
