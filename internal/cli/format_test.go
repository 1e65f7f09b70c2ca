package cli

import (
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestUnits(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{sizeBytes(int64(0)), "0 B"},
		{sizeBytes(int64(1536)), "1.5 KiB"},
		{sizeBytes(uint64(5 << 30)), "5.0 GiB"},
		{mib(512), "512 MiB"},
		{mib(2048), "2.0 GiB"},
		{sizeBytes(-1), "-"},
		{ago(time.Time{}), "-"},
		{ago(time.Now().Add(-3 * time.Minute)), "3 minutes ago"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestVMListScriptable(t *testing.T) {
	startFakeVMs(t, testVMs()...)
	for _, tc := range []struct {
		args []string
		want string
		code int
	}{
		{[]string{"vm", "ls", "-q"}, "aaaa1111\nbbbb2222\ncccc3333\n", 0},
		{[]string{"vm", "ls", "-q", "--filter", "state=stopped"}, "bbbb2222\ncccc3333\n", 0},
		{[]string{"vm", "ls", "-q", "--filter", "name=web"}, "aaaa1111\nbbbb2222\n", 0},
		{[]string{"vm", "ls", "-q", "--filter", "name=web", "--filter", "state=stopped"}, "bbbb2222\n", 0},
		{[]string{"vm", "ls", "-q", "--filter", "state=running", "--filter", "state=stopped", "--filter", "image=alpine"}, "cccc3333\n", 0},
		{[]string{"vm", "ls", "-q", "--filter", "id=bbbb"}, "bbbb2222\n", 0},
		{[]string{"vm", "ls", "--format", "{{.Name}} {{.State}}"}, "web running\nweb-old stopped\ndb stopped\n", 0},
		{[]string{"vm", "ls", "--format", "{{.Name}} {{mib .MemoryMiB}}", "--filter", "state=running"}, "web 2.0 GiB\n", 0},
		{[]string{"vm", "show", "web", "--format", "{{.IP}}"}, "10.0.0.2\n", 0},
		{[]string{"vm", "ls", "--filter", "color=red"}, "", 2},
		{[]string{"vm", "ls", "--filter", "state"}, "", 2},
		{[]string{"vm", "ls", "--format", "{{.Nope"}, "", 2},
		{[]string{"vm", "ls", "--format", "{{.Nope}}"}, "", 2},
	} {
		out, errOut, code := runCLI(t, tc.args...)
		if code != tc.code || (tc.code == 0 && out != tc.want) {
			t.Errorf("banger %s: exit %d, %q (stderr %q); want %d, %q", strings.Join(tc.args, " "), code, out, errOut, tc.code, tc.want)
		}
	}
	for _, f := range []string{"{{json .}}", "json"} {
		out, errOut, code := runCLI(t, "vm", "ls", "--format", f)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if code != 0 || len(lines) != 3 {
			t.Fatalf("--format %s: %d %q %s", f, code, out, errOut)
		}
		for _, l := range lines {
			var v map[string]any
			if err := json.Unmarshal([]byte(l), &v); err != nil || v["id"] == nil || v["state"] == nil {
				t.Errorf("--format %s line %q: %v", f, l, err)
			}
		}
	}
}

func TestErrorsUnderJSONOutput(t *testing.T) {
	startFakeVMs(t, testVMs()...)
	out, errOut, code := runCLI(t, "vm", "show", "ghost", "-o", "json")
	if code != 1 || out != "" {
		t.Fatalf("exit %d stdout %q", code, out)
	}
	var e struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
			OpID    string `json:"op_id"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(errOut), &e); err != nil || strings.Count(errOut, "\n") != 1 {
		t.Fatalf("stderr is not one JSON object: %q (%v)", errOut, err)
	}
	if e.Error.Code != "not_found" || e.Error.Message != `vm "ghost" not found` || !regexp.MustCompile(`^op-[0-9a-f]{6,}$`).MatchString(e.Error.OpID) {
		t.Fatalf("error object %+v", e.Error)
	}
	// usage errors too
	_, errOut, code = runCLI(t, "vm", "ls", "--filter", "bad", "-o", "json")
	if code != 2 || !strings.Contains(errOut, `"code":"usage"`) {
		t.Fatalf("usage error under -o json: %d %q", code, errOut)
	}
	// text: one line with the op id; --debug adds the code and where to look
	_, errOut, _ = runCLI(t, "vm", "show", "ghost")
	if !regexp.MustCompile(`^error: vm "ghost" not found \(op-[0-9a-f]{6,}\)\n$`).MatchString(errOut) {
		t.Fatalf("text error %q", errOut)
	}
	_, errOut, _ = runCLI(t, "vm", "show", "ghost", "--debug")
	if !strings.Contains(errOut, "code: not_found") || !regexp.MustCompile(`op id: op-[0-9a-f]+ \(grep op-`).MatchString(errOut) {
		t.Fatalf("--debug error %q", errOut)
	}
}
