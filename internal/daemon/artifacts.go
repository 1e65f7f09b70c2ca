package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"

	"github.com/bangerdev/banger/internal/kernel"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"

	"github.com/bangerdev/banger/api"
)

func (d *Daemon) registerArtifactAPI() {
	m := d.mux
	nameOf := func(p api.NameRef) string { return p.Name }
	rpc.Handle(m, api.MethodKernelImport, logOp(d.log, api.MethodKernelImport, "kernel", func(p api.KernelImportParams) string { return p.Name },
		func(ctx context.Context, p api.KernelImportParams) (*store.Kernel, error) {
			k, err := d.importKernel(ctx, p)
			if err == nil && k != nil {
				d.events.publish(ctx, api.Event{Type: api.EventKernelAdded, Name: k.Name})
			}
			return k, err
		}))
	rpc.Handle(m, api.MethodKernelList, func(ctx context.Context, _ struct{}) ([]*store.Kernel, error) {
		ks, err := d.store.ListKernels(ctx)
		return ks, storeErr(err)
	})
	rpc.Handle(m, api.MethodKernelDelete, logOp(d.log, api.MethodKernelDelete, "kernel", nameOf, func(ctx context.Context, p api.NameRef) (*api.DeleteResult, error) {
		k, err := d.store.FindKernel(ctx, p.Name)
		if err != nil {
			return nil, storeErr(err)
		}
		if users, _ := d.store.VMsUsing(ctx, "kernel_id", k.ID); len(users) > 0 {
			return nil, rpc.Errorf(rpc.CodeConflict, "kernel %q is used by %s; delete those VMs first", k.Name, strings.Join(users, ", "))
		}
		d.vms.dropBases(ctx, func(sn *store.Snapshot) bool { return sn.KernelID == k.ID })
		if snaps, _ := d.store.SnapshotsUsing(ctx, "kernel_id", k.ID); len(snaps) > 0 {
			return nil, rpc.Errorf(rpc.CodeConflict, "kernel %q is used by snapshot %s; delete those snapshots first (banger snapshot rm)", k.Name, strings.Join(snaps, ", "))
		}
		if err := d.store.DeleteKernel(ctx, k.ID); err != nil {
			return nil, storeErr(err)
		}
		os.RemoveAll(filepath.Join(d.cfg.Layout.KernelsDir(), k.ID))
		return &api.DeleteResult{Deleted: k.Name}, nil
	}))
	rpc.Handle(m, api.MethodImageImport, logOp(d.log, api.MethodImageImport, "image", func(p api.ImageImportParams) string { return p.Name + " " + p.Path },
		func(ctx context.Context, p api.ImageImportParams) (*api.Image, error) {
			im, err := d.runImageOp(ctx, "import", api.ImageOpParams{Name: p.Name, Path: p.Path, HeadroomMiB: p.HeadroomMiB}, nil)
			return im.API(), err
		}))
	d.registerImageOpsAPI()
	rpc.Handle(m, api.MethodImageConfig, func(ctx context.Context, p api.NameRef) (api.ImageConfig, error) {
		var ic api.ImageConfig
		im, err := d.store.FindImage(ctx, p.Name)
		if err != nil {
			return ic, storeErr(err)
		}
		if im.ConfigJSON != "" {
			if err := json.Unmarshal([]byte(im.ConfigJSON), &ic); err != nil {
				return ic, fmt.Errorf("image %s has a malformed config: %w", im.Name, err)
			}
		}
		return ic, nil
	})
	rpc.Handle(m, api.MethodImageList, func(ctx context.Context, _ struct{}) ([]*api.Image, error) {
		ims, err := d.store.ListImages(ctx)
		if err != nil {
			return nil, storeErr(err)
		}
		out := make([]*api.Image, len(ims))
		for i, im := range ims {
			out[i] = im.API()
		}
		return out, nil
	})
	rpc.Handle(m, api.MethodImageDelete, logOp(d.log, api.MethodImageDelete, "image", nameOf, func(ctx context.Context, p api.NameRef) (*api.DeleteResult, error) {
		im, err := d.store.FindImage(ctx, p.Name)
		if err != nil {
			return nil, storeErr(err)
		}
		if users, _ := d.store.VMsUsing(ctx, "image_id", im.ID); len(users) > 0 {
			return nil, rpc.Errorf(rpc.CodeConflict, "image %q is used by %s; delete those VMs first", im.Name, strings.Join(users, ", "))
		}
		d.vms.dropBases(ctx, func(sn *store.Snapshot) bool { return sn.ImageID == im.ID })
		if snaps, _ := d.store.SnapshotsUsing(ctx, "image_id", im.ID); len(snaps) > 0 {
			return nil, rpc.Errorf(rpc.CodeConflict, "image %q is used by snapshot %s; delete those snapshots first (banger snapshot rm)", im.Name, strings.Join(snaps, ", "))
		}
		if err := d.store.DeleteImage(ctx, im.ID); err != nil {
			return nil, storeErr(err)
		}
		os.RemoveAll(filepath.Join(d.cfg.Layout.ImagesDir(), im.ID))
		return &api.DeleteResult{Deleted: im.Name}, nil
	}))
}

func hostFile(p, what string) (string, error) {
	if p == "" {
		return "", rpc.Errorf(rpc.CodeInvalidArgument, "%s path is required", what)
	}
	if !filepath.IsAbs(p) {
		return "", rpc.Errorf(rpc.CodeInvalidArgument, "%s path %q must be absolute", what, p)
	}
	st, err := os.Stat(p)
	if err != nil {
		return "", rpc.Errorf(rpc.CodeInvalidArgument, "%s %s: %v", what, p, err)
	}
	if !st.Mode().IsRegular() {
		return "", rpc.Errorf(rpc.CodeInvalidArgument, "%s %s is not a regular file", what, p)
	}
	return p, nil
}

func (d *Daemon) importKernel(ctx context.Context, p api.KernelImportParams) (_ *store.Kernel, err error) {
	n := 0
	for _, s := range []string{p.Path, p.Deb, p.Package} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "give exactly one of a kernel file, --deb FILE or --package NAME")
	}
	op := logging.StartOp(ctx, d.log, "kernel.import")
	defer func() { op.End(err) }()
	// The import holds the decompressed kernel in memory: give it back to
	// the system now rather than when the scavenger gets to it (bangerd sat
	// at ~180 MiB RSS for minutes after an import).
	defer debug.FreeOSMemory()
	id := newID()
	dir := filepath.Join(d.cfg.Layout.KernelsDir(), id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	k := &store.Kernel{ID: id, Name: p.Name}
	switch {
	case p.Path != "":
		src, err := hostFile(p.Path, "kernel")
		if err != nil {
			return nil, err
		}
		k.VmlinuxPath = filepath.Join(dir, "vmlinux")
		if _, err := kernel.ExtractVmlinuxFile(ctx, src, k.VmlinuxPath); err != nil {
			return nil, rpc.Errorf(rpc.CodeInvalidArgument, "%s is not a usable x86-64 kernel: %v", src, err)
		}
		k.Source = src
		if p.Initrd != "" {
			ir, err := hostFile(p.Initrd, "initrd")
			if err != nil {
				return nil, err
			}
			k.InitrdPath = filepath.Join(dir, "initrd.user")
			if err := copyFile(ir, k.InitrdPath); err != nil {
				return nil, err
			}
		}
		if k.Name == "" {
			k.Name = sanitizeName(filepath.Base(src))
		}
	default:
		deb := p.Deb
		if p.Package != "" {
			if err := kernel.ValidatePackageName(p.Package); err != nil {
				return nil, codeErr(rpc.CodeInvalidArgument, err)
			}
			// A meta package (linux-image-cloud-amd64) names the current kernel.
			if rest := strings.TrimPrefix(p.Package, "linux-image-"); rest != "" && (rest[0] < '0' || rest[0] > '9') {
				name, err := kernel.ResolveKernelPackage(ctx, p.Package)
				if err != nil {
					return nil, codeErr(rpc.CodeFailedPrecondition, err)
				}
				p.Package = name
			}
			cache := filepath.Join(d.cfg.Layout.CacheDir(), "debs")
			os.MkdirAll(cache, 0o700)
			err := op.Step("download "+p.Package, func() (err error) {
				deb, err = kernel.FetchPackage(ctx, p.Package, cache)
				return err
			})
			if err != nil {
				return nil, rpc.Errorf(rpc.CodeFailedPrecondition, "download %s: %v", p.Package, err)
			}
		} else if _, err := hostFile(deb, "package"); err != nil {
			return nil, err
		}
		var kk *kernel.Kernel
		if err := op.Step("import package", func() (err error) {
			kk, err = kernel.ImportDeb(ctx, deb, dir, kernel.ImportOptions{Logger: d.log})
			return err
		}); err != nil {
			return nil, rpc.Errorf(rpc.CodeInvalidArgument, "import %s: %v", deb, err)
		}
		k.Version, k.VmlinuxPath, k.ModulesDir, k.Source = kk.Version, kk.VmlinuxPath, kk.ModulesDir, deb
		if k.Name == "" {
			k.Name = sanitizeName(kk.Version)
		}
	}
	if err := validName("kernel", k.Name); err != nil {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "%v (choose one with --name)", err)
	}
	k.SizeBytes = dirSize(dir)
	if err := d.store.CreateKernel(ctx, k); err != nil {
		return nil, storeErr(err)
	}
	return k, nil
}

func (d *Daemon) importImage(ctx context.Context, p api.ImageImportParams) (_ *store.Image, err error) {
	src, err := hostFile(p.Path, "image")
	if err != nil {
		return nil, err
	}
	if err := checkExt4(src); err != nil {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "%s: %v", src, err)
	}
	name := p.Name
	if name == "" {
		name = sanitizeName(strings.TrimSuffix(filepath.Base(src), filepath.Ext(src)))
	}
	if err := validName("image", name); err != nil {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "%v (choose one with --name)", err)
	}
	op := logging.StartOp(ctx, d.log, "image.import", "image", name)
	defer func() { op.End(err) }()
	id := newID()
	dir := filepath.Join(d.cfg.Layout.ImagesDir(), id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	dst := filepath.Join(dir, "rootfs.ext4")
	if err := copyFile(src, dst); err != nil {
		return nil, err
	}
	// The shared image is never written: VMs get it read-only.
	os.Chmod(dst, 0o400)
	sum, _ := fileDigest(dst)
	st, _ := os.Stat(dst)
	im := &store.Image{ID: id, Name: name, RootfsPath: dst, SizeBytes: st.Size(), Source: src, Digest: sum}
	if err := d.store.CreateImage(ctx, im); err != nil {
		return nil, storeErr(err)
	}
	return im, nil
}

// checkExt4 verifies the ext2/3/4 superblock magic.
func checkExt4(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	b := make([]byte, 2)
	if _, err := f.ReadAt(b, 1024+0x38); err != nil {
		return fmt.Errorf("too small to be an ext4 filesystem")
	}
	if b[0] != 0x53 || b[1] != 0xEF {
		return errors.New("not an ext4 filesystem image (no ext superblock); build one with mkfs.ext4 -d DIR FILE")
	}
	return nil
}

// copyFile copies src to dst keeping holes: all-zero blocks are skipped, so a
// sparse filesystem image stays sparse.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	var size int64
	for {
		n, rerr := io.ReadFull(in, buf)
		if n > 0 {
			if isZero(buf[:n]) {
				if _, err := out.Seek(int64(n), io.SeekCurrent); err != nil {
					out.Close()
					return err
				}
			} else if _, err := out.Write(buf[:n]); err != nil {
				out.Close()
				return fmt.Errorf("copy %s: %w", src, err)
			}
			size += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			out.Close()
			return fmt.Errorf("copy %s: %w", src, rerr)
		}
	}
	if err := out.Truncate(size); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func fileDigest(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

func dirSize(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() {
			n += info.Size()
		}
		return nil
	})
	return n
}

func sanitizeName(s string) string {
	s = strings.ToLower(s)
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	out := strings.Trim(b.String(), "-")
	if len(out) > 63 {
		out = strings.Trim(out[:63], "-")
	}
	return out
}

// agentPath finds the banger-agent binary: $BANGER_AGENT, next to bangerd, or PATH.
func agentPath() (string, error) {
	if p := os.Getenv("BANGER_AGENT"); p != "" {
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "banger-agent")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	p, err := exec.LookPath("banger-agent")
	if err != nil {
		return "", rpc.Errorf(rpc.CodeFailedPrecondition, "banger-agent not found next to bangerd or on PATH; install it with the other banger binaries")
	}
	return p, nil
}

// agentDigests remembers the last agent binary checked and hashed, by its
// identity (device, inode, size, modification and change times): hashing
// the ~6 MB agent took ~15 ms of CPU on every create. A replaced or
// rewritten binary has a new identity and is checked and hashed again.
var agentDigests agentDigestCache

type agentDigestCache struct {
	mu  sync.Mutex
	key agentFileKey
	sum string
}

type agentFileKey struct {
	path                   string
	dev, ino               uint64
	size, mtimeNs, ctimeNs int64
}

func agentKey(p string) (agentFileKey, error) {
	st, err := os.Stat(p)
	if err != nil {
		return agentFileKey{}, fmt.Errorf("read banger-agent: %w", err)
	}
	k := agentFileKey{path: p, size: st.Size(), mtimeNs: st.ModTime().UnixNano()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		k.dev, k.ino, k.ctimeNs = uint64(sys.Dev), sys.Ino, sys.Ctim.Nano()
	}
	return k, nil
}

// digest checks that the agent at p is statically linked and returns its
// digest, from the cache when p is unchanged.
func (c *agentDigestCache) digest(p string) (string, error) {
	key, err := agentKey(p)
	if err != nil {
		return "", err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sum != "" && c.key == key {
		return c.sum, nil
	}
	if err := kernel.CheckStaticAgent(p); err != nil {
		return "", codeErr(rpc.CodeFailedPrecondition, err)
	}
	sum, err := fileDigest(p)
	if err != nil {
		return "", fmt.Errorf("read banger-agent: %w", err)
	}
	// Changed while it was read: do not remember a digest of a mix.
	if after, err := agentKey(p); err == nil && after == key {
		c.key, c.sum = key, sum
	}
	return sum, nil
}

// initrdFor returns an initrd for k that carries the current agent, building
// it on first use (keyed by the agent's digest, so an upgraded agent gets a
// new initrd).
func (d *Daemon) initrdFor(ctx context.Context, k *store.Kernel) (string, error) {
	agent, err := agentPath()
	if err != nil {
		return "", err
	}
	sum, err := agentDigests.digest(agent)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(d.cfg.Layout.KernelsDir(), k.ID)
	out := filepath.Join(dir, "initrd-"+strings.TrimPrefix(sum, "sha256:")[:16]+".img")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	unlock := d.locks.Lock("initrd:" + k.ID)
	defer unlock()
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	kk := &kernel.Kernel{Version: k.Version, VmlinuxPath: k.VmlinuxPath, ModulesDir: k.ModulesDir}
	opts := kernel.InitrdOptions{Kernel: kk, AgentPath: agent}
	if k.ModulesDir == "" {
		opts.Modules = []string{}
	}
	tmp := out + ".tmp"
	if err := kernel.WriteInitrd(ctx, tmp, opts); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("build initrd for kernel %s: %w", k.Name, err)
	}
	if k.InitrdPath != "" {
		// The user's initrd first, banger's appended: the kernel unpacks both
		// and banger's /init wins.
		if err := concatFiles(tmp+".cat", k.InitrdPath, tmp); err != nil {
			os.Remove(tmp)
			return "", err
		}
		os.Rename(tmp+".cat", tmp)
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", err
	}
	return out, nil
}

func concatFiles(dst string, srcs ...string) error {
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	for _, s := range srcs {
		in, err := os.Open(s)
		if err != nil {
			out.Close()
			return err
		}
		_, err = io.Copy(out, in)
		in.Close()
		if err != nil {
			out.Close()
			return err
		}
		// cpio archives concatenated must be 4-byte aligned
		if st, _ := out.Stat(); st != nil && st.Size()%4 != 0 {
			out.Write(make([]byte, 4-st.Size()%4))
		}
	}
	return out.Close()
}
