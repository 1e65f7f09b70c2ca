// Package termsafe makes text that came from a guest safe to print on the
// user's terminal.
//
// A terminal interprets some bytes as commands: ESC sequences move the
// cursor, rewrite earlier output, set the window title, write the clipboard
// (OSC 52) or, on some terminals, answer back into the input stream. Bidi
// override characters reorder what is shown, so text can read differently
// from what it is. Everything a guest says is hostile (a process name is
// whatever the guest's process chose), so before the CLI prints a
// guest-provided string it goes through this package.
//
// The output of Writer, String and Line holds only valid UTF-8 with no C0
// control except tab and newline (Line: none at all), no DEL, no C1
// control (U+0080..U+009F) and no bidi formatting character. That
// property is what makes it safe; it holds for any input (FuzzWriter checks
// it). Recognising ESC sequences is only for tidiness: a whole sequence
// (CSI, OSC, DCS and the other strings, two-byte escapes) is dropped rather
// than leaving "[31m" behind.
package termsafe

import (
	"io"
	"strings"
	"unicode/utf8"
)

const (
	esc = 0x1b
	bel = 0x07
	can = 0x18
	sub = 0x1a
	del = 0x7f
)

// maxSeq bounds how many bytes one escape sequence may swallow; past it the
// sequence is abandoned and the rest shows as (harmless) text, so that an
// unterminated OSC cannot hide the remainder of a log.
const maxSeq = 4096

type state uint8

const (
	ground   state = iota
	escape         // after ESC
	escInter       // ESC then intermediate bytes (0x20..0x2F)
	csi            // ESC [ ...
	str            // ESC ] / P / X / ^ / _ ... until ST or BEL
	strEsc         // ESC inside a string: ESC \ ends it
)

// Writer strips terminal control sequences from what is written through it,
// keeping state between writes, so a sequence split across two writes is
// still removed. Call Flush at the end of the stream. Not safe for
// concurrent use.
type Writer struct {
	w       io.Writer
	st      state
	seqLen  int
	partial []byte // an incomplete UTF-8 encoding at the end of the last write
	out     []byte
}

// NewWriter returns a Writer that writes the sanitised stream to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Write sanitises p and writes the result. It reports len(p) on success.
func (s *Writer) Write(p []byte) (int, error) {
	s.out = s.out[:0]
	s.feed(p, false)
	if len(s.out) > 0 {
		if _, err := s.w.Write(s.out); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// Flush ends the stream: an incomplete UTF-8 encoding left by the last
// Write is written as U+FFFD, and an unfinished sequence is dropped.
func (s *Writer) Flush() error {
	s.out = s.out[:0]
	s.feed(nil, true)
	s.st, s.seqLen = ground, 0
	if len(s.out) > 0 {
		_, err := s.w.Write(s.out)
		return err
	}
	return nil
}

// feed runs the state machine over p (after any partial rune kept from the
// previous call), appending the printable result to s.out.
func (s *Writer) feed(p []byte, final bool) {
	if len(s.partial) > 0 {
		p = append(append([]byte(nil), s.partial...), p...)
		s.partial = s.partial[:0]
	}
	for len(p) > 0 {
		b := p[0]
		if b < utf8.RuneSelf {
			s.rune(rune(b), false)
			p = p[1:]
			continue
		}
		if !utf8.FullRune(p) && !final {
			s.partial = append(s.partial[:0], p...)
			return
		}
		r, size := utf8.DecodeRune(p)
		s.rune(r, size == 1 && r == utf8.RuneError)
		p = p[size:]
	}
}

// rune advances the state machine by one rune; invalid marks a byte that
// is not valid UTF-8 (shown as U+FFFD).
func (s *Writer) rune(r rune, invalid bool) {
	for {
		if s.st != ground {
			s.seqLen++
			if s.seqLen > maxSeq {
				s.st, s.seqLen = ground, 0
			}
		}
		switch s.st {
		case ground:
			switch {
			case invalid:
				s.out = utf8.AppendRune(s.out, utf8.RuneError)
			case r == esc:
				s.st, s.seqLen = escape, 0
			case r == '\t' || r == '\n':
				s.out = append(s.out, byte(r))
			case !Printable(r):
				// dropped
			default:
				s.out = utf8.AppendRune(s.out, r)
			}
			return
		case escape:
			switch {
			case r == '[':
				s.st = csi
			case r == ']' || r == 'P' || r == 'X' || r == '^' || r == '_':
				s.st = str
			case r == esc:
				// ESC ESC: the first is abandoned
			case r >= 0x20 && r <= 0x2f:
				s.st = escInter
			case r >= 0x30 && r <= 0x7e:
				s.st = ground
			default:
				s.st = ground
				continue // not a sequence: process r as text
			}
			return
		case escInter:
			switch {
			case r >= 0x20 && r <= 0x2f:
			case r >= 0x30 && r <= 0x7e:
				s.st = ground
			default:
				s.st = ground
				continue
			}
			return
		case csi:
			switch {
			case r >= 0x20 && r <= 0x3f:
			case r >= 0x40 && r <= 0x7e:
				s.st = ground
			default:
				s.st = ground
				continue
			}
			return
		case str:
			switch r {
			case bel, can, sub:
				s.st = ground
			case esc:
				s.st = strEsc
			case '\n':
				// Terminals keep going, but a newline ends the sequence
				// here so a string left open cannot hide later lines.
				s.st = ground
				continue
			}
			return
		case strEsc:
			if r == '\\' {
				s.st = ground
				return
			}
			s.st = escape // ESC began a new sequence
			continue
		}
	}
}

// Printable reports whether r may reach a terminal as is: not a C0 or C1
// control, not DEL, not a bidi formatting character. Tab and newline are
// controls too (callers decide about them).
func Printable(r rune) bool {
	switch {
	case r < 0x20, r == del, r >= 0x80 && r <= 0x9f:
		return false
	case isBidi(r):
		return false
	case r == utf8.RuneError:
		return true
	}
	return utf8.ValidRune(r)
}

// isBidi reports the bidi formatting characters: the marks (ALM, LRM, RLM),
// embeddings and overrides (LRE..RLO) and isolates (LRI..PDI).
func isBidi(r rune) bool {
	switch {
	case r == 0x061c, r == 0x200e, r == 0x200f:
		return true
	case r >= 0x202a && r <= 0x202e:
		return true
	case r >= 0x2066 && r <= 0x2069:
		return true
	}
	return false
}

// String returns s with terminal control sequences removed, keeping tabs
// and newlines (for multi-line text such as a log or an error message).
func String(s string) string {
	if isPlain(s, true) {
		return s
	}
	var b strings.Builder
	w := NewWriter(&b)
	_, _ = w.Write([]byte(s))
	_ = w.Flush()
	return b.String()
}

// Line is String for one table cell or line: tabs and newlines become
// spaces as well.
func Line(s string) string {
	if isPlain(s, false) {
		return s
	}
	s = String(s)
	return strings.Map(func(r rune) rune {
		if r == '\t' || r == '\n' {
			return ' '
		}
		return r
	}, s)
}

// isPlain reports whether s needs no change (the common case: no allocation).
func isPlain(s string, keepTabNL bool) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c < del {
			continue
		}
		if keepTabNL && (c == '\t' || c == '\n') {
			continue
		}
		if c < utf8.RuneSelf {
			return false
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if (r == utf8.RuneError && size == 1) || !Printable(r) {
			return false
		}
		i += size - 1
	}
	return true
}

// EscapeJSON rewrites the C1 controls, bidi formatting characters and DEL
// inside JSON text as \u escapes, which leaves the JSON value unchanged.
// encoding/json already escapes C0 controls but writes these as they are.
// js must be valid UTF-8 JSON (as encoding/json produces); outside strings
// JSON holds only ASCII, so only string contents are touched.
func EscapeJSON(js []byte) []byte {
	clean := true
	for i := 0; i < len(js); {
		r, size := utf8.DecodeRune(js[i:])
		if r == del || (r >= utf8.RuneSelf && !Printable(r)) {
			clean = false
			break
		}
		i += size
	}
	if clean {
		return js
	}
	out := make([]byte, 0, len(js)+32)
	for i := 0; i < len(js); {
		r, size := utf8.DecodeRune(js[i:])
		if r == del || (r >= utf8.RuneSelf && !Printable(r)) {
			out = append(out, `\u`...)
			const hex = "0123456789abcdef"
			out = append(out, hex[r>>12&0xf], hex[r>>8&0xf], hex[r>>4&0xf], hex[r&0xf])
		} else {
			out = append(out, js[i:i+size]...)
		}
		i += size
	}
	return out
}
