package router

import (
	"bytes"
	"context"
	"runtime"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// A reliable push handed off to user 7's node b that nobody answers, while
// the user reconnects to the sending node a itself: a keeps it in the
// offline list after the user's new session there drained the list (empty
// then), and its drain hint never reaches a's own subscription (NoEcho).
// Before, the push waited in le:off:{7} while the user was connected to a
// (lost after offline_ttl); now a drains the list itself when a session of
// the user registered there since the push found none.
func TestHandoffKeptReachesASessionRegisteredOnTheSender(t *testing.T) {
	for _, tc := range []struct {
		name string
		// b is in the presence but off NATS. old: a subscriber to the
		// user's subject never answers (a node without hand-offs), the
		// hand-off times out; else NATS says "no responders" at once, and
		// a's keeper is held back (a slow Redis write) until the new
		// session has drained the list.
		old bool
	}{{"unanswered", true}, {"no responders", false}} {
		t.Run(tc.name, func(t *testing.T) {
			env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
			px := redistest.StartProxy(t, env.redis.Addr)
			cfg := ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}}
			a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a", cfg)
			b := newCluster(t, env, "b", cfg)
			b.Register(&sink{id: 1, user: 7})
			waitFor(t, func() bool { on, known := a.onlineElsewhere(7); return on && known })
			b.nc.Close() // b holds user 7 (presence) but answers nothing
			if tc.old {
				nc, err := nats.Connect(env.nats.URL)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(nc.Close)
				if _, err := nc.SubscribeSync(userSubject(7)); err != nil {
					t.Fatal(err)
				}
				if err := nc.Flush(); err != nil {
					t.Fatal(err)
				}
			} else {
				// Another push waits to be kept, its Redis write held 1 s:
				// the keeper is busy when "no responders" comes for 7's.
				a.onlineElsewhere(7) // presence read from the cache below, not behind the held write
				px.Slow("le:off:{99}", time.Second)
				a.keepLater(handoff{user: 99, msg: encodeMsg(&proto.Push{Mid: "x", Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})})
				waitFor(t, func() bool { return px.Slowed() > 0 })
			}
			mid, n := a.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
			if n != 0 {
				t.Fatalf("a reached %d sessions of user 7 (none there)", n)
			}
			s := &sink{id: 2, user: 7}
			a.Register(s) // the user reconnects to a: the list is drained, empty
			px.Slow("", 0)
			deadline := time.Now().Add(handoffWait + 4*time.Second)
			for len(s.got()) == 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			time.Sleep(200 * time.Millisecond) // a second copy, if any
			kept, err := a.rdb.Do(context.Background(), a.rdb.B().Llen().Key(offlineKey(7)).Build()).AsInt64()
			if err != nil {
				t.Fatal(err)
			}
			if got := s.got(); !slices.Equal(got, []string{mid}) {
				t.Fatalf("the session on a got %v, want [%s] (the offline list holds %d)", got, mid, kept)
			}
			if kept != 0 {
				t.Fatalf("the offline list still holds %d pushes", kept)
			}
			want := int64(1)
			if !tc.old {
				want = 2 // and 99's
			}
			if k := a.ClusterStats().HandoffsKept; k != want {
				t.Fatalf("hand-offs kept %d, want %d (the test did not take its path)", k, want)
			}
		})
	}
}

// The drain after a NATS reconnect whose flush fails (NATS away again, or
// slower than CallTimeout) gave up on every local user: a push kept for
// them while the node was away waited in their list until their next
// connect (lost after offline_ttl if they stayed). Now each list is
// drained by the background retry.
func TestDrainAfterReconnectRetriedWhenTheFlushFails(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	a := newCluster(t, env, "a", ClusterConfig{CallTimeout: 300 * time.Millisecond,
		Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	s := &sink{id: 1, user: 7}
	a.Register(s)
	keepFor(t, a, 7, "kept") // as a hand-off kept while a was away
	env.nats.Stop()
	a.drainAfterReconnect() // its flush fails
	deadline := time.Now().Add(3 * time.Second)
	for len(s.got()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.got(); !slices.Equal(got, []string{"kept"}) {
		t.Fatalf("the session got %v, want [kept]", got)
	}
}

// The same with 3000 users here, its flush failing twice (a second
// reconnect while NATS stays away): each user's list was left to a retry
// goroutine of its own (redrain), all sending their first drain within
// 250–375 ms — with 100k users, 100k goroutines and drain scripts at once
// against the shared Redis, from every node that lost NATS. Now one task
// drains them 8 at a time: the goroutines stay a few whatever the users,
// and every user's kept push is delivered once NATS is back.
func TestDrainAfterReconnectFailedFlushIsOneTask(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	a := newCluster(t, env, "a", ClusterConfig{CallTimeout: 300 * time.Millisecond,
		Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}},
		nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond))
	const n = 3000
	sinks := make([]*sink, n)
	for i := range sinks {
		sinks[i] = &sink{id: uint64(i + 1), user: int64(1000 + i)}
		a.Register(sinks[i]) // its drain done: the list is empty
	}
	for _, s := range sinks {
		keepFor(t, a, s.user, "kept-"+strconv.FormatInt(s.user, 10))
	}
	g0 := runtime.NumGoroutine()
	var peak atomic.Int64
	done, sampled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			peak.Store(max(peak.Load(), int64(runtime.NumGoroutine())))
			select {
			case <-done:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	env.nats.Stop()
	a.drainAfterReconnect() // its flush fails
	a.drainAfterReconnect() // and again, the first retry still waiting
	stacks := make([]byte, 1<<20)
	for runtime.Stack(stacks, true) == len(stacks) {
		stacks = make([]byte, 2*len(stacks))
	}
	if k := bytes.Count(stacks, []byte(".redrainLoop(")); k > 0 {
		t.Errorf("%d per-user retries for %d users", k, n)
	}
	if k := bytes.Count(stacks, []byte(".drainLaterLoop(")); k > 1 {
		t.Errorf("%d background drains of every user, want 1", k)
	}
	time.Sleep(redrainFirst + redrainFirst/2) // past every old retry's first drain
	env.nats.Restart()
	waitFor(t, a.nc.IsConnected)
	left := func() int {
		k := 0
		for _, s := range sinks {
			if len(s.got()) == 0 {
				k++
			}
		}
		return k
	}
	deadline := time.Now().Add(20 * time.Second)
	for left() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	close(done)
	<-sampled
	if grew := peak.Load() - int64(g0); grew > 50 {
		t.Fatalf("goroutines grew by %d for %d users (from %d)", grew, n, g0)
	}
	for _, s := range sinks {
		if got, want := s.got(), []string{"kept-" + strconv.FormatInt(s.user, 10)}; !slices.Equal(got, want) {
			t.Fatalf("user %d's session got %v, want %v (%d of %d sessions got nothing)", s.user, got, want, left(), n)
		}
	}
}

// User 7's connection to node b drops (b's subscription to the user's
// subject lingers) and the user reconnects to node a while c hands a
// reliable push off to them, still seeing b in the presence: only b gets
// it, finds no session and — a not in the presence yet — keeps it in the
// offline list after a's new session drained it (empty then), and answers.
// b's keep hints the other nodes as a hand-off's sender does, so a drains
// again and the session gets the push. Before, it waited in le:off:{7}
// while the user stayed connected to a (lost after offline_ttl).
func TestHandoffKeptByTheOldHolderReachesTheNewNode(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	cfg := ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}}
	a := newCluster(t, env, "a", cfg)
	b := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "b", cfg)
	c := newCluster(t, env, "c", cfg)
	old := &sink{id: 1, user: 7}
	b.Register(old)
	waitFor(t, func() bool { on, known := c.onlineElsewhere(7); return on && known })
	b.Unregister(old)                           // b's subscription to the user lingers
	px.Slow("le:off:{7}", 300*time.Millisecond) // b's keep of the push is a little slow
	m := encodeMsg(&proto.Push{Mid: "gift-1", Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	c.handOff(7, m, c.regsOf(7), false) // c still sees b holding 7
	waitFor(t, func() bool { return px.Slowed() > 0 })
	s := &sink{id: 2, user: 7}
	a.Register(s) // the user reconnects to a: subscribed, the list drained (empty)
	waitFor(t, func() bool { return len(s.got()) == 1 })
	if got := s.got(); got[0] != "gift-1" {
		t.Fatalf("session on a got %+v, want gift-1", got)
	}
	n, err := a.rdb.Do(context.Background(), a.rdb.B().Llen().Key(offlineKey(7)).Build()).AsInt64()
	if err != nil || n != 0 {
		t.Fatalf("offline list holds %d (%v), want it drained", n, err)
	}
}
