package daemon

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/paths"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/system"
)

func TestParseProcStat(t *testing.T) {
	tail := " 4 5 6 7 8 9 10 11 12 13 250 50 16 17 18 19 20 21 987654 23 24 25\n"
	tests := []struct {
		name         string
		in           string
		ticks, start uint64
		wantErr      bool
	}{
		{"plain", "1234 (qemu-system-x86) S" + tail, 300, 987654, false},
		{"name with spaces and parens", "77 (a) b (c) R" + tail, 300, 987654, false},
		{"no name", "1234 qemu S" + tail, 0, 0, true},
		{"short", "1 (x) S 1 2 3", 0, 0, true},
		{"not a number", "1 (x) S 4 5 6 7 8 9 10 11 12 13 x 50 16 17 18 19 20 21 9 23", 0, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ticks, start, err := parseProcStat([]byte(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if ticks != tt.ticks || start != tt.start {
				t.Fatalf("got %d %d, want %d %d", ticks, start, tt.ticks, tt.start)
			}
		})
	}
}

func TestParseVmRSS(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    uint64
		wantErr bool
	}{
		{"plain", "Name:\tqemu\nVmPeak:\t 100 kB\nVmRSS:\t  2048 kB\nThreads: 3\n", 2048 * 1024, false},
		{"missing (zombie)", "Name:\tqemu\nState:\tZ (zombie)\n", 0, true},
		{"bad unit", "VmRSS:\t 12 MB\n", 0, true},
		{"bad number", "VmRSS:\t x kB\n", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseVmRSS([]byte(tt.in))
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("got %d, %v; want %d (error %v)", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func FuzzParseProcStat(f *testing.F) {
	f.Add([]byte("1 (x) S 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23"))
	f.Add([]byte("1 ()) S"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		parseProcStat(b)
		parseVmRSS(b)
	})
}

func TestReadProcStatsSelf(t *testing.T) {
	pid := os.Getpid()
	st, err := system.ProcessStartTime(pid)
	if err != nil {
		t.Fatal(err)
	}
	hs, _, err := readProcStats(pid, st)
	if err != nil {
		t.Fatal(err)
	}
	if hs.PID != pid || hs.RSSBytes == 0 {
		t.Fatalf("self stats: %+v", hs)
	}
	if _, _, err := readProcStats(pid, st+1); err == nil || !strings.Contains(err.Error(), "no longer the VMM") {
		t.Fatalf("wrong start time: %v", err)
	}
	if _, _, err := readProcStats(0, 0); err == nil {
		t.Fatal("pid 0 accepted")
	}
}

func TestHistoryCPUAndBound(t *testing.T) {
	h := &vmHistory{keep: 3}
	t0 := time.Now()
	if p := h.cpu(1000, t0); p != nil {
		t.Fatalf("first sample has a CPU figure: %v", *p)
	}
	// 150 ticks (1.5 s of CPU) over 2 s of wall time is 75 %.
	p := h.cpu(1150, t0.Add(2*time.Second))
	if p == nil || *p < 74.99 || *p > 75.01 {
		t.Fatalf("cpu = %v, want 75", p)
	}
	if p := h.cpu(10, t0.Add(3*time.Second)); p != nil {
		t.Fatalf("counter going back gave %v", *p)
	}
	for i := 0; i < 5; i++ {
		h.add(api.StatsSample{Time: t0.Add(time.Duration(i) * time.Second)})
	}
	s := h.snapshot()
	if len(s) != 3 || !s[0].Time.Equal(t0.Add(2*time.Second)) || !s[2].Time.Equal(t0.Add(4*time.Second)) {
		t.Fatalf("history not bounded to the last 3: %+v", s)
	}
}

func TestSortPorts(t *testing.T) {
	ps := []api.Port{{Proto: "udp", Port: 53}, {Proto: "tcp6", Address: "::", Port: 22}, {Proto: "tcp", Address: "0.0.0.0", Port: 22}}
	sortPorts(ps)
	if ps[0].Proto != "tcp" || ps[1].Proto != "tcp6" || ps[2].Port != 53 {
		t.Fatalf("order: %+v", ps)
	}
}

func TestWriteKnownHosts(t *testing.T) {
	dir := t.TempDir()
	l := paths.Layout{ConfigDir: dir, DataDir: dir, RunDir: filepath.Join(dir, "run")}
	s := &vmService{layout: l}
	sp := &statsPoller{s: s, hostKeys: map[string]string{}}
	mk := func(id, key string) {
		d := s.vmDir(id)
		os.MkdirAll(d, 0o700)
		if key != "" {
			os.WriteFile(filepath.Join(d, hostKeyName+".pub"), []byte(key+"\n"), 0o644)
		}
	}
	mk("id1", "ssh-ed25519 AAAAkey1")
	mk("id2", "ssh-ed25519 AAAAkey2")
	mk("id3", "") // never started: no key yet
	vms := []*store.VM{{ID: "id2", Name: "zeta"}, {ID: "id1", Name: "alpha"}, {ID: "id3", Name: "fresh"}}
	if err := sp.writeKnownHosts(vms); err != nil {
		t.Fatal(err)
	}
	p := s.knownHostsPath()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	want := "alpha ssh-ed25519 AAAAkey1\nzeta ssh-ed25519 AAAAkey2\n"
	if !strings.HasSuffix(string(b), want) || strings.Contains(string(b), "fresh") {
		t.Fatalf("known_hosts:\n%s", b)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode())
	}
	// a deleted VM disappears; a removed file is written again
	if err := sp.writeKnownHosts(vms[1:2]); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(p)
	if bytes.Contains(b, []byte("zeta")) {
		t.Fatalf("deleted VM still in known_hosts:\n%s", b)
	}
	os.Remove(p)
	if err := sp.writeKnownHosts(vms[1:2]); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("known_hosts not rewritten after removal: %v", err)
	}
}
