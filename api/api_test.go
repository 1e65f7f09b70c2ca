package api

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
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

// TestEveryMethodDocumented: docs/API.md names every method constant's
// value, so a new method cannot land undocumented.
func TestEveryMethodDocumented(t *testing.T) {
	doc, err := os.ReadFile("../docs/API.md")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	names, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.CONST {
				continue
			}
			for _, sp := range g.Specs {
				vs := sp.(*ast.ValueSpec)
				for i, name := range vs.Names {
					if !strings.HasPrefix(name.Name, "Method") || i >= len(vs.Values) {
						continue
					}
					lit, ok := vs.Values[i].(*ast.BasicLit)
					if !ok {
						continue
					}
					n++
					if v := strings.Trim(lit.Value, `"`); !strings.Contains(string(doc), "`"+v+"`") {
						t.Errorf("%s (%q) is not in docs/API.md", name.Name, v)
					}
				}
			}
		}
	}
	if n < 30 {
		t.Fatalf("found only %d method constants", n)
	}
}
