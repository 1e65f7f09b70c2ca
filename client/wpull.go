package client

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/workspace"
)

// pullStream copies the guest tree at dest into the new private directory
// root, in one bulk stream (bulk.OpPull) under the VM's workspace lock:
// the host first says what it has (haves), then the guest sends, one way,
// everything else. It returns the files the guest left out as the host's
// (bulk.PackSame, each one a name the host offered) and the bytes received.
// flags is the Open's N (bulk.PullGitOnly: only the guest's .git). What the
// guest may make this host store is bounded as a Download is
// (workspace.MaxDownloadBytes, workspace.MaxDownloadEntries).
func (c *Client) pullStream(ctx context.Context, vm, dest, root string, haves *workspace.Haves, flags uint64) (map[string]workspace.HostFile, int64, error) {
	conn, err := c.openBulkWith(ctx, api.BulkParams{VM: vm, Workspace: true}, bulk.Open{Op: bulk.OpPull, Arg: dest, N: flags})
	if err != nil {
		return nil, 0, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := os.Mkdir(root, 0o700); err != nil {
		return nil, 0, err
	}
	bw := bufio.NewWriterSize(conn, 256<<10)
	err = bulk.WriteHaves(bw, haves.List)
	if err == nil {
		err = bw.Flush()
	}
	var same map[string]workspace.HostFile
	cr := &countReader{r: conn}
	if err == nil {
		same, err = receiveTree(bufio.NewReaderSize(cr, 256<<10), root, workspace.MaxDownloadBytes, workspace.MaxDownloadEntries, haves.Files)
	}
	if err != nil && ctx.Err() != nil {
		return nil, cr.n, fmt.Errorf("workspace pull interrupted: %w", ctx.Err())
	}
	return same, cr.n, err
}

// countReader counts the bytes read through it.
type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// receiveTree writes a guest's OpPull stream into root,
// treating all of it as hostile: every name must be a plain relative path
// of plain components, directories and files are made through
// workspace.HostDir (no link is ever followed; an existing entry is never
// replaced, so a link then a directory of the same name is refused), links
// are data, files get exactly their announced size and only permission
// bits, and the whole is bounded. A PackSame may only name a file in
// offered (the host's own, by the host's object id), once, and nothing may
// be received at or below it; it returns those files.
func receiveTree(r io.Reader, root string, maxBytes int64, maxEntries int, offered map[string]workspace.HostFile) (map[string]workspace.HostFile, error) {
	hd, err := workspace.OpenHostDir(root)
	if err != nil {
		return nil, err
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
	same := map[string]workspace.HostFile{}
	got := map[string]bool{}    // offered names that arrived as entries
	dirSet := map[string]bool{} // directories made (as dirs holds them)
	// underSame: rel is a file the guest said it has as the host's, or
	// below one
	underSame := func(rel string) bool {
		for p := rel; ; {
			if _, ok := same[p]; ok {
				return true
			}
			i := strings.LastIndexByte(p, '/')
			if i < 0 {
				return false
			}
			p = p[:i]
		}
	}
	for n := 0; ; n++ {
		typ, p, err := bulk.ReadFrame(r, buf)
		buf = p
		if err != nil {
			return nil, fmt.Errorf("read the guest's workspace: %w", err)
		}
		switch typ {
		case bulk.FrameEOF:
			// Directory modes last (they may forbid writing into them).
			for i := len(dirs) - 1; i >= 0; i-- {
				d := dirs[i]
				if err := hd.SetDirMeta(d.rel, d.mode, d.mtime); err != nil {
					return nil, err
				}
			}
			return same, nil
		case bulk.FrameReply:
			var rep bulk.Reply
			_ = ssh.Unmarshal(p, &rep)
			msg := string(rep.Payload)
			if len(msg) > 512 {
				msg = msg[:512]
			}
			return nil, fmt.Errorf("the guest could not send its workspace: %s", msg)
		case bulk.FrameRequest:
		default:
			return nil, fmt.Errorf("unexpected frame type %d in the guest's workspace", typ)
		}
		if n >= maxEntries {
			return nil, fmt.Errorf("the guest's workspace has more than %d entries", maxEntries)
		}
		var req bulk.Request
		var e bulk.SyncEntry
		if err := ssh.Unmarshal(p, &req); err != nil {
			return nil, err
		}
		if err := ssh.Unmarshal(req.Payload, &e); err != nil {
			return nil, err
		}
		if err := plainRel(e.Rel); err != nil {
			return nil, err
		}
		if underSame(e.Rel) {
			return nil, fmt.Errorf("the guest sent %s after saying it is the host's file", e.Rel)
		}
		if _, ok := offered[e.Rel]; ok && req.Type != bulk.PackSame {
			got[e.Rel] = true
		}
		mtime := time.Unix(0, int64(e.MTime))
		switch req.Type {
		case bulk.PackSame:
			f, ok := offered[e.Rel]
			if !ok || got[e.Rel] {
				return nil, fmt.Errorf("the guest said %s is the host's file, which the host never offered (or the guest sent it too)", e.Rel)
			}
			if d := path.Dir(e.Rel); d != "." && !dirSet[d] {
				return nil, fmt.Errorf("the guest said %s is the host's file, but sent no directory %s for it", e.Rel, d)
			}
			same[e.Rel] = f
		case bulk.PackDir:
			if err := hd.Mkdir(e.Rel); err != nil {
				return nil, err
			}
			// owner rwx always: the host copy is private, and the pull
			// moves and removes entries in it
			dirs = append(dirs, dirMeta{e.Rel, fs.FileMode(e.Mode)&fs.ModePerm | 0o700, mtime})
			dirSet[e.Rel] = true
		case bulk.PackLink:
			if err := hd.Symlink(e.Target, e.Rel, false); err != nil {
				return nil, err
			}
		case bulk.PackFile:
			if total += int64(e.Size); e.Size > uint64(maxBytes) || total > maxBytes {
				return nil, fmt.Errorf("the guest's workspace is larger than %d bytes", maxBytes)
			}
			if err := receiveFile(r, hd, e, mtime); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("unknown entry type %q in the guest's workspace", req.Type)
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

// streamedPull is WorkspacePull over the bulk path: the host says what it
// has (workspace.PullHaves: its objects and clean files), the guest's tree
// arrives in one stream without them into a private temp directory
// (receiveTree), and the workspace package's import-as-data rules run on
// that copy in place (workspace.PullTreeSame: the same checks as on the
// guest, without copying the tree again; the files the guest left out are
// committed by the host's own object ids).
func (c *Client) streamedPull(ctx context.Context, vm, vmName, repo, dest string) (*PullResult, error) {
	t := time.Now()
	haves, err := workspace.PullHaves(ctx, repo)
	if err != nil {
		return nil, err
	}
	slog.DebugContext(ctx, "workspace pull phase", "phase", "list haves", "ms", float64(time.Since(t).Microseconds())/1000, "haves", len(haves.List))
	tmp, err := os.MkdirTemp("", "banger-pull-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	copyDir := filepath.Join(tmp, "guest")
	t = time.Now()
	same, received, err := c.pullStream(ctx, vm, dest, copyDir, haves, 0)
	if err != nil {
		return nil, err
	}
	slog.DebugContext(ctx, "workspace pull phase", "phase", "receive stream", "ms", float64(time.Since(t).Microseconds())/1000,
		"bytes", received, "same", len(same))
	work := filepath.Join(tmp, "work")
	if err := os.Mkdir(work, 0o700); err != nil {
		return nil, err
	}
	res, err := workspace.PullTreeSame(ctx, copyDir, repo, vmName, work, same)
	if res != nil {
		res.Received = received
	}
	return res, err
}

// streamedStatus is GetWorkspaceStatus over the bulk path: the guest sends
// only its .git, without the objects the host has (bulk.PullGitOnly), and
// the workspace package imports it as data in place
// (workspace.GetStatusTree).
func (c *Client) streamedStatus(ctx context.Context, vm, vmName, repo, dest string) (*WorkspaceStatus, error) {
	haves, err := workspace.ObjectHaves(ctx, repo)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "banger-status-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	copyDir := filepath.Join(tmp, "guest")
	if _, _, err := c.pullStream(ctx, vm, dest, copyDir, haves, bulk.PullGitOnly); err != nil {
		return nil, err
	}
	work := filepath.Join(tmp, "work")
	if err := os.Mkdir(work, 0o700); err != nil {
		return nil, err
	}
	return workspace.GetStatusTree(ctx, copyDir, repo, vmName, work)
}
