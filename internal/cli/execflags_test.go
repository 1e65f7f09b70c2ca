package cli

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func TestExecEnvironment(t *testing.T) {
	dir := t.TempDir()
	envFile := filepath.Join(dir, "env")
	os.WriteFile(envFile, []byte("# comment\n\nA=from-file\n  B=two words \nFROM_HOST\nC=x=y\r\n"), 0o600)
	t.Setenv("FROM_HOST", "host-value")
	os.Unsetenv("UNSET_ONE")
	for _, tc := range []struct {
		name    string
		f       execFlags
		want    []string
		wantErr string
	}{
		{"none", execFlags{}, nil, ""},
		{"plain", execFlags{env: []string{"A=1", "B="}}, []string{"A=1", "B="}, ""},
		{"file then -e wins last", execFlags{envFiles: []string{envFile}, env: []string{"A=flag"}},
			[]string{"A=from-file", "B=two words ", "FROM_HOST=host-value", "C=x=y", "A=flag"}, ""},
		{"bare key takes the host's", execFlags{env: []string{"FROM_HOST", "UNSET_ONE"}}, []string{"FROM_HOST=host-value"}, ""},
		{"bad key", execFlags{env: []string{"1A=x"}}, nil, "bad environment variable"},
		{"bad key with space", execFlags{env: []string{"A B=x"}}, nil, "bad environment variable"},
		{"missing file", execFlags{envFiles: []string{filepath.Join(dir, "nope")}}, nil, "--env-file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.f.environment()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestVMAndCommand(t *testing.T) {
	cmd := &cobra.Command{Use: "exec"}
	for _, tc := range []struct {
		args    []string
		need    bool
		vm      string
		argv    []string
		wantErr string
	}{
		{[]string{"dev", "--", "ls", "-la"}, true, "dev", []string{"ls", "-la"}, ""},
		{[]string{"dev", "ls", "-la"}, true, "dev", []string{"ls", "-la"}, ""},
		{[]string{"dev", "--", "--weird"}, true, "dev", []string{"--weird"}, ""},
		{[]string{"dev", "-e", "A=1", "--", "env"}, true, "", nil, "command after --"},
		{[]string{"dev"}, true, "", nil, "put the command after --"},
		{[]string{"dev"}, false, "dev", []string{}, ""},
		{nil, false, "", nil, "usage"},
	} {
		vm, argv, err := vmAndCommand(cmd, tc.args, tc.need)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: err %v, want %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil || vm != tc.vm || len(argv) != len(tc.argv) || (len(argv) > 0 && !reflect.DeepEqual(argv, tc.argv)) {
			t.Errorf("%q: %q %q %v", tc.args, vm, argv, err)
		}
	}
}

// TestOwnFailuresExit125: exec/run/ssh fail with 125 (never a status a guest
// command could have meant), other commands keep 1 and 2.
func TestOwnFailuresExit125(t *testing.T) {
	fakeDaemon(t) // has no vm.connect: banger cannot run anything
	for _, tc := range []struct {
		args     []string
		code     int
		inStderr string
	}{
		{[]string{"exec", "vm1", "--", "true"}, 125, "error:"},
		{[]string{"exec", "-e", "A=1", "-w", "/tmp", "vm1", "--", "true"}, 125, "error:"},
		{[]string{"exec", "vm1", "-e", "A=1", "--", "true"}, 125, "flags go before the VM name"},
		{[]string{"exec", "--bogus", "vm1", "--", "true"}, 125, "put the command after --"},
		{[]string{"exec", "vm1"}, 125, "put the command after --"},
		{[]string{"exec", "-e", "1=x", "vm1", "--", "true"}, 125, "bad environment variable"},
		{[]string{"ssh", "vm1"}, 125, "error:"},
		{[]string{"vm", "show", "vm1"}, 1, "error:"},
		{[]string{"vm", "show"}, 2, "error:"},
	} {
		_, errOut, code := runCLI(t, tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.inStderr) {
			t.Errorf("banger %s: exit %d (want %d), stderr %q (want %q)", strings.Join(tc.args, " "), code, tc.code, errOut, tc.inStderr)
		}
	}
}
