package bulk

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/crypto/ssh"
)

// OpPack sends a guest directory tree to the host in one stream (Open.Arg
// is the absolute directory): for each entry, parents first, a FrameRequest
// (Type PackDir, PackFile or PackLink, Payload a SyncEntry), a PackFile
// followed by exactly Size bytes in FrameData frames; then FrameEOF. On a
// failure the agent sends a FrameReply (not OK, with the error) instead.
// Other files (devices, sockets, fifos) are skipped. Everything in it is
// hostile to the host, which checks every name, type and size.
const OpPack = "pack"

// Pack entry types.
const (
	PackDir  = "d"
	PackFile = "f"
	PackLink = "l"
)

// ServePack runs the agent's side of OpPack.
func ServePack(w io.Writer, dir string) error {
	err := servePack(w, dir)
	if err != nil {
		_ = WriteFrame(w, FrameReply, ssh.Marshal(&Reply{OK: false, Payload: []byte(err.Error())}))
	}
	return err
}

func servePack(w io.Writer, dir string) error {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir {
		return fmt.Errorf("bad directory %q: want a clean absolute path", dir)
	}
	if fi, err := os.Lstat(dir); err != nil || !fi.IsDir() {
		return fmt.Errorf("%s is not a directory in the guest", dir)
	}
	send := func(kind string, e SyncEntry) error {
		return WriteFrame(w, FrameRequest, ssh.Marshal(&Request{Type: kind, Payload: ssh.Marshal(&e)}))
	}
	buf := make([]byte, 256<<10)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == dir {
			return nil
		}
		rel := filepath.ToSlash(p[len(dir)+1:])
		fi, err := d.Info()
		if err != nil {
			return err
		}
		e := SyncEntry{Rel: rel, Mode: KeptMode(fi.Mode()), MTime: uint64(fi.ModTime().UnixNano())}
		switch {
		case fi.IsDir():
			return send(PackDir, e)
		case fi.Mode()&fs.ModeSymlink != 0:
			if e.Target, err = os.Readlink(p); err != nil {
				return err
			}
			return send(PackLink, e)
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			e.Size = uint64(fi.Size())
			if err := send(PackFile, e); err != nil {
				return err
			}
			left := int64(e.Size)
			for left > 0 {
				n, err := f.Read(buf[:min(int64(len(buf)), left)])
				if n > 0 {
					if werr := WriteFrame(w, FrameData, buf[:n]); werr != nil {
						return werr
					}
					left -= int64(n)
				}
				if errors.Is(err, io.EOF) && left > 0 {
					return fmt.Errorf("%s shrank while it was sent", rel)
				}
				if err != nil && !errors.Is(err, io.EOF) {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return WriteFrame(w, FrameEOF, nil)
}
