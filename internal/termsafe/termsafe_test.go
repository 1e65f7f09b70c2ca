package termsafe

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"
)

// attacks are what a hostile guest puts in a process name, an address or
// its console, and what must reach the terminal.
var attacks = []struct {
	name, in, want, wantLine string
}{
	{"plain", "nginx", "nginx", "nginx"},
	{"unicode kept", "café ☕ 日本", "café ☕ 日本", "café ☕ 日本"},
	{"osc52 clipboard write, BEL", "x\x1b]52;c;Y3VybCBldmlsLnNofHNo\x07y", "xy", "xy"},
	{"osc52 clipboard write, ST", "x\x1b]52;c;Y3VybA==\x1b\\y", "xy", "xy"},
	{"window title", "\x1b]0;pwned\x07sshd", "sshd", "sshd"},
	{"hyperlink", "\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\", "click", "click"},
	{"cursor up and erase line", "ok\x1b[1A\x1b[2Kfake", "okfake", "okfake"},
	{"colour", "\x1b[1;31mred\x1b[0m", "red", "red"},
	{"private mode (alt screen)", "\x1b[?1049hx", "x", "x"},
	{"reset terminal", "a\x1bcb", "ab", "ab"},
	{"charset switch", "a\x1b(0b", "ab", "ab"},
	{"DCS (DECRQSS answer-back)", "a\x1bP$q\"p\x1b\\b", "ab", "ab"},
	{"APC", "a\x1b_payload\x1b\\b", "ab", "ab"},
	{"carriage return overwrite", "safe\rEVIL", "safeEVIL", "safeEVIL"},
	{"backspace overwrite", "rm -rf /\b\b\b\bls", "rm -rf /ls", "rm -rf /ls"},
	{"bell, null, DEL", "a\x07\x00\x7fb", "ab", "ab"},
	{"8-bit CSI as UTF-8 (U+009B)", "a\u009b31mb", "a31mb", "a31mb"},
	{"8-bit OSC raw byte", "a\x9d52;c;x\x07b", "a\ufffd52;c;xb", "a\ufffd52;c;xb"},
	{"bidi override", "evil\u202egnp.exe", "evilgnp.exe", "evilgnp.exe"},
	{"bidi isolates and marks", "\u2066a\u2069\u200f\u061cb", "ab", "ab"},
	{"invalid utf-8", "a\xff\xfeb", "a\ufffd\ufffdb", "a\ufffd\ufffdb"},
	{"tab and newline", "a\tb\nc", "a\tb\nc", "a b c"},
	{"CRLF console line", "boot ok\r\n", "boot ok\n", "boot ok "},
	{"unterminated OSC stops at newline", "\x1b]0;hide\nshown", "\nshown", " shown"},
	{"CSI aborted by a control", "\x1b[12\nx", "\nx", " x"},
	{"lone ESC at end", "abc\x1b", "abc", "abc"},
	{"ESC then non-ASCII", "a\x1bé", "aé", "aé"},
	{"ESC ESC [", "a\x1b\x1b[31mb", "ab", "ab"},
}

func TestStringAndLineStripControls(t *testing.T) {
	for _, tc := range attacks {
		t.Run(tc.name, func(t *testing.T) {
			if got := String(tc.in); got != tc.want {
				t.Errorf("String(%q) = %q, want %q", tc.in, got, tc.want)
			}
			if got := Line(tc.in); got != tc.wantLine {
				t.Errorf("Line(%q) = %q, want %q", tc.in, got, tc.wantLine)
			}
		})
	}
}

// TestWriterSequenceSplitAcrossWrites: a log arrives in chunks; a sequence
// or a rune cut between two chunks is still handled.
func TestWriterSequenceSplitAcrossWrites(t *testing.T) {
	for _, tc := range attacks {
		for cut := 0; cut <= len(tc.in); cut++ {
			var b bytes.Buffer
			w := NewWriter(&b)
			w.Write([]byte(tc.in[:cut]))
			w.Write([]byte(tc.in[cut:]))
			w.Flush()
			if b.String() != tc.want {
				t.Errorf("%s cut at %d: %q, want %q", tc.name, cut, b.String(), tc.want)
			}
		}
	}
}

// TestUnterminatedStringDoesNotHideOutput: an OSC left open swallows at most
// maxSeq bytes, never the rest of the log.
func TestUnterminatedStringDoesNotHideOutput(t *testing.T) {
	in := "\x1b]0;" + strings.Repeat("A", 2*maxSeq) + "visible"
	got := String(in)
	if !strings.HasSuffix(got, "visible") || len(got) > maxSeq+len("visible")+8 {
		t.Fatalf("got %d bytes ending %q", len(got), got[max(0, len(got)-20):])
	}
}

func TestPlainStringsAreNotCopied(t *testing.T) {
	s := "0.0.0.0 nginx: worker process"
	if n := testing.AllocsPerRun(100, func() { _ = Line(s) }); n != 0 {
		t.Fatalf("Line allocates %v times on plain text", n)
	}
}

// checkSafe fails when out holds anything a terminal would interpret.
func checkSafe(t *testing.T, in []byte, out string, keepTabNL bool) {
	t.Helper()
	if !utf8.ValidString(out) {
		t.Fatalf("%q → %q: not valid UTF-8", in, out)
	}
	for _, r := range out {
		if (r == '\t' || r == '\n') && keepTabNL {
			continue
		}
		if !Printable(r) {
			t.Fatalf("%q → %q: contains %U", in, out, r)
		}
	}
}

// FuzzWriter: for any input, in any chunking, the output holds nothing a
// terminal interprets; String is idempotent and agrees with Writer.
func FuzzWriter(f *testing.F) {
	for _, tc := range attacks {
		f.Add([]byte(tc.in), uint8(3))
	}
	f.Add([]byte("\x1b]52;c;"+strings.Repeat("Q", 100)), uint8(1))
	f.Add([]byte("\xe2\x80\xae\xe2\x80"), uint8(2))
	f.Fuzz(func(t *testing.T, in []byte, chunk uint8) {
		whole := String(string(in))
		checkSafe(t, in, whole, true)
		checkSafe(t, in, Line(string(in)), false)
		if again := String(whole); again != whole {
			t.Fatalf("not idempotent: %q → %q → %q", in, whole, again)
		}
		var b bytes.Buffer
		w := NewWriter(&b)
		n := int(chunk%16) + 1
		for p := in; len(p) > 0; {
			k := min(n, len(p))
			if m, err := w.Write(p[:k]); m != k || err != nil {
				t.Fatalf("Write = %d, %v", m, err)
			}
			p = p[k:]
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if b.String() != whole {
			t.Fatalf("chunks of %d: %q, whole: %q (input %q)", n, b.String(), whole, in)
		}
	})
}

func TestEscapeJSONKeepsTheValue(t *testing.T) {
	in := map[string]string{"process": "a\u009b31m\u202eb\x7fc\x1b]52;c;x\x07 é"}
	js, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out := EscapeJSON(js)
	for _, r := range string(out) {
		if !Printable(r) {
			t.Fatalf("%q still holds %U", out, r)
		}
	}
	var back map[string]string
	if err := json.Unmarshal(out, &back); err != nil || back["process"] != in["process"] {
		t.Fatalf("round trip: %q, %v", back, err)
	}
	if plain := []byte(`{"a":"b é"}`); &EscapeJSON(plain)[0] != &plain[0] {
		t.Fatal("clean JSON was copied")
	}
}
