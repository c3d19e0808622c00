package router

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// Redis refuses to number a batch holding a push past its deadline
// (PublishRoomBy): the push is answered "not sent" (its waiter ErrRoomBusy,
// or late "" when its waiter was told "unconfirmed"), the batch's other
// pushes numbered at once, consecutive, and the history has no trace of it.
// A batch numbered before its deadline whose reply was lost is answered its
// offsets by a retry after the deadline: numbered is numbered.
func TestRoomPushPastItsDeadlineNotNumbered(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{})
	c.OpenRoom(1)
	var lates []string
	push := func(mid string) seqItem {
		return seqItem{p: proto.Push{Mid: mid, Room: 1, Biz: proto.BizChat, Data: []byte(`{}`)}}
	}
	waited := push("c1") // its waiter still waits
	done := make(chan error, 1)
	waited.done, waited.state, waited.by = done, new(atomic.Int32), time.Now().Add(-time.Second)
	waited.state.Store(itemTaken)
	waited.late = func(m string) { lates = append(lates, "c1:"+m) }
	doubted := push("c2") // its waiter was told "unconfirmed"
	doubted.state, doubted.by, doubted.doubted = new(atomic.Int32), time.Now().Add(-time.Second), true
	doubted.state.Store(itemTaken)
	doubted.late = func(m string) { lates = append(lates, "c2:"+m) }
	items := []seqItem{push("g1"), waited, push("g2"), doubted}
	no := c.batchNo.Add(1)
	b, err := c.numberDue(1, &items, &no, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if b.first != 1 || len(b.msgs) != 2 || b.msgs[0].Mid != "g1" || b.msgs[1].Mid != "g2" {
		t.Fatalf("batch from %d: %d pushes, want g1 g2 at 1 and 2", b.first, len(b.msgs))
	}
	if err := <-done; !errors.Is(err, ErrRoomBusy) {
		t.Fatalf("the waiter of the push past its deadline: %v, want not sent (ErrRoomBusy)", err)
	}
	if !slices.Equal(lates, []string{"c2:"}) {
		t.Fatalf("late calls %q, want c2's only, not sent", lates)
	}
	if h := historyMids(t, env); len(h) != 2 || h["g1"] == nil || h["g2"] == nil {
		t.Fatalf("history %v, want g1 and g2 only", h)
	}

	// Numbered in time, its reply lost; retried past the deadline.
	in := push("c3")
	in.by = time.Now().Add(200 * time.Millisecond)
	items = []seqItem{in}
	no = c.batchNo.Add(1)
	if b, err := c.numberBy(1, items, no, time.Time{}); err != nil || b.first != 3 {
		t.Fatalf("numbered at %d (%v), want 3", b.first, err)
	}
	time.Sleep(time.Until(in.by.Add(50 * time.Millisecond)))
	if b, err := c.numberDue(1, &items, &no, time.Time{}); err != nil || b.first != 3 || len(items) != 1 {
		t.Fatalf("the retry after the deadline: at %d (%v, %d pushes), want 3 again", b.first, err, len(items))
	}
	if h := historyMids(t, env); len(h["c3"]) != 1 {
		t.Fatalf("c3 in the history at %v, want once", h["c3"])
	}
}

// Through the sequencer, on a Redis slow for the room's counter: a push
// whose every attempt reaches Redis after its deadline is never numbered,
// and its caller, told "unconfirmed", learns it (late ""); one whose first
// attempt reaches Redis in time is numbered, and its caller learns its mid
// (late) once a retry is answered. The room's offsets stay consecutive.
func TestRoomPushWithADeadlineLearnsItsFate(t *testing.T) {
	a, _, px, s, env := twoNodes(t, ClusterConfig{CallTimeout: 200 * time.Millisecond})
	lates := make(chan string, 4)
	late := func(m string) { lates <- m }
	fate := func() string {
		t.Helper()
		select {
		case m := <-lates:
			return m
		case <-time.After(10 * time.Second):
			t.Fatal("no late answer")
			return ""
		}
	}
	chat := proto.Push{Biz: proto.BizChat, Data: []byte(`{}`)}

	px.Slow(seqKey(1), 400*time.Millisecond) // every attempt reaches Redis 400 ms late
	gone, err := a.PublishRoomBy(1, chat, time.Now().Add(300*time.Millisecond), late)
	if !errors.Is(err, ErrUnconfirmed) {
		t.Fatalf("PublishRoomBy: %v, want unconfirmed", err)
	}
	waitFor(t, func() bool { return px.Slowed() >= 2 })
	px.Slow("", 0)
	if m := fate(); m != "" {
		t.Fatalf("late %q, want \"\" (never numbered)", m)
	}
	if h := historyMids(t, env); h[gone] != nil {
		t.Fatalf("the push past its deadline numbered at %v", h[gone])
	}

	px.Slow(seqKey(1), 400*time.Millisecond)
	sent, err := a.PublishRoomBy(1, chat, time.Now().Add(5*time.Second), late)
	if !errors.Is(err, ErrUnconfirmed) {
		t.Fatalf("PublishRoomBy: %v, want unconfirmed", err)
	}
	waitFor(t, func() bool { return s.has(sent) }) // numbered by the first attempt; b fills it
	px.Slow("", 0)
	if m := fate(); m != sent {
		t.Fatalf("late %q, want the mid %q", m, sent)
	}
	next, err := a.PublishRoomWait(1, chat)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return s.has(next) })
	offs, mids := s.got()
	if !slices.Equal(mids, []string{sent, next}) {
		t.Fatalf("member got %v, want %v", mids, []string{sent, next})
	}
	consecutive(t, offs, 1, 2)
}

// The rooms' sequencers are Close's goroutines: Close waits for a batch
// being retried (an attempt in flight), gives it up, and the pushes queued
// behind it, counted; no attempt is made after Close returns. Before, Close
// returned at once and the sequencer went on to the next batch.
func TestNoSequencerAttemptAfterClose(t *testing.T) {
	a, _, px, _, _ := twoNodes(t, ClusterConfig{CallTimeout: 200 * time.Millisecond})
	px.Slow(seqKey(1), 300*time.Millisecond) // every attempt times out
	if _, err := a.PublishRoom(1, proto.Push{Biz: proto.BizGift, Data: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return a.ClusterStats().SequencerErrors > 0 })
	if _, err := a.PublishRoom(1, proto.Push{Biz: proto.BizGift, Data: []byte(`{}`)}); err != nil {
		t.Fatal(err) // queued behind the batch being retried
	}
	n := px.Slowed()
	waitFor(t, func() bool { return px.Slowed() > n }) // a retry in flight
	a.Close()
	tried := px.Slowed()
	if g := a.ClusterStats().PushesGivenUp; g != 2 {
		t.Fatalf("PushesGivenUp %d when Close returned, want 2", g)
	}
	time.Sleep(time.Second) // the old code's next attempt: 200 ms at most
	if k := px.Slowed(); k != tried {
		t.Fatalf("%d attempts after Close returned", k-tried)
	}
	if _, err := a.PublishRoom(1, proto.Push{Biz: proto.BizGift, Data: []byte(`{}`)}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("PublishRoom after Close: %v, want ErrUnavailable", err)
	}
}

// A batch refused for its deadline on a room Redis has no state of (a new
// room, or after a data loss) leaves the new epoch and its counter with
// their TTL: before, the epoch key was set without one and the counter
// deleted — a key kept forever, and a state the tails check skips.
func TestRefusedFirstBatchLeavesKeysThatExpire(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{})
	c.OpenRoom(2)
	late := seqItem{p: proto.Push{Mid: "c1", Room: 2, Biz: proto.BizChat, Data: []byte(`{}`)}}
	late.state, late.by, late.doubted = new(atomic.Int32), time.Now().Add(-time.Second), true
	late.state.Store(itemTaken)
	late.late = func(string) {}
	items := []seqItem{late}
	no := c.batchNo.Add(1)
	if _, err := c.numberDue(2, &items, &no, time.Time{}); err != nil {
		t.Fatal(err)
	}
	rdb := env.redis.Client(t)
	for _, k := range []string{epKey(2), seqKey(2)} {
		ttl, err := rdb.Do(context.Background(), rdb.B().Pttl().Key(k).Build()).AsInt64()
		if err != nil || ttl <= 0 {
			t.Fatalf("%s: PTTL %d (%v), want a TTL (-1 none, -2 gone)", k, ttl, err)
		}
	}
}
