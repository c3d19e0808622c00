package gateway

import (
	"runtime"
	rm "runtime/metrics"
	"testing"
	"time"
)

func TestIdleDue(t *testing.T) {
	const after = 10 * time.Second
	for _, c := range []struct {
		idle              time.Duration
		reclaimable, live uint64
		want              bool
	}{
		{after, 64 << 20, 32 << 20, true},
		{after - time.Millisecond, 64 << 20, 32 << 20, false}, // not idle long enough
		{after, 3 << 20, 1 << 20, false},                      // under 4 MiB: nothing worth it
		{after, 7 << 20, 32 << 20, false},                     // under a quarter of live
		{after, 8 << 20, 32 << 20, true},
	} {
		if got := idleDue(c.idle, after, c.reclaimable, c.live); got != c.want {
			t.Errorf("idleDue(%v, %d reclaimable, %d live) = %v", c.idle, c.reclaimable, c.live, got)
		}
	}
}

var sink [][]byte

// An idle heap with freed garbage is handed back to the OS once, and only
// after a look that saw no collection for `after`.
func TestIdleReleaseReturnsFreeHeap(t *testing.T) {
	read := func(name string) uint64 {
		s := []rm.Sample{{Name: name}}
		rm.Read(s)
		return s[0].Value.Uint64()
	}
	const after = time.Second
	for try := 0; ; try++ {
		// 64 MiB of garbage, collected: its pages are free but kept.
		for i := 0; i < 64; i++ {
			sink = append(sink, make([]byte, 1<<20))
		}
		sink = nil
		runtime.GC()
		r := newIdleRelease(after)
		t0 := time.Now()
		released := read("/memory/classes/heap/released:bytes")
		if r.look(t0) {
			t.Fatal("released on the first look")
		}
		if r.look(t0.Add(after / 2)) {
			t.Fatal("released before `after`")
		}
		if !r.look(t0.Add(after)) {
			// Another collection ran between the looks (the test
			// process is not idle): try again.
			if try == 5 {
				t.Fatalf("no release in %d tries", try+1)
			}
			continue
		}
		if free := read("/memory/classes/heap/free:bytes"); free >= 8<<20 {
			t.Fatalf("%d bytes of free heap kept after the release", free)
		}
		if got := read("/memory/classes/heap/released:bytes"); got <= released {
			t.Fatalf("released %d bytes, no more than the %d before", got, released)
		}
		if r.releases.Load() != 1 || r.look(t0.Add(2*after)) {
			t.Fatalf("releases %d; a second release right after the first", r.releases.Load())
		}
		// A release that no collection of the runtime's own follows doubles
		// the wait for the next; the runtime's own collection resets it.
		if r.wait != 2*after {
			t.Fatalf("wait after a release %v, want %v", r.wait, 2*after)
		}
		runtime.GC()
		r.look(t0.Add(3 * after))
		if r.wait != after {
			t.Fatalf("wait after the runtime's own collection %v, want %v", r.wait, after)
		}
		return
	}
}
