package room

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
)

// sharedService is a room Service in cluster mode on a fresh Redis, and a
// client of that Redis without client-side caching.
func sharedService(t *testing.T) (*Service, rueidis.Client) {
	t.Helper()
	return sharedServiceAt(t, "a", redistest.Start(t).Addr)
}

// sharedServiceAt is node's room Service in cluster mode on the Redis at
// addr (Redis itself, or a fault proxy before it), and its client.
func sharedServiceAt(t *testing.T, node, addr string) (*Service, rueidis.Client) {
	t.Helper()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	s, err := New(st, router.NewLocal(node, router.LocalConfig{}), Config{Shared: &Shared{Client: rdb}})
	if err != nil {
		t.Fatal(err)
	}
	return s, rdb
}

// Redis back from an older snapshot: the room-id counter went back while
// rooms it had handed out are still open in the nodes' replicas. The next
// open must not hand one of those ids out again (two anchors, one room id,
// one subject, one history) — before, only a missing counter was restarted
// above the highest id seen.
func TestRoomIDsNotReusedAfterTheCounterWentBack(t *testing.T) {
	s, rdb := sharedService(t)
	var last Room
	var err error
	for anchor := int64(1); anchor <= 3; anchor++ {
		if last, err = s.Open(anchor, 0); err != nil {
			t.Fatal(err)
		}
	}
	// The counter as older snapshots had it: at the first room, at none.
	for i, back := range []string{"1", "0"} {
		if err := rdb.Do(context.Background(), rdb.B().Set().Key(keySeq).Value(back).Build()).Error(); err != nil {
			t.Fatal(err)
		}
		rm, err := s.Open(int64(10+i), 0)
		if err != nil {
			t.Fatal(err)
		}
		if rm.ID <= last.ID {
			t.Fatalf("counter back at %s: room id %d handed out again (highest seen %d)", back, rm.ID, last.ID)
		}
		last = rm
	}
}

// A closed room's record leaves the hash of every room ever opened for a
// key of its own that expires after ClosedRecordTTL: closed rooms are no
// longer kept in Redis forever. Until then GET answers "closed"; after, the
// room is unknown.
func TestClosedRoomRecordExpires(t *testing.T) {
	s, rdb := sharedService(t)
	rm, err := s.Open(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(1, rm.ID); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if n, err := rdb.Do(ctx, rdb.B().Hlen().Key(keyRecords).Build()).AsInt64(); err != nil || n != 0 {
		t.Fatalf("the records hash holds %d rooms after the close (%v), want 0", n, err)
	}
	ttl, err := rdb.Do(ctx, rdb.B().Pttl().Key(closedKey(rm.ID)).Build()).AsInt64()
	if err != nil || ttl <= 0 || ttl > ClosedRecordTTL.Milliseconds() {
		t.Fatalf("the closed record's TTL: %d ms (%v), want up to %v", ttl, err, ClosedRecordTTL)
	}
	if info, err := s.Get(rm.ID, 2); err != nil || info.Status != StatusClosed {
		t.Fatalf("GET of the closed room: %+v %v", info, err)
	}
	if err := s.Close(1, rm.ID); err == nil {
		t.Fatal("a second close was not refused")
	}
	if err := rdb.Do(ctx, rdb.B().Del().Key(closedKey(rm.ID)).Build()).Error(); err != nil { // expired
		t.Fatal(err)
	}
	if _, err := s.Get(rm.ID, 2); proto.AsError(err).Code != proto.CodeNotFound {
		t.Fatalf("GET after the record expired: %v, want 10004", err)
	}
}

// Redis back from a snapshot older than an open room (the id counter kept,
// the room's records gone): the next Sync puts the room back, so that its
// anchor can close it and cannot open a second one. Before, the room stayed
// open in every replica, unknown to Redis: its close answered 10004.
func TestRoomMissingAfterARollbackIsPutBack(t *testing.T) {
	s, rdb := sharedService(t)
	if _, err := s.Open(1, 0); err != nil { // in the snapshot, with the counter
		t.Fatal(err)
	}
	rm, err := s.Open(2, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	id := strconv.FormatInt(rm.ID, 10)
	for _, cmd := range []rueidis.Completed{ // the snapshot had no room rm
		rdb.B().Hdel().Key(keyOpen).Field(id).Build(),
		rdb.B().Hdel().Key(keyRecords).Field(id).Build(),
		rdb.B().Hdel().Key(keyAnchors).Field("2").Build(),
	} {
		if err := rdb.Do(ctx, cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if again, err := s.Open(2, 0); err != nil || again.ID != rm.ID {
		t.Fatalf("the anchor opening again: %+v %v, want its room %d", again, err, rm.ID)
	}
	if err := s.Close(2, rm.ID); err != nil {
		t.Fatalf("closing the room put back: %v", err)
	}
	if s.IsOpen(rm.ID) {
		t.Fatal("the room is still open")
	}
}

// The same rollback, but the anchor opened a new room before the next Sync:
// the room Redis lost is not put back (its anchor would hold two open rooms,
// and the old one could not be closed: not that anchor's room in Redis) —
// it closes.
func TestRoomMissingAfterARollbackClosesWhenItsAnchorOpenedAnother(t *testing.T) {
	s, rdb := sharedService(t)
	rm, err := s.Open(2, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	id := strconv.FormatInt(rm.ID, 10)
	for _, cmd := range []rueidis.Completed{
		rdb.B().Hdel().Key(keyOpen).Field(id).Build(),
		rdb.B().Hdel().Key(keyRecords).Field(id).Build(),
		rdb.B().Hdel().Key(keyAnchors).Field("2").Build(),
	} {
		if err := rdb.Do(ctx, cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
	again, err := s.Open(2, 0)
	if err != nil || again.ID == rm.ID {
		t.Fatalf("the anchor's new room: %+v %v", again, err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if s.IsOpen(rm.ID) {
		t.Fatalf("room %d, lost by Redis, still open beside its anchor's new room %d", rm.ID, again.ID)
	}
	if !s.IsOpen(again.ID) {
		t.Fatal("the anchor's new room is closed")
	}
	if err := s.Close(2, again.ID); err != nil {
		t.Fatalf("closing the anchor's new room: %v", err)
	}
}

// A room closed a moment ago is not opened again by a stale "opened": a
// Sync that read the open rooms just before the close (here: Redis still
// lists it, as from a snapshot taken before the close) or a late event —
// room ids are never reused. Before, it came back in the list until the
// next Sync (or for good, after a rollback).
func TestClosedRoomNotReopenedByAStaleOpened(t *testing.T) {
	s, rdb := sharedService(t)
	rm, err := s.Open(3, 0)
	if err != nil {
		t.Fatal(err)
	}
	v, err := rdb.Do(context.Background(), rdb.B().Hget().Key(keyOpen).Field(strconv.FormatInt(rm.ID, 10)).Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(3, rm.ID); err != nil {
		t.Fatal(err)
	}
	s.Apply("opened", rm) // a late event
	if err := rdb.Do(context.Background(), rdb.B().Hset().Key(keyOpen).FieldValue().FieldValue(strconv.FormatInt(rm.ID, 10), v).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if open, err := s.EnsureOpen(rm.ID); s.IsOpen(rm.ID) || open || err != nil {
		t.Fatalf("room %d, closed here, open again after a stale opened", rm.ID)
	}
}

// A room opened through another node a moment ago — its "opened" event not
// here yet — has its anchor all the same (asked of Redis): a rain created
// through this node right after the open is not refused 10004. A room
// never opened, or closed, has none.
func TestAnchorOfARoomOpenedThroughAnotherNode(t *testing.T) {
	a, rdb := sharedService(t)
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	b, err := New(st, router.NewLocal("b", router.LocalConfig{}), Config{Shared: &Shared{Client: rdb}})
	if err != nil {
		t.Fatal(err)
	}
	rm, err := a.Open(5, 0)
	if err != nil {
		t.Fatal(err)
	}
	if anchor, ok, err := b.AnchorOf(rm.ID); !ok || anchor != 5 || err != nil {
		t.Fatalf("room %d opened through a, asked of b: anchor %d %v %v, want 5", rm.ID, anchor, ok, err)
	}
	if _, ok, err := b.AnchorOf(rm.ID + 1000); ok || err != nil {
		t.Fatalf("a room never opened: %v %v, want no anchor", ok, err)
	}
	if err := a.Close(5, rm.ID); err != nil {
		t.Fatal(err)
	}
	c, err := New(st, router.NewLocal("c", router.LocalConfig{}), Config{Shared: &Shared{Client: rdb}})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := c.AnchorOf(rm.ID); ok || err != nil {
		t.Fatalf("a closed room: %v %v, want no anchor", ok, err)
	}
}

// Whether a room the replica does not have is open cannot be told while
// Redis does not answer: an error (the caller answers "retry"), not "not
// open" — a join or a rain create was told 10004, which a client takes as
// final. A room in the replica is answered without Redis.
func TestRoomUnreadIsAnErrorNotClosed(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	a, _ := sharedServiceAt(t, "a", rs.Addr)
	b, _ := sharedServiceAt(t, "b", px.Addr)
	known, err := b.Open(6, 0) // in b's replica
	if err != nil {
		t.Fatal(err)
	}
	rm, err := a.Open(5, 0) // not in b's replica (no events between them here)
	if err != nil {
		t.Fatal(err)
	}
	px.Refuse(time.Minute)
	for _, id := range []int64{rm.ID, rm.ID + 1000} {
		if open, err := b.EnsureOpen(id); open || err == nil {
			t.Fatalf("room %d with Redis away: open %v, err %v; want an error", id, open, err)
		}
		if _, ok, err := b.AnchorOf(id); ok || err == nil {
			t.Fatalf("anchor of room %d with Redis away: %v %v; want an error", id, ok, err)
		}
	}
	if anchor, ok, err := b.AnchorOf(known.ID); !ok || anchor != 6 || err != nil {
		t.Fatalf("a room in the replica with Redis away: %d %v %v, want its anchor", anchor, ok, err)
	}
}
