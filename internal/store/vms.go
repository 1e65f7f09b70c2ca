package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/bangerdev/banger/api"
)

// VM states (the wire's, see package api).
const (
	StateCreating = api.StateCreating
	StateStopped  = api.StateStopped
	StateStarting = api.StateStarting
	StateRunning  = api.StateRunning
	StateStopping = api.StateStopping
	StateError    = api.StateError
)

// VM is one VM record; it is the wire type, so the record and what bangerd
// reports cannot drift apart. Image and Kernel are names, filled in by joins.
type VM = api.VM

const vmColumns = `v.id, v.name, v.image_id, COALESCE(i.name, ''), v.kernel_id, COALESCE(k.name, ''),
	v.vcpus, v.memory_mib, v.disk_mib, v.state, v.driver, v.ip, v.mac, v.tap, v.workspace,
	v.last_error, v.created_at, v.updated_at, v.workspace_dest, v.expires_at, v.forwards, v.pool != ''`

const vmFrom = ` FROM vms v LEFT JOIN images i ON i.id = v.image_id LEFT JOIN kernels k ON k.id = v.kernel_id`

type scanner interface{ Scan(...any) error }

func scanVM(r scanner) (*VM, error) {
	var v VM
	var created, updated, expires, forwards string
	if err := r.Scan(&v.ID, &v.Name, &v.ImageID, &v.Image, &v.KernelID, &v.Kernel, &v.VCPUs, &v.MemoryMiB,
		&v.DiskMiB, &v.State, &v.Driver, &v.IP, &v.MAC, &v.Tap, &v.Workspace, &v.LastError, &created, &updated, &v.WorkspaceDest,
		&expires, &forwards, &v.Pool); err != nil {
		return nil, err
	}
	v.CreatedAt, v.UpdatedAt = parseTime(created), parseTime(updated)
	if expires != "" {
		t := parseTime(expires)
		v.ExpiresAt = &t
	}
	if forwards != "" {
		if err := json.Unmarshal([]byte(forwards), &v.Forwards); err != nil {
			return nil, fmt.Errorf("vm %s: unreadable published ports: %w", v.ID, err)
		}
	}
	return &v, nil
}

// SetVMExpiry records when bangerd deletes the VM (the zero time: never).
func (s *Store) SetVMExpiry(ctx context.Context, id string, at time.Time) error {
	v := ""
	if !at.IsZero() {
		v = fmtTime(at)
	}
	return s.setVMColumn(ctx, id, "expires_at", v)
}

// SetVMForwards records the VM's published ports (Port is not stored: the
// listening port is runtime state).
func (s *Store) SetVMForwards(ctx context.Context, id string, fws []api.Forward) error {
	v := ""
	if len(fws) > 0 {
		stored := make([]api.Forward, len(fws))
		for i, f := range fws {
			stored[i] = api.Forward{Spec: f.Spec, Host: f.Host, GuestPort: f.GuestPort}
		}
		b, err := json.Marshal(stored)
		if err != nil {
			return err
		}
		v = string(b)
	}
	return s.setVMColumn(ctx, id, "forwards", v)
}

// SetVMPool marks the VM as an unclaimed VM of the ready pool of key ("":
// not a pool VM).
func (s *Store) SetVMPool(ctx context.Context, id, key string) error {
	return s.setVMColumn(ctx, id, "pool", key)
}

// setVMColumn writes one of the columns UpdateVM leaves alone; col is a
// constant of this package, never a caller's string.
func (s *Store) setVMColumn(ctx context.Context, id, col, v string) error {
	res, err := s.db.ExecContext(ctx, `UPDATE vms SET `+col+`=? WHERE id=?`, v, id)
	if err != nil {
		return fmt.Errorf("update vm %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errf(ErrNotFound, "vm %s", id)
	}
	return nil
}

// PoolVMs lists the unclaimed pool VMs with their spec keys (keys[i] is
// vms[i]'s), oldest first.
func (s *Store) PoolVMs(ctx context.Context) (vms []*VM, keys []string, err error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+vmColumns+`, v.pool`+vmFrom+` WHERE v.pool != '' ORDER BY v.created_at, v.name`)
	if err != nil {
		return nil, nil, fmt.Errorf("list pool vms: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var key string
		v, err := scanVM(scanWithTail{rows, &key})
		if err != nil {
			return nil, nil, fmt.Errorf("list pool vms: %w", err)
		}
		vms, keys = append(vms, v), append(keys, key)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("list pool vms: %w", err)
	}
	return vms, keys, nil
}

// scanWithTail scans the VM columns and then the extra destinations.
type scanWithTail struct {
	r    scanner
	tail *string
}

func (s scanWithTail) Scan(dest ...any) error { return s.r.Scan(append(dest, s.tail)...) }

// ClaimPoolVM takes the running pool VM id of key out of the pool and gives
// it name and workspace, in one conditional update: of two claims of the
// same VM only one succeeds (claimed false for the other, and for a VM no
// longer running or in that pool). A taken name is ErrConflict, with
// nothing changed.
func (s *Store) ClaimPoolVM(ctx context.Context, id, key, name, workspace string) (claimed bool, err error) {
	res, err := s.db.ExecContext(ctx, `UPDATE vms SET pool='', name=?, workspace=?, updated_at=?
		WHERE id=? AND pool=? AND pool != '' AND state=?`, name, workspace, fmtTime(time.Now()), id, key, StateRunning)
	if isUniqueErr(err) {
		return false, errf(ErrConflict, "a VM named %q already exists", name)
	}
	if err != nil {
		return false, fmt.Errorf("claim pool vm %s: %w", id, err)
	}
	n, _ := res.RowsAffected()
	return n == 1, nil
}

// CreateVM inserts a new VM record. A taken name gives ErrConflict.
func (s *Store) CreateVM(ctx context.Context, v *VM) error { return s.createVM(ctx, v, "") }

// CreatePoolVM is CreateVM of an unclaimed VM of the ready pool of key: it
// is hidden from vm.list from its first moment.
func (s *Store) CreatePoolVM(ctx context.Context, v *VM, key string) error {
	if key == "" {
		return errf(ErrInvalid, "a pool VM needs its pool's key")
	}
	if err := s.createVM(ctx, v, key); err != nil {
		return err
	}
	v.Pool = true
	return nil
}

func (s *Store) createVM(ctx context.Context, v *VM, pool string) error {
	now := time.Now()
	if v.CreatedAt.IsZero() {
		v.CreatedAt = now
	}
	v.UpdatedAt = now
	_, err := s.db.ExecContext(ctx, `INSERT INTO vms (id, name, image_id, kernel_id, vcpus, memory_mib, disk_mib,
		state, driver, ip, mac, tap, workspace, last_error, created_at, updated_at, pool)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		v.ID, v.Name, v.ImageID, v.KernelID, v.VCPUs, v.MemoryMiB, v.DiskMiB, v.State, v.Driver, v.IP, v.MAC,
		v.Tap, v.Workspace, v.LastError, fmtTime(v.CreatedAt), fmtTime(v.UpdatedAt), pool)
	switch {
	case isUniqueErr(err) && strings.Contains(err.Error(), "vms.name"):
		return errf(ErrConflict, "a VM named %q already exists", v.Name)
	case isUniqueErr(err) && strings.Contains(err.Error(), "vms.ip"):
		return errf(ErrConflict, "address %s is already in use", v.IP)
	case isUniqueErr(err):
		return errf(ErrConflict, "VM id %s already exists", v.ID)
	case isFKErr(err):
		return errf(ErrNotFound, "image or kernel no longer exists")
	case err != nil:
		return fmt.Errorf("insert vm: %w", err)
	}
	return nil
}

// SetWorkspaceDest records where the VM's workspace is in the guest.
func (s *Store) SetWorkspaceDest(ctx context.Context, id, dest string) error {
	res, err := s.db.ExecContext(ctx, `UPDATE vms SET workspace_dest=? WHERE id=?`, dest, id)
	if err != nil {
		return fmt.Errorf("update vm %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errf(ErrNotFound, "vm %s", id)
	}
	return nil
}

// UpdateVM writes every mutable field of v (but not WorkspaceDest) (by id) and bumps updated_at.
func (s *Store) UpdateVM(ctx context.Context, v *VM) error {
	v.UpdatedAt = time.Now()
	res, err := s.db.ExecContext(ctx, `UPDATE vms SET name=?, image_id=?, kernel_id=?, vcpus=?, memory_mib=?, disk_mib=?,
		state=?, driver=?, ip=?, mac=?, tap=?, workspace=?, last_error=?, updated_at=? WHERE id=?`,
		v.Name, v.ImageID, v.KernelID, v.VCPUs, v.MemoryMiB, v.DiskMiB, v.State, v.Driver, v.IP, v.MAC, v.Tap,
		v.Workspace, v.LastError, fmtTime(v.UpdatedAt), v.ID)
	if isUniqueErr(err) {
		return errf(ErrConflict, "%v", err)
	}
	if err != nil {
		return fmt.Errorf("update vm %s: %w", v.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errf(ErrNotFound, "vm %s", v.ID)
	}
	return nil
}

// DeleteVM removes a VM record (no error when already gone).
func (s *Store) DeleteVM(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM vms WHERE id=?`, id)
	if err != nil {
		return fmt.Errorf("delete vm %s: %w", id, err)
	}
	return nil
}

// GetVM returns the VM with exactly this id.
func (s *Store) GetVM(ctx context.Context, id string) (*VM, error) {
	v, err := scanVM(s.db.QueryRowContext(ctx, `SELECT `+vmColumns+vmFrom+` WHERE v.id=?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, errf(ErrNotFound, "vm %q not found", id)
	}
	return v, err
}

// ListVMs returns all VMs, oldest first.
func (s *Store) ListVMs(ctx context.Context) ([]*VM, error) {
	l, err := queryAll(ctx, s.db, scanVM, `SELECT `+vmColumns+vmFrom+` ORDER BY v.created_at, v.name`)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	return l, nil
}

// vmJSONObject builds, in SQL, the object encoding/json makes of a VM (the
// wire's api.VM): same keys and values; the omitempty keys are present with
// their empty values, which decode the same.
const vmJSONObject = `json_object('id', v.id, 'name', v.name, 'image_id', v.image_id, 'image', COALESCE(i.name, ''),
	'kernel_id', v.kernel_id, 'kernel', COALESCE(k.name, ''), 'vcpus', v.vcpus, 'memory_mib', v.memory_mib,
	'disk_mib', v.disk_mib, 'state', v.state, 'driver', v.driver, 'ip', v.ip, 'mac', v.mac, 'tap', v.tap,
	'workspace', v.workspace, 'workspace_dest', v.workspace_dest, 'last_error', v.last_error,
	'pool', json(CASE WHEN v.pool != '' THEN 'true' ELSE 'false' END),
	'created_at', v.created_at, 'updated_at', v.updated_at, 'expires_at', NULLIF(v.expires_at, ''),
	'forwards', json(CASE WHEN v.forwards != '' THEN v.forwards ELSE 'null' END))`

// ListVMsJSON returns what json.Marshal of ListVMs would: the JSON array of
// all VMs, oldest first. Unclaimed pool VMs are left out unless all is set
// (vm ls --all). vm.list serves it as is. It is QueryVMsJSON's answer,
// cached until the database next changes (a 1000-VM query costs ~3-4 ms;
// checking the data version, ~20 µs). The bytes are shared: callers must
// not modify them.
func (s *Store) ListVMsJSON(ctx context.Context, all bool) ([]byte, error) {
	key := "vms"
	if all {
		key = "vms all"
	}
	return s.vmList.get(ctx, s, key, func() ([]byte, error) { return s.QueryVMsJSON(ctx, all) })
}

// QueryVMsJSON is ListVMsJSON read from the database every time: the array
// built by SQLite in one row (scanning 1000 records column by column
// through the driver and encoding them again cost ~8 ms of CPU per call).
func (s *Store) QueryVMsJSON(ctx context.Context, all bool) ([]byte, error) {
	where := ` WHERE v.pool = ''`
	if all {
		where = ``
	}
	var out []byte
	err := s.db.QueryRowContext(ctx, `SELECT json_group_array(`+vmJSONObject+` ORDER BY v.created_at, v.name)`+vmFrom+where).Scan(&out)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	return out, nil
}

// FindVM resolves a user's reference: exact id, then exact name, then an
// unambiguous prefix of an id or a name.
func (s *Store) FindVM(ctx context.Context, ref string) (*VM, error) {
	if strings.TrimSpace(ref) == "" {
		return nil, errf(ErrInvalid, "vm id or name is required")
	}
	if v, err := scanVM(s.db.QueryRowContext(ctx, `SELECT `+vmColumns+vmFrom+` WHERE v.id=?`, ref)); err == nil {
		return v, nil
	} else if !errors.Is(err, sql.ErrNoRows) {
		return nil, err
	}
	if v, err := scanVM(s.db.QueryRowContext(ctx, `SELECT `+vmColumns+vmFrom+` WHERE v.name=?`, ref)); err == nil {
		return v, nil
	} else if !errors.Is(err, sql.ErrNoRows) {
		return nil, err
	}
	pat := escapeLike(ref) + "%"
	rows, err := s.db.QueryContext(ctx, `SELECT `+vmColumns+vmFrom+
		` WHERE v.id LIKE ? ESCAPE '\' OR v.name LIKE ? ESCAPE '\' ORDER BY v.name LIMIT 10`, pat, pat)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var matches []*VM
	for rows.Next() {
		v, err := scanVM(rows)
		if err != nil {
			return nil, err
		}
		// LIKE is case-insensitive for ASCII; prefixes are exact.
		if strings.HasPrefix(v.ID, ref) || strings.HasPrefix(v.Name, ref) {
			matches = append(matches, v)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	switch len(matches) {
	case 0:
		return nil, errf(ErrNotFound, "vm %q not found", ref)
	case 1:
		return matches[0], nil
	default:
		names := make([]string, len(matches))
		for i, m := range matches {
			names[i] = m.Name
		}
		return nil, errf(ErrAmbiguous, "multiple VMs match %q (%s)", ref, strings.Join(names, ", "))
	}
}

func escapeLike(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)
	return r.Replace(s)
}

// UsedIPs returns the addresses assigned to VMs.
func (s *Store) UsedIPs(ctx context.Context) (map[string]bool, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT ip FROM vms WHERE ip != ''`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]bool{}
	for rows.Next() {
		var ip string
		if err := rows.Scan(&ip); err != nil {
			return nil, err
		}
		out[ip] = true
	}
	return out, rows.Err()
}

// LegacyFilesPending lists the ids of the VMs whose directories may still
// hold files of a bangerd before schema 4 (migration 0005): the VMs of a
// database upgraded past version 4 whose files are not imported yet.
func (s *Store) LegacyFilesPending(ctx context.Context) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT vm_id FROM legacy_files_pending ORDER BY vm_id`)
	if err != nil {
		return nil, fmt.Errorf("list vms with legacy files: %w", err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("list vms with legacy files: %w", err)
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// LegacyFilesImported records that the VM's legacy files are imported, so
// that no later start looks for them.
func (s *Store) LegacyFilesImported(ctx context.Context, id string) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM legacy_files_pending WHERE vm_id=?`, id); err != nil {
		return fmt.Errorf("vm %s: record its legacy files imported: %w", id, err)
	}
	return nil
}
