package mcpserver

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// fakeFiles is a guest of one file, for the file tools without a VM.
type fakeFiles struct {
	data  []byte
	wrote []byte
	mode  os.FileMode
}

func (f *fakeFiles) ReadFile(_ context.Context, _, _ string, max int64) ([]byte, error) {
	if int64(len(f.data)) > max {
		return nil, fmt.Errorf("file is larger than %d bytes", max)
	}
	return f.data, nil
}

func (f *fakeFiles) WriteFile(_ context.Context, _, _ string, data []byte, mode os.FileMode) error {
	f.wrote, f.mode = data, mode
	return nil
}

// session connects the SDK's client to a server on f over in-memory
// transports, as TestBenchFileOps's driver and `banger mcp` do (one session).
func session(tb testing.TB, f fileClient) *mcp.ClientSession {
	tb.Helper()
	ctx := context.Background()
	st, ct := mcp.NewInMemoryTransports()
	ss, err := newServer(nil, f, Options{Version: "test"}).Connect(ctx, st, nil)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ss.Close() })
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "test"}, nil).Connect(ctx, ct, nil)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cs.Close() })
	return cs
}

var benchSizes = []struct {
	name string
	n    int
}{{"100B", 100}, {"1MiB", 1 << 20}}

// BenchmarkReadFile: a read_file call through the SDK (client, in-memory
// transport, server) of a file the fake returns at once: the MCP layer's
// cost alone. text is bytes.Repeat("b"), as TestBenchFileOps reads; binary
// is every byte value, returned as base64.
func BenchmarkReadFile(b *testing.B) {
	for _, kind := range []string{"text", "binary"} {
		for _, sz := range benchSizes {
			b.Run(kind+"/"+sz.name, func(b *testing.B) {
				f := &fakeFiles{data: benchData(kind, sz.n)}
				cs := session(b, f)
				args := map[string]any{"vm": "v", "path": "/f", "max_bytes": sz.n}
				b.SetBytes(int64(sz.n))
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "read_file", Arguments: args})
					if err != nil || res.IsError {
						b.Fatal(err, res)
					}
				}
			})
		}
	}
}

// BenchmarkWriteFile: a write_file call through the SDK, as above.
func BenchmarkWriteFile(b *testing.B) {
	for _, kind := range []string{"text", "binary"} {
		for _, sz := range benchSizes {
			b.Run(kind+"/"+sz.name, func(b *testing.B) {
				f := &fakeFiles{}
				cs := session(b, f)
				data := benchData(kind, sz.n)
				args := map[string]any{"vm": "v", "path": "/f", "content": string(data), "mode": "0644"}
				if kind == "binary" {
					args["content"], args["encoding"] = base64.StdEncoding.EncodeToString(data), "base64"
				}
				b.SetBytes(int64(sz.n))
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "write_file", Arguments: args})
					if err != nil || res.IsError {
						b.Fatal(err, res)
					}
				}
				if !bytes.Equal(f.wrote, data) {
					b.Fatalf("wrote %d bytes, want %d", len(f.wrote), len(data))
				}
			})
		}
	}
}

func benchData(kind string, n int) []byte {
	if kind == "text" {
		return bytes.Repeat([]byte("b"), n)
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}
