package clientsdk

import "sync"

// dedup remembers the last len(ring) mids: a ring buffer gives the eviction
// order, a map the lookup. Memory is bounded by the window.
type dedup struct {
	mu   sync.Mutex
	ring []string
	pos  int
	set  map[string]struct{}
}

func newDedup(window int) *dedup {
	return &dedup{ring: make([]string, window), set: make(map[string]struct{}, min(window, 1024))}
}

// seen reports whether mid is in the window, and adds it if not.
func (d *dedup) seen(mid string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.set[mid]; ok {
		return true
	}
	if old := d.ring[d.pos]; old != "" {
		delete(d.set, old)
	}
	d.ring[d.pos] = mid
	d.pos++
	if d.pos == len(d.ring) {
		d.pos = 0
	}
	d.set[mid] = struct{}{}
	return false
}
