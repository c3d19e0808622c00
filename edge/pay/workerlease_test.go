package pay_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/persist/redistest"
)

func leaseClient(t *testing.T) rueidis.Client {
	t.Helper()
	srv := redistest.Start(t)
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// Nodes sharing Redis never get the same worker id: MaxWorkers nodes that
// derive theirs (-1) all get different ones and the next node is refused;
// an explicit id held by another node is refused; a released id (shutdown)
// is free again; a node restarting under its own id takes its lease back.
func TestWorkerLeaseUnique(t *testing.T) {
	c := leaseClient(t)
	ctx := context.Background()
	seen := map[int]string{}
	var leases []*pay.WorkerLease
	for i := 0; i < pay.MaxWorkers; i++ {
		node := fmt.Sprintf("gw-%d", i)
		l, err := pay.LeaseWorker(ctx, c, node, -1, -1, time.Minute, nil)
		if err != nil {
			t.Fatalf("%s: %v", node, err)
		}
		if other, dup := seen[l.ID()]; dup {
			t.Fatalf("%s got worker id %d, already %s's", node, l.ID(), other)
		}
		seen[l.ID()] = node
		if !l.Held() {
			t.Fatalf("%s: lease not held", node)
		}
		leases = append(leases, l)
	}
	if _, err := pay.LeaseWorker(ctx, c, "gw-extra", -1, -1, time.Minute, nil); err == nil {
		t.Fatal("a node beyond MaxWorkers got a worker id")
	}
	// An explicit id another node holds.
	if _, err := pay.LeaseWorker(ctx, c, "gw-extra", leases[3].ID(), -1, time.Minute, nil); err == nil || !strings.Contains(err.Error(), "gw-3") {
		t.Fatalf("explicit id held by gw-3: %v", err)
	}
	// The same node restarting (its lease still in Redis) takes it back.
	again, err := pay.LeaseWorker(ctx, c, "gw-5", leases[5].ID(), -1, time.Minute, nil)
	if err != nil || again.ID() != leases[5].ID() {
		t.Fatalf("gw-5 restarting: %v", err)
	}
	// Shutdown releases: the id is free for another node.
	freed := leases[7].ID()
	leases[7].Close()
	l, err := pay.LeaseWorker(ctx, c, "gw-new", freed, -1, time.Minute, nil)
	if err != nil || l.ID() != freed {
		t.Fatalf("released id %d not free: %v", freed, err)
	}
	if v, _ := c.Do(ctx, c.B().Get().Key(pay.WorkerLeaseKey(freed)).Build()).ToString(); v != "gw-new" {
		t.Fatalf("holder %q", v)
	}
	l.Close()
	for _, l := range leases {
		l.Close()
	}
}

// The lease is refreshed before its TTL ends; once another node holds the
// key, Held turns false (the order service then refuses to make ids).
func TestWorkerLeaseRefreshAndLoss(t *testing.T) {
	c := leaseClient(t)
	ctx := context.Background()
	const ttl = 300 * time.Millisecond
	l, err := pay.LeaseWorker(ctx, c, "gw-a", 4, -1, ttl, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	key := pay.WorkerLeaseKey(4)
	// Refreshed: still there after several TTLs.
	deadline := time.Now().Add(3 * ttl)
	for time.Now().Before(deadline) {
		if v, _ := c.Do(ctx, c.B().Get().Key(key).Build()).ToString(); v != "gw-a" || !l.Held() {
			t.Fatalf("lease lapsed: holder %q held %v", v, l.Held())
		}
		time.Sleep(ttl / 10)
	}
	// Another node takes the key (as after an expiry): the lease is lost.
	if err := c.Do(ctx, c.B().Set().Key(key).Value("gw-b").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for l.Held() {
		if time.Now().After(deadline) {
			t.Fatal("lease still held after another node took it")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Close does not delete the other node's key.
	l.Close()
	if v, _ := c.Do(ctx, c.B().Get().Key(key).Build()).ToString(); v != "gw-b" {
		t.Fatalf("holder after close %q", v)
	}
}

// A Redis restarted empty loses the lease keys: each node's refresh writes
// its own back within a second (not a third of the TTL: the cluster routes by
// the key, and a missing key lets another node claim the id), and the lease
// stays held.
func TestWorkerLeaseBackAfterRedisLoss(t *testing.T) {
	srv := redistest.Start(t)
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	l, err := pay.LeaseWorker(ctx, c, "gw-a", 7, -1, pay.DefaultLeaseTTL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srv.Restart()
	lost := time.Now()
	for {
		if v, _ := c.Do(ctx, c.B().Get().Key(pay.WorkerLeaseKey(7)).Build()).ToString(); v == "gw-a" {
			break
		}
		if time.Since(lost) > 5*time.Second {
			t.Fatal("the lease key not back 5 s after Redis restarted empty")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !l.Held() {
		t.Fatal("lease not held after the key came back")
	}
}

// A worker id stays its node's while the node is away: a node choosing an id
// (-1) takes one no node owns before one another node owned, even when its
// hash starts at that one (gw-1 and gw-23 both start at 1). The node comes
// back to its own id; after Redis lost the owners, to the id its disk
// remembers (prefer), unless another node owns that one now. Only when every
// id has an owner is another node's taken over (its lease free).
func TestWorkerIDStaysItsNodes(t *testing.T) {
	c := leaseClient(t)
	ctx := context.Background()
	take := func(node string, prefer int) *pay.WorkerLease {
		t.Helper()
		l, err := pay.LeaseWorker(ctx, c, node, -1, prefer, time.Minute, nil)
		if err != nil {
			t.Fatalf("%s: %v", node, err)
		}
		return l
	}
	a := take("gw-1", -1)
	if a.ID() != 1 {
		t.Fatalf("gw-1 took %d, want its hash's 1", a.ID())
	}
	a.Close() // a restart, an outage: the lease is free
	b := take("gw-23", -1)
	if b.ID() == 1 {
		t.Fatal("gw-23 took gw-1's worker id while gw-1 was away")
	}
	if a = take("gw-1", -1); a.ID() != 1 {
		t.Fatalf("gw-1 back: worker %d, want 1", a.ID())
	}
	a.Close()
	b.Close()
	// Redis restarted empty: the owners are gone; the disks remember.
	if err := c.Do(ctx, c.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if b = take("gw-23", 2); b.ID() != 2 {
		t.Fatalf("gw-23 preferring 2 took %d", b.ID())
	}
	if a = take("gw-1", 1); a.ID() != 1 {
		t.Fatalf("gw-1 preferring 1 took %d", a.ID())
	}
	a.Close()
	b.Close()
	// A stale preference (another node owns it now) is not taken.
	if l := take("gw-7", 2); l.ID() == 2 {
		t.Fatal("gw-7 took gw-23's id 2 by a stale preference")
	} else {
		l.Close()
	}
	// Every id owned (and free): a new node takes one over.
	for i := range pay.MaxWorkers {
		if err := c.Do(ctx, c.B().Set().Key(pay.WorkerOwnerKey(i)).Value(fmt.Sprintf("old-%d", i)).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	l := take("gw-new", -1)
	if v, _ := c.Do(ctx, c.B().Get().Key(pay.WorkerOwnerKey(l.ID())).Build()).ToString(); v != "gw-new" {
		t.Fatalf("owner of %d: %q, want gw-new", l.ID(), v)
	}
	l.Close()
}

// A node taking over an absent node's worker id with its clock more than the
// lease's TTL behind makes its ids after every id the absent node could have
// made (the high mark in Redis), not at its own clock's time: it would make
// the absent node's ids again, and madeByEarlierHolder would not know them
// as the earlier holder's.
func TestWorkerTakenOverByASlowClockStartsAfterTheEarlierHolder(t *testing.T) {
	srv := redistest.Start(t)
	client := func() rueidis.Client {
		c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}, DisableCache: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	ctx := context.Background()
	const ttl = 400 * time.Millisecond
	const worker = 9
	ca := client()
	a, err := pay.LeaseWorkerAt(ctx, ca, "gw-a", worker, -1, ttl, nil, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	genA := pay.NewIDGen("gw-a", worker, time.Now)
	var lastA int64
	for end := time.Now().Add(3 * ttl); time.Now().Before(end) && a.Held(); time.Sleep(5 * time.Millisecond) {
		lastA = genA.Next(42) // refreshed meanwhile: the mark follows
	}
	// gw-a dies: its Redis client gone, its lease runs out (not released).
	ca.Close()
	c0 := client()
	waitLeaseGone(t, c0, worker)
	behind := func() time.Time { return time.Now().Add(-time.Minute) }
	cb := client()
	b, err := pay.LeaseWorkerAt(ctx, cb, "gw-b", worker, -1, ttl, nil, behind)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if !pay.TimeOf(lastA).Before(b.Since()) {
		t.Fatalf("gw-b (clock a minute behind) took the id over since %v; gw-a made an id at %v", b.Since(), pay.TimeOf(lastA))
	}
	if first := pay.FirstIDAt(b.Since()); first <= lastA {
		t.Fatalf("gw-b's ids may start at %d, not above gw-a's %d", first, lastA)
	}
	// gw-b makes ids after the mark (its clock still behind), for a while
	// (refreshed meanwhile), then dies too: gw-c, as far behind, starts
	// after gw-b's ids — the mark gw-b left covers them, not its own clock.
	genB := pay.NewIDGen("gw-b", worker, behind)
	genB.NotBelow(pay.FirstIDAt(b.Since()))
	var lastB int64
	for end := time.Now().Add(3 * ttl); time.Now().Before(end) && b.Held(); time.Sleep(5 * time.Millisecond) {
		lastB = genB.Next(42)
	}
	cb.Close()
	waitLeaseGone(t, c0, worker)
	defer b.Close()
	c, err := pay.LeaseWorkerAt(ctx, client(), "gw-c", worker, -1, ttl, nil, behind)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if first := pay.FirstIDAt(c.Since()); first <= lastB || first <= lastA {
		t.Fatalf("gw-c's ids may start at %d, not above gw-b's %d (gw-a's %d)", first, lastB, lastA)
	}
}

// A node whose lease lapsed (Redis out of its reach past the TTL) while
// another node held the id and made ids with a clock ahead of its own takes
// the id back with its next refresh: it starts after that node's ids
// (Since raised, OnSince called to floor the order ids), not at its own
// clock. Before, it went on with its old Since and ids.
func TestWorkerLeaseRetakenAfterAnotherHolderStartsAfterIt(t *testing.T) {
	// gw-b ten minutes ahead, or half a lease (its mark then below the
	// time gw-a's own failed refreshes would have marked).
	for _, skew := range []time.Duration{10 * time.Minute, 150 * time.Millisecond} {
		t.Run(skew.String(), func(t *testing.T) { testWorkerLeaseRetaken(t, skew) })
	}
}

func testWorkerLeaseRetaken(t *testing.T, skew time.Duration) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	ctx := context.Background()
	const ttl = 300 * time.Millisecond
	const worker = 11
	a, err := pay.LeaseWorker(ctx, rdb, "gw-a", worker, -1, ttl, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	raised := make(chan time.Time, 4)
	a.SetOnSince(func(t time.Time) { raised <- t })
	// The lease lapses (as if gw-a were cut off) and gw-b, its clock ten
	// minutes ahead, takes the id at once and makes ids, then goes.
	if err := rdb.Do(ctx, rdb.B().Del().Key(pay.WorkerLeaseKey(worker)).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	ahead := func() time.Time { return time.Now().Add(skew) }
	b, err := pay.LeaseWorkerAt(ctx, rdb, "gw-b", worker, -1, ttl, nil, ahead)
	if err != nil {
		t.Fatal(err)
	}
	genB := pay.NewIDGen("gw-b", worker, ahead)
	genB.NotBelow(pay.FirstIDAt(b.Since()))
	var lastB int64
	for end := time.Now().Add(2 * ttl); time.Now().Before(end) && b.Held(); time.Sleep(5 * time.Millisecond) {
		lastB = genB.Next(42)
	}
	for deadline := time.Now().Add(5 * time.Second); a.Held(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("gw-a's lease still held while gw-b holds the key")
		}
	}
	b.Close()
	for deadline := time.Now().Add(5 * time.Second); !a.Held(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("gw-a did not take its lease back")
		}
	}
	if first := pay.FirstIDAt(a.Since()); first <= lastB {
		t.Fatalf("gw-a back since %v: its ids may start at %d, not above gw-b's %d", a.Since(), first, lastB)
	}
	select {
	case got := <-raised:
		if pay.FirstIDAt(got) <= lastB {
			t.Fatalf("OnSince told %v, not after gw-b's ids", got)
		}
	default:
		t.Fatal("OnSince not called when the lease was taken back")
	}
}

// waitLeaseGone waits until worker's lease key has expired (its holder gone
// without releasing it).
func waitLeaseGone(t *testing.T, c rueidis.Client, worker int) {
	t.Helper()
	for {
		n, err := c.Do(context.Background(), c.B().Exists().Key(pay.WorkerLeaseKey(worker)).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A refresh that takes the id back after another holder, whose reply is
// lost, has set the owner key to this node: the next claim is a first claim
// again and adopts the mark it finds. Before, the next refresh saw its own
// name as owner and kept its old Since — under the other holder's ids.
func TestWorkerLeaseRetakeWithItsReplyLostStillAdopts(t *testing.T) {
	srv := redistest.Start(t)
	px := redistest.StartProxy(t, srv.Addr)
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{px.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	ctx := context.Background()
	const ttl = 300 * time.Millisecond
	const worker = 13
	a, err := pay.LeaseWorker(ctx, c, "gw-a", worker, -1, ttl, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	// gw-b held the id meanwhile (a's lease lapsed), ten minutes ahead, and
	// went: its name as owner, its mark.
	rdb := srv.Client(t)
	bMark := time.Now().Add(10 * time.Minute).UnixMilli()
	for _, cmd := range []rueidis.Completed{
		rdb.B().Del().Key(pay.WorkerLeaseKey(worker)).Build(),
		rdb.B().Set().Key(pay.WorkerOwnerKey(worker)).Value("gw-b").Build(),
		rdb.B().Set().Key(pay.WorkerHighKey(worker)).Value(strconv.FormatInt(bMark, 10)).Build(),
	} {
		if err := rdb.Do(ctx, cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
	px.LoseReply("liveedge:pay:worker:13", 50*time.Millisecond) // a's next claim runs, its reply lost
	for deadline := time.Now().Add(10 * time.Second); a.Since().UnixMilli() < bMark; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("gw-a since %v, not after gw-b's mark %v (lost reply fired %d)", a.Since(), time.UnixMilli(bMark), px.Fired())
		}
	}
	if px.Fired() != 1 {
		t.Fatalf("the lost reply fired %d times", px.Fired())
	}
}
