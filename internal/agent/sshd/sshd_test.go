package sshd

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestLookupAccount(t *testing.T) {
	dir := t.TempDir()
	passwd := filepath.Join(dir, "passwd")
	group := filepath.Join(dir, "group")
	if err := os.WriteFile(passwd, []byte("# comment\nroot:x:0:0:root:/root:/bin/bash\ndev:x:1000:1000:Dev,,,:/home/dev:/usr/bin/zsh\nbad:x:notanumber:1:::\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(group, []byte("root:x:0:\nsudo:x:27:dev,other\ndocker:x:999:other,dev\ndev:x:1000:\nempty:x:5:\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		passwd  string
		user    string
		want    account
		wantErr error
	}{
		{"root", passwd, "root", account{Name: "root", Home: "/root", Shell: "/bin/bash", Groups: []uint32{0}}, nil},
		{"dev with groups", passwd, "dev", account{Name: "dev", UID: 1000, GID: 1000, Home: "/home/dev", Shell: "/usr/bin/zsh", Groups: []uint32{1000, 27, 999}}, nil},
		{"missing", passwd, "nobody", account{}, errNoUser},
		{"no passwd file, root", filepath.Join(dir, "none"), "root", account{Name: "root", Home: "/root", Shell: "/bin/sh"}, nil},
		{"no passwd file, other", filepath.Join(dir, "none"), "dev", account{}, os.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := lookupAccount(tt.passwd, group, tt.user)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
	if _, err := lookupAccount(passwd, group, "bad"); err == nil || !strings.Contains(err.Error(), "malformed") {
		t.Fatalf("malformed entry: %v", err)
	}
}

func TestDedupEnv(t *testing.T) {
	got := dedupEnv([]string{"A=1", "B=2", "A=3", "C", "B=", "C=x"})
	want := []string{"A=3", "B=", "C=x"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestParseAuthorizedKeys(t *testing.T) {
	const k1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGbGVd7J7vFv0E5e1pJX0xX5NqKqk0lUQk6c0Ttf7u5M one"
	keys, err := ParseAuthorizedKeys([]string{"", "# comment", k1, `from="10.0.0.1" ` + k1})
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 {
		t.Fatalf("parsed %d keys, want 2", len(keys))
	}
	if _, err := ParseAuthorizedKeys([]string{k1, "ssh-ed25519 garbage"}); err == nil || !strings.Contains(err.Error(), "authorized key 2") {
		t.Fatalf("bad key line: %v", err)
	}
}

func TestNewRequiresKeys(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("New without a host key succeeded")
	}
}

func TestLoginShell(t *testing.T) {
	if got := loginShell(account{Shell: "/nonexistent/shell"}); got != "/bin/sh" {
		t.Fatalf("missing shell: got %q", got)
	}
	if got := loginShell(account{Shell: "/bin/sh"}); got != "/bin/sh" {
		t.Fatalf("got %q", got)
	}
}
