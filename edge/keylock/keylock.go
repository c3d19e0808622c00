// Package keylock is one mutex per key (an order id, an event, a coupon),
// created on demand and dropped when nobody holds or waits for it: its size is
// bounded by the requests in flight, whatever keys clients send, and unlike a
// fixed array of shard mutexes it never makes two unrelated keys wait for
// each other's fsync. The zero value is ready to use; safe for concurrent use.
package keylock

import "sync"

// Map locks keys of type K.
type Map[K comparable] struct {
	mu sync.Mutex
	m  map[K]*entry
}

type entry struct {
	mu   sync.Mutex
	refs int
}

// Lock locks key and returns its unlock.
func (k *Map[K]) Lock(key K) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[K]*entry{}
	}
	e := k.m[key]
	if e == nil {
		e = &entry{}
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

// Len is the number of keys held or waited for (tests: it returns to 0).
func (k *Map[K]) Len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.m)
}
