package gateway

import (
	"runtime/debug"
	rm "runtime/metrics"
	"sync/atomic"
	"time"
)

// idleRelease hands an idle node's free heap back to the operating system.
//
// With node.gogc 400 the runtime lets the heap grow to five times its live
// size before it collects, and its scavenger keeps freed pages up to about
// that goal resident: after a ramp of connections (or a reconnect storm) the
// garbage of their set-up stays in RSS while the node then holds them idle
// for hours (an idle node allocates too little to reach its next collection;
// the runtime's forced collection every two minutes frees the objects but
// keeps their pages). Like a JVM's periodic collection of an idle heap
// (G1PeriodicGCInterval), the node watches the collector: once no cycle has
// run for `after` and a collection could give back at least a quarter of the
// live heap (and ≥ 4 MiB) — estimated from above as everything allocated
// since the last cycle plus the free pages not yet returned — it runs one
// collection and returns the free pages (debug.FreeOSMemory). A node under
// load collects often and never gets here. Under a light but steady load the
// same condition could come back every period; so each release that no
// collection of the runtime's own follows doubles the wait for the next
// (up to 16 × after), and the runtime's next own collection resets it.
type idleRelease struct {
	after    time.Duration
	wait     time.Duration // after, doubled per release in a row
	samples  []rm.Sample
	cycles   uint64    // GC cycles at the last look
	own      uint64    // the cycle count right after our last release (0: none)
	since    time.Time // when cycles last changed
	releases atomic.Int64
}

const (
	idleReleaseMinFree = 4 << 20
	idleReleaseMaxWait = 16 // × after
)

func newIdleRelease(after time.Duration) *idleRelease {
	return &idleRelease{after: after, wait: after, samples: []rm.Sample{
		{Name: "/gc/cycles/total:gc-cycles"},
		{Name: "/memory/classes/heap/free:bytes"},    // free pages, not yet returned
		{Name: "/memory/classes/heap/objects:bytes"}, // live, dead and new objects not yet swept
		{Name: "/gc/heap/live:bytes"},                // live at the last collection
	}}
}

// idleDue reports whether a heap that has seen no collection for idle, with
// reclaimable bytes (an upper bound: free pages and what was allocated since
// the last collection) beside live ones, should be released after wait.
func idleDue(idle, wait time.Duration, reclaimable, live uint64) bool {
	return idle >= wait && reclaimable >= idleReleaseMinFree && reclaimable >= live/4
}

// look samples the collector at now and releases if due; it reports whether
// it did.
func (r *idleRelease) look(now time.Time) bool {
	rm.Read(r.samples)
	cycles := r.samples[0].Value.Uint64()
	if cycles != r.cycles || r.since.IsZero() {
		if r.own == 0 || cycles != r.own {
			r.wait = r.after // the runtime collected by itself: not a light-load loop
		}
		r.cycles, r.since, r.own = cycles, now, 0
		return false
	}
	free, objects, live := r.samples[1].Value.Uint64(), r.samples[2].Value.Uint64(), r.samples[3].Value.Uint64()
	if !idleDue(now.Sub(r.since), r.wait, free+objects-min(live, objects), live) {
		return false
	}
	debug.FreeOSMemory()
	rm.Read(r.samples[:1])
	r.own = r.samples[0].Value.Uint64() // the next look sees this count as ours
	r.wait = min(2*r.wait, idleReleaseMaxWait*r.after)
	r.releases.Add(1)
	return true
}

// run looks every after/4 until stop is closed.
func (r *idleRelease) run(stop <-chan struct{}) {
	t := time.NewTicker(max(r.after/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			r.look(now)
		}
	}
}
