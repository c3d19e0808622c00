package router

import (
	"bytes"
	"context"
	"net"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

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

// keepFor stores reliable pushes mids for user in the shared offline list.
func keepFor(t *testing.T, c *Cluster, user int64, mids ...string) {
	t.Helper()
	for _, mid := range mids {
		if !c.storeOffline(user, encodeMsg(&proto.Push{Mid: mid, Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})) {
			t.Fatal("not stored")
		}
	}
}

// offlineKeys lists what Redis keeps of user's offline pushes (the list and
// any key beside it).
func offlineKeys(t *testing.T, env clusterEnv, user int64) []string {
	t.Helper()
	rdb := env.redis.Client(t)
	keys, err := rdb.Do(context.Background(), rdb.B().Keys().Pattern(offlineKey(user)+"*").Build()).AsStrSlice()
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// A drain whose reply is lost after Redis ran it (the connection cut right
// after, Redis unreachable a moment) had taken the pushes off the list:
// they were never delivered. Now they are leased to that drain, and the
// retry takes them back once the lease ran out: delivered, in order, once,
// and nothing is left in Redis after.
func TestClusterOfflineDrainWhoseReplyWasLostDeliversLater(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a",
		ClusterConfig{CallTimeout: 300 * time.Millisecond, Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	// Another user's session first: the drain script is loaded (the reply
	// lost below is the script's, not a NOSCRIPT's).
	a.Register(&sink{id: 9, user: 8})
	keepFor(t, a, 7, "p1", "p2")
	px.LoseReply(offlineKey(7), 500*time.Millisecond)
	s := &sink{id: 1, user: 7}
	a.Register(s) // its drain runs in Redis; its reply is lost
	if px.Fired() != 1 {
		t.Fatal("the proxy did not lose the drain's reply")
	}
	if got := s.got(); len(got) != 0 {
		t.Fatalf("delivered from a drain whose reply was lost: %v", got)
	}
	deadline := time.Now().Add(6 * time.Second)
	for len(s.got()) < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // a second copy would be on its way
	if got := s.got(); !slices.Equal(got, []string{"p1", "p2"}) {
		t.Fatalf("the session got %v, want [p1 p2] (taken back by a later drain)", got)
	}
	waitFor(t, func() bool { return len(offlineKeys(t, env, 7)) == 0 })
}

// Pushes leased to a drain whose reply was lost on node a are not taken by
// node b's drains while the lease runs (two drains never both get a push),
// a push kept after that drain is b's at once, and once the lease ran out
// the leased pushes are delivered by one drain, a's or b's: each push once.
func TestClusterOfflinePushesLeasedToALostDrainDeliveredOnce(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	cfg := ClusterConfig{CallTimeout: 300 * time.Millisecond, Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}}
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a", cfg)
	b := newCluster(t, env, "b", cfg)
	a.Register(&sink{id: 9, user: 8}) // the drain script loaded for a
	keepFor(t, b, 7, "p1", "p2")
	// Redis unreachable from a for a second after: a's retries do not
	// take p3 before b's drain.
	px.LoseReply(offlineKey(7), time.Second)
	sa := &sink{id: 1, user: 7}
	a.Register(sa) // its drain's reply is lost: p1, p2 leased to it
	if px.Fired() != 1 {
		t.Fatal("the proxy did not lose the drain's reply")
	}
	// a's drain answered already (its connection cut), its script maybe
	// not run yet: p3 is kept after it ran.
	waitFor(t, func() bool { return !slices.Contains(offlineKeys(t, env, 7), offlineKey(7)) })
	keepFor(t, b, 7, "p3")
	sb := &sink{id: 2, user: 7}
	b.Register(sb)
	if got := sb.got(); !slices.Equal(got, []string{"p3"}) {
		t.Fatalf("b's drain got %v, want [p3] (p1, p2 leased to a's)", got)
	}
	deadline := time.Now().Add(6 * time.Second)
	for len(sa.got())+len(sb.got()) < 3 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // a second copy would be on its way
	ga, gb := sa.got(), sb.got()
	if !(slices.Equal(ga, []string{"p1", "p2"}) && slices.Equal(gb, []string{"p3"})) &&
		!(len(ga) == 0 && slices.Equal(gb, []string{"p3", "p1", "p2"})) {
		t.Fatalf("a's session got %v, b's %v: want p1, p2 once, in order, on either, and p3 on b", ga, gb)
	}
	waitFor(t, func() bool { return len(offlineKeys(t, env, 7)) == 0 })
}

// drain.lua and release.lua on a real Redis: a live lease is nobody else's;
// leases that ran out are taken back before the list, oldest first, the
// whole bounded to the newest max; a lease lives no longer than its pushes
// would have in the list; a release is by token (a lease taken back is
// another's) and the last one leaves nothing behind.
func TestOfflineDrainLeases(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	a := newCluster(t, env, "a", ClusterConfig{Local: LocalConfig{OfflineMax: 4, OfflineTTL: time.Minute}})
	rdb := env.redis.Client(t)
	ctx := context.Background()
	keys := []string{offlineKey(7), leaseKey(7)}
	drain := func(tok string, lease time.Duration) (left int64, mids []string) {
		t.Helper()
		arr, err := drainScript.Exec(ctx, rdb, keys, []string{tok, strconv.FormatInt(lease.Milliseconds(), 10), "4", "60000"}).ToArray()
		if err != nil {
			t.Fatal(err)
		}
		if left, err = arr[0].AsInt64(); err != nil {
			t.Fatal(err)
		}
		for _, v := range arr[1:] {
			b, _ := v.ToString()
			m, err := decodeUserPush([]byte(b))
			if err != nil {
				t.Fatal(err)
			}
			mids = append(mids, m.Mid)
		}
		return left, mids
	}
	release := func(tok string) {
		t.Helper()
		if err := releaseScript.Exec(ctx, rdb, []string{leaseKey(7)}, []string{tok}).Error(); err != nil {
			t.Fatal(err)
		}
	}
	pttl := func(k string) int64 {
		t.Helper()
		v, err := rdb.Do(ctx, rdb.B().Pttl().Key(k).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}

	keepFor(t, a, 7, "p1", "p2")
	rdb.Do(ctx, rdb.B().Pexpire().Key(offlineKey(7)).Milliseconds(30_000).Build()) // kept a while ago
	if left, mids := drain("t1", 300*time.Millisecond); left != -1 || !slices.Equal(mids, []string{"p1", "p2"}) {
		t.Fatalf("first drain: %d %v, want -1 [p1 p2]", left, mids)
	}
	if p := pttl(leaseKey(7)); p <= 0 || p > 30_000 {
		t.Fatalf("the lease's TTL is %d ms, want at most the list's 30 s", p)
	}
	keepFor(t, a, 7, "p3", "p4")
	if left, mids := drain("t2", 300*time.Millisecond); left <= 0 || left > 300 || !slices.Equal(mids, []string{"p3", "p4"}) {
		t.Fatalf("second drain: %d %v, want t1's time left and [p3 p4] only", left, mids)
	}
	if p := pttl(leaseKey(7)); p <= 30_000 || p > 60_000 {
		t.Fatalf("the lease's TTL is %d ms, want the newer list's (up to 60 s)", p)
	}
	if left, mids := drain("t3", time.Minute); left <= 0 || len(mids) != 0 {
		t.Fatalf("a drain while both leases run: %d %v, want their time left and nothing", left, mids)
	}
	time.Sleep(400 * time.Millisecond) // both leases run out
	keepFor(t, a, 7, "p5")
	if left, mids := drain("t4", time.Minute); left != -1 || !slices.Equal(mids, []string{"p2", "p3", "p4", "p5"}) {
		t.Fatalf("a drain after the leases ran out: %d %v, want -1 [p2 p3 p4 p5] (t1's, t2's, the list's; the newest 4)", left, mids)
	}
	release("t1") // taken back: not t4's lease
	if left, mids := drain("t5", time.Minute); left <= 0 || len(mids) != 0 {
		t.Fatalf("t4's lease released by t1: %d %v", left, mids)
	}
	release("t4")
	if keys := offlineKeys(t, env, 7); len(keys) != 0 {
		t.Fatalf("left in Redis after the last release: %v", keys)
	}
}

// owedSink is a sink that takes owed pushes apart (Backlogged).
type owedSink struct {
	sink
	owedMu sync.Mutex
	owed   []string
}

func (s *owedSink) SendBacklog(f *Frame) bool {
	s.owedMu.Lock()
	defer s.owedMu.Unlock()
	for _, m := range f.Msgs {
		s.owed = append(s.owed, m.Mid)
	}
	return true
}

func (s *owedSink) gotOwed() []string {
	s.owedMu.Lock()
	defer s.owedMu.Unlock()
	return append([]string(nil), s.owed...)
}

// Pushes owed from before — the offline box, pushes handed on from the
// user's closed session — go to a Backlogged session as such (the gateway
// queues them behind its send queue, not all at once: a backlog larger than
// the queue closed the connection 4408 at every connect); a live push is
// sent as before. Single node and cluster.
func TestOwedPushesSentAsABacklog(t *testing.T) {
	check := func(t *testing.T, r interface {
		Router
		Keeper
	}) {
		var kept []string
		for range 3 {
			mid, _ := r.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
			kept = append(kept, mid)
		}
		s := &owedSink{sink: sink{id: 1, user: 7}}
		r.Register(s)
		waitFor(t, func() bool { return len(s.gotOwed()) == len(kept) })
		if got := s.gotOwed(); !slices.Equal(got, kept) {
			t.Fatalf("owed %v, want %v", got, kept)
		}
		live, _ := r.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
		waitFor(t, func() bool { return len(s.got()) == 1 })
		if got := s.got(); got[0] != live {
			t.Fatalf("sent %v, want the live push %s", got, live)
		}
		handed := Msg{Mid: "closed-1", Ack: true, Bytes: []byte(`{"t":"push","mid":"closed-1","biz":1,"ack":true,"d":{}}`)}
		r.Keep(7, []Msg{handed}) // a closed session's unacked push
		waitFor(t, func() bool { return len(s.gotOwed()) == len(kept)+1 })
		if got := s.gotOwed(); got[len(kept)] != handed.Mid || len(s.got()) != 1 {
			t.Fatalf("owed %v, sent %v: the handed-on push not owed", got, s.got())
		}
	}
	t.Run("local", func(t *testing.T) {
		check(t, NewLocal("gw-1", LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}))
	})
	t.Run("cluster", func(t *testing.T) {
		env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
		check(t, newCluster(t, env, "a", ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}}))
	})
	// Handed on from a session that closed on another node: owed there
	// too (the Le-Owed header); a live push from that node is not.
	t.Run("across nodes", func(t *testing.T) {
		env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
		cfg := ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}}
		a, b := newCluster(t, env, "a", cfg), newCluster(t, env, "b", cfg)
		s := &owedSink{sink: sink{id: 1, user: 7}}
		b.Register(s)
		waitFor(t, func() bool { on, known := a.onlineElsewhere(7); return on && known })
		handed := Msg{Mid: "closed-2", Ack: true, Bytes: []byte(`{"t":"push","mid":"closed-2","biz":1,"ack":true,"d":{}}`)}
		a.Keep(7, []Msg{handed})
		waitFor(t, func() bool { return len(s.gotOwed()) == 1 })
		live, _ := a.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
		waitFor(t, func() bool { return len(s.got()) == 1 })
		if s.gotOwed()[0] != handed.Mid || s.got()[0] != live {
			t.Fatalf("owed %v, sent %v: want %s owed, %s sent", s.gotOwed(), s.got(), handed.Mid, live)
		}
	})
}

// With the offline boxes off, what a closing session hands on (its unacked
// pushes and its backlog: more than a session takes at once) is cut to the
// newest MaxHandOn: the session it goes to is not closed as a slow consumer
// for it.
func TestHandOnBoundedWithTheBoxesOff(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{OfflineMax: -1})
	s := &owedSink{sink: sink{id: 1, user: 7}}
	l.Register(s)
	msgs := make([]Msg, MaxHandOn+100)
	for i := range msgs {
		mid := "closed-" + strconv.Itoa(i)
		msgs[i] = Msg{Mid: mid, Ack: true, Bytes: []byte(`{"t":"push","mid":"` + mid + `","biz":1,"ack":true,"d":{}}`)}
	}
	l.Keep(7, msgs)
	got := s.gotOwed()
	if len(got) != MaxHandOn || got[0] != msgs[100].Mid || got[len(got)-1] != msgs[len(msgs)-1].Mid {
		t.Fatalf("%d handed on (first %v), want the newest %d", len(got), got[:1], MaxHandOn)
	}
	if d := l.Stats().OfflineDropped; d != 100 {
		t.Fatalf("%d counted dropped, want the 100 oldest", d)
	}
}

// subSlowDialer dials NATS through a connection whose writes carrying a
// user subscription are held for d: the server gets the interest late, as
// under a reconnect storm's backlog.
type subSlowDialer struct{ d time.Duration }

func (s subSlowDialer) Dial(network, addr string) (net.Conn, error) {
	c, err := net.Dial(network, addr)
	if err != nil {
		return nil, err
	}
	return &subSlowConn{Conn: c, d: s.d}, nil
}

type subSlowConn struct {
	net.Conn
	d time.Duration
}

func (c *subSlowConn) Write(b []byte) (int, error) {
	if bytes.Contains(b, []byte("SUB "+userSubject(7))) {
		time.Sleep(c.d)
	}
	return c.Conn.Write(b)
}

// A session registering on node b drains the user's offline list only once
// NATS has its subscription: a reliable push stored (the user not yet in the
// presence) and published between the two is in the list or arrives through
// the subscription. Before, the drain ran while the subscription was still
// in b's write buffer: the push was stored after the drain, its publish
// found no interest, and it waited in the list while the user was connected.
func TestClusterPushStoredWhileTheSubscriptionIsOnItsWayIsDelivered(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	cfg := ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}}
	a := newCluster(t, env, "a", cfg)
	b := newCluster(t, env, "b", cfg, nats.SetCustomDialer(subSlowDialer{300 * time.Millisecond}))
	s := &sink{id: 1, user: 7}
	b.Register(s)
	// (The presence is written every 200 ms: a has not seen user 7 on b
	// yet, so the push is stored in the offline list and published.)
	mid, _ := a.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	for deadline := time.Now().Add(5 * time.Second); len(s.got()) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the push stored while b's subscription was on its way not delivered to the connected user")
		}
	}
	if got := s.got(); !slices.Equal(got, []string{mid}) {
		t.Fatalf("got %v, want [%s]", got, mid)
	}
}

// A full offline box (maxUsers users whose pushes have not expired) refuses
// a push for one more user without scanning every user each time: one sweep
// until the earliest of them can expire, then a push finds the place freed.
func TestFullOfflineBoxRefusesWithoutARescan(t *testing.T) {
	b := newOfflineBox(4, 1000, time.Minute)
	now := time.Now()
	for u := range int64(1000) {
		if !b.put(u, Msg{Mid: "m"}, now.Add(time.Duration(u)*time.Millisecond)) {
			t.Fatalf("user %d refused below the bound", u)
		}
	}
	for u := int64(1000); u < 11000; u++ {
		if b.put(u, Msg{Mid: "m"}, now.Add(time.Second)) {
			t.Fatalf("user %d kept in a full box", u)
		}
	}
	if b.sweeps != 1 {
		t.Fatalf("%d sweeps for 10,000 refused pushes, want 1 (nothing expires before a minute)", b.sweeps)
	}
	// User 0's push expires first: the next push finds its place.
	if !b.put(20000, Msg{Mid: "m"}, now.Add(time.Minute+time.Millisecond/2)) {
		t.Fatal("a push refused after the earliest user's pushes expired")
	}
	if got := b.take(0, now); len(got) != 0 {
		t.Fatalf("user 0 still has %d pushes", len(got))
	}
}

// drainSink is a Draining session that keeps the order its client would
// see: owed pushes at once, live ones held while it drains and released
// behind them at DrainDone (the gateway's backlog, in small).
type drainSink struct {
	user     int64
	mu       sync.Mutex
	draining bool
	held     []string
	seen     []string
}

func (s *drainSink) ID() uint64    { return 1 }
func (s *drainSink) UserID() int64 { return s.user }
func (s *drainSink) Send(f *Frame) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range f.Msgs {
		if s.draining {
			s.held = append(s.held, m.Mid)
		} else {
			s.seen = append(s.seen, m.Mid)
		}
	}
	return true
}
func (s *drainSink) SendBacklog(f *Frame) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range f.Msgs {
		s.seen = append(s.seen, m.Mid)
	}
	return true
}
func (s *drainSink) DrainStart() { s.mu.Lock(); s.draining = true; s.mu.Unlock() }
func (s *drainSink) DrainDone() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.draining = false
	s.seen, s.held = append(s.seen, s.held...), nil
}
func (s *drainSink) order() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.seen...)
}

// A push kept for the user arrives before a live one made while the user
// reconnected even when Redis did not answer the first drain: the session's
// live pushes wait behind the retried drain (up to redrainHold). Before,
// the retry delivered the kept push after the live one (an order's status
// could go back).
func TestClusterRetriedDrainKeepsOwedPushesFirst(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a",
		ClusterConfig{CallTimeout: 300 * time.Millisecond, Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	keepFor(t, a, 7, "kept")
	px.LoseReply("le:cut", 500*time.Millisecond) // Redis unreachable from a for half a second
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_ = a.rdb.Do(ctx, a.rdb.B().Get().Key("le:cut").Build()).Error()
	cancel()
	s := &drainSink{user: 7}
	a.Register(s) // its drain fails: retried
	live := Msg{Mid: "live", Ack: true, Bytes: []byte(`{"t":"push","mid":"live","biz":1,"ack":true,"d":{}}`)}
	a.local.sendMsg(7, live, false) // a live push while the retry waits
	waitFor(t, func() bool { return len(s.order()) == 2 })
	if got := s.order(); !slices.Equal(got, []string{"kept", "live"}) {
		t.Fatalf("the session saw %v, want [kept live]", got)
	}
	// Redis away for good: the live pushes wait redrainHold, no longer.
	px.Close()
	s8 := &drainSink{user: 8}
	start := time.Now()
	a.Register(s8)
	a.local.sendMsg(8, live, false)
	deadline := time.Now().Add(redrainHold + 3*time.Second)
	for len(s8.order()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got, took := s8.order(), time.Since(start); len(got) != 1 || took < redrainHold-100*time.Millisecond {
		t.Fatalf("with Redis away the live push came %v after the connect (%v), want after about %v", took, got, redrainHold)
	}
	// A user reconnecting in a loop through the outage: the held drains
	// that ended by their time are not kept.
	for i := range 5 {
		si := &drainSink{user: 8}
		a.Register(si)
		a.Unregister(si)
		if i == 0 {
			time.Sleep(redrainHold + 200*time.Millisecond)
		}
	}
	a.redrainMu.Lock()
	n := len(a.redrainWaits[8])
	a.redrainMu.Unlock()
	if n > 4 {
		t.Fatalf("%d held drains kept for the user, want the 4 not ended yet (those ended dropped)", n)
	}
}
