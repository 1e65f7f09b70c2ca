package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/image"
)

// TestImageLimitsConfig: images.max_unpacked_size and images.max_entries
// reach the image builder; bad values stop bangerd with the key named.
func TestImageLimitsConfig(t *testing.T) {
	cases := []struct {
		json    string
		want    image.Limits
		wantErr string
	}{
		{`{}`, image.Limits{}, ""},
		{`{"images":{"max_unpacked_size":"64GiB","max_entries":2000000}}`, image.Limits{MaxBytes: 64 << 30, MaxEntries: 2000000}, ""},
		{`{"images":{"max_unpacked_size":"512 MiB"}}`, image.Limits{MaxBytes: 512 << 20}, ""},
		{`{"images":{"max_unpacked_size":"1048576"}}`, image.Limits{MaxBytes: 1 << 20}, ""},
		{`{"images":{"max_unpacked_size":"1TiB"}}`, image.Limits{MaxBytes: 1 << 40}, ""},
		{`{"images":{"max_unpacked_size":"1.5GiB"}}`, image.Limits{}, "images.max_unpacked_size"},
		{`{"images":{"max_unpacked_size":"64GB"}}`, image.Limits{}, "images.max_unpacked_size"},
		{`{"images":{"max_unpacked_size":"0"}}`, image.Limits{}, "images.max_unpacked_size"},
		{`{"images":{"max_unpacked_size":"9999999TiB"}}`, image.Limits{}, "images.max_unpacked_size"},
		{`{"images":{"max_entries":-1}}`, image.Limits{}, "images.max_entries"},
	}
	for _, c := range cases {
		t.Run(c.json, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "config.json")
			if err := os.WriteFile(p, []byte(c.json), 0o600); err != nil {
				t.Fatal(err)
			}
			fc, err := loadFileConfig(p)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("got %v, want an error naming %s", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := fc.imageLimits(); got != c.want {
				t.Fatalf("limits %+v, want %+v", got, c.want)
			}
		})
	}
}

// qemu_memory_file is on unless the config or BANGER_QEMU_MEMORY_FILE
// turns it off; the environment wins, and a bad value is refused.
func TestQEMUMemoryFileConfig(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		file, env string
		want      bool
		bad       bool
	}{
		{file: `{}`, want: true},
		{file: `{"qemu_memory_file": false}`, want: false},
		{file: `{"qemu_memory_file": true}`, want: true},
		{file: `{"qemu_memory_file": true}`, env: "0", want: false},
		{file: `{"qemu_memory_file": false}`, env: "1", want: true},
		{file: `{}`, env: "yes", bad: true},
	} {
		p := filepath.Join(dir, "config.json")
		if err := os.WriteFile(p, []byte(tc.file), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv("BANGER_QEMU_MEMORY_FILE", tc.env)
		fc, err := loadFileConfig(p)
		if (err != nil) != tc.bad || (err == nil && fc.memoryFile() != tc.want) {
			t.Errorf("file %s, env %q: memory file %v, error %v", tc.file, tc.env, fc.memoryFile(), err)
		}
	}
}
