package store

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"github.com/bangerdev/banger/api"
)

// Snapshot is one snapshot record; it is the wire type. Image and Kernel are
// names, filled in by joins.
type Snapshot = api.Snapshot

const snapCols = `s.id, s.name, s.source_vm, s.image_id, COALESCE(i.name, ''), s.kernel_id, COALESCE(k.name, ''),
	s.driver, s.vcpus, s.memory_mib, s.disk_mib, s.state_bytes, s.disk_bytes, s.created_at`

const snapFrom = ` FROM snapshots s LEFT JOIN images i ON i.id = s.image_id LEFT JOIN kernels k ON k.id = s.kernel_id`

func scanSnapshot(r scanner) (*Snapshot, error) {
	var sn Snapshot
	var created string
	if err := r.Scan(&sn.ID, &sn.Name, &sn.SourceVM, &sn.ImageID, &sn.Image, &sn.KernelID, &sn.Kernel,
		&sn.Driver, &sn.VCPUs, &sn.MemoryMiB, &sn.DiskMiB, &sn.StateBytes, &sn.DiskBytes, &created); err != nil {
		return nil, err
	}
	sn.CreatedAt = parseTime(created)
	return &sn, nil
}

// CreateSnapshot records a snapshot. A taken name gives ErrConflict; an
// unknown image or kernel gives ErrInvalid.
func (s *Store) CreateSnapshot(ctx context.Context, sn *Snapshot) error {
	if sn.CreatedAt.IsZero() {
		sn.CreatedAt = time.Now()
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO snapshots (id, name, source_vm, image_id, kernel_id, driver, vcpus,
		memory_mib, disk_mib, state_bytes, disk_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		sn.ID, sn.Name, sn.SourceVM, sn.ImageID, sn.KernelID, sn.Driver, sn.VCPUs, sn.MemoryMiB, sn.DiskMiB,
		sn.StateBytes, sn.DiskBytes, fmtTime(sn.CreatedAt))
	switch {
	case isUniqueErr(err):
		return errf(ErrConflict, "a snapshot named %q already exists", sn.Name)
	case isFKErr(err):
		return errf(ErrInvalid, "snapshot %q: its image or kernel does not exist", sn.Name)
	}
	return err
}

// ListSnapshots returns snapshots, newest first.
func (s *Store) ListSnapshots(ctx context.Context) ([]*Snapshot, error) {
	return queryAll(ctx, s.db, scanSnapshot, `SELECT `+snapCols+snapFrom+` ORDER BY s.created_at DESC, s.rowid DESC`)
}

// FindSnapshot resolves a snapshot by exact id or name.
func (s *Store) FindSnapshot(ctx context.Context, ref string) (*Snapshot, error) {
	sn, err := scanSnapshot(s.db.QueryRowContext(ctx, `SELECT `+snapCols+snapFrom+` WHERE s.id=? OR s.name=? ORDER BY s.name=? DESC LIMIT 1`, ref, ref, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, errf(ErrNotFound, "snapshot %q not found", ref)
	}
	return sn, err
}

// DeleteSnapshot removes a snapshot record.
func (s *Store) DeleteSnapshot(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM snapshots WHERE id=?`, id)
	return err
}

// SnapshotsUsing lists the names of snapshots that depend on an image
// (column image_id) or kernel (kernel_id).
func (s *Store) SnapshotsUsing(ctx context.Context, column, id string) ([]string, error) {
	if column != "image_id" && column != "kernel_id" {
		return nil, errf(ErrInvalid, "bad column %q", column)
	}
	return queryAll(ctx, s.db, scanName, `SELECT name FROM snapshots WHERE `+column+`=? ORDER BY name`, id)
}
