package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// encodeResponse must write what json.Marshal writes for every response.
func TestEncodeResponseMatchesMarshal(t *testing.T) {
	for _, r := range []Response{
		{Result: json.RawMessage(`[{"id":"a","name":"x\"<>&\u2028"}]`), OpID: "op-1"},
		{Result: json.RawMessage(`"pong"`)},
		{Result: json.RawMessage(`[]`), OpID: `weird"id\n`},
		{Error: &ErrorResponse{Code: CodeNotFound, Message: "no"}, OpID: "op-2"},
		{},
	} {
		got, err := encodeResponse(r)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := json.Marshal(r)
		// json.Marshal compacts and HTML-escapes the raw result; decode both
		// to compare what a client sees.
		var g, w any
		if err := json.Unmarshal(got, &g); err != nil {
			t.Fatalf("%+v: not JSON: %s", r, got)
		}
		json.Unmarshal(want, &w)
		gb, _ := json.Marshal(g)
		wb, _ := json.Marshal(w)
		if string(gb) != string(wb) {
			t.Errorf("encodeResponse %s, json.Marshal %s", got, want)
		}
	}
}

// The client decodes the result in one pass; errors, nulls and type
// mismatches come back as before.
func TestClientResultDecoding(t *testing.T) {
	sock, _, _ := startServer(t)
	ctx := WithOpID(context.Background(), "op-0123abcd")
	var s string
	err := Call(ctx, sock, "fail", map[string]string{"Code": CodeNotFound}, &s)
	var er *ErrorResponse
	if !errors.As(err, &er) || er.Code != CodeNotFound || er.OpID != "op-0123abcd" {
		t.Fatalf("error response with a result pointer: %T %v", err, err)
	}
	var m map[string]any
	if err := Call(ctx, sock, "echo", map[string]any{"a": 1.5}, &m); err != nil || m["a"] != 1.5 {
		t.Fatalf("echo: %v %v", m, err)
	}
	if err := Call(ctx, sock, "echo", map[string]any{"a": 1}, &s); err == nil || !strings.Contains(err.Error(), "decode result of echo") {
		t.Fatalf("type mismatch: %v", err)
	}
	keep := map[string]any{"kept": true}
	if err := Call(ctx, sock, "echo", nil, &keep); err != nil || keep["kept"] != true {
		t.Fatalf("a null result changed the value: %v %v", keep, err)
	}
}
