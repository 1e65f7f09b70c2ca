package mcpserver

import (
	"context"
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/google/jsonschema-go/jsonschema"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// TestFileTools: the file tools' results and errors through the SDK, with a
// fake guest. Every success's structuredContent satisfies the advertised
// output schema and its TextContent is the same JSON; every failure is a
// tool error (bad arguments as the SDK words them, the guest's with an op id).
func TestFileTools(t *testing.T) {
	f := &fakeFiles{}
	cs := session(t, f)
	lt, err := cs.ListTools(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	outSchema := map[string]*jsonschema.Resolved{}
	for _, tl := range lt.Tools {
		var s jsonschema.Schema
		b, _ := json.Marshal(tl.OutputSchema)
		if err := json.Unmarshal(b, &s); err != nil {
			t.Fatal(err)
		}
		if outSchema[tl.Name], err = s.Resolve(nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name     string
		data     string // the guest's file, for read_file
		tool     string
		args     map[string]any
		want     map[string]any // structuredContent
		wantErr  string         // else: the error's text has this
		wrote    string         // write_file: what the guest got
		wroteMod os.FileMode
	}{
		{name: "read text", data: "hé \"quoted\" <&>\n", tool: "read_file", args: map[string]any{"vm": "v", "path": "/f"},
			want: map[string]any{"content": "hé \"quoted\" <&>\n", "encoding": "utf-8", "size": 17.0}},
		{name: "read binary", data: "\x00\xff\x00\xff", tool: "read_file", args: map[string]any{"vm": "v", "path": "/f", "max_bytes": 4},
			want: map[string]any{"content": "AP8A/w==", "encoding": "base64", "size": 4.0}},
		{name: "read empty", tool: "read_file", args: map[string]any{"vm": "v", "path": "/f"},
			want: map[string]any{"content": "", "encoding": "utf-8", "size": 0.0}},
		{name: "read past max_bytes", data: "123456", tool: "read_file", args: map[string]any{"vm": "v", "path": "/f", "max_bytes": 3}, wantErr: "larger than 3 bytes (op-"},
		{name: "read without path", tool: "read_file", args: map[string]any{"vm": "v"}, wantErr: `validating "arguments"`},
		{name: "read max_bytes not a number", tool: "read_file", args: map[string]any{"vm": "v", "path": "/f", "max_bytes": "9"}, wantErr: `validating "arguments"`},
		{name: "read max_bytes not an integer", tool: "read_file", args: map[string]any{"vm": "v", "path": "/f", "max_bytes": 1.5}, wantErr: `validating "arguments"`},
		{name: "read max_bytes past int64", tool: "read_file", args: map[string]any{"vm": "v", "path": "/f", "max_bytes": 1e30}, wantErr: "max_bytes"},
		{name: "read unknown argument", tool: "read_file", args: map[string]any{"vm": "v", "path": "/f", "offset": 1}, wantErr: `validating "arguments"`},
		{name: "read vm not a string", tool: "read_file", args: map[string]any{"vm": 1, "path": "/f"}, wantErr: `validating "arguments"`},
		{name: "read no arguments", tool: "read_file", wantErr: `validating "arguments"`},
		{name: "write text", tool: "write_file", args: map[string]any{"vm": "v", "path": "/f", "content": "hé\n", "mode": "0600"},
			want: map[string]any{"path": "/f", "bytes": 4.0}, wrote: "hé\n", wroteMod: 0o600},
		{name: "write base64", tool: "write_file", args: map[string]any{"vm": "v", "path": "/f", "content": "AP8A/w==", "encoding": "base64"},
			want: map[string]any{"path": "/f", "bytes": 4.0}, wrote: "\x00\xff\x00\xff", wroteMod: 0o644},
		{name: "write empty", tool: "write_file", args: map[string]any{"vm": "v", "path": "/f", "content": ""},
			want: map[string]any{"path": "/f", "bytes": 0.0}, wrote: "", wroteMod: 0o644},
		{name: "write without content", tool: "write_file", args: map[string]any{"vm": "v", "path": "/f"}, wantErr: `validating "arguments"`},
		{name: "write content not a string", tool: "write_file", args: map[string]any{"vm": "v", "path": "/f", "content": 7}, wantErr: `validating "arguments"`},
		{name: "write bad base64", tool: "write_file", args: map[string]any{"vm": "v", "path": "/f", "content": "%%", "encoding": "base64"}, wantErr: "not base64"},
		{name: "write bad encoding", tool: "write_file", args: map[string]any{"vm": "v", "path": "/f", "content": "x", "encoding": "hex"}, wantErr: "encoding must be"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.data, f.wrote, f.mode = []byte(tc.data), nil, 0
			var args any
			if tc.args != nil {
				args = tc.args
			}
			res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: tc.tool, Arguments: args})
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantErr != "" {
				if msg := text(res); !res.IsError || !strings.Contains(msg, tc.wantErr) {
					t.Fatalf("isError %v, %q; want a tool error with %q", res.IsError, msg, tc.wantErr)
				}
				if f.wrote != nil {
					t.Fatalf("the guest got %q", f.wrote)
				}
				return
			}
			if res.IsError {
				t.Fatalf("tool error: %s", text(res))
			}
			b, _ := json.Marshal(res.StructuredContent)
			var got map[string]any
			json.Unmarshal(b, &got)
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("structuredContent %v, want %v", got, tc.want)
			}
			if err := outSchema[tc.tool].Validate(&got); err != nil {
				t.Fatalf("structuredContent against the output schema: %v", err)
			}
			var fromText map[string]any
			if err := json.Unmarshal([]byte(text(res)), &fromText); err != nil || !reflect.DeepEqual(fromText, tc.want) || len(res.Content) != 1 {
				t.Fatalf("content %d blocks, %q (%v), want the structured content's JSON", len(res.Content), text(res), err)
			}
			if tc.tool == "write_file" && (string(f.wrote) != tc.wrote || f.mode != tc.wroteMod) {
				t.Fatalf("the guest got %q mode %o, want %q %o", f.wrote, f.mode, tc.wrote, tc.wroteMod)
			}
		})
	}
}

func text(res *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			b.WriteString(tc.Text)
		}
	}
	return b.String()
}
