package client

import (
	"bufio"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"hash/adler32"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
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
	conn, err := c.openBulkWith(ctx, api.BulkParams{VM: vm, Workspace: true, Dest: dest, Spool: true}, bulk.Open{Op: bulk.OpSync, Arg: dest})
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
	guest, caps, err := bulk.ReadManifestCaps(br)
	if err != nil {
		return fail(err)
	}
	carry := carriedObjects(ctx, p, guest, caps)
	pk := planPack(p, guest, caps, carry)
	bw := bufio.NewWriterSize(conn, 256<<10)
	send := func(kind string, e bulk.SyncEntry) error {
		return bulk.WriteFrame(bw, bulk.FrameRequest, ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(&e)}))
	}
	want := make(map[string]bool, len(p.Items))
	for _, it := range p.Items {
		want[it.Rel] = true
	}
	// A pack an earlier push wrote stays while it holds an object the host
	// still has loose (it stands in for the loose files); otherwise it goes
	// like any other path pushed before and gone from the host.
	for rel, g := range guest {
		if g.T == "k" && want[rel] {
			want[packDir+"/"+g.L+".pack"] = true
			want[packDir+"/"+g.L+".idx"] = true
		}
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
			if pk != nil && looseDir(it.Rel) {
				// With a pack no loose object is written: git makes
				// .git/objects/xx when it needs it (256 mkdirs saved).
				continue
			}
			err = send(bulk.SyncDir, bulk.SyncEntry{Rel: it.Rel, Mode: mode})
		case it.Link != "":
			if has && g.T == "l" && g.L == it.Link {
				continue
			}
			err = send(bulk.SyncLink, bulk.SyncEntry{Rel: it.Rel, Target: it.Link, MTime: uint64(it.MTime.UnixNano())})
		default:
			id, loose := looseObject(it.Rel)
			switch {
			case loose && has && (g.T == "f" || g.T == "k"):
				continue // named by its content: the guest has it
			case loose && (carry.done[id] || pk.has(id)):
				continue // written from a work tree file's data, or goes in the pack
			case guestHasFile(it, g, has):
				continue
			}
			src := filepath.Join(p.Root, filepath.FromSlash(it.Rel))
			if id, ok := pk.carried(it.Rel); ok {
				err = pk.sendFile(bw, src, it, mode, id, buf, progress)
			} else if obj, ok := carry.objectFor(it.Rel); ok && pk == nil {
				var sent bool
				sent, err = sendFileObj(bw, src, it, mode, obj, buf, progress)
				if sent {
					carry.done[obj.id] = true
				}
			} else {
				err = sendFile(bw, src, it, mode, buf, progress)
			}
		}
		if err != nil {
			return fail(fmt.Errorf("push %s: %w", it.Rel, err))
		}
	}
	if pk != nil {
		if err := pk.finish(ctx, bw, p.Root, buf); err != nil {
			return fail(err)
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
func sendFile(w io.Writer, src string, it workspace.Item, mode uint32, buf []byte, progress func(int64)) error {
	e := bulk.SyncEntry{Rel: it.Rel, Mode: mode, MTime: uint64(it.MTime.UnixNano()), Size: uint64(it.Size)}
	return streamFile(w, src, it, sshMarshalReq(bulk.SyncFile, e), buf, progress, nil)
}

// streamFile sends the request req, then src's data (exactly it.Size bytes)
// in data frames, each also given to seen when set.
func streamFile(w io.Writer, src string, it workspace.Item, req []byte, buf []byte, progress func(int64), seen func([]byte)) error {
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
	if err := bulk.WriteFrame(w, bulk.FrameRequest, req); err != nil {
		return err
	}
	// Each frame is read into buf after room for its header and written
	// with one Write (no copy, no allocation per frame).
	left := it.Size
	for left > 0 {
		n, err := f.Read(buf[bulk.HeaderSize : bulk.HeaderSize+int(min(int64(len(buf)-bulk.HeaderSize), left))])
		if n > 0 {
			if seen != nil {
				seen(buf[bulk.HeaderSize : bulk.HeaderSize+n])
			}
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

// carry says which loose objects of the push travel inside the data of a
// work tree file (bulk.SyncFileObj) instead of as files of their own.
type carry struct {
	blobs   map[string]string         // work tree path → its index blob id
	missing map[string]workspace.Item // loose objects the guest lacks, by id
	done    map[string]bool           // ids written in the guest from file data
}

type carriedObject struct {
	id string
	it workspace.Item
}

// carriedObjects: when the agent can write loose objects from file data and
// lacks some, the index's blob ids of the work tree files say which file
// holds which object (each is checked by hashing what is sent).
func carriedObjects(ctx context.Context, p *workspace.Plan, guest map[string]bulk.ManifestEntry, caps map[string]bool) carry {
	c := carry{done: map[string]bool{}}
	if !caps[bulk.CapObjects] && !caps[bulk.CapPack] {
		return c
	}
	for _, it := range p.Items {
		if id, ok := looseObject(it.Rel); ok && it.Mode.IsRegular() {
			if g, has := guest[it.Rel]; !has || (g.T != "f" && g.T != "k") {
				if c.missing == nil {
					c.missing = map[string]workspace.Item{}
				}
				c.missing[id] = it
			}
		}
	}
	if len(c.missing) == 0 {
		return c
	}
	// Without the index's ids every object travels as a file: slower, not wrong.
	c.blobs, _ = workspace.IndexBlobs(ctx, p.Root)
	return c
}

// objectFor returns the missing loose object whose content rel's data
// should be, if any and not yet written.
func (c carry) objectFor(rel string) (carriedObject, bool) {
	id, ok := c.blobs[rel]
	if !ok || c.done[id] {
		return carriedObject{}, false
	}
	it, ok := c.missing[id]
	return carriedObject{id: id, it: it}, ok
}

// looseObject reports whether rel is a loose object of the repository
// (.git/objects/xx/<hex>, SHA-1 or SHA-256) and returns its id.
func looseObject(rel string) (string, bool) {
	rest, ok := strings.CutPrefix(rel, ".git/objects/")
	if !ok || (len(rest) != 41 && len(rest) != 65) || rest[2] != '/' {
		return "", false
	}
	id := rest[:2] + rest[3:]
	for _, c := range []byte(id) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return "", false
		}
	}
	return id, true
}

// looseDir reports whether rel is a directory of loose objects,
// .git/objects/xx.
func looseDir(rel string) bool {
	xx, ok := strings.CutPrefix(rel, ".git/objects/")
	return ok && len(xx) == 2 && strings.Trim(xx, "0123456789abcdef") == ""
}

// sendFileObj sends a work tree file as bulk.SyncFileObj: the agent also
// writes its data as the loose object obj. What is sent is hashed as a git
// blob on the way; only if that is obj's id does the agent keep the object
// (sent reports it), otherwise the loose object is sent later as a file.
func sendFileObj(w io.Writer, src string, it workspace.Item, mode uint32, obj carriedObject, buf []byte, progress func(int64)) (sent bool, err error) {
	var h hash.Hash
	switch len(obj.id) {
	case 40:
		h = sha1.New()
	case 64:
		h = sha256.New()
	default:
		return false, fmt.Errorf("object id %q", obj.id)
	}
	ad := adler32.New()
	head := []byte("blob " + strconv.FormatInt(it.Size, 10) + "\x00")
	h.Write(head)
	ad.Write(head)
	e := bulk.SyncObjEntry{Rel: it.Rel, Mode: mode, MTime: uint64(it.MTime.UnixNano()), Size: uint64(it.Size),
		Object: obj.it.Rel, ObjMode: bulk.KeptMode(obj.it.Mode), ObjMTime: uint64(obj.it.MTime.UnixNano())}
	req := ssh.Marshal(&bulk.Request{Type: bulk.SyncFileObj, Payload: ssh.Marshal(&e)})
	err = streamFile(w, src, it, req, buf, progress, func(d []byte) { h.Write(d); ad.Write(d) })
	if err != nil {
		return false, err
	}
	ok := hex.EncodeToString(h.Sum(nil)) == obj.id
	end := ssh.Marshal(&bulk.Request{Type: bulk.SyncObjEnd, Payload: ssh.Marshal(&bulk.ObjEnd{OK: ok, Adler: ad.Sum32()})})
	if err := bulk.WriteFrame(w, bulk.FrameRequest, end); err != nil {
		return false, err
	}
	return ok, nil
}

func sshMarshalReq(kind string, e bulk.SyncEntry) []byte {
	return ssh.Marshal(&bulk.Request{Type: kind, Payload: ssh.Marshal(&e)})
}

// guestHasFile says whether the guest's g is already the regular file it
// (type, size, mtime to the nanosecond and mode): then it is not sent.
func guestHasFile(it workspace.Item, g bulk.ManifestEntry, has bool) bool {
	return has && g.T == "f" && g.S == it.Size && g.N == it.MTime.UnixNano() && g.M == bulk.KeptMode(it.Mode)
}
