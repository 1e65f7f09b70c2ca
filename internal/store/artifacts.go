package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/bangerdev/banger/api"
)

// Image is a registered root filesystem image. It is api.Image plus the
// recorded config, which goes out only through image.config.
type Image struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Digest     string    `json:"digest,omitempty"`
	RootfsPath string    `json:"rootfs_path"`
	SizeBytes  int64     `json:"size_bytes"`
	Source     string    `json:"source,omitempty"`
	ConfigJSON string    `json:"-"`
	CreatedAt  time.Time `json:"created_at"`
}

// Kernel is a registered guest kernel; it is the wire type.
type Kernel = api.Kernel

// CreateImage registers an image; a taken name gives ErrConflict.
func (s *Store) CreateImage(ctx context.Context, im *Image) error {
	if im.CreatedAt.IsZero() {
		im.CreatedAt = time.Now()
	}
	if im.ConfigJSON == "" {
		im.ConfigJSON = "{}"
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO images (id, name, digest, rootfs_path, size_bytes, source, config_json, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?)`, im.ID, im.Name, im.Digest, im.RootfsPath, im.SizeBytes, im.Source, im.ConfigJSON, fmtTime(im.CreatedAt))
	if isUniqueErr(err) {
		return errf(ErrConflict, "an image named %q already exists", im.Name)
	}
	return err
}

const imageCols = `id, name, digest, rootfs_path, size_bytes, source, config_json, created_at`

func scanImage(r scanner) (*Image, error) {
	var im Image
	var created string
	if err := r.Scan(&im.ID, &im.Name, &im.Digest, &im.RootfsPath, &im.SizeBytes, &im.Source, &im.ConfigJSON, &created); err != nil {
		return nil, err
	}
	im.CreatedAt = parseTime(created)
	return &im, nil
}

// ListImages returns images, newest first.
func (s *Store) ListImages(ctx context.Context) ([]*Image, error) {
	return queryAll(ctx, s.db, scanImage, `SELECT `+imageCols+` FROM images ORDER BY created_at DESC, rowid DESC`)
}

// FindImage resolves an image by exact id or name (a name wins over an id).
func (s *Store) FindImage(ctx context.Context, ref string) (*Image, error) {
	im, err := scanImage(s.db.QueryRowContext(ctx, `SELECT `+imageCols+` FROM images WHERE id=? OR name=? ORDER BY name=? DESC LIMIT 1`, ref, ref, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, errf(ErrNotFound, "image %q not found", ref)
	}
	return im, err
}

// DeleteImage removes an image record; ErrConflict while a VM uses it.
func (s *Store) DeleteImage(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM images WHERE id=?`, id)
	if isFKErr(err) {
		return errf(ErrConflict, "image is used by a VM or a snapshot")
	}
	return err
}

// VMsUsingImage lists the names of VMs using an image.
func (s *Store) VMsUsing(ctx context.Context, column, id string) ([]string, error) {
	if column != "image_id" && column != "kernel_id" {
		return nil, fmt.Errorf("bad column %q", column)
	}
	return queryAll(ctx, s.db, scanName, `SELECT name FROM vms WHERE `+column+`=? ORDER BY name`, id)
}

// CreateKernel registers a kernel; a taken name gives ErrConflict.
func (s *Store) CreateKernel(ctx context.Context, k *Kernel) error {
	if k.CreatedAt.IsZero() {
		k.CreatedAt = time.Now()
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO kernels (id, name, version, vmlinux_path, initrd_path, modules_dir, source, size_bytes, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`, k.ID, k.Name, k.Version, k.VmlinuxPath, k.InitrdPath, k.ModulesDir, k.Source, k.SizeBytes, fmtTime(k.CreatedAt))
	if isUniqueErr(err) {
		return errf(ErrConflict, "a kernel named %q already exists", k.Name)
	}
	return err
}

const kernelCols = `id, name, version, vmlinux_path, initrd_path, modules_dir, source, size_bytes, created_at`

func scanKernel(r scanner) (*Kernel, error) {
	var k Kernel
	var created string
	if err := r.Scan(&k.ID, &k.Name, &k.Version, &k.VmlinuxPath, &k.InitrdPath, &k.ModulesDir, &k.Source, &k.SizeBytes, &created); err != nil {
		return nil, err
	}
	k.CreatedAt = parseTime(created)
	return &k, nil
}

// ListKernels returns kernels, newest first.
func (s *Store) ListKernels(ctx context.Context) ([]*Kernel, error) {
	return queryAll(ctx, s.db, scanKernel, `SELECT `+kernelCols+` FROM kernels ORDER BY created_at DESC, rowid DESC`)
}

// FindKernel resolves a kernel by id or name.
func (s *Store) FindKernel(ctx context.Context, ref string) (*Kernel, error) {
	k, err := scanKernel(s.db.QueryRowContext(ctx, `SELECT `+kernelCols+` FROM kernels WHERE id=? OR name=? ORDER BY name=? DESC LIMIT 1`, ref, ref, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, errf(ErrNotFound, "kernel %q not found", ref)
	}
	return k, err
}

// DeleteKernel removes a kernel record; ErrConflict while a VM uses it.
func (s *Store) DeleteKernel(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM kernels WHERE id=?`, id)
	if isFKErr(err) {
		return errf(ErrConflict, "kernel is used by a VM or a snapshot")
	}
	return err
}

// API returns the image as the wire reports it (nil for nil).
func (im *Image) API() *api.Image {
	if im == nil {
		return nil
	}
	return &api.Image{ID: im.ID, Name: im.Name, Digest: im.Digest, RootfsPath: im.RootfsPath, SizeBytes: im.SizeBytes,
		Source: im.Source, CreatedAt: im.CreatedAt}
}
