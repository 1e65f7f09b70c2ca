package daemon

import (
	"context"
	"database/sql"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/store"
)

// An upgrade keeps what an older bangerd kept in files beside a VM: the
// expiry, published ports and pool marker move into the record at start-up
// and the files go; a link or a garbled file imports nothing and breaks
// nothing.
func TestImportLegacyFiles(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	old := ts.newVM(t, "old", store.StateStopped)
	pool := ts.newVM(t, "pool-x", store.StateStopped)
	odd := ts.newVM(t, "odd", store.StateStopped)
	at := time.Date(2027, 1, 2, 3, 4, 5, 600, time.UTC)
	write := func(vm *store.VM, name, body string) {
		t.Helper()
		dir := ts.vmDir(vm.ID)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(old, legacyExpiryFile, at.Format(time.RFC3339Nano)+"\n")
	write(old, legacyPortsFile, `["127.0.0.1:8080:80","0:22"]`)
	write(pool, legacyPoolFile, "img/k/1/256/256/qemu\n")
	write(odd, legacyExpiryFile, "not a time")
	write(odd, legacyPortsFile, `["99999:1"]`)
	ts.upgradeFromSchema4(t)
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("img/k/1/256/256/qemu\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(ts.vmDir(odd.ID), legacyPoolFile)); err != nil {
		t.Fatal(err)
	}
	vms, err := ts.st.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	opens := ts.countLegacyOpens()
	ts.importLegacyFiles(ctx, vms)
	if *opens != 9 {
		t.Errorf("the import opened %d legacy files, want 3 for each of the 3 VMs", *opens)
	}

	got, _ := ts.st.GetVM(ctx, old.ID)
	if got.ExpiresAt == nil || !got.ExpiresAt.Equal(at) {
		t.Errorf("expiry imported as %v, want %v", got.ExpiresAt, at)
	}
	if len(got.Forwards) != 2 || got.Forwards[0].Spec != "127.0.0.1:8080:80" || got.Forwards[0].GuestPort != 80 || got.Forwards[1].Spec != "127.0.0.1:0:22" {
		t.Errorf("ports imported as %+v", got.Forwards)
	}
	if got, _ := ts.st.GetVM(ctx, pool.ID); !got.Pool {
		t.Error("pool marker not imported")
	}
	if _, keys, _ := ts.st.PoolVMs(ctx); len(keys) != 1 || keys[0] != "img/k/1/256/256/qemu" {
		t.Errorf("pool keys %q", keys)
	}
	if got, _ := ts.st.GetVM(ctx, odd.ID); got.ExpiresAt != nil || len(got.Forwards) != 0 || got.Pool {
		t.Errorf("garbled files or a link imported: %+v", got)
	}
	for _, f := range []string{legacyExpiryFile, legacyPortsFile, legacyPoolFile} {
		for _, vm := range []*store.VM{old, pool} {
			if _, err := os.Lstat(filepath.Join(ts.vmDir(vm.ID), f)); err == nil {
				t.Errorf("%s of %s left after the import", f, vm.Name)
			}
		}
	}
	if _, err := os.Stat(secret); err != nil {
		t.Errorf("the link's target was touched: %v", err)
	}
	// A second start does no legacy work (it opens nothing) and keeps what
	// was imported.
	vms, _ = ts.st.ListVMs(ctx)
	*opens = 0
	ts.importLegacyFiles(ctx, vms)
	if *opens != 0 {
		t.Errorf("a second start opened %d legacy files", *opens)
	}
	if got, _ := ts.st.GetVM(ctx, old.ID); got.ExpiresAt == nil || len(got.Forwards) != 2 {
		t.Errorf("a second import lost state: %+v", got)
	}
}

// A VM made by this bangerd, or any VM of a home that never had an older
// bangerd, costs a start no legacy work: no file is opened for it.
func TestImportLegacyFilesNothingPending(t *testing.T) {
	ts := newTestSvc(t)
	ctx := context.Background()
	for _, n := range []string{"a", "b", "c"} {
		ts.newVM(t, n, store.StateStopped)
	}
	vms, err := ts.st.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	opens := ts.countLegacyOpens()
	ts.importLegacyFiles(ctx, vms)
	if *opens != 0 {
		t.Errorf("a start opened %d legacy files for VMs made at the current schema", *opens)
	}
}

// countLegacyOpens makes the service count the legacy files it opens.
func (ts *testSvc) countLegacyOpens() *int {
	n := new(int)
	ts.openLegacy = func(name string, flag int, perm os.FileMode) (*os.File, error) {
		*n++
		return os.OpenFile(name, flag, perm)
	}
	return n
}

// upgradeFromSchema4 turns the test's database into what a bangerd of
// schema 4 (the last whose VMs may still have legacy files) left, and opens
// it again as this bangerd does, migrating it.
func (ts *testSvc) upgradeFromSchema4(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	ts.st.Close()
	db, err := sql.Open("sqlite", ts.layout.DB())
	if err != nil {
		t.Fatal(err)
	}
	_, err = db.ExecContext(ctx, `DROP TABLE legacy_files_pending; PRAGMA user_version = 4`)
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(ctx, ts.layout.DB())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	ts.st, ts.store = st, st
	ts.arts.st = st
}
