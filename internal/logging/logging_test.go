package logging

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"regexp"
	"strings"
	"testing"
)

func records(t *testing.T, b *bytes.Buffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("not JSON: %q", l)
		}
		out = append(out, m)
	}
	return out
}

func TestOpIDOnEveryRecord(t *testing.T) {
	var b bytes.Buffer
	log := New(&b, slog.LevelDebug).With("component", "x")
	ctx := WithOpID(context.Background(), "op-abcdef")
	log.InfoContext(ctx, "one", "k", 1)
	log.DebugContext(ctx, "two")
	log.Info("three") // no context id
	recs := records(t, &b)
	if len(recs) != 3 {
		t.Fatalf("%d records", len(recs))
	}
	for i, want := range []any{"op-abcdef", "op-abcdef", nil} {
		if recs[i]["op_id"] != want {
			t.Errorf("record %d op_id = %v, want %v", i, recs[i]["op_id"], want)
		}
		if recs[i]["component"] != "x" {
			t.Errorf("record %d lost its attributes: %v", i, recs[i])
		}
	}
}

func TestNewOpIDFormat(t *testing.T) {
	re := regexp.MustCompile(`^op-[0-9a-f]{12}$`)
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		id := NewOpID()
		if !re.MatchString(id) || seen[id] {
			t.Fatalf("bad or repeated id %q", id)
		}
		seen[id] = true
	}
}

func TestOpStepsAndOutcome(t *testing.T) {
	var b bytes.Buffer
	log := New(&b, slog.LevelDebug)
	ctx := WithOpID(context.Background(), "op-123456")
	op := StartOp(ctx, log, "vm.create", "vm", "web")
	op.Step("disk", func() error { return nil })
	op.Step("boot", func() error { return errors.New("no kernel") })
	op.End(errors.New("boot failed"))
	recs := records(t, &b)
	want := []string{"operation started", "step completed", "step failed", "operation failed"}
	if len(recs) != len(want) {
		t.Fatalf("%d records: %s", len(recs), b.String())
	}
	for i, r := range recs {
		if r["msg"] != want[i] || r["op_id"] != "op-123456" || r["operation"] != "vm.create" {
			t.Errorf("record %d: %v", i, r)
		}
		if i > 0 {
			if _, ok := r["duration_ms"].(float64); !ok {
				t.Errorf("record %d lacks duration_ms: %v", i, r)
			}
		}
	}
	if recs[2]["step"] != "boot" || recs[2]["error"] != "no kernel" || recs[3]["outcome"] != "error" {
		t.Errorf("failure details missing: %v %v", recs[2], recs[3])
	}
}
