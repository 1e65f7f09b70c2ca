package api

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
)

// maxMuxLine bounds the tail of a line examined for a marker.
const maxMuxLine = 128

// MuxLine renders a resynchronisation line.
func MuxLine(kind, nonce string) []byte {
	return []byte(kind + " " + MuxVersion + " " + nonce + "\n")
}

// ReadMuxLine reads from br until a line ends with a resynchronisation
// marker ("<KIND> 1 <nonce>"), discarding everything else, and returns the
// marker's kind and nonce. It never reads past the marker's newline, so the
// bytes that follow stay in br for the multiplexer.
func ReadMuxLine(br *bufio.Reader) (kind, nonce string, err error) {
	tail := make([]byte, 0, 2*maxMuxLine)
	for {
		chunk, err := br.ReadSlice('\n')
		tail = append(tail, chunk...)
		if len(tail) > maxMuxLine {
			n := copy(tail, tail[len(tail)-maxMuxLine:])
			tail = tail[:n]
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			return "", "", err
		}
		if k, n, ok := ParseMuxLine(tail); ok {
			return k, n, nil
		}
		tail = tail[:0]
	}
}

// ParseMuxLine finds a marker at the end of line (which ends with '\n'),
// ignoring any garbage before it on the same line.
func ParseMuxLine(line []byte) (kind, nonce string, ok bool) {
	line = bytes.TrimSuffix(line, []byte("\n"))
	i := bytes.LastIndex(line, []byte(MuxPreamble))
	if i < 0 {
		return "", "", false
	}
	f := bytes.Split(line[i:], []byte(" "))
	if len(f) != 3 || string(f[1]) != MuxVersion || !validNonce(f[2]) {
		return "", "", false
	}
	switch k := string(f[0]); k {
	case MuxHello, MuxPreamble, MuxAck, MuxGo:
		return k, string(f[2]), true
	}
	return "", "", false
}

func validNonce(b []byte) bool {
	if len(b) == 0 || len(b) > 32 {
		return false
	}
	for _, c := range b {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c == '-') {
			return false
		}
	}
	return true
}

// ErrBadNonce is returned by CheckNonce.
var ErrBadNonce = errors.New("bad multiplexer nonce")

// CheckNonce validates a nonce before it is sent.
func CheckNonce(n string) error {
	if !validNonce([]byte(n)) {
		return fmt.Errorf("%w %q", ErrBadNonce, n)
	}
	return nil
}
