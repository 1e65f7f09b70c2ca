package image

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// The debugfs batch is the one place where names from a layer meet a command
// language, so it is written by this small writer and nothing else.
//
// How debugfs (e2fsprogs 1.47) reads `-f script`: fgets into a BUFSIZ buffer
// (8192 bytes with glibc, 1024 with musl), so a longer line is split and every
// piece runs as a command of its own; a line starting with '#' is a comment;
// the line is cut at its first '\n' and then at its first '\r' (and, being a C
// string, at a NUL); leading blanks are skipped and a line then starting with
// '!' is passed to system(3). Otherwise lib/ss splits it into words at blanks,
// where "..." quotes and "" inside quotes is one '"' — no other escapes.
// Several commands (ea_set) take options through GNU getopt, which permutes:
// any argument starting with '-' is an option wherever it stands. Path
// arguments of the form <N> name inode N.
//
// So the writer: quotes every argument; refuses control bytes in arguments;
// starts every path argument with "/" or "./" or "../" (never '-' or '<');
// keeps every line under maxScriptLine, far below the smaller reader
// buffer; and checks each rendered line parses back into exactly the words it
// meant. A layer name therefore cannot add, split or change a command.

const (
	// maxScriptLine bounds a script line without its newline. musl's BUFSIZ
	// is 1024 (fgets keeps 1023 bytes); glibc's is 8192.
	maxScriptLine = 1000
	// maxNameLen is the longest path component (ext4 and Linux NAME_MAX).
	maxNameLen = 255
	// maxPathLen is the longest path in the image (Linux PATH_MAX).
	maxPathLen = 4096
	// maxXattrName and maxXattrValue are Linux's XATTR_NAME_MAX and
	// XATTR_SIZE_MAX; maxXattrsPerInode bounds one inode's names and values.
	maxXattrName      = 255
	maxXattrValue     = 64 << 10
	maxXattrsPerInode = 64 << 10
)

// ErrScript means the debugfs batch would not say exactly what was meant; it
// is never expected for names that passed the tree's checks.
var ErrScript = errors.New("unsafe debugfs script line")

// debugfsScript is a debugfs -f batch under construction.
type debugfsScript struct {
	b bytes.Buffer
	n int // commands written
	// record, when set, keeps every command's words (for tests).
	record bool
	cmds   [][]string
}

// cmd appends one command: name is a debugfs request (a constant of this
// package), args are quoted.
func (s *debugfsScript) cmd(name string, args ...string) error {
	line := make([]byte, 0, 64)
	line = append(line, name...)
	for _, a := range args {
		if i := strings.IndexFunc(a, isControl); i >= 0 {
			return fmt.Errorf("%w: argument %q has control byte %#x", ErrScript, a, a[i])
		}
		line = append(line, ' ')
		line = append(line, quote(a)...)
	}
	if len(line) > maxScriptLine {
		return fmt.Errorf("%w: %s line of %d bytes (at most %d)", ErrScript, name, len(line), maxScriptLine)
	}
	words, err := parseScriptLine(string(line))
	if err != nil {
		return fmt.Errorf("%w: %v", ErrScript, err)
	}
	want := append([]string{name}, args...)
	if !slices.Equal(words, want) {
		return fmt.Errorf("%w: %.60q parses as %.60q", ErrScript, line, words)
	}
	s.b.Write(line)
	s.b.WriteByte('\n')
	s.n++
	if s.record {
		s.cmds = append(s.cmds, want)
	}
	return nil
}

// quote makes s one lib/ss word.
func quote(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

// checkName checks one path component for the image.
func checkName(c string) error {
	switch {
	case c == "" || c == "." || c == "..":
		return fmt.Errorf("%w: empty, . or .. name", ErrUnsafePath)
	case len(c) > maxNameLen:
		return fmt.Errorf("%w: name %.40q… is %d bytes (at most %d)", ErrUnsafePath, c, len(c), maxNameLen)
	case strings.ContainsRune(c, '/'):
		return fmt.Errorf("%w: name %q contains '/'", ErrUnsafePath, c)
	}
	if i := strings.IndexFunc(c, isControl); i >= 0 {
		return fmt.Errorf("%w: name %q contains control byte %#x", ErrUnsafePath, c, c[i])
	}
	return nil
}

// xattrNamespaces are the namespaces an image may set. system.* is only the
// POSIX ACLs: other system names (system.data) are ext4's own.
var xattrNamespaces = []string{"user.", "trusted.", "security."}

// checkXattr checks an xattr name and value from a layer.
func checkXattr(name string, value string) error {
	if len(name) > maxXattrName {
		return fmt.Errorf("xattr name %.40q… is %d bytes (at most %d)", name, len(name), maxXattrName)
	}
	if len(value) > maxXattrValue {
		return fmt.Errorf("xattr %q: value of %d bytes (at most %d)", name, len(value), maxXattrValue)
	}
	if name == "system.posix_acl_access" || name == "system.posix_acl_default" {
		return nil
	}
	for _, ns := range xattrNamespaces {
		if rest, ok := strings.CutPrefix(name, ns); ok && rest != "" {
			for i := 0; i < len(rest); i++ {
				if !xattrNameByte(rest[i]) {
					return fmt.Errorf("xattr name %q: byte %#x not supported (letters, digits and . _ - : @ + , ~)", name, rest[i])
				}
			}
			return nil
		}
	}
	return fmt.Errorf("xattr name %q: namespace not supported (user., trusted., security., system.posix_acl_*)", name)
}

func xattrNameByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("._-:@+,~", c) >= 0
}

// parseScript reads a whole script as debugfs does with a read buffer of
// bufsiz bytes, returning the commands it would run. A shell escape or a
// line lib/ss cannot parse is an error (debugfs reports it and goes on, so
// the reading does too).
func parseScript(data []byte, bufsiz int) ([][]string, error) {
	var cmds [][]string
	err := scanScript(data, bufsiz, func(words []string) { cmds = append(cmds, words) })
	return cmds, err
}

// scanScript calls fn with the words of every command debugfs would run.
func scanScript(data []byte, bufsiz int, fn func([]string)) error {
	var errs []error
	for len(data) > 0 {
		// fgets: up to bufsiz-1 bytes, through the first newline.
		n := min(len(data), bufsiz-1)
		if i := bytes.IndexByte(data[:n], '\n'); i >= 0 {
			n = i + 1
		}
		buf := string(data[:n])
		data = data[n:]
		if buf[0] == '#' {
			continue
		}
		for _, cut := range []string{"\x00", "\n", "\r"} {
			if i := strings.Index(buf, cut); i >= 0 {
				buf = buf[:i]
			}
		}
		words, err := parseScriptLine(buf)
		if err != nil {
			errs = append(errs, err)
		} else if len(words) > 0 {
			fn(words)
		}
	}
	return errors.Join(errs...)
}

// verify reads the whole batch as debugfs would with musl's 1024-byte read
// buffer (cmd keeps lines short enough for either), and fails unless it holds
// exactly the commands written: the last check before debugfs runs.
func (s *debugfsScript) verify() error {
	n := 0
	if err := scanScript(s.b.Bytes(), 1024, func([]string) { n++ }); err != nil {
		return fmt.Errorf("%w: %v", ErrScript, err)
	}
	if n != s.n {
		return fmt.Errorf("%w: the batch reads as %d commands, %d were written", ErrScript, n, s.n)
	}
	return nil
}

// parseScriptLine is ss_execute_line's view of one line: the shell escape,
// then ss_parse.
func parseScriptLine(line string) ([]string, error) {
	line = strings.TrimLeft(line, " \t")
	if strings.HasPrefix(line, "!") {
		return nil, fmt.Errorf("shell escape %.60q", line)
	}
	var words []string
	var cur []byte
	const (
		white = iota
		token
		quoted
	)
	mode := white
	for i := 0; ; i++ {
		if i == len(line) {
			switch mode {
			case quoted:
				return nil, fmt.Errorf("unbalanced quotes in %.60q", line)
			case token:
				words = append(words, string(cur))
			}
			return words, nil
		}
		c := line[i]
		switch mode {
		case white:
			switch c {
			case ' ', '\t':
				continue
			case '"':
				mode, cur = quoted, []byte{}
			default:
				mode, cur = token, []byte{c}
			}
		case token:
			switch c {
			case ' ', '\t':
				words = append(words, string(cur))
				mode = white
			case '"':
				mode = quoted
			default:
				cur = append(cur, c)
			}
		case quoted:
			if c != '"' {
				cur = append(cur, c)
			} else if i+1 < len(line) && line[i+1] == '"' {
				cur = append(cur, '"')
				i++
			} else {
				mode = token
			}
		}
	}
}
