package userconfig

import (
	"path/filepath"
	"reflect"
	"testing"
)

func TestGetSetFlatten(t *testing.T) {
	m := map[string]any{}
	if err := Set(m, "network.mode", "none"); err != nil {
		t.Fatal(err)
	}
	Set(m, "vmm", "qemu")
	Set(m, "sizes.ci.cpus", ParseValue("2"))
	if v, ok := Get(m, "network.mode"); !ok || v != "none" {
		t.Fatalf("Get: %v %v", v, ok)
	}
	if err := Set(m, "vmm.x", "y"); err == nil {
		t.Fatal("Set through a string succeeded")
	}
	want := [][2]string{{"network.mode", "none"}, {"sizes.ci.cpus", "2"}, {"vmm", "qemu"}}
	if got := Flatten(m); !reflect.DeepEqual(got, want) {
		t.Fatalf("Flatten: %v", got)
	}
	Set(m, "network.mode", nil)
	if _, ok := Get(m, "network.mode"); ok {
		t.Fatal("unset left the key")
	}
	p := filepath.Join(t.TempDir(), "sub", "config.json")
	if err := Save(p, m); err != nil {
		t.Fatal(err)
	}
	back, err := Load(p)
	if err != nil || back["vmm"] != "qemu" {
		t.Fatalf("Load: %v %v", back, err)
	}
	if m, err := Load(filepath.Join(t.TempDir(), "none.json")); err != nil || len(m) != 0 {
		t.Fatalf("Load missing: %v %v", m, err)
	}
}

func TestParseValue(t *testing.T) {
	for in, want := range map[string]any{"3": int64(3), "true": true, "qemu": "qemu", `["a"]`: []any{"a"}, "2G": "2G", "[bad": "[bad"} {
		if got := ParseValue(in); !reflect.DeepEqual(got, want) {
			t.Errorf("ParseValue(%q) = %#v, want %#v", in, got, want)
		}
	}
}

func TestProfiles(t *testing.T) {
	m := map[string]any{"sizes": map[string]any{"medium": map[string]any{"memory": "3G"}, "ci": map[string]any{"cpus": float64(6)}}}
	s, ok, err := Profile(m, "medium")
	if err != nil || !ok || s != (Size{CPUs: 2, Memory: "3G", Disk: "10G"}) {
		t.Fatalf("medium: %+v %v %v", s, ok, err)
	}
	if s, _, _ := Profile(m, "ci"); s.CPUs != 6 {
		t.Fatalf("ci: %+v", s)
	}
	if _, ok, err := Profile(m, ""); ok || err != nil {
		t.Fatalf("no default: %v %v", ok, err)
	}
	m["default_size"] = "large"
	if s, ok, _ := Profile(m, ""); !ok || s.CPUs != 4 {
		t.Fatalf("default large: %+v", s)
	}
	if _, _, err := Profile(m, "huge"); err == nil {
		t.Fatal("unknown profile accepted")
	}
	if _, err := Sizes(map[string]any{"sizes": "x"}); err == nil {
		t.Fatal("malformed sizes accepted")
	}
	for _, k := range []string{"vmm", "sizes.ci.memory", "network.dns"} {
		if _, ok := KnownKey(k); !ok {
			t.Errorf("%s unknown", k)
		}
	}
	for _, k := range []string{"vmmm", "sizes.ci.colour", "sizes.BAD!.cpus", "sizes.ci"} {
		if _, ok := KnownKey(k); ok {
			t.Errorf("%s known", k)
		}
	}
}

func TestParseMiB(t *testing.T) {
	for in, want := range map[string]int{"512M": 512, "2G": 2048, "1T": 1 << 20, "1024": 1024, "1.5G": 1536, "2GiB": 2048} {
		if got, err := ParseMiB(in); err != nil || got != want {
			t.Errorf("ParseMiB(%q) = %d, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "x", "-1G", "0"} {
		if _, err := ParseMiB(in); err == nil {
			t.Errorf("ParseMiB(%q) accepted", in)
		}
	}
}
