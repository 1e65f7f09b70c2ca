package daemon

import (
	"context"
	"encoding/json"
	"path/filepath"

	"github.com/bangerdev/banger/internal/image"
	"github.com/bangerdev/banger/internal/logging"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"

	"github.com/bangerdev/banger/api"
)

// logWriter sends a tool's output lines to the daemon log at debug level.
type logWriter struct {
	d    *Daemon
	ctx  context.Context
	what string
}

func (w logWriter) Write(p []byte) (int, error) {
	w.d.log.DebugContext(w.ctx, w.what, "output", string(p))
	return len(p), nil
}

// buildDebootstrap makes a Debian image with debootstrap from the host's
// mirror and builds it with the same exact ext4 builder as OCI images.
func (d *Daemon) buildDebootstrap(ctx context.Context, p api.ImageOpParams, op *imageOp, id, work string, opts image.BuildOptions) (_ *store.Image, err error) {
	name := p.Name
	if name == "" {
		name = sanitizeName("debian-" + p.Suite)
	}
	if err := validName("image", name); err != nil {
		return nil, rpc.Errorf(rpc.CodeInvalidArgument, "%v (choose one with --name)", err)
	}
	if _, err := d.store.FindImage(ctx, name); err == nil {
		return nil, rpc.Errorf(rpc.CodeConflict, "an image named %q already exists; remove it with `banger image rm %s` or choose another --name", name, name)
	}
	mirror := p.Mirror
	if mirror == "" {
		mirror = image.DefaultMirror("/")
	}
	op.progress(image.Event{Phase: "debootstrap"})
	lop := logging.StartOp(ctx, d.log, "debootstrap", "suite", p.Suite, "mirror", mirror)
	stream, wait, err := image.Debootstrap(ctx, image.DebootstrapOptions{Suite: p.Suite, Mirror: mirror, Packages: p.Packages,
		Work: work, Logger: d.log, Log: logWriter{d, ctx, "debootstrap"}})
	lop.End(err)
	if err != nil {
		return nil, codeErr(rpc.CodeFailedPrecondition, err)
	}
	op.progress(image.Event{Phase: "mkfs"})
	built := filepath.Join(work, "rootfs.ext4")
	_, err = image.FromTar(ctx, stream, filepath.Join(work, "build"), built, opts)
	stream.Close()
	if werr := wait(); err == nil && werr != nil {
		err = werr
	}
	if err != nil {
		return nil, rpc.Errorf(rpc.CodeFailedPrecondition, "build the Debian image's filesystem: %v%s", err, d.imageLimitHint(err))
	}
	cfg, _ := json.Marshal(image.Config{Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}})
	sum, _ := fileDigest(built)
	dir := filepath.Join(d.cfg.Layout.ImagesDir(), id)
	return d.registerBuilt(ctx, op, id, built, dir, filepath.Join(dir, "rootfs.ext4"),
		&store.Image{ID: id, Name: name, Digest: sum, Source: "debootstrap " + p.Suite + " " + mirror, ConfigJSON: string(cfg)}, false)
}
