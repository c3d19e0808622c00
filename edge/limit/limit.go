// Package limit is a keyed rate limiter (GCRA, equivalent to a token bucket):
// one int64 per key, an atomic decision under a sharded lock, bounded memory.
// Safe for concurrent use. A nil *Keyed allows everything (limit off).
package limit

import (
	"sync"
	"time"
)

const shards = 32

// Keyed limits events per key to Rate per second with bursts of Burst.
type Keyed struct {
	interval time.Duration // emission interval = 1s / rate
	burst    time.Duration // tolerance = interval × (burst-1)
	now      func() time.Time
	base     time.Time // tats count from here, on the monotonic clock (a wall-clock step back would refuse every recent key for as long)
	maxKeys  int
	shards   [shards]shard
}

type shard struct {
	mu  sync.Mutex
	tat map[uint64]int64 // theoretical arrival time, ns since Keyed.base
}

// New returns a limiter of rate events per interval per key with the given
// burst (≥ 1). rate ≤ 0 returns nil: no limit. now may be nil (time.Now).
func New(rate int, per time.Duration, burst int, now func() time.Time) *Keyed {
	if rate <= 0 || per <= 0 {
		return nil
	}
	if burst < 1 {
		burst = 1
	}
	if now == nil {
		now = time.Now
	}
	iv := per / time.Duration(rate)
	k := &Keyed{interval: iv, burst: iv * time.Duration(burst-1), now: now, base: now(), maxKeys: 1 << 16}
	for i := range k.shards {
		k.shards[i].tat = map[uint64]int64{}
	}
	return k
}

// Allow reports whether one more event for key is allowed now, and records it.
func (k *Keyed) Allow(key uint64) bool {
	ok, _ := k.allow(key)
	return ok
}

// allow is Allow, and the key's theoretical arrival time the event recorded
// (for undo).
func (k *Keyed) allow(key uint64) (bool, int64) {
	if k == nil {
		return true, 0
	}
	now := k.nanos()
	s := &k.shards[key%shards]
	s.mu.Lock()
	defer s.mu.Unlock()
	tat, ok := s.tat[key]
	if !ok || tat < now {
		tat = now
	}
	if tat-now > int64(k.burst) {
		return false, 0
	}
	if !ok && len(s.tat) >= k.maxKeys/shards {
		s.sweep(now)
	}
	s.tat[key] = tat + int64(k.interval)
	return true, tat + int64(k.interval)
}

// nanos is now in ns since k.base: time.Now's monotonic reading when both
// have one (time.Time.Sub), so that a step of the wall clock moves nothing.
func (k *Keyed) nanos() int64 { return int64(k.now().Sub(k.base)) }

// undo gives back the event allow recorded for key as recorded (its
// caller did not go through with it): what is left of it now, at most one
// interval — an event that has already drained gives nothing back, so a
// later event of the key is never undone with it.
func (k *Keyed) undo(key uint64, recorded int64) {
	if k == nil {
		return
	}
	left := min(int64(k.interval), recorded-k.nanos())
	if left <= 0 {
		return
	}
	s := &k.shards[key%shards]
	s.mu.Lock()
	defer s.mu.Unlock()
	if tat, ok := s.tat[key]; ok {
		s.tat[key] = tat - left
	}
}

// sweep drops keys whose bucket is full again (they carry no state).
func (s *shard) sweep(now int64) {
	for key, tat := range s.tat {
		if tat <= now {
			delete(s.tat, key)
		}
	}
}
