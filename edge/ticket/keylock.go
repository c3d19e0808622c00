package ticket

import "sync"

// keyLock is one mutex per key (an order id, a coupon), created on demand
// and dropped when nobody holds or waits for it: its size is bounded by the
// requests in flight, whatever keys clients send.
type keyLock[K comparable] struct {
	mu sync.Mutex
	m  map[K]*keyLockEntry
}

type keyLockEntry struct {
	mu   sync.Mutex
	refs int
}

// lock locks key and returns its unlock.
func (k *keyLock[K]) lock(key K) func() {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[K]*keyLockEntry{}
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
