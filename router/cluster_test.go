package router

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

func seqMsgs(ep string, from, to int64) []Msg {
	var out []Msg
	for o := from; o <= to; o++ {
		p := proto.Push{Mid: "m", Room: 1, Off: o, Ep: ep, Data: []byte("{}")}
		out = append(out, encodeMsg(&p))
	}
	return out
}

// A node that re-subscribes to a room it served before, after the room's
// Redis keys expired (new epoch at 0), tells a joiner off 0 in the new epoch
// (an old epoch's taken would make the SDK drop the new pushes 1..old).
func TestResubscribeInNewEpochStartsAtZero(t *testing.T) {
	l := NewLocal("n", LocalConfig{Sequenced: true})
	l.OpenRoom(1)
	l.SetPosition(1, "E1", 0)
	a := &offSink{id: 1}
	if _, err := l.JoinAt(1, a, nil); err != nil {
		t.Fatal(err)
	}
	l.Deliver(1, "E1", seqMsgs("E1", 1, 500))
	for len(a.got()) < 500 {
		time.Sleep(time.Millisecond)
	}
	l.Leave(1, a)
	// re-subscribe after dropIdle + key expiry: position.lua gives (E2, 0)
	l.SetPosition(1, "E2", 0)
	j, err := l.JoinAt(1, &offSink{id: 2}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if j.Ep == "E2" && j.Off != 0 {
		t.Fatalf("joiner told {ep:%s off:%d}; the new epoch has no push yet (want off 0)", j.Ep, j.Off)
	}
}

type clusterEnv struct {
	nats  *natstest.Server
	redis *redistest.Server
	via   string // the Redis address the node dials, if not redis's own (a fault proxy)
}

func newCluster(t *testing.T, env clusterEnv, node string, cfg ClusterConfig, opts ...nats.Option) *Cluster {
	var cl atomic.Pointer[Cluster] // its NATS connection tells it when it is back, as the gateway's
	opts = append([]nats.Option{nats.NoEcho(), nats.ReconnectHandler(func(*nats.Conn) {
		if c := cl.Load(); c != nil {
			c.Reconnected()
		}
	})}, opts...)
	nc, err := nats.Connect(env.nats.URL, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	addr := env.redis.Addr
	if env.via != "" {
		addr = env.via
	}
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	cfg.Node, cfg.NATS, cfg.Redis = node, nc, rdb
	c, err := NewCluster(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cl.Store(c)
	t.Cleanup(c.Close)
	return c
}

// roomMember is node's cluster router on a NATS and a Redis of its own, with
// one member (s) joined to its room 1, and that room's state (st).
func roomMember(t *testing.T, node string, cfg ClusterConfig) (*Cluster, *offSink, *croom) {
	t.Helper()
	c := newCluster(t, clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}, node, cfg)
	c.OpenRoom(1)
	s := &offSink{id: 1}
	if _, err := c.JoinAt(1, s, nil); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	st := c.rooms[1]
	c.mu.Unlock()
	return c, s, st
}

// One lost NATS batch (offset 1) while the next 300 pushes arrive and are
// buffered; the history no longer has offset 1: only offset 1 is skipped,
// the 300 buffered pushes are delivered.
func TestLostOffsetSkipsOnlyTheHole(t *testing.T) {
	c, s, st := roomMember(t, "b", ClusterConfig{HistorySize: 8, GapWait: 50 * time.Millisecond})
	if _, err := c.number(1, items(1)); err != nil { // offset 1: "lost on NATS"
		t.Fatal(err)
	}
	// ... and gone from the history too (trimmed: the history keeps at
	// least minSharedHistory, so it is removed by hand here).
	if err := c.rdb.Do(context.Background(), c.rdb.B().Xdel().Key(histKey(1)).Id("1-0").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 30; i++ { // offsets 2..301 arrive
		b, err := c.number(1, items(10))
		if err != nil {
			t.Fatal(err)
		}
		c.receive(st, b)
	}
	deadline := time.Now().Add(3 * time.Second)
	for !slices.Contains(s.got(), 301) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	got := s.got()
	if !slices.Contains(got, 301) || len(got) != 300 {
		t.Fatalf("one lost batch cost buffered pushes too: delivered %d: %v", len(got), got)
	}
	consecutive(t, got, 2, 301)
}

// A gap whose start the shared history no longer has (trimmed) while its
// rest is still kept: the kept rest is delivered, only the lost start
// skipped. Before, the whole read failed ("not all of it kept") and every
// offset of the gap was skipped — here 7 pushes Redis still held.
func TestGapFillDeliversWhatTheHistoryStillHas(t *testing.T) {
	c, s, st := roomMember(t, "b", ClusterConfig{GapWait: 20 * time.Millisecond})
	if _, err := c.number(1, items(10)); err != nil { // offsets 1..10: lost on NATS
		t.Fatal(err)
	}
	for _, id := range []string{"1-0", "2-0", "3-0"} { // and 1..3 trimmed from the history
		if err := c.rdb.Do(context.Background(), c.rdb.B().Xdel().Key(histKey(1)).Id(id).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	b, err := c.number(1, items(1)) // offset 11 arrives
	if err != nil {
		t.Fatal(err)
	}
	c.receive(st, b)
	waitFor(t, func() bool { return slices.Contains(s.got(), 11) })
	got := s.got()
	if len(got) != 8 {
		t.Fatalf("delivered %v, want 4..11 (what the history kept, and the push that arrived)", got)
	}
	consecutive(t, got, 4, 11)
}

// The room's final push delivered from the history first (its batch late:
// a gap fill got there before it) still closes the room when its batch
// comes: the history does not carry the closing mark, and the batch was
// dropped as a duplicate — the room stayed open here until the closed
// event's 3 s backstop.
func TestFinalPushFilledFromHistoryStillClosesTheRoom(t *testing.T) {
	c, s, st := roomMember(t, "b", ClusterConfig{GapWait: 10 * time.Millisecond})
	final := []seqItem{{p: proto.Push{Mid: "f", Room: 1, Biz: 5559, Data: []byte("{}")}, closing: true}}
	fb, err := c.number(1, final) // offset 1, the final push: its batch late
	if err != nil {
		t.Fatal(err)
	}
	st.mu.Lock()
	c.startFill(st, 1) // a gap fill reads it from the history first
	st.mu.Unlock()
	waitFor(t, func() bool { return slices.Contains(s.got(), 1) })
	c.receive(st, fb)
	waitFor(t, func() bool { return c.local.room(1) == nil })
}

// A user's last session leaves this node while its presence write fails
// (Redis unreachable): the delete of its presence fields stays queued for
// the next flush. Before, a failed flush re-marked only the
// rooms and users still here, so the fields stayed for as long as this node
// lived — the other nodes counted the user's 8 sessions for good (every
// connection refused by ws.max_conns_per_user).
func TestPresenceOfAUserWhoLeftRetriedAfterAFailedFlush(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a", ClusterConfig{CallTimeout: 200 * time.Millisecond})
	px.Close()                    // Redis unreachable from a from here on
	a.markUser(77)                // a user's last session here left: the next flushes fail
	time.Sleep(3 * presenceEvery) // a first flush failed (200 ms each)
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		a.dirtyMu.Lock()
		_, kept := a.dirtyUsers[77] // queued again (between two failing flushes)
		a.dirtyMu.Unlock()
		if kept {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the delete of a departed user's presence was dropped with the failed flush")
		}
	}
}

// A big presence flush on a slow Redis (here 16 pipelines of deletes, each
// held 300 ms on the wire: ~5 s) does not hold the heartbeat back: the
// alive key never lapses (TTL 1.5 s), so the other nodes never take this
// node for dead and drop its entries. Before, the heartbeat ran on the
// flush's goroutine and waited for the whole flush: the key expired.
func TestHeartbeatNotHeldBackByABigPresenceFlush(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a", ClusterConfig{PresenceTTL: 1500 * time.Millisecond})
	direct := env.redis.Client(t)
	px.Slow("HDEL", 300*time.Millisecond)
	defer px.Slow("", 0)
	for u := range 8000 { // users whose sessions left: two deletes each
		a.markUser(int64(u + 1))
	}
	ctx := context.Background()
	for end := time.Now().Add(4 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		n, err := direct.Do(ctx, direct.B().Exists().Key(aliveKey("a")).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Fatal("the alive key lapsed during a big presence flush")
		}
	}
	a.dirtyMu.Lock()
	left := len(a.dirtyUsers)
	a.dirtyMu.Unlock()
	if left != 0 {
		t.Fatalf("%d users left marked: the flush was not taken", left)
	}
}

// A hole this node cannot read (its Redis unreachable) while the room goes
// on through NATS: what it buffers past the hole is bounded — beyond twice
// maxGapBuffer the hole is given up (counted lost) and the buffer
// delivered — instead of growing with every batch for as long as Redis
// stays away (20,000 pushes here), the viewers getting nothing meanwhile.
func TestGapBufferBoundedWhileTheHoleCannotBeRead(t *testing.T) {
	c, s, st := roomMember(t, "b", ClusterConfig{GapWait: 10 * time.Millisecond, CallTimeout: 100 * time.Millisecond})
	b, err := c.number(1, items(1))
	if err != nil {
		t.Fatal(err)
	}
	c.receive(st, b) // offset 1
	c.rdb.Close()    // Redis unreachable from this node from here on
	most := 0
	const batches, per = 200, 100
	for i := range batches { // offset 2 lost on NATS; 3.. arrive
		first := int64(3 + i*per)
		c.receive(st, roomBatch{ep: b.ep, first: first, msgs: seqMsgs(b.ep, first, first+per-1)})
		st.mu.Lock()
		most = max(most, st.buffered)
		st.mu.Unlock()
	}
	if most > 2*maxGapBuffer+per {
		t.Fatalf("%d pushes buffered behind a hole this node cannot read, want at most %d", most, 2*maxGapBuffer+per)
	}
	last := int64(2 + batches*per)
	waitFor(t, func() bool { return slices.Contains(s.got(), last) })
	if n := c.ClusterStats().GapsLost; n == 0 {
		t.Fatal("the hole given up was not counted")
	}
}

// The room's final push whose numbering failed (the script's reply lost,
// Redis unreachable for a moment) is numbered again once Redis answers:
// the other nodes close the room after delivering it. Before, the closing
// node closed only its own room; the others got the push from the history
// at their tail sweep but never its closing mark, and kept the room open.
func TestRoomFinalPushRetriedWhenNumberingFails(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a", ClusterConfig{CallTimeout: 200 * time.Millisecond})
	b := newCluster(t, env, "b", ClusterConfig{})
	a.OpenRoom(1)
	b.OpenRoom(1)
	s := &offSink{id: 1}
	if _, err := b.JoinAt(1, s, nil); err != nil {
		t.Fatal(err)
	}
	px.LoseReply(seqKey(1), 300*time.Millisecond) // the final push's numbering
	a.CloseRoom(1, &proto.Push{Biz: 5559, Data: []byte(`{"room_id":1}`)})
	waitFor(t, func() bool { return px.Fired() == 1 && b.local.room(1) == nil })
}

// The room's final push on a slow Redis: numbered late but within the
// other nodes' backstop (a script answered after 1.7 s), it is delivered and
// closes the room there; on a Redis that hangs (answers after 4 s,
// CallTimeout 5 s), the node gives it up by finalCut after its first
// attempt and closes its room. Before, an attempt could run CallTimeout
// past the backstop (4.1 s with the default 2 s: a retry started at 1.6 s).
func TestRoomFinalPushGivenUpBeforeTheBackstop(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a", ClusterConfig{CallTimeout: 5 * time.Second})
	b := newCluster(t, env, "b", ClusterConfig{})
	defer px.Slow("", 0)
	a.OpenRoom(2)
	b.OpenRoom(2)
	s := &offSink{id: 1}
	if _, err := b.JoinAt(2, s, nil); err != nil {
		t.Fatal(err)
	}
	// A push first: the sequence script is loaded (else EVALSHA and then
	// EVAL would each be held).
	if _, err := a.PublishRoomWait(2, proto.Push{Biz: proto.BizChat, Data: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	px.Slow(seqKey(2), 1700*time.Millisecond)
	start := time.Now()
	a.CloseRoom(2, &proto.Push{Biz: 5559, Data: []byte(`{"room_id":2}`)})
	// Closed on b, and the final push delivered to its member (the room
	// leaves b's index first; its pump delivers what was queued after:
	// checking the sink at once was a race — CI saw offsets [1]).
	waitFor(t, func() bool { return b.local.room(2) == nil && len(s.got()) >= 2 })
	if took := time.Since(start); took >= closeGrace || !slices.Equal(s.got(), []int64{1, 2}) {
		t.Fatalf("slow Redis: room closed on b after %v with offsets %v, want the final push (2) before the %v backstop", took, s.got(), closeGrace)
	}

	a.OpenRoom(1)
	px.Slow(seqKey(1), 4*time.Second)
	start = time.Now()
	a.CloseRoom(1, &proto.Push{Biz: 5559, Data: []byte(`{"room_id":1}`)})
	waitFor(t, func() bool { return a.local.room(1) == nil })
	if took := time.Since(start); took > finalCut+300*time.Millisecond {
		t.Fatalf("hanging Redis: the final push given up after %v, want by %v", took, finalCut)
	}
}

// A batch of an older epoch that arrives late — buffered by a publisher's
// NATS connection while it was away, flushed after the room's history
// expired and a new epoch began — must not silence the room here. The node
// took the unknown epoch for a new one, and then dropped every batch of the
// real epoch as a straggler of "the epoch before", for as long as the room
// stayed busy (each dropped batch counted as activity, so the tail sweep
// never looked). Now the sweep finds Redis on the epoch the node left and
// takes it back there, reading what was dropped from the history; the
// stale push itself is never delivered.
func TestStaleEpochBatchNeverSilencesTheRoom(t *testing.T) {
	c, s, st := roomMember(t, "d", ClusterConfig{GapWait: 20 * time.Millisecond})
	next := func() int64 {
		t.Helper()
		b, err := c.number(1, items(1))
		if err != nil {
			t.Fatal(err)
		}
		c.receive(st, b)
		return b.last()
	}
	next()                                                                                 // offset 1 of the room's epoch
	c.receive(st, roomBatch{ep: "stale", first: 1000, msgs: seqMsgs("stale", 1000, 1000)}) // the late one
	var last int64
	for until := time.Now().Add(5 * time.Second); time.Now().Before(until); time.Sleep(20 * time.Millisecond) {
		prev := last
		last = next() // the room stays busy: a push every 20 ms
		if slices.Contains(s.got(), prev) {
			break // delivered again (the room's pump delivers after receive returns)
		}
	}
	for until := time.Now().Add(time.Second); !slices.Contains(s.got(), last) && time.Now().Before(until); {
		time.Sleep(5 * time.Millisecond)
	}
	got := s.got()
	if !slices.Contains(got, last) {
		t.Fatalf("the room went silent after a stale epoch's batch: delivered %v, last numbered %d", got, last)
	}
	// The stale batch's push is not delivered either: its fill found Redis
	// in another epoch (before, read as "trimmed": the hole was skipped
	// and the stale push delivered, its viewers re-syncing twice).
	if slices.Contains(got, 1000) {
		t.Fatalf("the stale epoch's push delivered: %v", got)
	}
	consecutive(t, got, 1, last)
}

// The linger sweep between JoinAt's subscribe and its Local join must not
// drop the room: the member would sit in a room this node no longer hears.
func TestDropIdleNeverDuringAJoin(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	a := newCluster(t, env, "a", ClusterConfig{Linger: time.Millisecond})
	b := newCluster(t, env, "b", ClusterConfig{Linger: time.Millisecond})
	a.OpenRoom(1)
	b.OpenRoom(1)
	// JoinAt step 1 on b: subscribe (room lingered >= Linger with no member)
	st, err := b.subscribe(1)
	if err != nil {
		t.Fatal(err)
	}
	b.dropIdle() // marks idleFrom
	time.Sleep(5 * time.Millisecond)
	b.dropIdle() // sweep tick: drops and unsubscribes
	// JoinAt step 2 on b
	s := &offSink{id: 7}
	if _, err := b.local.JoinAt(1, s, nil); err != nil {
		t.Fatal(err)
	}
	b.joined(st)
	if _, err := a.PublishRoomWait(1, proto.Push{Data: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for len(s.got()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if len(s.got()) == 0 {
		b.mu.Lock()
		_, sub := b.rooms[1]
		b.mu.Unlock()
		t.Fatalf("member on b got nothing; b subscribed to the room: %v", sub)
	}
}

// Cluster: offline pushes drained into a session that is closing already
// (it refuses them) go back to the offline list: the user's next session
// gets them. They were taken from the list and dropped before.
func TestClusterOfflinePushesRefusedByAClosingSessionAreKept(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	var mids []string
	for i := 0; i < 3; i++ {
		mid, _ := c.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
		mids = append(mids, mid)
	}
	closing := &sink{id: 1, user: 7}
	closing.refuse.Store(true)
	c.Register(closing)
	c.Unregister(closing)
	s := &sink{id: 2, user: 7}
	c.Register(s)
	deadline := time.Now().Add(5 * time.Second)
	for len(s.got()) < len(mids) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.got(); !slices.Equal(got, mids) {
		t.Fatalf("next session got %v, want %v", got, mids)
	}
}

// Cluster: the same when the push was kept in the offline list while the
// user's only session here was closing.
func TestClusterOfflinePushKeptBesideAClosingSessionReachesTheNextOne(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	closing := &sink{id: 1, user: 7}
	c.Register(closing)
	closing.refuse.Store(true)
	mid, _ := c.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	// Published to the user's subject: this node's subscription finds no
	// session taking it and stores it in the offline list.
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := c.rdb.Do(context.Background(), c.rdb.B().Llen().Key(offlineKey(7)).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("offline list has %d pushes, want 1", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	s := &sink{id: 2, user: 7}
	c.Register(s)
	c.Unregister(closing)
	if got := s.got(); !slices.Equal(got, []string{mid}) {
		t.Fatalf("next session got %v, want [%s]", got, mid)
	}
}

// A leave of a room the session is not in (any room id a client sends)
// changes no presence: before, each marked the room and the next flush sent
// Redis an HDEL for it — one shared-Redis write per frame.
func TestClusterLeaveOfARoomNotJoinedWritesNothing(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{})
	s := &sink{id: 1, user: 9}
	c.Register(s)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{env.redis.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	hdels := func() int {
		t.Helper()
		info, err := rdb.Do(context.Background(), rdb.B().Info().Section("commandstats").Build()).ToString()
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(info, "\r\n") {
			if rest, ok := strings.CutPrefix(line, "cmdstat_hdel:calls="); ok {
				n, _ := strconv.Atoi(rest[:strings.IndexByte(rest, ',')])
				return n
			}
		}
		return 0
	}
	time.Sleep(3 * presenceEvery) // the registration's own writes are done
	before := hdels()
	for id := int64(1000); id < 1500; id++ {
		c.Leave(id, s)
	}
	time.Sleep(3 * presenceEvery)
	if n := hdels() - before; n != 0 {
		t.Fatalf("%d HDELs for 500 leaves of rooms never joined, want 0", n)
	}
}

// Reads of a presence hash that still shows a dead node's field delete it
// in the background — once at a time per field, and a bounded number of
// fields at once, not a goroutine per read.
func TestStalePresenceDeletedOnceAtATime(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{})
	before := runtime.NumGoroutine()
	for i := 0; i < 10_000; i++ {
		c.dropStale(onlineKey(1), "dead", "boot:1")
		c.dropStale(onlineKey(int64(2+i)), "dead", "boot:1")
	}
	c.staleMu.Lock()
	inFlight := len(c.staleDrops)
	c.staleMu.Unlock()
	if extra := runtime.NumGoroutine() - before; inFlight > maxStaleDrops || extra > maxStaleDrops+16 {
		t.Fatalf("%d deletions in flight, %d more goroutines; want at most %d", inFlight, extra, maxStaleDrops)
	}
	waitFor(t, func() bool {
		c.staleMu.Lock()
		defer c.staleMu.Unlock()
		return len(c.staleDrops) == 0
	})
}

// Redis back from an older snapshot: a room's offset counter went back in
// the same epoch. The next push must not reuse an offset every node has
// delivered already (it would be dropped as a duplicate: the sender told
// "sent", no viewer sees it) — the sequencer starts a new epoch instead.
func TestRoomCounterGoneBackStartsANewEpoch(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{})
	c.OpenRoom(1)
	s := &offSink{id: 1}
	if _, err := c.JoinAt(1, s, nil); err != nil {
		t.Fatal(err)
	}
	publish := func() {
		t.Helper()
		if _, err := c.PublishRoomWait(1, proto.Push{Data: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	publish()
	// The snapshot: the room's counter and history after offset 1.
	dump := map[string]string{}
	for _, k := range []string{seqKey(1), histKey(1)} {
		v, err := c.rdb.Do(ctx, c.rdb.B().Dump().Key(k).Build()).ToString()
		if err != nil {
			t.Fatal(err)
		}
		dump[k] = v
	}
	publish()
	publish()
	waitFor(t, func() bool { return len(s.got()) == 3 })
	ep, err := c.rdb.Do(ctx, c.rdb.B().Get().Key(epKey(1)).Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range dump { // Redis restored from it
		if err := c.rdb.Do(ctx, c.rdb.B().Restore().Key(k).Ttl(0).SerializedValue(v).Replace().Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	publish()
	deadline := time.Now().Add(3 * time.Second)
	for len(s.got()) < 4 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := s.got(); len(got) != 4 {
		t.Fatalf("after the counter went back: delivered offsets %v, want a 4th push", got)
	}
	if now, _ := c.rdb.Do(ctx, c.rdb.B().Get().Key(epKey(1)).Build()).ToString(); now == ep {
		t.Fatalf("epoch %s kept after the counter went back", ep)
	}
}

// The counter gone back while the room's pushes come from a node with no
// member of it (a red-packet start, a PK score): that node knows nothing of
// the room's offsets, so its numbering in the same epoch was never checked,
// and the member's node dropped every push as a duplicate until the counter
// passed what it had delivered (here 99 pushes, ~5 s). Now the first
// duplicate makes the member's node check the counter at its next sweep
// and move the room to a new epoch: pushes reach the member again within
// about a second.
func TestRoomCounterGoneBackUnderAPublisherWithoutMembers(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	a := newCluster(t, env, "a", ClusterConfig{})
	c := newCluster(t, env, "c", ClusterConfig{})
	a.OpenRoom(1)
	c.OpenRoom(1)
	s := &offSink{id: 1}
	if _, err := a.JoinAt(1, s, nil); err != nil {
		t.Fatal(err)
	}
	publish := func(via *Cluster) {
		t.Helper()
		if _, err := via.PublishRoomWait(1, proto.Push{Data: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	publish(a)
	dump := map[string]string{} // the snapshot: the counter and history after offset 1
	for _, k := range []string{seqKey(1), histKey(1)} {
		v, err := a.rdb.Do(ctx, a.rdb.B().Dump().Key(k).Build()).ToString()
		if err != nil {
			t.Fatal(err)
		}
		dump[k] = v
	}
	for range 99 {
		publish(a)
	}
	waitFor(t, func() bool { return len(s.got()) == 100 })
	for k, v := range dump { // Redis restored from it
		if err := a.rdb.Do(ctx, a.rdb.B().Restore().Key(k).Ttl(0).SerializedValue(v).Replace().Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	sent := 0
	for len(s.got()) == 100 {
		if sent == 150 {
			t.Fatalf("150 pushes from the node without members after the counter went back, none delivered")
		}
		publish(c)
		sent++
		time.Sleep(50 * time.Millisecond)
	}
	if sent >= 99 {
		t.Fatalf("the member got a push only once the counter passed what it had (%d pushes sent)", sent)
	}
	if n := a.ClusterStats().EpochsForced; n != 1 {
		t.Fatalf("epochs forced by the member's node: %d, want 1", n)
	}
	t.Logf("delivered again after %d pushes", sent)
}

// A reliable push for a user connected nowhere while Redis is down: the
// shared offline list cannot take it, so it is kept in this node's offline
// box and a session here gets it. Before, it was dropped (and when Redis
// could not say whether the user was online elsewhere, not even tried).
func TestClusterOfflinePushKeptHereWhileRedisIsDown(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	c := newCluster(t, env, "a", ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}})
	env.redis.Stop()
	mid, _ := c.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
	s := &sink{id: 1, user: 7}
	c.Register(s)
	deadline := time.Now().Add(5 * time.Second)
	for len(s.got()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.got(); !slices.Equal(got, []string{mid}) {
		t.Fatalf("the session got %v, want the push kept while Redis was down (%s)", got, mid)
	}
}

// NATS restarts; node a is back first and sends a reliable push to user 7,
// whose session is on b, before b has subscribed again: NATS drops the
// publish (nobody subscribed). The push is handed off instead — "no
// responders" — so a keeps it in the user's offline list and b drains it
// once it is back: the session gets it (before, it was lost: the user was
// online, so nothing was kept). A push handed off while both are connected
// is answered by b and kept nowhere.
func TestClusterUserPushAcrossANATSRestart(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	cfg := ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}, PresenceTTL: 3 * time.Second}
	back := []nats.Option{nats.MaxReconnects(-1), nats.ReconnectJitter(0, 0)}
	a := newCluster(t, env, "a", cfg, append(back, nats.ReconnectWait(20*time.Millisecond))...)
	b := newCluster(t, env, "b", cfg, append(back, nats.ReconnectWait(6*time.Second))...) // well after a, even on a loaded machine
	s := &sink{id: 1, user: 7}
	b.Register(s)
	waitFor := func(what string, d time.Duration, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(d); !ok(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %v", what, d)
			}
		}
	}
	waitFor("user 7's presence on b seen from a", 5*time.Second, func() bool { on, known := a.onlineElsewhere(7); return on && known })
	push := func() string {
		mid, n := a.SendUser(7, proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
		if n != 0 {
			t.Fatalf("a reached %d sessions of user 7 (none there)", n)
		}
		return mid
	}
	first := push()
	waitFor("the push handed off while both are connected", 5*time.Second, func() bool { return len(s.got()) == 1 })
	time.Sleep(handoffWait + 1500*time.Millisecond) // past the sweep that would keep an unanswered one
	if k := a.ClusterStats().HandoffsKept; k != 0 {
		t.Fatalf("%d hand-offs kept though b answered", k)
	}

	env.nats.Restart()
	waitFor("a reconnected", 5*time.Second, a.nc.IsConnected)
	if b.nc.IsConnected() {
		t.Fatal("b reconnected as early as a: the test needs it later")
	}
	second := push()
	waitFor("b reconnected", 20*time.Second, b.nc.IsConnected)
	waitFor("the push sent while b was away delivered", 10*time.Second, func() bool { return len(s.got()) >= 2 })
	if got := slices.Compact(s.got()); !slices.Equal(got, []string{first, second}) { // at least once: a second copy is dropped by mid
		t.Fatalf("the session got %v, want [%s %s]", got, first, second)
	}
	if k := a.ClusterStats().HandoffsKept; k != 1 {
		t.Fatalf("hand-offs kept %d, want 1", k)
	}
}

// items is n pushes of room 1 for the sequencer.
func items(n int) []seqItem {
	out := make([]seqItem, n)
	for i := range out {
		out[i].p = proto.Push{Mid: "x", Room: 1, Data: []byte("{}")}
	}
	return out
}

// A chat's PublishRoomWait that gives up before the room's sequencer took
// its push (Redis slow: earlier batches hold the sequencer) answers
// ErrUnavailable, and that push is never sent — so "nothing sent" is true;
// one the sequencer took and could not confirm is ErrUnconfirmed (it may
// still go out). Before, a push given up on stayed queued and went out
// once Redis answered, while its client had been told nothing was sent.
func TestPublishRoomWaitGivenUpIsNeverSent(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	px := redistest.StartProxy(t, env.redis.Addr)
	a := newCluster(t, clusterEnv{nats: env.nats, redis: env.redis, via: px.Addr}, "a", ClusterConfig{CallTimeout: 100 * time.Millisecond})
	a.OpenRoom(1)
	px.Slow(seqKey(1), 300*time.Millisecond) // every numbering outlasts CallTimeout
	for range 6 * maxSeqBatch {              // six batches ahead: ≥ 600 ms of sequencer work
		if _, err := a.PublishRoom(1, proto.Push{Data: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
	}
	mid, err := a.PublishRoomWait(1, proto.Push{Data: []byte(`{"text":"given up"}`)})
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnconfirmed) {
		t.Fatalf("a push given up before it was taken: %v, want ErrUnavailable (not sent)", err)
	}
	// Redis is fast again while the sequencer still has batches ahead of
	// the push given up on: they are numbered and sent (retried until Redis
	// answers: none is dropped), it is not.
	px.Slow("", 0)
	for deadline := time.Now().Add(15 * time.Second); a.ClusterStats().PushesSequenced < 6*maxSeqBatch; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of the %d pushes ahead numbered once Redis answered", a.ClusterStats().PushesSequenced, 6*maxSeqBatch)
		}
	}
	if _, err := a.PublishRoomWait(1, proto.Push{Data: []byte("{}")}); err != nil {
		t.Fatalf("after Redis recovered: %v", err)
	}
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{env.redis.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	entries, err := rdb.Do(context.Background(), rdb.B().Xrange().Key(histKey(1)).Start("-").End("+").Build()).AsXRange()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.FieldValues["m"] == mid {
			t.Fatalf("the push given up on was numbered (offset %s) and sent", e.ID)
		}
	}
}

// A node's user subscriptions hold no goroutine each (nats.go gives every
// async subscription one, ~3 KB with its state, per connected user): 500
// users connected here add a handful of goroutines, and their pushes still
// arrive, in order, through the shared queues.
func TestUserSubscriptionsHoldNoGoroutineEach(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	cfg := ClusterConfig{Local: LocalConfig{OfflineMax: 8, OfflineTTL: time.Minute}}
	a := newCluster(t, env, "a", cfg)
	b := newCluster(t, env, "b", cfg)
	before := runtime.NumGoroutine()
	const users = 500
	sinks := make([]*sink, users)
	for i := range sinks {
		sinks[i] = &sink{id: uint64(i + 1), user: int64(1000 + i)}
		b.Register(sinks[i])
	}
	if n := runtime.NumGoroutine() - before; n > users/20 {
		t.Fatalf("%d users registered added %d goroutines", users, n)
	}
	for u := range users {
		on := false
		for deadline := time.Now().Add(5 * time.Second); !on; time.Sleep(10 * time.Millisecond) {
			if on, _ = a.onlineElsewhere(int64(1000 + u)); !on && time.Now().After(deadline) {
				t.Fatalf("user %d not seen on b", 1000+u)
			}
		}
	}
	var mids [][2]string
	for u := range users {
		m1, _ := a.SendUser(int64(1000+u), proto.Push{Biz: proto.BizGift, Ack: true, Data: []byte(`{}`)})
		m2, _ := a.SendUser(int64(1000+u), proto.Push{Biz: proto.BizGift, Data: []byte(`{}`)})
		mids = append(mids, [2]string{m1, m2})
	}
	for u, s := range sinks {
		for deadline := time.Now().Add(10 * time.Second); len(s.got()) < 2; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("user %d got %v", 1000+u, s.got())
			}
		}
		if got := s.got(); !slices.Equal(got, mids[u][:]) {
			t.Fatalf("user %d got %v, want %v in order", 1000+u, got, mids[u])
		}
	}
}

// A room quiet for longer than its history's TTL keeps its epoch: a join
// after the lull (another node's, reading Redis) is in the epoch of the
// join before it, recovered with nothing missed, and the next push follows
// the offsets the viewers have in that epoch. Before, the epoch and the
// counter expired with the history: after each lull of history_ttl (2
// minutes by default) the next push started a new epoch and every viewer
// re-synced. The pushes themselves still age out.
func TestQuietRoomKeepsItsEpoch(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	const ttl = 300 * time.Millisecond
	a := newCluster(t, env, "a", ClusterConfig{HistoryTTL: ttl})
	a.OpenRoom(1)
	s := &offSink{id: 1}
	j, err := a.JoinAt(1, s, nil)
	if err != nil || j.Ep == "" {
		t.Fatalf("join: %+v %v", j, err)
	}
	if _, err := a.PublishRoom(1, proto.Push{Biz: proto.BizChat}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(s.got()) == 1 })
	time.Sleep(3 * ttl) // quiet: past the history's TTL
	b := newCluster(t, env, "b", ClusterConfig{HistoryTTL: ttl})
	b.OpenRoom(1)
	s2 := &offSink{id: 2}
	j2, err := b.JoinAt(1, s2, &proto.Position{Off: 1, Ep: j.Ep})
	if err != nil || j2.Ep != j.Ep || j2.Off != 1 || !j2.Recovered {
		t.Fatalf("join after the lull: %+v %v, want epoch %s at offset 1, recovered", j2, err, j.Ep)
	}
	if _, err := b.PublishRoom(1, proto.Push{Biz: proto.BizChat}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(s.got()) == 2 && len(s2.got()) == 1 })
	if got := s.got(); got[1] != 2 {
		t.Fatalf("the first member got offsets %v, want 1, 2 in one epoch", got)
	}
	ep, err := a.rdb.Do(context.Background(), a.rdb.B().Get().Key(epKey(1)).Build()).ToString()
	if err != nil || ep != j.Ep {
		t.Fatalf("epoch in Redis %q (%v), want %q", ep, err, j.Ep)
	}
	// A join from before the first push is not recovered past the TTL.
	time.Sleep(3 * ttl)
	if j3, err := b.JoinAt(1, &offSink{id: 3}, &proto.Position{Off: 0, Ep: j.Ep}); err != nil || j3.Recovered || j3.Ep != j.Ep {
		t.Fatalf("join since offset 0 after the pushes aged out: %+v %v, want not recovered, same epoch", j3, err)
	}
}

// A room this node stops receiving (no member here for its linger) drops
// the pushes it kept in memory: they could not serve a join any more (a
// join subscribes anew and reads Redis), and every node that ever had a
// member kept up to rooms.history_size pushes for as long as the room
// stayed open. Its position stays.
func TestDroppedRoomForgetsItsRing(t *testing.T) {
	c := newCluster(t, clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}, "a", ClusterConfig{Linger: 50 * time.Millisecond})
	c.OpenRoom(1)
	s := &offSink{id: 1}
	if _, err := c.JoinAt(1, s, nil); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, err := c.PublishRoom(1, proto.Push{Biz: proto.BizChat}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return len(s.got()) == 5 })
	r := c.local.room(1)
	kept := func() int {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.hist.n
	}
	if kept() != 5 {
		t.Fatalf("%d pushes kept, want 5", kept())
	}
	c.Leave(1, s)
	waitFor(t, func() bool { return kept() == 0 })
	if ep, last, _ := c.local.Position(1); ep == "" || last != 5 {
		t.Fatalf("position after the drop: %q %d, want the epoch at 5", ep, last)
	}
}

// A room's ids are never reused: the batch that closes it leaves its epoch
// and counter to expire with its history (history_ttl), not a day later —
// closed rooms do not fill Redis with keys for a day.
func TestClosedRoomsKeysExpireWithItsHistory(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	a := newCluster(t, env, "a", ClusterConfig{HistoryTTL: time.Minute})
	a.OpenRoom(1)
	if _, err := a.JoinAt(1, &offSink{id: 1}, nil); err != nil {
		t.Fatal(err)
	}
	ttl := func(k string) time.Duration {
		ms, err := a.rdb.Do(context.Background(), a.rdb.B().Pttl().Key(k).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		return time.Duration(ms) * time.Millisecond
	}
	if _, err := a.PublishRoom(1, proto.Push{Biz: proto.BizChat}); err != nil {
		t.Fatal(err)
	}
	if d := ttl(epKey(1)); d <= time.Hour {
		t.Fatalf("an open room's epoch expires in %v, want the epoch's TTL (24 h)", d)
	}
	a.CloseRoom(1, &proto.Push{Biz: 5559, Data: []byte(`{"room_id":1}`)})
	waitFor(t, func() bool { return a.local.room(1) == nil })
	for _, k := range []string{epKey(1), seqKey(1), batchKey(1)} {
		if d := ttl(k); d <= 0 || d > time.Minute {
			t.Fatalf("%s of a closed room expires in %v, want within history_ttl (1m)", k, d)
		}
	}
}

// Redis came back from an older snapshot (the room's counter below what
// clients have, its epoch the same) and no node remembers the room (every
// one restarted): a join whose since is ahead of the counter is not
// recovered — the next pushes reuse offsets the client has, which it would
// drop as duplicates; told, it re-syncs and takes the reply's position. A
// since within the counter is recovered as before. Before, both were.
func TestJoinSinceAheadOfARolledBackCounterNotRecovered(t *testing.T) {
	env := clusterEnv{nats: natstest.Start(t), redis: redistest.Start(t)}
	a := newCluster(t, env, "a", ClusterConfig{})
	a.OpenRoom(1)
	s := &offSink{id: 1}
	j, err := a.JoinAt(1, s, nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, err := a.PublishRoom(1, proto.Push{Biz: proto.BizChat}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return len(s.got()) == 5 })
	// The snapshot: the counter back at 2, the epoch kept.
	if err := a.rdb.Do(context.Background(), a.rdb.B().Set().Key(seqKey(1)).Value("2").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	b := newCluster(t, env, "b", ClusterConfig{}) // a node that never had the room
	b.OpenRoom(1)
	j2, err := b.JoinAt(1, &offSink{id: 2}, &proto.Position{Off: 5, Ep: j.Ep})
	if err != nil || j2.Recovered || j2.Ep != j.Ep || j2.Off != 2 {
		t.Fatalf("join since 5 with Redis's counter at 2: %+v %v, want not recovered at %s:2", j2, err, j.Ep)
	}
	if j3, err := b.JoinAt(1, &offSink{id: 3}, &proto.Position{Off: 2, Ep: j.Ep}); err != nil || !j3.Recovered {
		t.Fatalf("join since 2: %+v %v, want recovered", j3, err)
	}
}
