package pay

import "sync"

// keyLock is one mutex per key (an order id, a user id), created on demand
// and dropped when nobody holds or waits for it. Unlike a fixed array of
// shard mutexes it never makes two unrelated orders wait for each other's
// fsync.
type keyLock struct {
	mu sync.Mutex
	m  map[int64]*keyLockEntry
}

type keyLockEntry struct {
	mu   sync.Mutex
	refs int
}

// lock locks key and returns its unlock.
func (k *keyLock) lock(key int64) func() {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[int64]*keyLockEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyLockEntry{}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}
