package fakefc

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

// Verdicts a Record can carry.
const (
	VerdictOK          = "ok"          // valid request, served
	VerdictViolation   = "violation"   // the request breaks the spec or an order rule: a driver bug
	VerdictInjected    = "injected"    // refused on purpose (FAKEFC_FAIL)
	VerdictUnsimulated = "unsimulated" // valid, but the fake does not implement it
)

// Kinds of Record.
const (
	KindAPI   = "api"   // an HTTP request on the API socket
	KindVsock = "vsock" // a host-initiated vsock connection on uds_path
	KindEvent = "event" // something the fake did on its own (boot, power-off, crash)
)

// Record is one line of the record file (FAKEFC_RECORD).
type Record struct {
	Time    time.Time       `json:"time"`
	ID      string          `json:"id"` // --id of the fake instance
	Kind    string          `json:"kind"`
	Method  string          `json:"method,omitempty"`
	Path    string          `json:"path,omitempty"`
	Body    json.RawMessage `json:"body,omitempty"`     // the request body when it was valid JSON
	RawBody string          `json:"raw_body,omitempty"` // the request body when it was not
	Status  int             `json:"status,omitempty"`
	Verdict string          `json:"verdict"`
	Fault   string          `json:"fault,omitempty"` // fault_message answered, or event detail
}

type recorder struct {
	mu sync.Mutex
	f  *os.File
	id string
}

func openRecorder(path, id string) (*recorder, error) {
	if path == "" {
		return &recorder{id: id}, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open record file: %w", err)
	}
	return &recorder{f: f, id: id}, nil
}

func (r *recorder) add(rec Record) {
	if r == nil || r.f == nil {
		return
	}
	rec.Time = time.Now().UTC()
	rec.ID = r.id
	b, err := json.Marshal(rec)
	if err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	// One write per line: O_APPEND keeps concurrent writers' lines whole.
	_, _ = r.f.Write(append(b, '\n'))
}

func (r *recorder) close() {
	if r != nil && r.f != nil {
		r.f.Close()
	}
}

// ReadRecords reads a record file. A missing file reads as no records.
func ReadRecords(path string) ([]Record, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var recs []Record
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 4<<20)
	for sc.Scan() {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var r Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return recs, fmt.Errorf("record file %s: %w", path, err)
		}
		recs = append(recs, r)
	}
	return recs, sc.Err()
}
