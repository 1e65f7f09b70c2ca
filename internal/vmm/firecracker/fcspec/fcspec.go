// Package fcspec loads Firecracker's OpenAPI (Swagger 2) description,
// firecracker.yaml, and checks API requests against it: the path template and
// method exist, and the JSON body matches the referenced definition (required
// fields, types, $ref, enums, integer bounds, no unknown fields).
//
// The spec is read at run time from a file; nothing of it is compiled in. It is
// used by the fake firecracker that validates banger's Firecracker driver.
package fcspec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Schema is the subset of a Swagger 2 schema object that Firecracker's spec uses.
type Schema struct {
	Ref         string             `yaml:"$ref"`
	Type        string             `yaml:"type"`
	Format      string             `yaml:"format"`
	Required    []string           `yaml:"required"`
	Properties  map[string]*Schema `yaml:"properties"`
	Items       *Schema            `yaml:"items"`
	Enum        []yaml.Node        `yaml:"enum"`
	Minimum     *float64           `yaml:"minimum"`
	Maximum     *float64           `yaml:"maximum"`
	ReadOnly    bool               `yaml:"readOnly"`
	Description string             `yaml:"description"`
	// AdditionalProperties is either a boolean or a schema; only an explicit
	// `true` (or a schema) opens an object. Every other definition is closed.
	AdditionalProperties yaml.Node `yaml:"additionalProperties"`
}

// Param is one operation parameter.
type Param struct {
	Name     string  `yaml:"name"`
	In       string  `yaml:"in"` // "path" or "body"
	Required bool    `yaml:"required"`
	Type     string  `yaml:"type"`
	Schema   *Schema `yaml:"schema"`
}

// Operation is one (method, path template) pair of the API.
type Operation struct {
	Method      string  `yaml:"-"` // upper case, e.g. PUT
	Template    string  `yaml:"-"` // e.g. /drives/{drive_id}
	ID          string  `yaml:"operationId"`
	Summary     string  `yaml:"summary"`
	Description string  `yaml:"description"`
	Parameters  []Param `yaml:"parameters"`
}

// Body returns the body parameter, or nil when the operation takes none.
func (o *Operation) Body() *Param {
	for i := range o.Parameters {
		if o.Parameters[i].In == "body" {
			return &o.Parameters[i]
		}
	}
	return nil
}

var (
	preBootRe  = regexp.MustCompile(`(?i)\bpre-boot only\b|\bfail after machine startup\b`)
	postBootRe = regexp.MustCompile(`(?i)\bpost-boot only\b`)
)

// PreBootOnly reports whether the spec says the operation is only valid
// before the microVM starts ("Pre-boot only", "will fail after machine startup").
func (o *Operation) PreBootOnly() bool {
	return preBootRe.MatchString(o.Summary) || preBootRe.MatchString(o.Description)
}

// PostBootOnly reports whether the spec says the operation is only valid once
// the microVM runs ("Post-boot only").
func (o *Operation) PostBootOnly() bool {
	return postBootRe.MatchString(o.Summary) || postBootRe.MatchString(o.Description)
}

// Spec is a loaded firecracker.yaml.
type Spec struct {
	Version     string
	Definitions map[string]*Schema
	ops         []*Operation
}

type rawSpec struct {
	Swagger string `yaml:"swagger"`
	Info    struct {
		Version string `yaml:"version"`
	} `yaml:"info"`
	Paths       map[string]map[string]*Operation `yaml:"paths"`
	Definitions map[string]*Schema               `yaml:"definitions"`
}

var httpMethods = map[string]bool{"get": true, "put": true, "patch": true, "post": true, "delete": true, "head": true, "options": true}

// Load reads and parses the spec at path.
func Load(path string) (*Spec, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read firecracker API spec: %w", err)
	}
	s, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("firecracker API spec %s: %w", path, err)
	}
	return s, nil
}

// Parse parses a spec document.
func Parse(b []byte) (*Spec, error) {
	var raw rawSpec
	if err := yaml.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("parse yaml: %w", err)
	}
	if raw.Swagger != "2.0" {
		return nil, fmt.Errorf("not a Swagger 2.0 document (swagger: %q)", raw.Swagger)
	}
	if len(raw.Paths) == 0 || len(raw.Definitions) == 0 {
		return nil, errors.New("spec has no paths or no definitions")
	}
	s := &Spec{Version: raw.Info.Version, Definitions: raw.Definitions}
	for tmpl, item := range raw.Paths {
		for m, op := range item {
			if !httpMethods[strings.ToLower(m)] || op == nil {
				continue
			}
			op.Method = strings.ToUpper(m)
			op.Template = tmpl
			s.ops = append(s.ops, op)
		}
	}
	sort.Slice(s.ops, func(i, j int) bool {
		if s.ops[i].Template != s.ops[j].Template {
			return s.ops[i].Template < s.ops[j].Template
		}
		return s.ops[i].Method < s.ops[j].Method
	})
	// Every $ref must resolve, or validation would silently pass.
	var check func(sc *Schema, where string) error
	seen := map[*Schema]bool{}
	check = func(sc *Schema, where string) error {
		if sc == nil || seen[sc] {
			return nil
		}
		seen[sc] = true
		if sc.Ref != "" {
			if _, err := s.resolve(sc); err != nil {
				return fmt.Errorf("%s: %w", where, err)
			}
		}
		for name, p := range sc.Properties {
			if err := check(p, where+"."+name); err != nil {
				return err
			}
		}
		return check(sc.Items, where+"[]")
	}
	for name, d := range s.Definitions {
		if err := check(d, name); err != nil {
			return nil, err
		}
	}
	for _, op := range s.ops {
		for _, p := range op.Parameters {
			if err := check(p.Schema, op.Method+" "+op.Template); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

func (s *Spec) resolve(sc *Schema) (*Schema, error) {
	for depth := 0; sc != nil && sc.Ref != ""; depth++ {
		if depth > 16 {
			return nil, fmt.Errorf("$ref loop at %q", sc.Ref)
		}
		name, ok := strings.CutPrefix(sc.Ref, "#/definitions/")
		if !ok {
			return nil, fmt.Errorf("unsupported $ref %q", sc.Ref)
		}
		d, ok := s.Definitions[name]
		if !ok {
			return nil, fmt.Errorf("$ref to unknown definition %q", name)
		}
		sc = d
	}
	return sc, nil
}

// ErrNoRoute means no path template matches the request path.
var ErrNoRoute = errors.New("no such API path")

// ErrMethod means the path exists but not with that method.
var ErrMethod = errors.New("method not allowed on this path")

// Match finds the operation for method and path and returns the values of the
// path parameters.
func (s *Spec) Match(method, path string) (*Operation, map[string]string, error) {
	method = strings.ToUpper(method)
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	segs := splitPath(path)
	pathFound := false
	for _, op := range s.ops {
		params, ok := matchTemplate(op.Template, segs)
		if !ok {
			continue
		}
		pathFound = true
		if op.Method == method {
			return op, params, nil
		}
	}
	if pathFound {
		return nil, nil, fmt.Errorf("%w: %s %s", ErrMethod, method, path)
	}
	return nil, nil, fmt.Errorf("%w: %s", ErrNoRoute, path)
}

func splitPath(p string) []string {
	p = strings.Trim(p, "/")
	if p == "" {
		return nil
	}
	return strings.Split(p, "/")
}

func matchTemplate(tmpl string, segs []string) (map[string]string, bool) {
	ts := splitPath(tmpl)
	if len(ts) != len(segs) {
		return nil, false
	}
	var params map[string]string
	for i, t := range ts {
		if strings.HasPrefix(t, "{") && strings.HasSuffix(t, "}") {
			if segs[i] == "" {
				return nil, false
			}
			if params == nil {
				params = map[string]string{}
			}
			params[t[1:len(t)-1]] = segs[i]
			continue
		}
		if t != segs[i] {
			return nil, false
		}
	}
	return params, true
}

// Problem is one way a request departs from the spec.
type Problem struct {
	Field string // JSON path of the offending value, e.g. "drives.is_read_only"; "" for the request itself
	Msg   string
}

func (p Problem) String() string {
	if p.Field == "" {
		return p.Msg
	}
	return p.Field + ": " + p.Msg
}

// MaxBody is Firecracker's default limit on an API request body
// (--http-api-max-payload-size).
const MaxBody = 51200

// CheckRequest validates a whole request: route, method, path parameters and
// body. It returns the matched operation (nil when the route is unknown) and
// every problem found.
func (s *Spec) CheckRequest(method, path string, body []byte) (*Operation, map[string]string, []Problem) {
	op, params, err := s.Match(method, path)
	if err != nil {
		return nil, nil, []Problem{{Msg: err.Error()}}
	}
	var probs []Problem
	for _, p := range op.Parameters {
		if p.In == "path" && p.Required && params[p.Name] == "" {
			probs = append(probs, Problem{Field: p.Name, Msg: "missing path parameter"})
		}
	}
	if len(body) > MaxBody {
		return op, params, append(probs, Problem{Msg: fmt.Sprintf("request body of %d bytes exceeds the %d byte limit", len(body), MaxBody)})
	}
	bp := op.Body()
	empty := len(bytes.TrimSpace(body)) == 0
	switch {
	case bp == nil && !empty:
		probs = append(probs, Problem{Msg: fmt.Sprintf("%s %s takes no body", op.Method, op.Template)})
	case bp == nil:
	case empty && bp.Required:
		probs = append(probs, Problem{Msg: "missing request body"})
	case empty:
	default:
		probs = append(probs, s.CheckJSON(bp.Schema, body, op.Template)...)
	}
	return op, params, probs
}

// CheckJSON validates a JSON document against a schema (usually a $ref).
// root names the document in problem fields.
func (s *Spec) CheckJSON(sc *Schema, body []byte, root string) []Problem {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return []Problem{{Msg: "body is not valid JSON: " + err.Error()}}
	}
	if dec.More() {
		return []Problem{{Msg: "body has trailing data after the JSON value"}}
	}
	var probs []Problem
	s.check(sc, v, strings.TrimPrefix(root, "/"), &probs)
	return probs
}

// CheckDefinition validates a JSON document against the named definition.
func (s *Spec) CheckDefinition(name string, body []byte) []Problem {
	if _, ok := s.Definitions[name]; !ok {
		return []Problem{{Msg: fmt.Sprintf("no definition %q in spec", name)}}
	}
	return s.CheckJSON(&Schema{Ref: "#/definitions/" + name}, body, name)
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func (s *Spec) check(sc *Schema, v any, path string, probs *[]Problem) {
	add := func(format string, args ...any) {
		*probs = append(*probs, Problem{Field: path, Msg: fmt.Sprintf(format, args...)})
	}
	sc, err := s.resolve(sc)
	if err != nil {
		add("%v", err)
		return
	}
	if sc == nil {
		return
	}
	typ := sc.Type
	if typ == "" && sc.Properties != nil {
		typ = "object"
	}
	if v == nil {
		add("null is not allowed (expected %s)", orAny(typ))
		return
	}
	switch typ {
	case "object":
		obj, ok := v.(map[string]any)
		if !ok {
			add("expected an object, got %s", jsonKind(v))
			return
		}
		for _, r := range sc.Required {
			if _, ok := obj[r]; !ok {
				*probs = append(*probs, Problem{Field: join(path, r), Msg: "missing required field"})
			}
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		open := sc.AdditionalProperties.Kind != 0 && !(sc.AdditionalProperties.Kind == yaml.ScalarNode && sc.AdditionalProperties.Value == "false")
		for _, k := range keys {
			ps, ok := sc.Properties[k]
			if !ok {
				if !open {
					*probs = append(*probs, Problem{Field: join(path, k), Msg: fmt.Sprintf("unknown field, expected one of %s", fieldList(sc))})
				}
				continue
			}
			if ps.ReadOnly {
				*probs = append(*probs, Problem{Field: join(path, k), Msg: "field is read-only"})
				continue
			}
			s.check(ps, obj[k], join(path, k), probs)
		}
	case "array":
		arr, ok := v.([]any)
		if !ok {
			add("expected an array, got %s", jsonKind(v))
			return
		}
		for i, e := range arr {
			s.check(sc.Items, e, path+"["+strconv.Itoa(i)+"]", probs)
		}
	case "string":
		str, ok := v.(string)
		if !ok {
			add("expected a string, got %s", jsonKind(v))
			return
		}
		// "The possible values are case-insensitive" (Logger.level) is honoured.
		fold := strings.Contains(strings.ToLower(sc.Description), "case-insensitive")
		if len(sc.Enum) > 0 && !inEnum(sc.Enum, str, fold) {
			add("%q is not one of %s", str, enumList(sc.Enum))
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			add("expected a boolean, got %s", jsonKind(v))
		}
	case "integer":
		n, ok := v.(json.Number)
		if !ok {
			add("expected an integer, got %s", jsonKind(v))
			return
		}
		i, err := strconv.ParseInt(n.String(), 10, 64)
		if err != nil {
			// Firecracker's unsigned fields accept up to u64; anything with a
			// fraction or exponent is not an integer.
			u, uerr := strconv.ParseUint(n.String(), 10, 64)
			if uerr != nil {
				add("expected an integer, got %s", n)
				return
			}
			if sc.Maximum != nil && float64(u) > *sc.Maximum {
				add("%s is above the maximum %v", n, *sc.Maximum)
			}
			return
		}
		if sc.Format == "int32" && (i < math.MinInt32 || i > math.MaxInt32) {
			add("%d does not fit in int32", i)
		}
		if sc.Minimum != nil && float64(i) < *sc.Minimum {
			add("%d is below the minimum %v", i, *sc.Minimum)
		}
		if sc.Maximum != nil && float64(i) > *sc.Maximum {
			add("%d is above the maximum %v", i, *sc.Maximum)
		}
		if len(sc.Enum) > 0 && !inEnum(sc.Enum, n.String(), false) {
			add("%s is not one of %s", n, enumList(sc.Enum))
		}
	case "number":
		if _, ok := v.(json.Number); !ok {
			add("expected a number, got %s", jsonKind(v))
		}
	case "":
		// Untyped schema: anything goes.
	default:
		add("spec uses unsupported type %q", typ)
	}
}

func orAny(t string) string {
	if t == "" {
		return "a value"
	}
	return t
}

func jsonKind(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean " + strconv.FormatBool(x)
	case json.Number:
		return "number " + x.String()
	case string:
		return fmt.Sprintf("string %q", x)
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

func inEnum(enum []yaml.Node, s string, fold bool) bool {
	for _, e := range enum {
		if e.Value == s || fold && strings.EqualFold(e.Value, s) {
			return true
		}
	}
	return false
}

func enumList(enum []yaml.Node) string {
	vals := make([]string, len(enum))
	for i, e := range enum {
		vals[i] = strconv.Quote(e.Value)
	}
	return "[" + strings.Join(vals, ", ") + "]"
}

func fieldList(sc *Schema) string {
	names := make([]string, 0, len(sc.Properties))
	for n := range sc.Properties {
		names = append(names, "`"+n+"`")
	}
	sort.Strings(names)
	if len(names) == 0 {
		return "no fields"
	}
	return strings.Join(names, ", ")
}
