package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/bangerdev/banger/internal/image"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"

	"github.com/bangerdev/banger/api"
)

type imageOp struct {
	mu     sync.Mutex
	status api.ImageOpStatus
	cancel context.CancelCauseFunc // set for operations begun with *.begin
}

// cancelOp cancels the operation unless it has finished; it reports
// whether it was still running.
func (o *imageOp) cancelOp() bool {
	o.mu.Lock()
	done, cancel := o.status.Done, o.cancel
	o.mu.Unlock()
	if done {
		return false
	}
	if cancel != nil {
		cancel(errCancelled)
	}
	return true
}

func (o *imageOp) snapshot() api.ImageOpStatus {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.status
}

func (o *imageOp) progress(ev image.Event) {
	o.mu.Lock()
	o.status.Phase, o.status.Current, o.status.Total = ev.Phase, ev.Done, ev.Total
	o.mu.Unlock()
}

// imageOps is a Daemon's registry of image operations: those begun with
// *.begin (kept a while after they end, for image.op_status) and the work
// directories of those running, which the sweep of leftovers must skip.
// The zero value is ready to use.
type imageOps struct {
	mu    sync.Mutex
	ops   map[string]*imageOp
	temps map[string]struct{}
}

func (r *imageOps) add(id string, op *imageOp) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ops == nil {
		r.ops = map[string]*imageOp{}
	}
	r.ops[id] = op
}

func (r *imageOps) get(id string) *imageOp {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ops[id]
}

func (r *imageOps) forget(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.ops, id)
}

// cancelRunning cancels every operation that has not finished and returns them.
func (r *imageOps) cancelRunning(cause error) []*imageOp {
	r.mu.Lock()
	defer r.mu.Unlock()
	var running []*imageOp
	for _, op := range r.ops {
		op.mu.Lock()
		if !op.status.Done && op.cancel != nil {
			op.cancel(cause)
			running = append(running, op)
		}
		op.mu.Unlock()
	}
	return running
}

// holdTemp marks dir as the work directory of a running operation until
// release is called.
func (r *imageOps) holdTemp(dir string) (release func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.temps == nil {
		r.temps = map[string]struct{}{}
	}
	r.temps[dir] = struct{}{}
	return func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		delete(r.temps, dir)
	}
}

func (r *imageOps) tempHeld(dir string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.temps[dir]
	return ok
}

func (d *Daemon) registerImageOpsAPI() {
	m := d.mux
	begin := func(kind string) func(ctx context.Context, p api.ImageOpParams) (api.ImageOpStatus, error) {
		return func(ctx context.Context, p api.ImageOpParams) (api.ImageOpStatus, error) {
			return d.beginImageOp(ctx, kind, p)
		}
	}
	opOf := func(p api.ImageOpParams) string { return p.Name + " " + p.Ref + p.Path + p.Suite }
	rpc.Handle(m, api.MethodImagePullBegin, logOp(d.log, api.MethodImagePullBegin, "image", opOf, begin("pull")))
	rpc.Handle(m, api.MethodImageImportBegin, logOp(d.log, api.MethodImageImportBegin, "image", opOf, begin("import")))
	rpc.Handle(m, api.MethodImageBuildBegin, logOp(d.log, api.MethodImageBuildBegin, "image", opOf, begin("build")))
	rpc.Handle(m, api.MethodImageOpStatus, func(ctx context.Context, p api.ImageOpStatusParams) (api.ImageOpStatus, error) {
		op := d.imageOps.get(p.OpID)
		if op == nil {
			return api.ImageOpStatus{}, rpc.Errorf(rpc.CodeNotFound, "no image operation %q", p.OpID)
		}
		return op.snapshot(), nil
	})
	rpc.Handle(m, api.MethodImagePull, logOp(d.log, api.MethodImagePull, "image", opOf, func(ctx context.Context, p api.ImageOpParams) (*api.Image, error) {
		im, err := d.runImageOp(ctx, "pull", p, nil)
		return im.API(), err
	}))
}

func (d *Daemon) beginImageOp(ctx context.Context, kind string, p api.ImageOpParams) (api.ImageOpStatus, error) {
	if err := validateImageOp(kind, &p); err != nil {
		return api.ImageOpStatus{}, err
	}
	opID := rpc.OpID(ctx)
	if opID == "" {
		opID = newID()
	}
	op := &imageOp{status: api.ImageOpStatus{OpID: opID, Kind: kind, Phase: "start"}}
	d.imageOps.add(opID, op)
	bctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	op.cancel = cancel
	go func() {
		defer cancel(nil)
		im, err := d.runImageOp(bctx, kind, p, op)
		op.mu.Lock()
		op.status.Done = true
		op.status.Image = im.API()
		if err != nil {
			op.status.Error = err.Error()
		}
		op.mu.Unlock()
		// Finished operations are kept a while for the CLI to read.
		time.AfterFunc(10*time.Minute, func() { d.imageOps.forget(opID) })
	}()
	return op.snapshot(), nil
}

func validateImageOp(kind string, p *api.ImageOpParams) error {
	switch kind {
	case "pull":
		if p.Ref == "" {
			return rpc.Errorf(rpc.CodeInvalidArgument, "an image reference is required, e.g. debian:bookworm")
		}
	case "import":
		if _, err := hostPath(p.Path); err != nil {
			return err
		}
	case "build":
		if err := image.ValidateSuite(p.Suite); err != nil {
			return codeErr(rpc.CodeInvalidArgument, err)
		}
		for _, pk := range p.Packages {
			if err := image.ValidatePackage(pk); err != nil {
				return codeErr(rpc.CodeInvalidArgument, err)
			}
		}
	}
	if p.HeadroomMiB < 0 || p.HeadroomMiB > 1<<20 {
		return rpc.Errorf(rpc.CodeInvalidArgument, "headroom must be between 0 and 1048576 MiB")
	}
	if p.Name != "" {
		if err := validName("image", p.Name); err != nil {
			return codeErr(rpc.CodeInvalidArgument, err)
		}
	}
	return nil
}

// hostPath checks an absolute path to an existing file or directory.
func hostPath(p string) (string, error) {
	if p == "" {
		return "", rpc.Errorf(rpc.CodeInvalidArgument, "image path is required")
	}
	if !filepath.IsAbs(p) {
		return "", rpc.Errorf(rpc.CodeInvalidArgument, "image path %q must be absolute", p)
	}
	if _, err := os.Stat(p); err != nil {
		return "", rpc.Errorf(rpc.CodeInvalidArgument, "image %s: %v", p, err)
	}
	return p, nil
}

// runImageOp does a pull, import or build to the end: the image's files are
// made in a temporary directory, moved into place, and the database row is
// written last, so an interrupted operation leaves nothing registered.
func (d *Daemon) runImageOp(ctx context.Context, kind string, p api.ImageOpParams, op *imageOp) (added *store.Image, err error) {
	if op == nil {
		op = &imageOp{}
	}
	defer func() {
		if err == nil && added != nil {
			d.events.publish(ctx, api.Event{Type: api.EventImageAdded, Name: added.Name})
		}
	}()
	if err := validateImageOp(kind, &p); err != nil {
		return nil, err
	}
	if kind == "import" {
		k, err := image.Detect(p.Path)
		if err != nil {
			return nil, codeErr(rpc.CodeInvalidArgument, err)
		}
		if k == image.KindExt4 {
			op.progress(image.Event{Phase: "copy"})
			return d.importImage(ctx, api.ImageImportParams{Name: p.Name, Path: p.Path})
		}
	}
	lop := logging.StartOp(ctx, d.log, "image."+kind, "ref", p.Ref, "path", p.Path, "suite", p.Suite)
	defer func() { lop.End(err) }()
	imagesDir := d.cfg.Layout.ImagesDir()
	if err := os.MkdirAll(imagesDir, 0o700); err != nil {
		return nil, err
	}
	d.sweepImageTemps(ctx)
	id := newID()
	work := filepath.Join(imagesDir, ".tmp-"+id)
	if err := os.MkdirAll(work, 0o700); err != nil {
		return nil, err
	}
	defer d.imageOps.holdTemp(work)()
	defer func() {
		if err := removeTree(work); err != nil {
			d.log.WarnContext(ctx, "remove image work directory", "error", err.Error())
		}
	}()
	opts := image.BuildOptions{HeadroomMiB: p.HeadroomMiB, Limits: d.fileCfg.imageLimits()}

	var (
		img    v1.Image
		source string
		name   = p.Name
	)
	switch kind {
	case "pull":
		op.progress(image.Event{Phase: "resolve"})
		ref, insecure := p.Ref, p.Insecure
		var r interface{ Name() string }
		img, r, err = func() (v1.Image, interface{ Name() string }, error) {
			i, rr, err := image.RemoteImage(ctx, ref, insecure)
			return i, rr, err
		}()
		if err != nil {
			return nil, codeErr(rpc.CodeFailedPrecondition, err)
		}
		source = r.Name()
		if name == "" {
			name = imageNameFromRef(p.Ref)
		}
	case "import":
		k, _ := image.Detect(p.Path)
		img, err = image.OpenArchive(p.Path, k, work)
		if err != nil {
			return nil, codeErr(rpc.CodeInvalidArgument, err)
		}
		if st, err := os.Stat(p.Path); err == nil && !st.IsDir() {
			opts.SourceBytes = st.Size()
		}
		source = p.Path
		if name == "" {
			name = sanitizeName(strings.TrimSuffix(filepath.Base(p.Path), filepath.Ext(p.Path)))
		}
	case "build":
		return d.buildDebootstrap(ctx, p, op, id, work, opts)
	}
	if err := validName("image", name); err != nil {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "%v (choose one with --name)", err)
	}
	digest, cfg, err := image.ConfigOf(img)
	if err != nil {
		return nil, codeErr(rpc.CodeInvalidArgument, err)
	}
	cfgJSON, _ := json.Marshal(cfg)
	unlock := d.locks.Lock("image-digest:" + digest)
	defer unlock()
	if existing, err := d.store.FindImage(ctx, name); err == nil {
		if existing.Digest == digest {
			op.mu.Lock()
			op.status.Reused = true
			op.mu.Unlock()
			return existing, nil
		}
		return nil, rpc.Errorf(rpc.CodeConflict, "an image named %q already exists (digest %s); remove it with `banger image rm %s` or choose another --name", name, shortDigest(existing.Digest), name)
	}
	dir := filepath.Join(imagesDir, id)
	dst := filepath.Join(dir, "rootfs.ext4")
	built := filepath.Join(work, "rootfs.ext4")
	reused := false
	// The same image (by config digest) is never unpacked twice: its
	// filesystem is shared by a hard link.
	if all, err := d.store.ListImages(ctx); err == nil {
		for _, o := range all {
			if o.Digest == digest && o.RootfsPath != "" {
				if err := os.Link(o.RootfsPath, built); err == nil {
					reused = true
					break
				}
			}
		}
	}
	var res *image.BuildResult
	if !reused {
		var cache *image.BlobCache
		if kind == "pull" {
			cache = &image.BlobCache{Dir: filepath.Join(d.cfg.Layout.CacheDir(), "blobs")}
		}
		res, err = image.Flatten(ctx, img, cache, work, built, opts, op.progress)
		if err != nil {
			return nil, rpc.Errorf(rpc.CodeFailedPrecondition, "build the image's filesystem: %v%s", err, d.imageLimitHint(err))
		}
		os.RemoveAll(filepath.Join(work, "stage"))
		d.log.InfoContext(ctx, "image filesystem built", "image", name, "inodes", res.Inodes, "content_bytes", res.ContentBytes,
			"mkfs_ms", logging.Ms(res.MkfsTime), "fixup_ms", logging.Ms(res.FixupTime), "fixups", res.FixupCmds)
	}
	return d.registerBuilt(ctx, op, id, built, dir, dst, &store.Image{ID: id, Name: name, Digest: digest, Source: source, ConfigJSON: string(cfgJSON)}, reused)
}

// registerBuilt moves a finished filesystem into place and writes the row.
func (d *Daemon) registerBuilt(ctx context.Context, op *imageOp, id, built, dir, dst string, im *store.Image, reused bool) (_ *store.Image, err error) {
	op.progress(image.Event{Phase: "register"})
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	if !reused {
		os.Chmod(built, 0o400)
	}
	if err := os.Rename(built, dst); err != nil {
		return nil, err
	}
	st, err := os.Stat(dst)
	if err != nil {
		return nil, err
	}
	im.RootfsPath, im.SizeBytes = dst, st.Size()
	if err := d.store.CreateImage(ctx, im); err != nil {
		return nil, storeErr(err)
	}
	op.mu.Lock()
	op.status.Reused = reused
	op.mu.Unlock()
	return im, nil
}

// sweepImageTemps removes work directories of operations that no longer run
// (e.g. bangerd was stopped mid-pull).
func (d *Daemon) sweepImageTemps(ctx context.Context) {
	ents, _ := os.ReadDir(d.cfg.Layout.ImagesDir())
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".tmp-") {
			continue
		}
		if d.tempInUse(e.Name()) {
			continue
		}
		// unmounted first: a debootstrap stopped half-way leaves proc mounted
		if err := removeTree(filepath.Join(d.cfg.Layout.ImagesDir(), e.Name())); err != nil {
			d.log.WarnContext(ctx, "remove a leftover image work directory", "error", err.Error())
		}
	}
}

func (d *Daemon) tempInUse(name string) bool {
	return d.imageOps.tempHeld(filepath.Join(d.cfg.Layout.ImagesDir(), name))
}

// imageLimitHint says where a limit the image hit is configured.
func (d *Daemon) imageLimitHint(err error) string {
	if !errors.Is(err, image.ErrLimit) {
		return ""
	}
	return fmt.Sprintf(" (if you trust this image, raise images.max_unpacked_size or images.max_entries in %s and restart bangerd)", d.cfg.Layout.ConfigFile())
}

func imageNameFromRef(ref string) string {
	r := ref
	if i := strings.LastIndex(r, "@"); i >= 0 {
		r = r[:i]
	}
	if i := strings.LastIndex(r, "/"); i >= 0 {
		r = r[i+1:]
	}
	return sanitizeName(r)
}

func shortDigest(d string) string {
	d = strings.TrimPrefix(d, "sha256:")
	if len(d) > 12 {
		d = d[:12]
	}
	return d
}
