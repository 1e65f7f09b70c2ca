package cli

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestManPageEscapes: text from the commands cannot turn into roff
// requests (a line starting with . or ') or escapes (a backslash).
func TestManPageEscapes(t *testing.T) {
	root := &cobra.Command{Use: "banger", Short: "root"}
	sub := &cobra.Command{Use: "x", Short: `a \fB bold`, Long: "first line\n.so /etc/passwd\n'br\nend", Run: func(*cobra.Command, []string) {}}
	sub.Flags().String("flag", "", `use \n here`)
	root.AddCommand(sub)
	page := string(manPage(sub))
	for _, bad := range []string{"\n.so", "\n'br", `\fB bold`, `\n here`} {
		if strings.Contains(page, bad) {
			t.Errorf("the man page holds %q unescaped:\n%s", bad, page)
		}
	}
	for _, want := range []string{`.TH "BANGER-X" "1"`, "\\&.so /etc/passwd", `\fB\-\-flag string\fR`, ".BR banger (1)"} {
		if !strings.Contains(page, want) {
			t.Errorf("the man page lacks %q:\n%s", want, page)
		}
	}
}
