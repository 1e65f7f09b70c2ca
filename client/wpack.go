package client

import (
	"bufio"
	"compress/zlib"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"hash/adler32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent/bulk"
	"github.com/bangerdev/banger/internal/workspace"
)

// packDir is where git keeps packs, below the work tree.
const packDir = ".git/objects/pack"

// packPush is the host's side of one pack a push writes in the guest
// (bulk.CapPack): every loose object of the host the guest lacks goes in
// it, from the data of the work tree file whose index blob it is when that
// file is sent anyway (bulk.SyncFilePack: the data crosses once), else
// inflated from the host's loose object (bulk.SyncPackObj). The host lays
// out nothing itself: it follows the agent's bytes (bulk.PackEntry) to sum
// the pack and build its index.
type packPush struct {
	newHash func() hash.Hash
	missing map[string]workspace.Item // id → the host's loose object
	carrier map[string]string         // work tree path → the id its data is
	done    map[string]bool           // ids in the pack
	sum     *bulk.PackSummer
	e       bulk.PackEntry
	iov     [][]byte
}

func (k *packPush) has(id string) bool {
	if k == nil {
		return false
	}
	_, ok := k.missing[id]
	return ok
}

// carried returns the blob id rel's data is the pack entry of, if any.
func (k *packPush) carried(rel string) (string, bool) {
	if k == nil {
		return "", false
	}
	id, ok := k.carrier[rel]
	return id, ok
}

// maxPackObjects bounds a push's pack: its index stays well under what the
// agent accepts (bulk's 64 MiB); past it, the loose path (a variable for
// tests).
var maxPackObjects = 1 << 20

// planPack decides the pack, if the agent can write one and lacks some of
// the host's loose objects: nil otherwise (then the loose path, or plain
// files, as before).
func planPack(p *workspace.Plan, guest map[string]bulk.ManifestEntry, caps map[string]bool, c carry) *packPush {
	if !caps[bulk.CapPack] || len(c.missing) == 0 || len(c.missing) > maxPackObjects {
		return nil
	}
	k := &packPush{missing: c.missing, carrier: map[string]string{}, done: map[string]bool{}}
	hexLen := 0
	for id := range c.missing {
		if hexLen == 0 {
			hexLen = len(id)
		}
		if len(id) != hexLen {
			return nil // two object formats: no pack
		}
	}
	nh, err := bulk.HashFor(hexLen)
	if err != nil {
		return nil
	}
	k.newHash = nh
	k.sum = bulk.NewPackSummer(nh, uint32(len(c.missing)))
	// the work tree files that will be sent carry their blobs, the first
	// one of each
	taken := map[string]bool{}
	for _, it := range p.Items {
		if !it.Mode.IsRegular() || it.Link != "" {
			continue
		}
		if _, loose := looseObject(it.Rel); loose {
			continue
		}
		g, has := guest[it.Rel]
		if guestHasFile(it, g, has) {
			continue
		}
		id, ok := c.blobs[it.Rel]
		if _, miss := c.missing[id]; !ok || !miss || taken[id] {
			continue
		}
		taken[id] = true
		k.carrier[it.Rel] = id
	}
	return k
}

// entryBegin starts an entry in the summer.
func (k *packPush) entryBegin(typ byte, size uint64) error {
	if err := k.sum.BeginEntry(); err != nil {
		return err
	}
	k.e.Reset()
	k.iov = k.e.Begin(k.iov[:0], typ, size)
	k.sum.Add(k.iov)
	return nil
}

func (k *packPush) entryData(d []byte) {
	k.e.Reset()
	k.iov = k.e.Data(k.iov[:0], d)
	k.sum.Add(k.iov)
}

// entryEnd keeps the entry as id when ok, else drops it; then tells the
// agent which.
func (k *packPush) entryEnd(w io.Writer, id string, ok bool, adler uint32) error {
	if ok {
		k.e.Reset()
		iov, err := k.e.End(k.iov[:0], adler)
		if err != nil {
			return err
		}
		k.sum.Add(iov)
		raw, _ := hex.DecodeString(id)
		k.sum.EndEntry(raw)
		k.done[id] = true
	} else if err := k.sum.DropEntry(); err != nil {
		return err
	}
	end := ssh.Marshal(&bulk.Request{Type: bulk.SyncObjEnd, Payload: ssh.Marshal(&bulk.ObjEnd{OK: ok, Adler: adler})})
	return bulk.WriteFrame(w, bulk.FrameRequest, end)
}

// sendFile sends a work tree file as bulk.SyncFilePack: its data is also
// the pack's entry for blob id, kept only if what was sent hashes to id
// (a file changed since git add, or while it is sent, is not its blob;
// the object is then sent from the host's loose file at the end).
func (k *packPush) sendFile(w io.Writer, src string, it workspace.Item, mode uint32, id string, buf []byte, progress func(int64)) error {
	h := k.newHash()
	ad := adler32.New()
	h.Write([]byte("blob " + strconv.FormatInt(it.Size, 10) + "\x00"))
	if err := k.entryBegin(bulk.ObjBlob, uint64(it.Size)); err != nil {
		return err
	}
	e := bulk.SyncEntry{Rel: it.Rel, Mode: mode, MTime: uint64(it.MTime.UnixNano()), Size: uint64(it.Size)}
	err := streamFile(w, src, it, sshMarshalReq(bulk.SyncFilePack, e), buf, progress, func(d []byte) {
		h.Write(d)
		ad.Write(d)
		k.entryData(d)
	})
	if err != nil {
		return err
	}
	return k.entryEnd(w, id, hex.EncodeToString(h.Sum(nil)) == id, ad.Sum32())
}

// maxLooseHeader bounds a loose object's "<type> <size>\0".
const maxLooseHeader = 32

var objTypes = map[string]byte{"commit": bulk.ObjCommit, "tree": bulk.ObjTree, "blob": bulk.ObjBlob, "tag": bulk.ObjTag}

// sendObj sends the host's loose object id (at src) as a bulk.SyncPackObj
// entry: inflated, checked against its id on the way. The entry is counted
// in the pack already, so an object that cannot be read fails the push.
func (k *packPush) sendObj(w io.Writer, src, id string, buf []byte) error {
	bad := func(err error) error {
		return fmt.Errorf("the repository's object %s cannot be read (%w); check it with git fsck", id, err)
	}
	f, err := os.Open(src)
	if err != nil {
		return bad(err)
	}
	defer f.Close()
	zr, err := zlib.NewReader(bufio.NewReaderSize(f, 64<<10))
	if err != nil {
		return bad(err)
	}
	br := bufio.NewReaderSize(zr, 64<<10)
	head, err := br.ReadSlice(0)
	if err != nil || len(head) > maxLooseHeader {
		return bad(errors.New("no object header"))
	}
	name, sz, _ := strings.Cut(string(head[:len(head)-1]), " ")
	typ, ok := objTypes[name]
	size, perr := strconv.ParseUint(sz, 10, 63)
	if !ok || perr != nil || strconv.FormatUint(size, 10) != sz {
		return bad(fmt.Errorf("bad object header %q", head))
	}
	h := k.newHash()
	h.Write(head)
	ad := adler32.New()
	if err := k.entryBegin(typ, size); err != nil {
		return err
	}
	req := ssh.Marshal(&bulk.Request{Type: bulk.SyncPackObj, Payload: ssh.Marshal(&bulk.PackObj{Type: uint32(typ), Size: size})})
	if err := bulk.WriteFrame(w, bulk.FrameRequest, req); err != nil {
		return err
	}
	for left := size; left > 0; {
		n, err := io.ReadFull(br, buf[bulk.HeaderSize:bulk.HeaderSize+int(min(uint64(len(buf)-bulk.HeaderSize), left))])
		if err != nil {
			return bad(err) // the agent's entry is cut short: the push fails
		}
		d := buf[bulk.HeaderSize : bulk.HeaderSize+n]
		h.Write(d)
		ad.Write(d)
		k.entryData(d)
		bulk.PutHeader(buf, bulk.FrameData, n)
		if _, err := w.Write(buf[:bulk.HeaderSize+n]); err != nil {
			return err
		}
		left -= uint64(n)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		return bad(errors.New("longer than its header says"))
	}
	if hex.EncodeToString(h.Sum(nil)) != id {
		_ = k.entryEnd(w, id, false, 0)
		return bad(errors.New("its content does not hash to its name"))
	}
	return k.entryEnd(w, id, true, ad.Sum32())
}

// finish sends the objects no work tree file carried, then the pack's end
// and index.
func (k *packPush) finish(ctx context.Context, w io.Writer, root string, buf []byte) error {
	var rest []string
	for id := range k.missing {
		if !k.done[id] {
			rest = append(rest, id)
		}
	}
	sort.Strings(rest)
	for _, id := range rest {
		if err := ctx.Err(); err != nil {
			return err
		}
		src := filepath.Join(root, filepath.FromSlash(k.missing[id].Rel))
		if err := k.sendObj(w, src, id, buf); err != nil {
			return err
		}
	}
	sum, idx, err := k.sum.Finish()
	if err != nil {
		return err
	}
	end := bulk.PackEnd{Count: uint32(len(k.missing)), Name: hex.EncodeToString(sum), IdxSize: uint64(len(idx))}
	if err := bulk.WriteFrame(w, bulk.FrameRequest, ssh.Marshal(&bulk.Request{Type: bulk.SyncPackEnd, Payload: ssh.Marshal(&end)})); err != nil {
		return err
	}
	for len(idx) > 0 {
		n := min(len(idx), 256<<10)
		if err := bulk.WriteFrame(w, bulk.FrameData, idx[:n]); err != nil {
			return err
		}
		idx = idx[n:]
	}
	return nil
}
