package store

import "sync"

// LockSet is a set of mutexes keyed by VM id: every mutating operation on a
// VM holds that VM's lock (and re-reads the record under it); different VMs
// proceed in parallel. Entries are reference counted and freed when unused.
type LockSet struct {
	mu    sync.Mutex
	locks map[string]*entry
}

type entry struct {
	mu   sync.Mutex
	refs int
}

// Lock locks key and returns the unlock function.
func (l *LockSet) Lock(key string) (unlock func()) {
	l.mu.Lock()
	if l.locks == nil {
		l.locks = map[string]*entry{}
	}
	e := l.locks[key]
	if e == nil {
		e = &entry{}
		l.locks[key] = e
	}
	e.refs++
	l.mu.Unlock()
	e.mu.Lock()
	var once sync.Once
	return func() {
		once.Do(func() {
			e.mu.Unlock()
			l.mu.Lock()
			e.refs--
			if e.refs == 0 {
				delete(l.locks, key)
			}
			l.mu.Unlock()
		})
	}
}

// Len returns how many keys are held or awaited (for tests).
func (l *LockSet) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.locks)
}
