package router

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// A reliable push to a user with no session is kept and delivered, once, by
// the user's next session; an unreliable one is not kept; the box is bounded
// per user and expires.
func TestOfflineReliablePushesDeliveredOnConnect(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{OfflineMax: 3, OfflineTTL: time.Minute})
	for i := 0; i < 5; i++ {
		l.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	}
	l.SendUser(7, proto.Push{Biz: proto.BizChat, Data: []byte(`{}`)}) // not reliable: not kept
	s := &sink{id: 1, user: 7}
	l.Register(s)
	if got := s.got(); len(got) != 3 {
		t.Fatalf("delivered on connect: %v, want the 3 newest", got)
	}
	s2 := &sink{id: 2, user: 7}
	l.Register(s2)
	if got := s2.got(); len(got) != 0 {
		t.Fatalf("a second session got them again: %v", got)
	}

	b := newOfflineBox(2, 1, time.Second)
	now := time.Now()
	if !b.put(1, Msg{Mid: "a"}, now) || b.put(2, Msg{Mid: "b"}, now) {
		t.Fatal("user bound not enforced")
	}
	if got := b.take(1, now.Add(2*time.Second)); len(got) != 0 {
		t.Fatalf("expired pushes delivered: %v", got)
	}
}

// The offline box drained into a session that is closing already (it
// refuses them) keeps its pushes: the user's next session gets them. They
// were dropped with the refused frame before.
func TestOfflinePushesRefusedByAClosingSessionAreKept(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute})
	var mids []string
	for i := 0; i < 3; i++ {
		mid, _ := l.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
		mids = append(mids, mid)
	}
	closing := &sink{id: 1, user: 7}
	closing.refuse.Store(true)
	l.Register(closing)
	l.Unregister(closing)
	s := &sink{id: 2, user: 7}
	l.Register(s)
	if got := s.got(); !slices.Equal(got, mids) {
		t.Fatalf("next session got %v, want %v", got, mids)
	}
}

// A push kept while the user's only session was closing (it refused it and
// is still registered) reaches the user's next session even if that one
// registers before the closing one leaves: every session drains the box.
func TestOfflinePushKeptBesideAClosingSessionReachesTheNextOne(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute})
	closing := &sink{id: 1, user: 7}
	l.Register(closing)
	closing.refuse.Store(true)
	mid, n := l.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	if n != 0 {
		t.Fatalf("taken by %d sessions, want 0 (the only one is closing)", n)
	}
	s := &sink{id: 2, user: 7}
	l.Register(s) // not the user's first session: the closing one is still here
	l.Unregister(closing)
	if got := s.got(); !slices.Equal(got, []string{mid}) {
		t.Fatalf("next session got %v, want [%s]", got, mid)
	}
}

// registersOnSend is a closing session (it refuses every push) that
// registers the user's next session while the first push is offered to it:
// the next session registers — and drains the offline box, empty then —
// between the sender's "no session took it" and its keeping the push.
type registersOnSend struct {
	sink
	once sync.Once
	then func()
}

func (s *registersOnSend) Send(*Frame) bool {
	s.once.Do(s.then)
	return false
}

// A reliable push that no session took reaches a session that registered
// meanwhile (it drained the box before the push was kept there): before, it
// waited in the box for the user's next connect, the session connected the
// whole time.
func TestOfflinePushReachesASessionRegisteredWhileItWasKept(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute})
	next := &sink{id: 2, user: 7}
	closing := &registersOnSend{sink: sink{id: 1, user: 7}, then: func() { l.Register(next) }}
	l.Register(closing)
	mid, _ := l.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	if got := next.got(); !slices.Equal(got, []string{mid}) {
		t.Fatalf("the session registered meanwhile got %v, want [%s]", got, mid)
	}
}

// Cluster: the same — this node does not get its own publish on the user's
// subject (NoEcho), so the push stored in the shared list after the new
// session drained it waited there.
func TestClusterOfflinePushReachesASessionRegisteredWhileItWasKept(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	next := &sink{id: 2, user: 7}
	closing := &registersOnSend{sink: sink{id: 1, user: 7}, then: func() { c.Register(next) }}
	c.Register(closing)
	mid, _ := c.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	deadline := time.Now().Add(3 * time.Second)
	for len(next.got()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := next.got(); !slices.Equal(got, []string{mid}) {
		t.Fatalf("the session registered meanwhile got %v, want [%s]", got, mid)
	}
}

// Redis does not answer while the user connects: the offline list's drain
// fails. Before, it was never retried — what was kept for the user waited
// in le:off:{7} until their next connect (lost after offline_ttl if they
// stayed connected); now it is retried in the background.
func TestClusterOfflineDrainRetriedWhenRedisDidNotAnswer(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a",
		ClusterConfig{CallTimeout: 300 * time.Millisecond, Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	m := encodeMsg(&proto.Push{Mid: "kept", Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	if !a.storeOffline(7, m) {
		t.Fatal("not stored")
	}
	// Redis unreachable from a for 1.5 s: every connection cut, new ones
	// refused (the GET runs; its reply is lost).
	px.LoseReply("le:cut", 1500*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_ = a.rdb.Do(ctx, a.rdb.B().Get().Key("le:cut").Build()).Error()
	cancel()
	if px.Fired() != 1 {
		t.Fatal("the proxy did not cut Redis off")
	}
	s := &sink{id: 1, user: 7}
	a.Register(s) // its drain fails
	if got := s.got(); len(got) != 0 {
		t.Fatalf("drained while Redis was unreachable: %v", got)
	}
	deadline := time.Now().Add(6 * time.Second)
	for len(s.got()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.got(); !slices.Equal(got, []string{"kept"}) {
		t.Fatalf("the session got %v, want [kept] once Redis answered again", got)
	}
}

// The drain retried while Redis stays unreachable ends when the user's last
// session here leaves, and at Close.
func TestClusterOfflineDrainRetryEndsWithTheSessionOrAtClose(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a",
		ClusterConfig{CallTimeout: 200 * time.Millisecond, Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	px.Close() // Redis unreachable from a from here on
	retrying := func(user int64) bool {
		a.redrainMu.Lock()
		defer a.redrainMu.Unlock()
		_, on := a.redrains[user]
		return on
	}
	s := &sink{id: 1, user: 7}
	a.Register(s)
	a.Register(&sink{id: 2, user: 7}) // its drain fails too: still one retry
	a.Register(&sink{id: 3, user: 8})
	if !retrying(7) || !retrying(8) {
		t.Fatal("failed drains not retried")
	}
	a.Unregister(s)
	time.Sleep(time.Second)
	if !retrying(7) {
		t.Fatal("the retry ended while a session of the user is still here")
	}
	a.Unregister(&sink{id: 2, user: 7})
	waitFor(t, func() bool { return !retrying(7) })
	done := make(chan struct{})
	go func() { a.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Close waits for the retry")
	}
}
