// Package store is bangerd's state: SQLite through modernc.org/sqlite (no
// cgo), WAL, a busy timeout, foreign keys and embedded versioned migrations.
package store

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	_ "modernc.org/sqlite"
)

//go:embed migrations/*.sql
var migrationFS embed.FS

// Store wraps the database.
type Store struct {
	db *sql.DB
	// ver never writes: PRAGMA data_version on it changes whenever any other
	// connection, of this process or another, commits. It keys the cached
	// answers (vmList).
	ver    *sql.Conn
	vmList listCache
}

// Open opens (creating if needed) the database at path and migrates it.
func Open(ctx context.Context, path string) (*Store, error) {
	// The path goes into a file: URI: '%', '?' and '#' must be escaped, or
	// a home named like "a#b" opens the database "a".
	esc := strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23").Replace(path)
	dsn := "file:" + esc + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	db.SetMaxOpenConns(4)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	s := &Store{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	if s.ver, err = db.Conn(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	return s, nil
}

// Close closes the database.
func (s *Store) Close() error {
	s.ver.Close()
	return s.db.Close()
}

// dataVersion is a number that changes whenever the database may have
// changed since it was last read: SQLite's data_version on a connection
// that never writes, so every commit (by bangerd or any other process)
// counts.
func (s *Store) dataVersion(ctx context.Context) (int64, error) {
	var v int64
	err := s.ver.QueryRowContext(ctx, "PRAGMA data_version").Scan(&v)
	return v, err
}

// listCache holds an answer built from the whole database, with the data
// version it was read at.
type listCache struct {
	mu      sync.Mutex
	entries map[string]listEntry
}

type listEntry struct {
	ver int64
	b   []byte
}

// get returns the cached answer for key if the database has not changed
// since it was built, and otherwise builds it with build and caches it. The
// version is read before build: a commit that lands while build reads makes
// the entry stale at once (rebuilt next time), never the other way round.
// An unreadable version is not cached (build answers alone).
func (c *listCache) get(ctx context.Context, s *Store, key string, build func() ([]byte, error)) ([]byte, error) {
	ver, verr := s.dataVersion(ctx)
	if verr == nil {
		c.mu.Lock()
		e, ok := c.entries[key]
		c.mu.Unlock()
		if ok && e.ver == ver {
			return e.b, nil
		}
	}
	b, err := build()
	if err != nil || verr != nil {
		return b, err
	}
	c.mu.Lock()
	if c.entries == nil {
		c.entries = map[string]listEntry{}
	}
	c.entries[key] = listEntry{ver: ver, b: b}
	c.mu.Unlock()
	return b, nil
}

// SchemaVersion returns the applied migration version.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v)
	return v, err
}

func (s *Store) migrate(ctx context.Context) error {
	entries, err := fs.ReadDir(migrationFS, "migrations")
	if err != nil {
		return err
	}
	type mig struct {
		version int
		name    string
	}
	var migs []mig
	for _, e := range entries {
		n, err := strconv.Atoi(strings.SplitN(e.Name(), "_", 2)[0])
		if err != nil {
			return fmt.Errorf("bad migration file name %s", e.Name())
		}
		migs = append(migs, mig{n, e.Name()})
	}
	sort.Slice(migs, func(i, j int) bool { return migs[i].version < migs[j].version })
	cur, err := s.SchemaVersion(ctx)
	if err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if len(migs) > 0 && cur > migs[len(migs)-1].version {
		return fmt.Errorf("database schema version %d is newer than this bangerd understands (%d); upgrade banger", cur, migs[len(migs)-1].version)
	}
	for _, m := range migs {
		if m.version <= cur {
			continue
		}
		body, err := migrationFS.ReadFile("migrations/" + m.name)
		if err != nil {
			return err
		}
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, string(body)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %s: %w", m.name, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", m.version)); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migration %s: %w", m.name, err)
		}
	}
	return nil
}

// Errors returned by lookups.
var (
	ErrNotFound  = errors.New("not found")
	ErrAmbiguous = errors.New("ambiguous")
	ErrConflict  = errors.New("conflict")
	ErrInvalid   = errors.New("invalid")
)

// Error is a store error of a kind (ErrNotFound, ErrAmbiguous, ErrConflict)
// whose message is meant for users as is.
type Error struct {
	Kind error
	Msg  string
}

func (e *Error) Error() string        { return e.Msg }
func (e *Error) Is(target error) bool { return target == e.Kind }

func errf(kind error, format string, args ...any) error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

const timeFormat = time.RFC3339Nano

func fmtTime(t time.Time) string { return t.UTC().Format(timeFormat) }

func parseTime(s string) time.Time {
	t, _ := time.Parse(timeFormat, s)
	return t
}

func isUniqueErr(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

func isFKErr(err error) bool {
	return err != nil && strings.Contains(err.Error(), "FOREIGN KEY constraint failed")
}

// queryAll runs query and scans every row with scan. The result is never nil
// (an empty list encodes as [], not null).
func queryAll[T any](ctx context.Context, db *sql.DB, scan func(scanner) (T, error), query string, args ...any) ([]T, error) {
	rows, err := db.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []T{}
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// scanName scans a one-column row of a name.
func scanName(r scanner) (string, error) {
	var n string
	err := r.Scan(&n)
	return n, err
}
