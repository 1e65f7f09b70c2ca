package qemu

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Guest memory comes in one of three kinds:
//
//   - memShared: a file on a tmpfs (Options.MemoryDirs), mapped shared
//     (memory-backend-file,share=on). A snapshot copies it sparsely next to
//     a small device-state stream (x-ignore-shared leaves the RAM out of
//     the stream). The file is named by the VM id, made 0600 in a 0700
//     directory of the user's, and removed once QEMU has exited.
//   - memSnapshot: a VM restored from a snapshot with a RAM file maps that
//     file privately (share=off: copy-on-write, faulted in lazily, the file
//     is never written). QEMU opens it through /dev/fd/3, the descriptor
//     bangerd opened without following links.
//   - memAnon: anonymous memory (-m alone), when no memory directory is
//     usable. Snapshots of such a VM, and of a memSnapshot VM (its memory is
//     in no file of its own), carry the whole memory in the stream.
type memKind string

const (
	memAnon     memKind = "anonymous"
	memShared   memKind = "tmpfs-file"
	memSnapshot memKind = "snapshot-file"
)

const (
	memFileSuffix = ".ram"
	// snapRAMName is the snapshot's copy of the guest memory file.
	snapRAMName = "qemu.ram"
	// snapMetaName says how a snapshot was saved. A snapshot without it is
	// a version 1 snapshot: the whole memory in the stream.
	snapMetaName = "qemu.meta"
	// snapFormat is the version SaveState writes.
	snapFormat = 2
	// snapshotRAMFD is the descriptor the snapshot's RAM file has in QEMU.
	snapshotRAMFD = 3
	tmpfsMagic    = 0x01021994
)

// guestMemory is how one QEMU gets its guest memory.
type guestMemory struct {
	Kind memKind
	// Path is the memory file: the tmpfs file (memShared) or /dev/fd/3
	// (memSnapshot).
	Path string
	// File is the snapshot's RAM file, passed to QEMU as fd 3 (memSnapshot).
	File *os.File
	// Why is, for memAnon, why no memory directory was used.
	Why string
}

// backendArgs are the -object argument and the -machine suffix for mem.
func (m guestMemory) backendArgs(memMiB int) (object, machine string) {
	share := "on"
	switch m.Kind {
	case memShared:
	case memSnapshot:
		share = "off"
	default:
		return "", ""
	}
	return "memory-backend-file,id=ram,mem-path=" + optValue(m.Path) + ",share=" + share + ",size=" + strconv.Itoa(memMiB) + "M",
		",memory-backend=ram"
}

// snapMeta is qemu.meta.
type snapMeta struct {
	Version int `json:"version"`
	// Memory is "file" (qemu.ram holds the memory, the stream only the
	// devices, saved with x-ignore-shared) or "stream" (all in the stream).
	Memory string `json:"memory"`
}

// statfsFn is unix.Statfs; tests replace it.
var statfsFn = unix.Statfs

// prepareMemDir makes dir (mode 0700) when its parent is a tmpfs, and checks
// it can hold need more bytes besides what the files already in it may still
// grow to. It returns why the directory is unusable.
func prepareMemDir(dir string, need int64) error {
	var st unix.Statfs_t
	if err := statfsFn(filepath.Dir(dir), &st); err != nil {
		return fmt.Errorf("%s: %w", filepath.Dir(dir), err)
	}
	if st.Type != tmpfsMagic {
		return fmt.Errorf("%s is not on a tmpfs", filepath.Dir(dir))
	}
	if err := os.Mkdir(dir, 0o700); err == nil {
		// The umask may have taken bits; 0700 exactly.
		if err := os.Chmod(dir, 0o700); err != nil {
			return err
		}
	} else if !errors.Is(err, fs.ErrExist) {
		return err
	}
	if err := checkPrivateDir(dir); err != nil {
		return err
	}
	if err := statfsFn(dir, &st); err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	if st.Type != tmpfsMagic {
		return fmt.Errorf("%s is not on a tmpfs", dir)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	promised := memPromised(dir)
	if free < need+promised {
		return fmt.Errorf("%s has %d MiB free; a %d MiB guest needs that much besides the %d MiB the running guests may still fill", dir, free>>20, need>>20, promised>>20)
	}
	return nil
}

// checkPrivateDir: dir is a directory (not a link to one), owned by this
// user, mode 0700. In a world-writable parent such as /dev/shm, anyone could
// have made it first.
func checkPrivateDir(dir string) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s belongs to uid %d, not to this user (uid %d)", dir, st.Uid, os.Geteuid())
	}
	if st.Mode&0o777 != 0o700 {
		return fmt.Errorf("%s has mode %o, want 700", dir, st.Mode&0o777)
	}
	return nil
}

// memPromised is how much the memory files in dir may still grow: their
// size less what they already use.
func memPromised(dir string) int64 {
	ents, _ := os.ReadDir(dir)
	var n int64
	for _, e := range ents {
		var st unix.Stat_t
		if unix.Lstat(filepath.Join(dir, e.Name()), &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			continue
		}
		if rest := st.Size - st.Blocks*512; rest > 0 {
			n += rest
		}
	}
	return n
}

// sharedMemory makes the file for a new VM's memory in the first usable
// memory directory, or says why there is none (then the guest gets
// anonymous memory).
func (d *Driver) sharedMemory(vmID string, memMiB int) guestMemory {
	need := int64(memMiB) << 20
	if len(d.opts.MemoryDirs) == 0 {
		return guestMemory{Kind: memAnon, Why: "no memory directory configured"}
	}
	var why []string
	for _, dir := range d.opts.MemoryDirs {
		if err := prepareMemDir(dir, need); err != nil {
			why = append(why, err.Error())
			continue
		}
		path := filepath.Join(dir, vmID+memFileSuffix)
		if err := createMemFile(path, need); err != nil {
			why = append(why, err.Error())
			continue
		}
		return guestMemory{Kind: memShared, Path: path}
	}
	return guestMemory{Kind: memAnon, Why: strings.Join(why, "; ")}
}

// createMemFile makes path (0600, not through a link) of size bytes, all
// holes. A file left there by an earlier VMM of the same VM is replaced: a
// VM has one VMM at a time.
func createMemFile(path string, size int64) error {
	for try := 0; ; try++ {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
		if errors.Is(err, fs.ErrExist) && try == 0 {
			if err := removeMemFile(path); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("create the guest memory file: %w", err)
		}
		err = f.Truncate(size)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
			return fmt.Errorf("size the guest memory file: %w", err)
		}
		return nil
	}
}

// removeMemFile removes a guest memory file if it is a regular file.
func removeMemFile(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file; left alone", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// readSnapMeta reads dir/qemu.meta; a snapshot without one is version 1
// (the whole memory in the stream).
func readSnapMeta(dir string) (snapMeta, error) {
	f, err := os.OpenFile(filepath.Join(dir, snapMetaName), os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return snapMeta{Version: 1, Memory: "stream"}, nil
	}
	if err != nil {
		return snapMeta{}, fmt.Errorf("read %s: %w", snapMetaName, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4<<10))
	if err != nil {
		return snapMeta{}, fmt.Errorf("read %s: %w", snapMetaName, err)
	}
	var m snapMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return snapMeta{}, fmt.Errorf("%s is damaged: %w", snapMetaName, err)
	}
	switch {
	case m.Version > snapFormat:
		return snapMeta{}, fmt.Errorf("the snapshot has format %d, this banger reads up to %d; hint: upgrade banger, or take the snapshot again", m.Version, snapFormat)
	case m.Version < 2 || (m.Memory != "file" && m.Memory != "stream"):
		return snapMeta{}, fmt.Errorf("%s is damaged: version %d, memory %q", snapMetaName, m.Version, m.Memory)
	}
	return m, nil
}

// writeSnapMeta writes dir/qemu.meta.
func writeSnapMeta(dir string, m snapMeta) error {
	b, _ := json.Marshal(m)
	f, err := os.OpenFile(filepath.Join(dir, snapMetaName), os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// openSnapshotRAM opens dir/qemu.ram for a private mapping: a regular file
// (not a link) of exactly the guest's memory size.
func openSnapshotRAM(dir string, memMiB int) (*os.File, error) {
	path := filepath.Join(dir, snapRAMName)
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("open the snapshot's memory: %w", err)
	}
	fi, err := f.Stat()
	switch {
	case err != nil:
	case !fi.Mode().IsRegular():
		err = fmt.Errorf("%s is not a regular file", path)
	case fi.Size() != int64(memMiB)<<20:
		err = fmt.Errorf("%s is %d bytes, the guest has %d MiB of memory", path, fi.Size(), memMiB)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open the snapshot's memory: %w", err)
	}
	return f, nil
}
