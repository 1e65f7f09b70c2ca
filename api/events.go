package api

import "time"

// Methods for events and cancellation.
const (
	// MethodEventsSubscribe takes EventsParams and returns EventsResult; the
	// connection is then upgraded to a stream of Event, one JSON object per
	// line: the recent events first, then (with Follow) each new one until
	// the client closes the connection.
	MethodEventsSubscribe = "events.subscribe"
	// MethodOpCancel takes OpCancelParams and returns OpCancelResult. It
	// cancels a running create or image operation by its op id; the
	// operation then undoes what it made.
	MethodOpCancel = "op.cancel"
)

// Event types.
const (
	EventVMCreated      = "vm.created"
	EventVMCreateFailed = "vm.create_failed"
	EventVMStarted      = "vm.started"
	EventVMStartFailed  = "vm.start_failed"
	EventVMStopped      = "vm.stopped"
	EventVMDeleted      = "vm.deleted"
	EventImageAdded     = "image.added"
	EventKernelAdded    = "kernel.added"
)

// Event is one state change in bangerd.
type Event struct {
	Time time.Time `json:"time"`
	Type string    `json:"type"`
	// OpID is the operation that caused it (for a VMM that died on its own,
	// the watcher's own op id).
	OpID string `json:"op_id,omitempty"`
	// VM names the VM (name and id) of vm.* events.
	VM   string `json:"vm,omitempty"`
	VMID string `json:"vm_id,omitempty"`
	// Name names the image or kernel of image.* and kernel.* events.
	Name string `json:"name,omitempty"`
	// Reason says why a VM stopped or an operation failed; empty for an
	// intentional stop or a guest that powered off by itself.
	Reason string `json:"reason,omitempty"`
}

// EventsParams is events.subscribe.
type EventsParams struct {
	// Follow keeps the stream open for new events.
	Follow bool `json:"follow,omitempty"`
}

// EventsResult is events.subscribe's result, before the stream.
type EventsResult struct {
	// Recent is how many past events come first in the stream.
	Recent int `json:"recent"`
}

// OpCancelParams is op.cancel.
type OpCancelParams struct {
	OpID string `json:"op_id"`
}

// OpCancelResult is op.cancel's result.
type OpCancelResult struct {
	OpID string `json:"op_id"`
	// Kind is "create" or "image".
	Kind string `json:"kind"`
	// Cancelled is false when the operation had already finished.
	Cancelled bool `json:"cancelled"`
}
