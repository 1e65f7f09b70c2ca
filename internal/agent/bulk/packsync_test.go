package bulk

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestReadManifestPackedHostile plays a guest listing objects of pushed
// packs (type "k"): only a loose object's path with a pack's base name is
// kept, and never as something to delete (w is dropped).
func TestReadManifestPackedHostile(t *testing.T) {
	id := strings.Repeat("ab", 20)
	loose := ".git/objects/ab/" + id[2:]
	pack := "pack-" + strings.Repeat("c", 40)
	var b bytes.Buffer
	WriteFrame(&b, FrameData, []byte(`[
		{"p":"`+loose+`","t":"k","l":"`+pack+`","w":true,"s":5},
		{"p":".git/objects/zz/`+id[2:]+`","t":"k","l":"`+pack+`"},
		{"p":".git/config","t":"k","l":"`+pack+`","w":true},
		{"p":"../`+loose+`","t":"k","l":"`+pack+`"},
		{"p":".git/objects/cd/`+id[2:]+`","t":"k","l":"pack-../../x"},
		{"p":".git/objects/ef/`+id[2:]+`","t":"k","l":"pack-`+strings.Repeat("C", 40)+`"},
		{"p":".git/objects/01/`+id[2:]+`","t":"k"}
	]`))
	WriteFrame(&b, FrameEOF, []byte(CapObjects+" "+CapPack))
	m, caps, err := ReadManifestCaps(&b)
	if err != nil {
		t.Fatal(err)
	}
	if !caps[CapPack] || len(m) != 1 {
		t.Fatalf("kept %v (caps %v), want only %s", m, caps, loose)
	}
	if e := m[loose]; e.T != "k" || e.W || e.L != pack || e.S != 0 {
		t.Fatalf("kept %+v", e)
	}
}

// TestReadManifestPackedBound: a guest listing more packed objects than
// the bound ends the push (they are bounded apart from the walk's entries).
func TestReadManifestPackedBound(t *testing.T) {
	defer func(n int) { maxPackedReport = n }(maxPackedReport)
	maxPackedReport = 3
	entries := []string{}
	for i := range 4 {
		id := strings.Repeat("ab", 19) + fmt.Sprintf("%02x", i)
		entries = append(entries, `{"p":".git/objects/ab/`+id[2:]+`","t":"k","l":"pack-`+strings.Repeat("c", 40)+`"}`)
	}
	for n, wantErr := range map[int]bool{3: false, 4: true} {
		var b bytes.Buffer
		WriteFrame(&b, FrameData, []byte("["+strings.Join(entries[:n], ",")+`,{"p":"a","t":"f"}]`))
		WriteFrame(&b, FrameEOF, []byte(CapPack))
		m, _, err := ReadManifestCaps(&b)
		if (err != nil) != wantErr || (!wantErr && len(m) != n+1) {
			t.Fatalf("%d packed entries: %d kept, %v", n, len(m), err)
		}
	}
}

// FuzzReadManifest: whatever a guest sends as its manifest, the host keeps
// only plain relative paths, and of packed objects only loose paths named
// with a pack's base name, none marked as the host's to delete.
func FuzzReadManifest(f *testing.F) {
	f.Add([]byte(`[{"p":".git/objects/ab/` + strings.Repeat("cd", 19) + `","t":"k","l":"pack-` + strings.Repeat("e", 40) + `","w":true}]`))
	f.Add([]byte(`[{"p":"a","t":"f","s":1,"w":true},{"p":"../b","t":"d"}]`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) > MaxFrame {
			return
		}
		var b bytes.Buffer
		WriteFrame(&b, FrameData, frame)
		WriteFrame(&b, FrameEOF, []byte(CapPack))
		m, _, err := ReadManifestCaps(&b)
		if err != nil {
			return
		}
		for p, e := range m {
			if CleanRel(p) != nil || e.P != p {
				t.Fatalf("kept %q", p)
			}
			if e.T == "k" {
				if _, ok := PackBaseName(e.L); !ok || !looseObjectPath(p) || e.W {
					t.Fatalf("kept packed %+v", e)
				}
			}
		}
	})
}

// TestPackedEntriesBounded: the manifest lists the objects of the packs
// pushes wrote (from their indexes), and none of a pack whose index is
// missing, unreadable or not an index.
func TestPackedEntriesBounded(t *testing.T) {
	dest := t.TempDir()
	pd := filepath.Join(dest, ".git/objects/pack")
	os.MkdirAll(pd, 0o755)
	newHash, _ := HashFor(40)
	_, idx, _ := buildPack(t, packObjects(newHash), newHash, 1<<20, nil)
	good := "pack-" + strings.Repeat("1", 40)
	os.WriteFile(filepath.Join(pd, good+".idx"), idx, 0o444)
	os.WriteFile(filepath.Join(pd, good+".pack"), []byte("x"), 0o444)
	noPack := "pack-" + strings.Repeat("2", 40)
	os.WriteFile(filepath.Join(pd, noPack+".idx"), idx, 0o444)
	garbage := "pack-" + strings.Repeat("3", 40)
	os.WriteFile(filepath.Join(pd, garbage+".idx"), []byte("\xfftOc\x00\x00\x00\x02short"), 0o444)
	os.WriteFile(filepath.Join(pd, garbage+".pack"), []byte("x"), 0o444)
	lies := "pack-" + strings.Repeat("4", 40)
	big := append([]byte{}, idx...)
	big[8+1020], big[8+1021] = 0x7f, 0xff // a count far past the file
	os.WriteFile(filepath.Join(pd, lies+".idx"), big, 0o444)
	os.WriteFile(filepath.Join(pd, lies+".pack"), []byte("x"), 0o444)
	linked := "pack-" + strings.Repeat("5", 40)
	os.Symlink(filepath.Join(pd, good+".idx"), filepath.Join(pd, linked+".idx"))
	os.WriteFile(filepath.Join(pd, linked+".pack"), []byte("x"), 0o444)
	s := &Syncer{Dest: dest, state: map[string]bool{}}
	for _, b := range []string{good, noPack, garbage, lies, linked} {
		s.state[".git/objects/pack/"+b+".idx"] = true
	}
	got := s.packedEntries()
	if len(got) != len(packObjects(newHash)) {
		t.Fatalf("%d packed entries, want the %d of %s", len(got), len(packObjects(newHash)), good)
	}
	for _, e := range got {
		if e.L != good || e.T != "k" || !looseObjectPath(e.P) {
			t.Fatalf("entry %+v", e)
		}
	}
}
