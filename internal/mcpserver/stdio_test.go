package mcpserver

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// TestStdioTakesMaxWrite: over `banger mcp`'s stdio transport, a write_file
// of MaxWriteBytes (the tool's documented limit) arrives whole, in base64 and
// as text with a newline every 64 bytes, and the session goes on. With the
// SDK's default frame limit (16 MiB) the server refused either message and
// the session ended.
func TestStdioTakesMaxWrite(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f := &fakeFiles{}
	cr, sw := io.Pipe() // server → client
	sr, cw := io.Pipe() // client → server
	go func() {
		// when the server ends (a refused message ends it), so do the
		// client's reads and writes
		err := newServer(nil, f, Options{Version: "test"}).Run(ctx, stdioTransport(sr, sw))
		sr.CloseWithError(fmt.Errorf("the server ended: %v", err))
		sw.CloseWithError(fmt.Errorf("the server ended: %v", err))
	}()
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "test"}, nil).Connect(ctx, &mcp.IOTransport{Reader: cr, Writer: cw}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()

	bin := benchData("binary", MaxWriteBytes)
	text := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n"), MaxWriteBytes/64)
	for _, tc := range []struct {
		name string
		args map[string]any
		want []byte
	}{
		{"base64", map[string]any{"vm": "v", "path": "/f", "content": base64.StdEncoding.EncodeToString(bin), "encoding": "base64"}, bin},
		{"text", map[string]any{"vm": "v", "path": "/f", "content": string(text)}, text},
	} {
		f.wrote = nil
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "write_file", Arguments: tc.args})
		if err != nil || res.IsError {
			t.Fatalf("%s: write_file of %d bytes: %v %v", tc.name, len(tc.want), err, res)
		}
		if !bytes.Equal(f.wrote, tc.want) {
			t.Fatalf("%s: the client got %d bytes, want %d", tc.name, len(f.wrote), len(tc.want))
		}
	}
	if _, err := cs.ListTools(ctx, nil); err != nil {
		t.Fatalf("the session after the writes: %v", err)
	}
}
