package limit

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
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

// Both: a Redis that does not answer is "retry" and gives the local event
// back (an outage spends none of a user's rate); refusals by either keep
// it; undo gives back exactly one event, and nothing of one that drained.
func TestBothGivesBackTheLocalEventWhenRedisDoesNotAnswer(t *testing.T) {
	srv := redistest.Start(t)
	shared := NewShared(srv.Client(t), "test", 1, time.Hour, 1) // one an hour
	local := New(2, time.Hour, 2, nil)                          // two an hour
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	refused := proto.Errorf(proto.CodeRateLimited, "slow down")
	if perr := Both(local, shared, 1, refused, log); perr != nil {
		t.Fatalf("first: %v", perr)
	}
	if perr := Both(local, shared, 1, refused, log); perr != refused {
		t.Fatalf("second (the shared limit spent): %v, want refused", perr)
	}
	// The local limit is spent now (the refusal across the cluster kept its
	// event): refused without asking Redis.
	if perr := Both(local, shared, 1, refused, log); perr != refused {
		t.Fatalf("third: %v, want refused", perr)
	}
	srv.Stop()
	for i := range 5 { // another user, Redis down: retry, never refused
		if perr := Both(local, shared, 2, refused, log); perr == nil || perr == refused {
			t.Fatalf("Redis down, attempt %d: %v, want a retry", i, perr)
		}
	}
	if !local.Allow(2) || !local.Allow(2) || local.Allow(2) {
		t.Fatal("the attempts during the outage spent user 2's local rate")
	}
	_, rec := local.allow(3)
	local.allow(3)
	local.undo(3, rec)
	if !local.Allow(3) || local.Allow(3) {
		t.Fatal("undo gave back other than one event")
	}
	// An event that drained gives nothing back: a later one is not undone.
	clock := time.Unix(1000, 0)
	fast := New(10, time.Second, 1, func() time.Time { return clock }) // 100 ms apart
	_, old := fast.allow(4)
	clock = clock.Add(time.Second) // drained
	if !fast.Allow(4) {
		t.Fatal("refused after a second")
	}
	fast.undo(4, old)
	if fast.Allow(4) {
		t.Fatal("undoing a drained event gave back a later one")
	}
}

// Take's Spent gives its event back once, however often GiveBack is called;
// a refused or unchecked Take has nothing to give back.
func TestTakeGivesBackItsEventOnce(t *testing.T) {
	local := New(2, time.Hour, 2, nil) // two an hour
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	refused := proto.Errorf(proto.CodeRateLimited, "slow down")
	a, perr := Take(local, nil, 1, refused, log)
	if perr != nil {
		t.Fatal(perr)
	}
	if _, perr := Take(local, nil, 1, refused, log); perr != nil {
		t.Fatal(perr)
	}
	none, perr := Take(local, nil, 1, refused, log)
	if perr != refused {
		t.Fatalf("third: %v, want refused", perr)
	}
	none.GiveBack() // nothing recorded: gives nothing
	a.GiveBack()
	a.GiveBack() // once only
	if !local.Allow(1) || local.Allow(1) {
		t.Fatal("GiveBack did not give back exactly one event")
	}
}
