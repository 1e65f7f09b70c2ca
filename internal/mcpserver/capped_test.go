package mcpserver

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestCapped(t *testing.T) {
	for _, tc := range []struct {
		max       int
		writes    []string
		want      string
		truncated bool
		total     int64
	}{
		{10, []string{"hello"}, "hello", false, 5},
		{5, []string{"hello"}, "hello", false, 5},
		{4, []string{"he", "llo"}, "hell", true, 5},
		{0, []string{"x"}, "", true, 1},
		// a rune cut at the cap is dropped, never sent as invalid UTF-8
		{4, []string{"abc€"}, "abc", true, 6},
		{3, []string{"\xff\xfeok"}, "\uFFFDo", true, 4},
	} {
		c := &capped{max: tc.max}
		for _, w := range tc.writes {
			if n, err := c.Write([]byte(w)); n != len(w) || err != nil {
				t.Fatalf("Write: %d %v", n, err)
			}
		}
		got := c.text()
		if got != tc.want || c.truncated() != tc.truncated || c.total != tc.total || !utf8.ValidString(got) {
			t.Errorf("max %d %q: got %q truncated %v total %d; want %q %v %d", tc.max, strings.Join(tc.writes, ""), got, c.truncated(), c.total, tc.want, tc.truncated, tc.total)
		}
	}
}
