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
// size before it collects, and its scavenger keeps everything below that goal:
// after a ramp of connections (or a reconnect storm) the garbage of their
// set-up stays resident while the node then holds them idle for hours, and no
// collection comes, because an idle node allocates next to nothing. Like a
// JVM's periodic collection of an idle heap (G1PeriodicGCInterval), the node
// watches the collector: once no cycle has run for `after` and what a
// collection would give back — the garbage allocated since the last one plus
// the free pages not yet returned — is at least a quarter of the live heap
// (and ≥ 4 MiB), it runs one collection and returns the free pages
// (debug.FreeOSMemory). A node under load collects often and never gets here;
// an idle one does it at most once per `after` and only when there is
// something to return.
type idleRelease struct {
	after    time.Duration
	samples  []rm.Sample
	cycles   uint64    // GC cycles at the last look
	since    time.Time // when cycles last changed
	releases atomic.Int64
}

const idleReleaseMinFree = 4 << 20

func newIdleRelease(after time.Duration) *idleRelease {
	return &idleRelease{after: after, samples: []rm.Sample{
		{Name: "/gc/cycles/total:gc-cycles"},
		{Name: "/memory/classes/heap/free:bytes"},    // free pages, not yet returned
		{Name: "/memory/classes/heap/objects:bytes"}, // live and dead objects not yet swept
		{Name: "/gc/heap/live:bytes"},                // live at the last collection
	}}
}

// idleDue reports whether a heap that has seen no collection for idle, with
// reclaimable bytes (dead objects and free pages) beside live ones, should be
// released after `after`.
func idleDue(idle, after time.Duration, reclaimable, live uint64) bool {
	return idle >= after && reclaimable >= idleReleaseMinFree && reclaimable >= live/4
}

// look samples the collector at now and releases if due; it reports whether
// it did.
func (r *idleRelease) look(now time.Time) bool {
	rm.Read(r.samples)
	cycles := r.samples[0].Value.Uint64()
	if cycles != r.cycles || r.since.IsZero() {
		r.cycles, r.since = cycles, now
		return false
	}
	free, objects, live := r.samples[1].Value.Uint64(), r.samples[2].Value.Uint64(), r.samples[3].Value.Uint64()
	if !idleDue(now.Sub(r.since), r.after, free+objects-min(live, objects), live) {
		return false
	}
	debug.FreeOSMemory() // a collection: the next look sees a new cycle count
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
