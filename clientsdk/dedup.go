package clientsdk

import "sync"

// dedup remembers the last window mids: a ring buffer gives the eviction
// order, a map the lookup. Memory is bounded by the window, and grows with
// the mids seen up to it: a client that gets few pushes holds few (a
// process with thousands of clients — a test, a bot fleet — allocated
// 16384 ring slots and a 1024-entry map each, some 300 KiB, and its
// collector had that much more to mark per client).
type dedup struct {
	mu     sync.Mutex
	window int
	ring   []string // grows to window, then wraps at pos
	pos    int
	set    map[string]struct{}
}

func newDedup(window int) *dedup {
	return &dedup{window: window, set: map[string]struct{}{}}
}

// seen reports whether mid is in the window, and adds it if not.
func (d *dedup) seen(mid string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.set[mid]; ok {
		return true
	}
	if len(d.ring) < d.window {
		if len(d.ring) == cap(d.ring) { // doubled, never past the window
			d.ring = append(make([]string, 0, min(max(2*cap(d.ring), 16), d.window)), d.ring...)
		}
		d.ring = append(d.ring, mid)
	} else {
		delete(d.set, d.ring[d.pos])
		d.ring[d.pos] = mid
		d.pos++
		if d.pos == len(d.ring) {
			d.pos = 0
		}
	}
	d.set[mid] = struct{}{}
	return false
}
