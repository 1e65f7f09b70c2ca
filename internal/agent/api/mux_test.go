package api

import (
	"bufio"
	"bytes"
	"io"
	"strings"
	"testing"
)

func TestReadMuxLine(t *testing.T) {
	tests := []struct {
		name      string
		in        string
		kind      string
		nonce     string
		remaining string
	}{
		{"plain", "BANGER-MUX 1 abc\nrest", MuxPreamble, "abc", "rest"},
		{"garbage lines before", "junk\n\x00\x01\x02\nBANGER-MUX-OK 1 0f\nyamux", MuxAck, "0f", "yamux"},
		{"garbage on the same line", "\x00\x00\x0cBANGER-MUX-GO 1 12\n\x00", MuxGo, "12", "\x00"},
		{"hello", "BANGER-MUX-HELLO 1 -\n", MuxHello, "-", ""},
		{"wrong version skipped", "BANGER-MUX 2 aa\nBANGER-MUX 1 bb\n", MuxPreamble, "bb", ""},
		{"bad nonce skipped", "BANGER-MUX 1 XYZ\nBANGER-MUX 1 ab\n", MuxPreamble, "ab", ""},
		{"unknown kind skipped", "BANGER-MUX-NOPE 1 ab\nBANGER-MUX-OK 1 cd\n", MuxAck, "cd", ""},
		{"long garbage", strings.Repeat("x", 100000) + "BANGER-MUX 1 ee\nz", MuxPreamble, "ee", "z"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			br := bufio.NewReaderSize(strings.NewReader(tt.in), 16)
			kind, nonce, err := ReadMuxLine(br)
			if err != nil {
				t.Fatal(err)
			}
			if kind != tt.kind || nonce != tt.nonce {
				t.Fatalf("got %q %q, want %q %q", kind, nonce, tt.kind, tt.nonce)
			}
			rest, _ := io.ReadAll(br)
			if string(rest) != tt.remaining {
				t.Fatalf("remaining %q, want %q", rest, tt.remaining)
			}
		})
	}
}

func TestReadMuxLineEOF(t *testing.T) {
	br := bufio.NewReader(strings.NewReader("BANGER-MUX 1 ab"))
	if _, _, err := ReadMuxLine(br); err != io.EOF {
		t.Fatalf("err = %v, want EOF", err)
	}
}

func TestMuxLineRoundTrip(t *testing.T) {
	for _, k := range []string{MuxHello, MuxPreamble, MuxAck, MuxGo} {
		kind, nonce, ok := ParseMuxLine(MuxLine(k, "0123abcd"))
		if !ok || kind != k || nonce != "0123abcd" {
			t.Errorf("round trip of %s: %q %q %v", k, kind, nonce, ok)
		}
	}
	if CheckNonce("ab cd") == nil || CheckNonce("") == nil || CheckNonce("abc") != nil {
		t.Error("CheckNonce misjudged")
	}
}

func FuzzParseMuxLine(f *testing.F) {
	f.Add([]byte("BANGER-MUX 1 abc\n"))
	f.Add([]byte("\x00BANGER-MUX-OK 1 -\n"))
	f.Add([]byte("BANGER-MUX-GO 1 \n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, nonce, ok := ParseMuxLine(b)
		if !ok {
			return
		}
		again, n2, ok2 := ParseMuxLine(MuxLine(kind, nonce))
		if !ok2 || again != kind || n2 != nonce {
			t.Fatalf("re-rendered marker %q %q does not parse back", kind, nonce)
		}
		if !bytes.Contains(b, []byte(kind)) {
			t.Fatalf("kind %q not in input", kind)
		}
	})
}
