package daemon

// faultHook is called at named points of the VM lifecycle. It does nothing
// in a normal build; a build with the faultinject tag (fault_inject.go) makes
// bangerd SIGKILL itself at the point named by BANGER_FAULT, so the
// end-to-end tests can check that a restarted bangerd converges.
//
// Points: after-record (create, record written), after-spawn (VMM process
// exists), before-handles (VMM started, handles.json not yet final),
// agent-wait (waiting for the guest agent), start, stop, delete, and the
// steps of a writable disk spare's background refill after a create:
// disk-refill-template, -temp (its temporary file made), -written (written
// and synced, not renamed), -renamed.
var faultHook = func(point string) {}

func fault(point string) { faultHook(point) }
