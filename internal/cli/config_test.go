package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigCommand(t *testing.T) {
	h := t.TempDir()
	t.Setenv("BANGER_HOME", h)
	out, _, code := runCLI(t, "config", "path")
	if code != 0 || strings.TrimSpace(out) != filepath.Join(h, "config.json") {
		t.Fatalf("config path: %d %q", code, out)
	}
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{[]string{"config", "get", "vmm"}, 1, ""},
		{[]string{"config", "set", "vmm", "qemu"}, 0, "vmm = qemu\nbangerd reads this when it starts: restart it for the change to apply\n"},
		{[]string{"config", "get", "vmm"}, 0, "qemu\n"},
		{[]string{"config", "set", "vmm", "bochs"}, 2, ""},
		{[]string{"config", "set", "vmmm", "qemu"}, 2, ""},
		{[]string{"config", "set", "boot_timeout", "soon"}, 2, ""},
		{[]string{"config", "set", "network.dns", `["1.1.1.1"]`}, 0, ""},
		{[]string{"config", "get", "network.dns"}, 0, "[\"1.1.1.1\"]\n"},
		{[]string{"config", "set", "sizes.ci.cpus", "3"}, 0, "sizes.ci.cpus = 3\n"},
		{[]string{"config", "set", "sizes.ci.memory", "1G"}, 0, ""},
		{[]string{"config", "set", "sizes.ci.memory", "lots"}, 2, ""},
		{[]string{"config", "set", "default_size", "huge"}, 2, ""},
		{[]string{"config", "set", "default_size", "ci"}, 0, ""},
		{[]string{"config", "get", "sizes.medium.memory"}, 0, "2G\n"},
		{[]string{"config", "unset", "vmm"}, 0, "unset vmm\nbangerd reads this when it starts: restart it for the change to apply\n"},
		{[]string{"config", "get", "vmm"}, 1, ""},
	} {
		out, errOut, code := runCLI(t, tc.args...)
		if code != tc.code || (tc.out != "" && out != tc.out) {
			t.Errorf("banger %s: exit %d %q (stderr %q); want %d %q", strings.Join(tc.args, " "), code, out, errOut, tc.code, tc.out)
		}
	}
	out, _, _ = runCLI(t, "config", "get")
	for _, want := range []string{"default_size = ci\n", "network.dns = [\"1.1.1.1\"]\n", "sizes.ci.cpus = 3\n", "sizes.ci.memory = 1G\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("config get lacks %q:\n%s", want, out)
		}
	}
	if fi, err := os.Stat(filepath.Join(h, "config.json")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("config file: %v %v", fi, err)
	}
}

func TestSizeProfiles(t *testing.T) {
	f := startFakeVMs(t)
	h := os.Getenv("BANGER_HOME")
	os.WriteFile(filepath.Join(h, "config.json"), []byte(`{"sizes":{"ci":{"cpus":3,"memory":"1G"}},"default_size":"ci"}`), 0o600)
	for _, tc := range []struct {
		args            []string
		cpus, mem, disk int
	}{
		{[]string{"vm", "create", "a"}, 3, 1024, 4096},                     // default_size ci (disk from the built-in default)
		{[]string{"vm", "create", "b", "--size", "large"}, 4, 8192, 40960}, // built-in
		{[]string{"vm", "create", "c", "--size", "medium", "--cpus", "8"}, 8, 2048, 10240},
		{[]string{"vm", "create", "d", "--memory", "256M"}, 1, 256, 4096}, // explicit flags: no default profile
	} {
		if _, errOut, code := runCLI(t, tc.args...); code != 0 {
			t.Fatalf("%v: %d %s", tc.args, code, errOut)
		}
		p := f.creates[len(f.creates)-1]
		if p.VCPUs != tc.cpus || p.MemoryMiB != tc.mem || p.DiskMiB != tc.disk {
			t.Errorf("%v: cpus %d memory %d disk %d; want %d %d %d", tc.args, p.VCPUs, p.MemoryMiB, p.DiskMiB, tc.cpus, tc.mem, tc.disk)
		}
	}
	if _, errOut, code := runCLI(t, "vm", "create", "e", "--size", "nope"); code != 2 || !strings.Contains(errOut, "no size") {
		t.Errorf("--size nope: %d %s", code, errOut)
	}
}
