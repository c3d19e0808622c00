package limit

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/persist/redistest"
)

// A shared limit counts a key's events on every node: two limiters (two
// nodes, each its own client) on one Redis allow the burst once between
// them, then one per interval; another key has its own; Redis down is an
// error (the caller refuses), never a silent allow.
func TestSharedCountsAcrossNodes(t *testing.T) {
	srv := redistest.Start(t)
	a := NewShared(srv.Client(t), "test", 10, time.Second, 4) // 100 ms apart, bursts of 4
	b := NewShared(srv.Client(t), "test", 10, time.Second, 4)
	allow := func(s *Shared, key uint64) bool {
		t.Helper()
		ok, err := s.Allow(key)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	allowed, start := 0, time.Now()
	for i := range 8 {
		if allow([]*Shared{a, b}[i%2], 1) {
			allowed++
		}
	}
	// The burst of 4, and one more per 100 ms the eight calls took.
	if most := 4 + int(time.Since(start)/(100*time.Millisecond)); allowed < 4 || allowed > most {
		t.Fatalf("%d of 8 events allowed across two nodes, want 4..%d", allowed, most)
	}
	if !allow(b, 2) {
		t.Fatal("another key is limited")
	}
	time.Sleep(250 * time.Millisecond)
	if !allow(a, 1) {
		t.Fatal("refused after two intervals")
	}
	var off *Shared
	if ok, err := off.Allow(1); !ok || err != nil {
		t.Fatal("a nil limiter refused")
	}
	srv.Stop()
	if ok, err := a.Allow(3); ok || err == nil {
		t.Fatalf("Redis down: allowed %v, err %v; want an error", ok, err)
	}
}
