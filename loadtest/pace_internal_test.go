package loadtest

import (
	"testing"
	"time"
)

// A publisher whose reply came late sends its next chat at once and goes on
// from then: the slots it missed are not sent back to back (a burst a
// node's per-user chat rate refuses after a failover).
func TestPublisherSkipsMissedSlots(t *testing.T) {
	t0 := time.Unix(1000, 0)
	every := 500 * time.Millisecond
	if got := afterNext(t0.Add(every), t0.Add(100*time.Millisecond)); !got.Equal(t0.Add(every)) {
		t.Fatalf("on time: next chat at %v, want its slot %v", got, t0.Add(every))
	}
	// The reply took 6 s: twelve slots passed.
	late := t0.Add(6 * time.Second)
	next := afterNext(t0.Add(every), late)
	if !next.Equal(late) {
		t.Fatalf("late: next chat at %v, want now %v", next, late)
	}
	if after := afterNext(next.Add(every), late); !after.Equal(late.Add(every)) {
		t.Fatalf("the chat after it at %v, want one interval later %v (no catch-up burst)", after, late.Add(every))
	}
}
