package workspace

import "strings"

// maxRefName bounds a ref name read from a guest (git has no limit; real
// names are far shorter).
const maxRefName = 1024

// CheckRefName reports whether name is a valid multi-level git ref name, by
// the rules of git check-ref-format (without --allow-onelevel,
// --refspec-pattern or --normalize): no component starts with '.' or ends
// with ".lock"; no empty component, so no leading, trailing or doubled '/';
// no "..", "@{", control character, space, '~', '^', ':', '?', '*', '[' or
// '\'; not ending with '.'; not "@"; at least two components. A NUL byte or a
// name longer than maxRefName is refused too.
func CheckRefName(name string) bool {
	if name == "" || name == "@" || len(name) > maxRefName {
		return false
	}
	components := 0
	for comp := range strings.SplitSeq(name, "/") {
		if !checkRefComponent(comp) {
			return false
		}
		components++
	}
	return components >= 2 && name[len(name)-1] != '.'
}

func checkRefComponent(c string) bool {
	if c == "" || c[0] == '.' || strings.HasSuffix(c, ".lock") {
		return false
	}
	var last byte
	for i := 0; i < len(c); i++ {
		ch := c[i]
		switch {
		case ch < 0x20, ch == 0x7f, ch == ' ', ch == '~', ch == '^', ch == ':', ch == '?', ch == '*', ch == '[', ch == '\\':
			return false
		case ch == '.' && last == '.':
			return false
		case ch == '{' && last == '@':
			return false
		}
		last = ch
	}
	return true
}

// checkOID reports whether s is an object id as git writes it: lowercase hex
// of hexLen digits (40 for SHA-1, 64 for SHA-256), not all zeros.
func checkOID(s string, hexLen int) bool {
	if len(s) != hexLen {
		return false
	}
	zero := true
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'f':
		default:
			return false
		}
		if c != '0' {
			zero = false
		}
	}
	return !zero
}
