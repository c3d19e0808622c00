package redpacket

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Regression tests from a review of the sharding: each drove Σ granted +
// refunded above T, or refunded packets viewers were still grabbing.

// inDoubtWallet applies the settlement op of a rain but answers
// ErrInProgress once, as the shared wallet does when the script ran and its
// reply was lost (its watcher finishes it later).
type inDoubtWallet struct {
	*persist.Ledger
	once sync.Once
}

func (w *inDoubtWallet) Apply(op persist.Op) (persist.Result, error) {
	res, err := w.Ledger.Apply(op)
	lost := false
	if strings.HasPrefix(op.ReqID, "rp-end:") {
		w.once.Do(func() { lost = true })
	}
	if lost && err == nil {
		return persist.Result{}, persist.ErrInProgress
	}
	return res, err
}

// A cancel whose op is in doubt leaves the rain unable to start (the anchor
// may already have its T back) until the cancel is retried, which completes
// it once.
func TestCancelInDoubtBlocksStart(t *testing.T) {
	n := newPendingNode(t) // the anchor has 1,000
	n.start(t, &inDoubtWallet{Ledger: n.l})
	svc, l := n.svc, n.l
	const total = 1000
	v, err := svc.Create(shardAnchor, shardRoom, total, 10, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Prepare(shardAnchor, v.Code); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Cancel(shardAnchor, v.Code); err == nil {
		t.Fatal("want the in-doubt error")
	}
	if _, err := svc.Start(shardAnchor, v.Code); proto.AsError(err).Code != proto.CodeConflict {
		t.Fatalf("start after a cancel in doubt: %v, want 10409", err)
	}
	if _, err := svc.Prepare(shardAnchor, v.Code); err == nil {
		// Already PREPARED: answers its state; the point is that nothing moves.
		if b, _ := l.Balance(shardAnchor); b != total {
			t.Fatalf("balance %d", b)
		}
	}
	fin, err := svc.Cancel(shardAnchor, v.Code)
	if err != nil || fin.State != StateFinished || fin.Refunded != total {
		t.Fatalf("cancel retried: %+v %v", fin, err)
	}
	if b, _ := l.Balance(shardAnchor); b != total {
		t.Fatalf("anchor balance %d after the cancel, want %d (refunded once)", b, total)
	}
}

// A grab that took a shard just before another grab forgot it (its first
// lease found the rain not running yet) cannot lease or grant through it: it
// takes a fresh one, which the owner's close then waits for.
func TestForgottenShardGrantsNothing(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	const total, count = 200, 2
	m := c.nodes["n1"]
	if _, err := m.ledger.Apply(persist.Op{Postings: []persist.Posting{{User: shardAnchor, Delta: total, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	v, err := m.svc.Create(shardAnchor, shardRoom, total, count, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.svc.Prepare(shardAnchor, v.Code); err != nil {
		t.Fatal(err)
	}
	code, h := v.Code, c.svc("n2")
	sh := h.shardOf(code, "n1") // grab C: its first step
	if _, perr := h.GrabVia("n1", 1, code); perr == nil || perr.Code != proto.CodeRedPacketNotFound {
		t.Fatalf("grab A before the start: %v", perr)
	}
	if _, err := m.svc.Start(shardAnchor, code); err != nil {
		t.Fatal(err)
	}
	if err := h.refill(sh); err != errShardGone {
		t.Fatalf("lease through a forgotten shard: %v", err)
	}
	if _, err := h.popShard(sh); err != errShardGone {
		t.Fatalf("pop from a forgotten shard: %v", err)
	}
	if _, perr := h.GrabVia("n1", 2, code); perr != nil { // a fresh shard
		t.Fatal(perr)
	}
	grabUntilServed(t, c, "n1", 3, code)
	c.conserve(t, "n1", code, total)
}

// A shard that only learned a rain's room (its grabber was refused) is
// forgotten once the rain is over.
func TestMetaShardForgottenAfterTheRain(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	code := c.rain(t, "n1", 100, 1, time.Second)
	h := c.svc("n2")
	h.cfg.InRoom = func(int64, int64) (bool, error) { return false, nil }
	if _, perr := h.GrabVia("n1", 5, code); perr == nil || perr.Code != proto.CodeForbidden {
		t.Fatalf("want 10003, got %v", perr)
	}
	h.mu.RLock()
	sh := h.shards[code]
	h.mu.RUnlock()
	if sh == nil {
		t.Fatal("no shard")
	}
	time.Sleep(1100 * time.Millisecond)
	h.sweepShard(sh) // what its timer runs (at the end + tombstoneTTL)
	h.mu.RLock()
	left := h.shards[code]
	h.mu.RUnlock()
	if left != nil {
		t.Fatal("the shard of an ended rain is still kept")
	}
}

// A holder's lease ahead (it still has packets) that finds the owner empty
// does not end the rain: the holder's viewers grab its packets to the last.
func TestLeaseAheadDoesNotEndTheRain(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	const count, total = 100, 10_000
	code := c.rain(t, "n1", total, count, time.Hour)
	got := 0
	if _, perr := c.grab("n2", "n1", 1, code); perr != nil { // n2 leases its slice
		t.Fatal(perr)
	}
	got++
	u, n := c.takePool(t, code, 1000) // the owner's viewers take its pool
	got += n
	for ; u < 5000; u++ { // now only n2's viewers grab
		if _, perr := c.grab("n2", "n1", u, code); perr != nil {
			break
		}
		got++
	}
	v := c.conserve(t, "n1", code, total)
	if got != count {
		t.Fatalf("%d of %d granted, %d refunded while n2's viewers were told 30003", got, count, v.Refunded)
	}
}

// A lease answer still travelling to its holder (built on the owner, not
// yet in the holder's slice) does not let the owner's grab end the rain: a
// reclaim round sees the holder's Held behind what was leased to it and
// looks again once the answer arrives.
func TestLeaseOnTheWayDoesNotEndTheRain(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	const count, total = 20, 2_000
	code := c.rain(t, "n1", total, count, time.Hour)
	if _, perr := c.grab("n2", "n1", 50, code); perr != nil { // n2 leases a slice (3 of the 20)
		t.Fatal(perr)
	}
	got := 1
	free := func() int { // n2's unused packets
		sh := c.svc("n2").shardOf(code, "n1")
		sh.mu.Lock()
		defer sh.mu.Unlock()
		return len(sh.free) + sh.inflight
	}
	pool := func() int { n, _ := c.svc("n1").mem.Len(context.Background(), code); return n }
	for deadline := time.Now().Add(5 * time.Second); free() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("n2 has no packets left of its slice")
		}
	}
	u := int64(100)
	for ; pool() > 1; u++ { // the owner's viewers take its pool down to one packet
		if _, perr := c.grab("n1", "n1", u, code); perr != nil {
			t.Fatal(perr)
		}
		got++
	}
	gate := make(chan int)
	c.mu.Lock()
	c.leaseGate = gate
	c.mu.Unlock()
	// n2's viewers take its slice; its last grab leases the owner's last
	// packet, whose answer is held on the way.
	for free() > 0 {
		if _, perr := c.grab("n2", "n1", u, code); perr != nil {
			t.Fatal(perr)
		}
		u++
		got++
	}
	if n := <-gate; n != 1 || pool() != 0 {
		t.Fatalf("the lease on the way carries %d packets, the pool has %d", n, pool())
	}
	ownerGrab := make(chan *proto.Error, 1)
	go func(user int64) {
		_, perr := c.grab("n1", "n1", user, code)
		ownerGrab <- perr
	}(u)
	u++
	select {
	case perr := <-ownerGrab:
		t.Fatalf("the owner's grab answered %v with a packet on its way to n2", perr)
	case <-time.After(100 * time.Millisecond):
	}
	c.mu.Lock()
	c.leaseGate = nil
	c.mu.Unlock()
	gate <- 0 // the answer arrives
	if perr := <-ownerGrab; perr == nil {
		got++ // the owner took it back from n2
	}
	for ; got < count && u < 1000; u++ {
		if _, perr := c.grab("n2", "n1", u, code); perr == nil {
			got++
		} else if perr.Code == proto.CodeRedPacketEmpty {
			break
		}
	}
	v := c.conserve(t, "n1", code, total)
	if got != count || v.Refunded != 0 {
		t.Fatalf("%d of %d granted, %d refunded", got, count, v.Refunded)
	}
}

// flakyWallet answers grant ops ErrInProgress without applying them while
// flaky (the script ran but this node cannot reach Redis to finish: its
// intent stays and its watcher lands it later).
type flakyWallet struct {
	*persist.Ledger
	mu      sync.Mutex
	flaky   bool
	pending []persist.Op
}

func (w *flakyWallet) isFlaky(op persist.Op) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.flaky && strings.HasPrefix(op.ReqID, "rp:")
}

func (w *flakyWallet) Apply(op persist.Op) (persist.Result, error) {
	if w.isFlaky(op) {
		return persist.Result{}, persist.ErrInProgress
	}
	return w.Ledger.Apply(op)
}

func (w *flakyWallet) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	if w.isFlaky(op) {
		w.mu.Lock()
		w.pending = append(w.pending, op)
		w.mu.Unlock()
		done(persist.Result{}, persist.ErrInProgress)
		return
	}
	w.Ledger.ApplyAsync(op, done)
}

// A grant in doubt on a holder keeps its shard (the sweep does not forget
// it) until a close has applied it again and counted it: the owner never
// refunds a packet that lands later.
func TestDoubtfulGrantKeepsItsShard(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	code := c.rain(t, "n1", 1000, 10, time.Hour)
	h := c.svc("n2")
	fw := &flakyWallet{Ledger: c.nodes["n2"].ledger}
	h.wallet = fw
	if _, perr := c.grab("n2", "n1", 1, code); perr != nil {
		t.Fatal(perr)
	}
	fw.mu.Lock()
	fw.flaky = true
	fw.mu.Unlock()
	if _, perr := c.grab("n2", "n1", 2, code); perr == nil {
		t.Fatal("want the in-doubt error")
	}
	// Its user keeps the one-per-user place if Redis loses the sets: the
	// rebuild lists them beside the durable grants.
	var doubt []string
	_ = h.InDoubtClaims(func(code string, user, until int64) error {
		doubt = append(doubt, code+"/"+strconv.FormatInt(user, 10))
		return nil
	})
	if len(doubt) != 1 || doubt[0] != code+"/2" {
		t.Fatalf("in-doubt claims %v, want [%s/2]", doubt, code)
	}
	o := c.svc("n1")
	o.end(o.get(code)) // time is up: settle → close n2 → its re-apply fails → retried in 5 s
	time.Sleep(200 * time.Millisecond)
	h.mu.RLock()
	sh := h.shards[code]
	h.mu.RUnlock()
	h.sweepShard(sh) // its timer firing meanwhile
	h.mu.RLock()
	kept := h.shards[code] == sh
	h.mu.RUnlock()
	if !kept {
		t.Fatal("a shard with a grant in doubt was forgotten")
	}
	fw.mu.Lock()
	fw.flaky = false
	pending := fw.pending
	fw.mu.Unlock()
	v := c.conserve(t, "n1", code, 1000) // waits for the retried settlement
	for _, op := range pending {         // the holder's watcher lands its intent: a replay
		if _, err := fw.Ledger.Apply(op); err != nil {
			t.Fatal(err)
		}
	}
	grants, _ := c.grants(t, code)
	var sum int64
	for _, a := range grants {
		sum += a
	}
	if sum+v.Refunded != 1000 || len(grants) != 2 {
		t.Fatalf("%d grants, %d coins + refunded %d, total 1000", len(grants), sum, v.Refunded)
	}
}

// takePool grabs on the owner n1, as users from u on, until its pool is
// empty; it returns the next user and the packets granted.
func (c *cluster) takePool(t *testing.T, code string, u int64) (next int64, got int) {
	t.Helper()
	for left, _ := c.svc("n1").mem.Len(context.Background(), code); left > 0; left-- {
		if _, perr := c.grab("n1", "n1", u, code); perr != nil {
			t.Fatal(perr)
		}
		u++
		got++
	}
	return u, got
}

// grabUntilServed grabs through node until the answer is not "retry" (a
// packet on its way to another node is neither here nor there yet).
func grabUntilServed(t *testing.T, c *cluster, node string, user int64, code string) {
	t.Helper()
	for i := 0; ; i++ {
		_, perr := c.grab(node, "n1", user, code)
		if perr == nil {
			return
		}
		if perr.Code != proto.CodeInternal || i > 100 {
			t.Fatalf("grab through %s: %v", node, perr)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A rain's only packet is out on the owner, its grant held; a holder asks
// meanwhile and is told "none left anywhere". The wallet then refuses the
// grant as unavailable: the packet goes back and reopens the rain, and the
// holder asks again after overRecheck — its grabber gets the packet (before:
// the holder took the first "none" for good, and the packet waited for the
// rain's end to be refunded).
func TestReopenedRainReachesHolders(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	code := c.rain(t, "n1", 100, 1, time.Hour)
	o := c.svc("n1")
	hw := &heldWallet{Ledger: c.nodes["n1"].ledger, prefix: "rp:", arrived: make(chan struct{}), release: make(chan error)}
	o.wallet = hw
	first := make(chan *proto.Error, 1)
	o.GrabAsync(1, code, func(_ GrabReply, perr *proto.Error) { first <- perr })
	<-hw.arrived
	if _, perr := c.grab("n2", "n1", 2, code); perr == nil || perr.Code != proto.CodeRedPacketEmpty {
		t.Fatalf("a holder's grab while the only packet is out: %v (want empty)", perr)
	}
	hw.release <- persist.ErrWalletUnavailable
	if perr := <-first; perr == nil {
		t.Fatal("the refused grab answered ok")
	}
	start := time.Now()
	for {
		_, perr := c.grab("n2", "n1", 3, code)
		if perr == nil {
			break
		}
		if perr.Code != proto.CodeRedPacketEmpty || time.Since(start) > 5*overRecheck {
			c.dump(t, code)
			t.Fatalf("the packet put back never reached the holder's grabber: %v", perr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if v := c.conserve(t, "n1", code, 100); v.GrantedCount != 1 || v.Refunded != 0 {
		t.Fatalf("finished %+v, want the one packet granted", v)
	}
}

// A node that asked for a lease when none could be given (the pool empty,
// the only other holder unreachable) and then went for good has nothing
// out: the rain settles without it once the real holder is back. Before,
// every settlement asked it to close and failed: the anchor's refund and
// the room's next rain waited for ever.
func TestGoneHolderWithNothingOutDoesNotBlockTheSettlement(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	const count, total = 100, 10_000
	code := c.rain(t, "n1", total, count, time.Second)
	if _, perr := c.grab("n2", "n1", 1, code); perr != nil { // n2 leases its slice
		t.Fatal(perr)
	}
	c.takePool(t, code, 1000) // the owner's viewers take its pool
	m2 := c.kill("n2")
	if _, perr := c.grab("n3", "n1", 5000, code); perr == nil {
		t.Fatal("n3 granted a packet with the pool empty and n2 unreachable")
	}
	m3 := c.kill("n3") // gone: it never had a packet
	c.start(t, "n2", m2.dir)
	deadline := time.Now().Add(15 * time.Second)
	for v, _ := c.svc("n1").Get(code); v.State != StateFinished; v, _ = c.svc("n1").Get(code) {
		if time.Now().After(deadline) {
			t.Fatalf("not settled with n3 gone: %+v", v)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.start(t, "n3", m3.dir) // for the conservation check: its disk has no grant
	c.conserve(t, "n1", code, total)
}

// On a holder, a grab whose one-per-user claim was taken but whose reply
// was lost fails and grants nothing; the user's next grab there gets a
// packet (the place taken back from that attempt), and none more on any
// node.
func TestShardedGrabAfterALostClaimReply(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	const total, count, user = 1000, 10, 50
	code := c.rain(t, "n1", total, count, time.Second)
	h := c.svc("n2")
	claim := h.cfg.Claim
	var lost sync.Once
	h.cfg.Claim = func(ctx context.Context, code string, u, until int64, token string, prev []string) (bool, string, error) {
		ok, gen, err := claim(ctx, code, u, until, token, prev)
		drop := false
		if u == user {
			lost.Do(func() { drop = true })
		}
		if drop && err == nil {
			return false, "", context.DeadlineExceeded // taken; its reply lost
		}
		return ok, gen, err
	}
	if _, perr := c.grab("n2", "n1", user, code); perr == nil || perr.Code != proto.CodeInternal {
		t.Fatalf("grab with its claim's reply lost: %v, want 50000", perr)
	}
	if _, perr := c.grab("n2", "n1", user, code); perr != nil {
		t.Fatalf("the user's next grab: %v, want a packet", perr)
	}
	for _, n := range []string{"n1", "n2"} {
		if _, perr := c.grab(n, "n1", user, code); perr == nil || perr.Code != proto.CodeRedPacketTaken {
			t.Fatalf("a second packet for the user on %s: %v, want 30002", n, perr)
		}
	}
	if v := c.conserve(t, "n1", code, total); v.GrantedCount != 1 {
		t.Fatalf("view %+v, want one grant", v)
	}
}

// Attempts that granted nothing pile up while Redis misbehaves: A's claim
// took the place (its reply lost) and A's release is not answered; B's
// claim never reached Redis (its release is answered: B held nothing). The
// user's next grab takes the place back from A all the same — the node
// remembered only the last attempt, B, whose answered release forgot it:
// 30002 with nothing granted. And the failed attempts share one release
// loop per user, not a goroutine each until the rain's end.
func TestShardedGrabAfterStackedLostAttempts(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	const total, count, user = 1000, 10, 50
	code := c.rain(t, "n1", total, count, 5*time.Second)
	h := c.svc("n2")
	claim, unclaim := h.cfg.Claim, h.cfg.Unclaim
	var calls atomic.Int32
	var first atomic.Value // A's token
	var refuseA atomic.Bool
	refuseA.Store(true)
	h.cfg.Claim = func(ctx context.Context, code string, u, until int64, token string, prev []string) (bool, string, error) {
		if u != user {
			return claim(ctx, code, u, until, token, prev)
		}
		switch calls.Add(1) {
		case 1: // A: taken, its reply lost
			first.Store(token)
			if _, _, err := claim(ctx, code, u, until, token, prev); err != nil {
				return false, "", err
			}
			return false, "", context.DeadlineExceeded
		case 2, 3, 4, 5, 6: // B…: never reached Redis
			return false, "", errors.New("dial tcp: connection refused")
		}
		return claim(ctx, code, u, until, token, prev)
	}
	h.cfg.Unclaim = func(ctx context.Context, code string, u int64, token string) error {
		if u == user && refuseA.Load() && token == first.Load() {
			return errors.New("dial tcp: connection refused")
		}
		return unclaim(ctx, code, u, token)
	}
	for i := range 6 {
		if _, perr := c.grab("n2", "n1", user, code); perr == nil || perr.Code != proto.CodeInternal {
			t.Fatalf("grab %d with Redis misbehaving: %v, want 50000", i+1, perr)
		}
	}
	var (
		entries int
		held    []string
	)
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		h.placesMu.Lock()
		lp := h.lost[placeKey{code, user}]
		entries, held = len(h.lost), nil
		if lp != nil {
			held = slices.Clone(lp.tokens)
		}
		h.placesMu.Unlock()
		if (entries == 1 && len(held) == 1) || time.Now().After(deadline) {
			break
		}
	}
	if entries != 1 || len(held) != 1 || held[0] != first.Load() {
		t.Fatalf("after six failed attempts: %d lost places, attempts %v; want one place, the first attempt's (%v) — one release loop", entries, held, first.Load())
	}
	if _, perr := c.grab("n2", "n1", user, code); perr != nil {
		t.Fatalf("the user's next grab: %v, want a packet (the place taken back from the first attempt)", perr)
	}
	refuseA.Store(false)
	for _, n := range []string{"n1", "n2"} {
		if _, perr := c.grab(n, "n1", user, code); perr == nil || perr.Code != proto.CodeRedPacketTaken {
			t.Fatalf("a second packet for the user on %s: %v, want 30002", n, perr)
		}
	}
	if v := c.conserve(t, "n1", code, total); v.GrantedCount != 1 {
		t.Fatalf("view %+v, want one grant", v)
	}
}

// A grab whose room's members cannot be read (the cluster's presence in
// Redis did not answer) is 50000 "retry", on the owner and through a slice —
// not 10003 "not in the room", which a client does not retry.
func TestGrabWithPresenceUnreadableIsRetry(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	code := c.rain(t, "n1", 100, 2, time.Hour)
	for _, n := range []string{"n1", "n2"} {
		c.svc(n).cfg.InRoom = func(int64, int64) (bool, error) { return false, errors.New("redis: timeout") }
	}
	for _, n := range []string{"n1", "n2"} {
		if _, perr := c.grab(n, "n1", 5, code); perr == nil || perr.Code != proto.CodeInternal {
			t.Fatalf("grab on %s with presence unreadable: %v, want 50000", n, perr)
		}
	}
	for _, n := range []string{"n1", "n2"} {
		c.svc(n).cfg.InRoom = func(room, user int64) (bool, error) { return room == shardRoom, nil }
	}
	if _, perr := c.grab("n2", "n1", 5, code); perr != nil {
		t.Fatalf("the retry once presence is read: %v", perr)
	}
	if got := c.drain(t, "n1", code, []string{"n1", "n2"}, 6); got != 1 {
		t.Fatalf("%d more packets granted, want the 1 left", got)
	}
	c.conserve(t, "n1", code, 100)
}
