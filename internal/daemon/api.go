package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"time"

	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"

	"github.com/bangerdev/banger/api"
)

func (d *Daemon) registerAPI() {
	m := d.mux
	rpc.Handle(m, api.MethodPing, func(ctx context.Context, _ struct{}) (string, error) { return "pong", nil })
	rpc.Handle(m, api.MethodInfo, func(ctx context.Context, _ struct{}) (api.Info, error) {
		return api.Info{
			Version: d.cfg.Version, PID: os.Getpid(), Home: d.cfg.Layout.DataDir, Socket: d.cfg.Layout.Socket(),
			UptimeSeconds: time.Since(d.started).Seconds(), StartedAt: d.started.UTC().Format(time.RFC3339),
		}, nil
	})
	rpc.Handle(m, api.MethodVMList, func(ctx context.Context, p api.VMListParams) (json.RawMessage, error) {
		if !d.vms.listDecorated() {
			// The common case, served as SQLite encodes it (no runtime state to add).
			b, err := d.store.ListVMsJSON(ctx, p.All)
			return b, storeErr(err)
		}
		vms, err := d.store.ListVMs(ctx)
		if err != nil {
			return nil, storeErr(err)
		}
		out := make([]*store.VM, 0, len(vms))
		for _, vm := range vms {
			d.vms.markPaused(vm)
			d.vms.markForwards(vm)
			if !vm.Pool || p.All {
				out = append(out, vm)
			}
		}
		return json.Marshal(out)
	})
	rpc.Handle(m, api.MethodVMGet, func(ctx context.Context, p api.VMRef) (*store.VM, error) {
		vm, err := d.store.FindVM(ctx, p.VM)
		if vm != nil {
			d.vms.markPaused(vm)
			d.vms.markForwards(vm)
		}
		return vm, storeErr(err)
	})
	d.registerServiceAPI()
}

// storeErr maps store errors to protocol codes, keeping the message.
func storeErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, store.ErrNotFound):
		return codeErr(rpc.CodeNotFound, err)
	case errors.Is(err, store.ErrInvalid):
		return codeErr(rpc.CodeInvalidArgument, err)
	case errors.Is(err, store.ErrAmbiguous), errors.Is(err, store.ErrConflict):
		return codeErr(rpc.CodeConflict, err)
	}
	return err
}

// codeErr attaches a protocol code to err, keeping err in the chain and its message.
func codeErr(code string, err error) error {
	return &codedError{code: code, err: err}
}

type codedError struct {
	code string
	err  error
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() []error {
	return []error{e.err, &rpc.ErrorResponse{Code: e.code, Message: e.err.Error()}}
}
