package client

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/api"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/workspace"
)

// PushStats says what a streamed workspace push sent.
type PushStats = bulk.SyncStats

// syncPush sends plan p to dest in vm as one bulk stream (bulk.OpSync): the
// agent answers with what dest holds, and only what differs goes (plus the
// deletion of what an earlier push wrote and the host no longer has).
func (c *Client) syncPush(ctx context.Context, vm string, p *workspace.Plan, dest string, progress func(int64)) (PushStats, error) {
	// Under the VM's workspace lock in bangerd: pushes never interleave.
	conn, err := c.openBulkWith(ctx, api.BulkParams{VM: vm, Workspace: true, Dest: dest}, bulk.Open{Op: bulk.OpSync, Arg: dest})
	if err != nil {
		return PushStats{}, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	return pushStream(ctx, conn, p, progress)
}

// pushStream runs the host side of bulk.OpSync on conn (after Open).
func pushStream(ctx context.Context, conn io.ReadWriter, p *workspace.Plan, progress func(int64)) (PushStats, error) {
	fail := func(err error) (PushStats, error) {
		if ctx.Err() != nil {
			return PushStats{}, fmt.Errorf("workspace push interrupted: %w", ctx.Err())
		}
		if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return PushStats{}, fmt.Errorf("workspace push interrupted: the stream to the VM closed (was it stopped or deleted?): %w", err)
		}
		return PushStats{}, err
	}
	br := bufio.NewReaderSize(conn, 256<<10)
	guest, err := bulk.ReadManifest(br)
	if err != nil {
		return fail(err)
	}
	bw := bufio.NewWriterSize(conn, 256<<10)
	send := func(kind string, e bulk.SyncEntry) error {
		return bulk.WriteFrame(bw, bulk.FrameRequest, ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(&e)}))
	}
	want := make(map[string]bool, len(p.Items))
	for _, it := range p.Items {
		want[it.Rel] = true
	}
	// Deletions first (a path may change type): what an earlier push wrote
	// and the plan no longer has, outermost only.
	var gone []string
	for rel, e := range guest {
		if e.W && !want[rel] {
			gone = append(gone, rel)
		}
	}
	sort.Strings(gone)
	var last string
	for _, rel := range gone {
		if last != "" && strings.HasPrefix(rel, last+"/") {
			continue
		}
		last = rel
		if err := send(bulk.SyncDelete, bulk.SyncEntry{Rel: rel}); err != nil {
			return fail(err)
		}
	}
	buf := make([]byte, bulk.HeaderSize+256<<10)
	for _, it := range p.Items {
		if err := ctx.Err(); err != nil {
			return fail(err)
		}
		g, has := guest[it.Rel]
		mode := bulk.KeptMode(it.Mode)
		switch {
		case it.Mode.IsDir():
			mode |= 0o700
			if has && g.T == "d" && g.M == mode {
				continue
			}
			err = send(bulk.SyncDir, bulk.SyncEntry{Rel: it.Rel, Mode: mode})
		case it.Link != "":
			if has && g.T == "l" && g.L == it.Link {
				continue
			}
			err = send(bulk.SyncLink, bulk.SyncEntry{Rel: it.Rel, Target: it.Link, MTime: uint64(it.MTime.UnixNano())})
		default:
			if has && g.T == "f" && g.S == it.Size && g.N == it.MTime.UnixNano() && g.M == mode {
				continue
			}
			err = sendFile(bw, send, filepath.Join(p.Root, filepath.FromSlash(it.Rel)), it, mode, buf, progress)
		}
		if err != nil {
			return fail(fmt.Errorf("push %s: %w", it.Rel, err))
		}
	}
	if err := send(bulk.SyncDone, bulk.SyncEntry{}); err != nil {
		return fail(err)
	}
	if err := bw.Flush(); err != nil {
		return fail(err)
	}
	st, err := bulk.ReadSyncReply(br)
	if err != nil {
		return fail(err)
	}
	return st, nil
}

// sendFile sends one file: its entry, then exactly its planned size. A file
// that changed size since the plan was made fails the push.
func sendFile(w io.Writer, send func(string, bulk.SyncEntry) error, src string, it workspace.Item, mode uint32, buf []byte, progress func(int64)) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() || fi.Size() != it.Size {
		return fmt.Errorf("%s changed during the push; push again", path.Base(it.Rel))
	}
	if err := send(bulk.SyncFile, bulk.SyncEntry{Rel: it.Rel, Mode: mode, MTime: uint64(it.MTime.UnixNano()), Size: uint64(it.Size)}); err != nil {
		return err
	}
	// Each frame is read into buf after room for its header and written
	// with one Write (no copy, no allocation per frame).
	left := it.Size
	for left > 0 {
		n, err := f.Read(buf[bulk.HeaderSize : bulk.HeaderSize+int(min(int64(len(buf)-bulk.HeaderSize), left))])
		if n > 0 {
			bulk.PutHeader(buf, bulk.FrameData, n)
			if _, werr := w.Write(buf[:bulk.HeaderSize+n]); werr != nil {
				return werr
			}
			left -= int64(n)
			if progress != nil {
				progress(int64(n))
			}
		}
		if err == io.EOF && left > 0 {
			return fmt.Errorf("%s changed during the push; push again", path.Base(it.Rel))
		}
		if err != nil && err != io.EOF {
			return err
		}
	}
	return nil
}

func sshMarshalReq(kind string, e bulk.SyncEntry) []byte {
	return ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(&e)})
}
