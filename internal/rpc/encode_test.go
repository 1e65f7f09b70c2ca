package rpc

import (
	"encoding/json"
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
