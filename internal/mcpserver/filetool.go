package mcpserver

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"strings"

	"github.com/google/jsonschema-go/jsonschema"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	fastjson "github.com/segmentio/encoding/json"
)

// addFileTool registers read_file or write_file, whose result or arguments
// hold a whole file, with the SDK's low-level Server.AddTool rather than
// mcp.AddTool. The tool advertises the same schemas (inferred from In and
// Out as mcp.AddTool infers them), checks its arguments against the input
// schema the same way, and returns the same result (the output as
// structuredContent and, serialized, as a TextContent), but builds each
// once: mcp.AddTool decodes the arguments twice and encodes them once more
// (to a map to validate, back to JSON, then into In), and encodes the
// output, decodes it to validate it against our own schema and encodes it
// again, each a pass over the file's bytes (docs/BENCHMARKS.md, "The
// client's file methods"). Unlike mcp.AddTool, a failed call's result
// carries no structuredContent (it carried the zero output).
func addFileTool[In, Out any](s *mcp.Server, t *tools, tool *mcp.Tool, h func(context.Context, In) (Out, error)) {
	inSchema, in := mustResolve[In]()
	outSchema, _ := mustResolve[Out]()
	fields := argFields[In]()
	tt := *tool
	tt.InputSchema, tt.OutputSchema = inSchema, outSchema
	s.AddTool(&tt, func(ctx context.Context, req *mcp.CallToolRequest) (*mcp.CallToolResult, error) {
		var args In
		if err := decodeArgs(req.Params.Arguments, in, fields, reflect.ValueOf(&args).Elem()); err != nil {
			var res mcp.CallToolResult
			res.SetError(fmt.Errorf("validating \"arguments\": %w", err))
			return &res, nil
		}
		out, res := call(ctx, t, tool.Name, args, h)
		if res != nil {
			return res, nil
		}
		b, err := json.Marshal(out)
		if err != nil {
			return nil, fmt.Errorf("marshaling output: %w", err)
		}
		return &mcp.CallToolResult{
			Content:           []mcp.Content{&mcp.TextContent{Text: string(b)}},
			StructuredContent: out,
		}, nil
	})
}

// mustResolve is the schema mcp.AddTool infers for T, resolved.
func mustResolve[T any]() (*jsonschema.Schema, *jsonschema.Resolved) {
	s, err := jsonschema.ForType(reflect.TypeFor[T](), &jsonschema.ForOptions{})
	if err != nil {
		panic(fmt.Sprintf("schema of %v: %v", reflect.TypeFor[T](), err))
	}
	r, err := s.Resolve(&jsonschema.ResolveOptions{ValidateDefaults: true})
	if err != nil {
		panic(fmt.Sprintf("schema of %v: %v", reflect.TypeFor[T](), err))
	}
	return s, r
}

// argFields maps the JSON names of In's fields to their indexes. In's fields
// are strings and integers only (what decodeArgs sets).
func argFields[In any]() map[string]int {
	rt := reflect.TypeFor[In]()
	m := map[string]int{}
	for i := range rt.NumField() {
		f := rt.Field(i)
		switch f.Type.Kind() {
		case reflect.String, reflect.Int, reflect.Int64:
		default:
			panic(fmt.Sprintf("%v.%s: decodeArgs sets strings and integers, not %v", rt, f.Name, f.Type))
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		m[name] = i
	}
	return m
}

// decodeArgs decodes the arguments once, into a map (with the decoder the
// SDK uses; the SDK's transport has already bounded the message's nesting),
// checks the map against the input schema (as mcp.AddTool does: required
// properties, no others, their types) and sets in's fields from it.
func decodeArgs(raw json.RawMessage, schema *jsonschema.Resolved, fields map[string]int, in reflect.Value) error {
	m := map[string]any{}
	if len(raw) > 0 {
		if err := fastjson.Unmarshal(raw, &m); err != nil {
			return fmt.Errorf("unmarshaling arguments: %w", err)
		}
		if m == nil { // null
			m = map[string]any{}
		}
	}
	if err := schema.Validate(&m); err != nil {
		return err
	}
	for name, v := range m {
		f := in.Field(fields[name]) // the schema allows no other property
		switch x := v.(type) {
		case string:
			f.SetString(x)
		case float64: // an integer: the schema said so
			if x < math.MinInt64 || x >= math.MaxInt64 {
				return fmt.Errorf("%s: %v does not fit in a 64-bit integer", name, x)
			}
			f.SetInt(int64(x))
		}
	}
	return nil
}
