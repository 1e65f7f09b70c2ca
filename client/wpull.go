package client

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/workspace"
)

// Bounds of a streamed pull: what a guest may make this host store.
const (
	MaxPullBytes   = 16 << 30
	MaxPullEntries = 1 << 20
)

// pullStream copies the guest tree at dest into the new private directory
// root, in one bulk stream (bulk.OpPack) under the VM's workspace lock.
func (c *Client) pullStream(ctx context.Context, vm, dest, root string) error {
	conn, err := c.openBulkWith(ctx, api.BulkParams{VM: vm, Workspace: true}, bulk.Open{Op: bulk.OpPack, Arg: dest})
	if err != nil {
		return err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := os.Mkdir(root, 0o700); err != nil {
		return err
	}
	err = receiveTree(conn, root, MaxPullBytes, MaxPullEntries)
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("workspace pull interrupted: %w", ctx.Err())
	}
	return err
}

// receiveTree writes a guest's OpPack stream into root, treating all of it
// as hostile: every name must be a plain relative path of plain components,
// directories and files are made through workspace.HostDir (no link is
// ever followed; an existing entry is never replaced, so a link then a
// directory of the same name is refused), links are data, files get exactly
// their announced size and only permission bits, and the whole is bounded.
func receiveTree(r io.Reader, root string, maxBytes int64, maxEntries int) error {
	hd, err := workspace.OpenHostDir(root)
	if err != nil {
		return err
	}
	defer hd.Close()
	type dirMeta struct {
		rel   string
		mode  fs.FileMode
		mtime time.Time
	}
	var dirs []dirMeta
	var total int64
	var buf []byte
	for n := 0; ; n++ {
		typ, p, err := bulk.ReadFrame(r, buf)
		buf = p
		if err != nil {
			return fmt.Errorf("read the guest's workspace: %w", err)
		}
		switch typ {
		case bulk.FrameEOF:
			// Directory modes last (they may forbid writing into them).
			for i := len(dirs) - 1; i >= 0; i-- {
				d := dirs[i]
				if err := hd.SetDirMeta(d.rel, d.mode, d.mtime); err != nil {
					return err
				}
			}
			return nil
		case bulk.FrameReply:
			var rep bulk.Reply
			_ = ssh.Unmarshal(p, &rep)
			msg := string(rep.Payload)
			if len(msg) > 512 {
				msg = msg[:512]
			}
			return fmt.Errorf("the guest could not send its workspace: %s", msg)
		case bulk.FrameRequest:
		default:
			return fmt.Errorf("unexpected frame type %d in the guest's workspace", typ)
		}
		if n >= maxEntries {
			return fmt.Errorf("the guest's workspace has more than %d entries", maxEntries)
		}
		var req bulk.Request
		var e bulk.SyncEntry
		if err := ssh.Unmarshal(p, &req); err != nil {
			return err
		}
		if err := ssh.Unmarshal(req.Payload, &e); err != nil {
			return err
		}
		if err := plainRel(e.Rel); err != nil {
			return err
		}
		mtime := time.Unix(0, int64(e.MTime))
		switch req.Type {
		case bulk.PackDir:
			if err := hd.Mkdir(e.Rel); err != nil {
				return err
			}
			// owner rwx always: the host copy is private, and the pull
			// moves and removes entries in it
			dirs = append(dirs, dirMeta{e.Rel, fs.FileMode(e.Mode)&fs.ModePerm | 0o700, mtime})
		case bulk.PackLink:
			if err := hd.Symlink(e.Target, e.Rel, false); err != nil {
				return err
			}
		case bulk.PackFile:
			if total += int64(e.Size); e.Size > uint64(maxBytes) || total > maxBytes {
				return fmt.Errorf("the guest's workspace is larger than %d bytes", maxBytes)
			}
			if err := receiveFile(r, hd, e, mtime); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown entry type %q in the guest's workspace", req.Type)
		}
	}
}

// plainRel checks a guest's relative path: clean, relative, every component
// a plain name.
func plainRel(rel string) error {
	if bulk.CleanRel(rel) != nil {
		return fmt.Errorf("the guest sent a bad name %q", rel)
	}
	for _, c := range strings.Split(rel, "/") {
		if !workspace.PlainName(c) {
			return fmt.Errorf("the guest sent a bad name %q", rel)
		}
	}
	return nil
}

func receiveFile(r io.Reader, hd *workspace.HostDir, e bulk.SyncEntry, mtime time.Time) error {
	f, err := hd.Create(e.Rel, true)
	if err != nil {
		return err
	}
	defer f.Close()
	left := e.Size
	var buf []byte
	for left > 0 {
		typ, d, err := bulk.ReadFrame(r, buf)
		buf = d
		if err != nil {
			return fmt.Errorf("read %s from the guest: %w", e.Rel, err)
		}
		if typ != bulk.FrameData || uint64(len(d)) > left {
			return fmt.Errorf("the guest sent %s wrongly (frame type %d of %d bytes, %d left)", e.Rel, typ, len(d), left)
		}
		if _, err := f.Write(d); err != nil {
			return err
		}
		left -= uint64(len(d))
	}
	if err := workspace.SetFileMeta(f, fs.FileMode(e.Mode)&fs.ModePerm, mtime); err != nil {
		return err
	}
	return f.Close()
}

// streamedPull is WorkspacePull over the bulk path: the guest's tree
// arrives in one stream into a private temp directory (receiveTree), and
// the workspace package's import-as-data rules run on that copy in place
// (workspace.PullTree: the same checks as on the guest, without copying the
// tree again).
func (c *Client) streamedPull(ctx context.Context, vm, vmName, repo, dest string) (*PullResult, error) {
	tmp, err := os.MkdirTemp("", "banger-pull-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	copyDir := filepath.Join(tmp, "guest")
	t := time.Now()
	if err := c.pullStream(ctx, vm, dest, copyDir); err != nil {
		return nil, err
	}
	slog.DebugContext(ctx, "workspace pull phase", "phase", "receive stream", "ms", float64(time.Since(t).Microseconds())/1000)
	work := filepath.Join(tmp, "work")
	if err := os.Mkdir(work, 0o700); err != nil {
		return nil, err
	}
	return workspace.PullTree(ctx, copyDir, repo, vmName, work)
}
