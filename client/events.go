package client

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/bangerdev/banger/api"
)

// Events calls fn with bangerd's recent state changes (VM created, started,
// stopped with the reason, deleted; image and kernel added), oldest first,
// and, with follow, with each new one until ctx ends or fn returns an error.
// Every event carries the op id of the operation that caused it.
func (c *Client) Events(ctx context.Context, follow bool, fn func(api.Event) error) error {
	rc, err := c.dial(ctx)
	if err != nil {
		return err
	}
	var res api.EventsResult
	conn, err := rc.Upgrade(ctx, api.MethodEventsSubscribe, api.EventsParams{Follow: follow}, &res)
	if err != nil {
		rc.Close()
		return err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r := bufio.NewReaderSize(conn, 64<<10)
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 {
			var ev api.Event
			if jerr := json.Unmarshal(line, &ev); jerr != nil {
				return fmt.Errorf("bad event from bangerd: %w", jerr)
			}
			if ferr := fn(ev); ferr != nil {
				return ferr
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				if follow {
					return errors.New("bangerd ended the event stream (it stopped, or this client fell behind)")
				}
				return nil
			}
			return err
		}
	}
}

// CancelOp cancels a running create or image operation by its op id;
// bangerd then undoes what it made. Cancelled is false when the operation
// had already finished.
func (c *Client) CancelOp(ctx context.Context, opID string) (api.OpCancelResult, error) {
	var res api.OpCancelResult
	err := c.Call(ctx, api.MethodOpCancel, api.OpCancelParams{OpID: opID}, &res)
	return res, err
}
