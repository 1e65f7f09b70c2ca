package api

import (
	"encoding/json"
	"testing"
)

// The wire must not change when a type moves: these are the exact JSON
// shapes bangerd sent before the types lived here.
func TestWireShapes(t *testing.T) {
	for _, tc := range []struct {
		v    any
		want string
	}{
		{DeleteResult{Deleted: "k1"}, `{"deleted":"k1"}`},
		{DeleteResult{Deleted: "vm1", ID: "abc"}, `{"deleted":"vm1","id":"abc"}`},
		{CreateStatusParams{OpID: "op-1", Wait: true}, `{"op_id":"op-1","wait":true}`},
		{CreateStatusParams{OpID: "op-1"}, `{"op_id":"op-1"}`},
		{ImageOpStatusParams{OpID: "op-2"}, `{"op_id":"op-2"}`},
		{VMRef{VM: "a"}, `{"vm":"a"}`},
		{CreateStatus{OpID: "o", Stages: []Stage{}}, `{"op_id":"o","vm_id":"","name":"","done":false,"stages":[]}`},
		{PortsResult{VM: "a", Ports: []Port{{Proto: "tcp", Address: "0.0.0.0", Port: 22}}}, `{"vm":"a","ports":[{"proto":"tcp","address":"0.0.0.0","port":22}]}`},
	} {
		b, err := json.Marshal(tc.v)
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != tc.want {
			t.Errorf("%T: got %s, want %s", tc.v, b, tc.want)
		}
	}
}
