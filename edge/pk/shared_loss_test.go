package pk

import (
	"context"
	"crypto/sha1"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
)

// openWallets opens the shared wallets of nodes n1 and n2 (one rebuild set)
// on fresh stores, and waits until they are ready.
func openWallets(t *testing.T, addr string) (*persist.SharedWallet, *persist.SharedWallet) {
	t.Helper()
	var ws []*persist.SharedWallet
	for _, name := range []string{"n1", "n2"} {
		st, err := persist.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = st.Close() })
		rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(rdb.Close)
		w, err := persist.NewSharedWallet(st, rdb, persist.SharedConfig{Node: name, Nodes: []string{"n1", "n2"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(w.Close) // (before the store closes: cleanups run last first)
		ws = append(ws, w)
	}
	for _, w := range ws {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := w.WaitReady(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	return ws[0], ws[1]
}

// walletNode is a cluster node's PK service wired to its shared wallet as
// the gateway wires it: tallies read fresh, its ends wait for the wallet to
// be ready, and the wallet's OnReady writes its PK state back.
func walletNode(t *testing.T, addr string, w *persist.SharedWallet, syncEvery time.Duration, rooms ...int64) *node {
	t.Helper()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	rt, n := watchedNode(t, rooms...)
	n.s = NewShared(rt, func(int64) (bool, error) { return true, nil }, rdb, w.TallyFresh, nil)
	n.s.sh.every = syncEvery
	n.s.grace = 200 * time.Millisecond
	n.s.sh.restoreDelay = 300 * time.Millisecond // (1 s in production)
	n.s.SetWalletReady(w.Ready)
	w.OnReady(n.s.RestoreLost)
	if err := n.s.Restore(time.Now()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.s.Close)
	return n
}

// Redis loses its data (FLUSHALL) while a contest runs, with PK gifts
// scored through two nodes: the wallets rebuild the tallies from the nodes'
// ledgers, the nodes write the contest back (RestoreLost, on the wallet's
// OnReady), a gift after that scores on top, and the contest ends at its
// end time with one final push per room carrying every gift — a seq above
// every push before the loss. (On a machine so slow that the write-back
// comes less than 2 s before the end time, or after it, the gift on top is
// left out: the contest's end waits for the write-back, then it ends with
// every gift before the loss.) A contest that had ended (on node 1; node 2,
// whose sync is off, still held it as running) is not revived: its final
// state is written back by node 1, node 2 drops its copy, no second final.
// After a second loss, with both ended, nothing comes back running.
// Before, every node's sync found the running contests gone and forgot
// them: no final push, ever.
func TestSharedPKSurvivesRedisDataLoss(t *testing.T) {
	srv := redistest.Start(t)
	w1, w2 := openWallets(t, srv.Addr)
	n1 := walletNode(t, srv.Addr, w1, 50*time.Millisecond, 1, 2, 3, 4)
	n2 := walletNode(t, srv.Addr, w2, time.Hour, 1, 2, 3, 4) // learns of the loss from its wallet only
	const giver = 77
	if _, err := w1.Apply(persist.Op{User: giver, ReqID: "credit", Postings: []persist.Posting{{User: giver, Delta: 1000}}}); err != nil {
		t.Fatal(err)
	}
	var gifts sync.Mutex
	no := 0
	// gift debits a PK gift through wallet w, then (unless unscored: its
	// node died first) scores it through n.
	gift := func(w *persist.SharedWallet, n *node, id string, room, v int64, scored bool) {
		t.Helper()
		gifts.Lock()
		no++
		req := "g" + i64(int64(no))
		gifts.Unlock()
		if _, err := w.Apply(persist.Op{User: giver, ReqID: req, Postings: []persist.Posting{{User: giver, Delta: -v}},
			Tallies: []persist.Tally{{Name: TallyName(id), User: room, Delta: v}}}); err != nil {
			t.Fatal(err)
		}
		if scored {
			n.s.AddScore(room, id, v)
		}
	}
	a, err := n1.s.Start(1, 2, 10*time.Second) // (time for the loss, the rebuild and the write-back on a slow machine)
	if err != nil {
		t.Fatal(err)
	}
	b, err := n1.s.Start(3, 4, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, room := range []int64{1, 3} {
		if _, _, ok := n2.s.Running(room); !ok {
			t.Fatalf("room %d's contest not running through node 2", room)
		}
	}
	gift(w1, n1, a.ID, 1, 5, true)
	gift(w2, n2, a.ID, 2, 7, true)
	gift(w1, n1, a.ID, 2, 3, true)
	gift(w2, n2, a.ID, 1, 4, false) // debited, never scored: only its tally has it
	poll(t, 10*time.Second, "the score pushes", func() bool {
		for _, p := range pushes(a.ID, 1, n1, n2) {
			if p.Scores["1"] == 5 && p.Scores["2"] == 10 {
				return true
			}
		}
		return false
	})
	var seqBefore int64
	for _, p := range pushes(a.ID, 1, n1, n2) {
		seqBefore = max(seqBefore, p.Seq)
	}
	// Contest b ends on node 1 (its room closed); node 2 has not learnt it.
	n1.s.EndRoom(3)
	poll(t, 10*time.Second, "b's final push", func() bool { return len(finals(pushes(b.ID, 4, n1, n2))) == 1 })
	n2.s.mu.Lock()
	held := n2.s.sh.byID[b.ID] != nil
	n2.s.mu.Unlock()
	if !held {
		t.Fatal("node 2 already dropped b (the test needs it to miss b's end)")
	}

	flush := func() {
		t.Helper()
		c := srv.Client(t)
		if err := c.Do(context.Background(), c.B().Flushall().Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	flush()
	t.Logf("FLUSHALL at %v before a's end", time.Until(a.EndsAt).Round(time.Millisecond))
	// Written back: its hash is there again (running, or over at once if
	// its end time passed meanwhile).
	poll(t, time.Until(a.EndsAt)+30*time.Second, "a written back to Redis", func() bool { _, ok := n1.s.Get(a.ID); return ok })
	want := [2]int64{11, 10} // every gift, and one on top after the write-back
	if left := time.Until(a.EndsAt); left > 2*time.Second {
		if _, _, ok := n1.s.Running(1); !ok {
			t.Fatal("a not running through node 1 after its write-back")
		}
		gift(w2, n2, a.ID, 1, 2, true) // after the write-back: scores on top
	} else {
		want = [2]int64{9, 10}
		t.Logf("a written back %v before its end time: no gift on top (its end waited for the write-back)", left.Round(time.Millisecond))
	}
	for _, room := range []int64{1, 2} {
		poll(t, time.Until(a.EndsAt)+30*time.Second, "a's final push", func() bool { return len(finals(pushes(a.ID, room, n1, n2))) > 0 })
	}
	settled(t, 10*time.Second, a.ID, n1, n2) // (no second final can come after)
	for _, room := range []int64{1, 2} {
		ps := pushes(a.ID, room, n1, n2)
		f := finals(ps)
		if len(f) != 1 {
			t.Fatalf("room %d: %d final pushes of a, want 1: %+v", room, len(f), f)
		}
		t.Logf("room %d: a's final push %+v (seq before the loss ≤ %d)", room, f[0], seqBefore)
		if f[0].Scores["1"] != want[0] || f[0].Scores["2"] != want[1] || f[0].Winner != winner(want) {
			t.Fatalf("room %d: a's final %+v, want %d:%d", room, f[0], want[0], want[1])
		}
		if f[0].Seq <= seqBefore {
			t.Fatalf("room %d: a's final seq %d not above the pushes before the loss (%d)", room, f[0].Seq, seqBefore)
		}
		sort.Slice(ps, func(x, y int) bool { return ps[x].Seq < ps[y].Seq })
		if last := ps[len(ps)-1]; !last.Over {
			t.Fatalf("room %d: a's highest seq is not the final: %+v", room, last)
		}
	}
	if time.Now().Before(a.EndsAt) {
		t.Fatal("a ended before its end time")
	}
	// b stayed ended: over in Redis, node 2's copy gone, its last push the
	// final from before the loss — or, had node 2's wallet been ready more
	// than restoreDelay before node 1's (node 2 wrote b back running first),
	// that final pushed again above node 2's push.
	poll(t, 20*time.Second, "b over through node 2", func() bool { got, ok := n2.s.Get(b.ID); return ok && got.Over })
	settled(t, 10*time.Second, b.ID, n1, n2)
	bf := finals(pushes(b.ID, 4, n1, n2))
	if len(bf) > 1 {
		t.Logf("b's final pushed again: %+v", bf)
	}
	bs := pushes(b.ID, 4, n1, n2)
	sort.Slice(bs, func(x, y int) bool { return bs[x].Seq < bs[y].Seq })
	for _, f := range bf {
		if f.Scores["3"] != bf[0].Scores["3"] || f.Scores["4"] != bf[0].Scores["4"] {
			t.Fatalf("b's finals differ: %+v", bf)
		}
	}
	if last := bs[len(bs)-1]; !last.Over {
		t.Fatalf("b's highest push is not its final: %+v", last)
	}
	for i, n := range []*node{n1, n2} {
		for _, room := range []int64{1, 3} {
			if _, _, ok := n.s.Running(room); ok {
				t.Fatalf("room %d's contest still running through node %d", room, i+1)
			}
		}
	}

	// A second loss, both contests ended: nothing comes back running.
	pushed := len(pushes(a.ID, 1, n1, n2)) + len(pushes(b.ID, 4, n1, n2))
	flush()
	// The rebuild and both nodes' write-backs of the ended contests; the
	// nodes hold no running one, so none can come back after.
	poll(t, 30*time.Second, "both contests written back over", func() bool {
		ga, oka := n2.s.Get(a.ID)
		gb, okb := n2.s.Get(b.ID)
		return w1.Ready() && w2.Ready() && oka && ga.Over && okb && gb.Over
	})
	for _, n := range []*node{n1, n2} {
		n.s.mu.Lock()
		held := len(n.s.sh.byID)
		n.s.mu.Unlock()
		if held != 0 {
			t.Fatalf("a node holds %d contests", held)
		}
	}
	c := srv.Client(t)
	if run, err := c.Do(context.Background(), c.B().Hlen().Key(keyRunning).Build()).AsInt64(); err != nil || run != 0 {
		t.Fatalf("running contests after the second loss: %d %v, want none", run, err)
	}
	if got, ok := n2.s.Get(a.ID); !ok || !got.Over || got.Scores != want {
		t.Fatalf("a after the second loss: %+v %v, want over %v", got, ok, want)
	}
	if p := len(pushes(a.ID, 1, n1, n2)) + len(pushes(b.ID, 4, n1, n2)); p != pushed {
		t.Fatalf("%d pushes after the second loss, want none", p-pushed)
	}
	for i, n := range []*node{n1, n2} {
		for _, room := range []int64{1, 3} {
			if _, _, ok := n.s.Running(room); ok {
				t.Fatalf("room %d's contest running again through node %d", room, i+1)
			}
		}
	}
}

// Two contests lost with Redis's data: a's end time passes while Redis is
// empty and the wallets rebuild — its end waits (the contest gone, then
// the tallies not back) and comes once a is written back, with every gift;
// c's room 4 is paired again (with room 5) before c is written back — c
// ends at once, its final push carrying its scores, and the new contest
// runs on.
func TestSharedPKLostContestEndsLateOrAtOnce(t *testing.T) {
	srv := redistest.Start(t)
	w1, w2 := openWallets(t, srv.Addr)
	n1 := walletNode(t, srv.Addr, w1, 50*time.Millisecond, 1, 2, 3, 4, 5)
	n2 := walletNode(t, srv.Addr, w2, 50*time.Millisecond, 1, 2, 3, 4, 5)
	for _, n := range []*node{n1, n2} {
		// Room 4 is paired again right after the loss: no node may write c
		// back before that (its write-back comes restoreDelay after the
		// rebuild; the {pk}-alone path waits lostWait, 10 s).
		n.s.mu.Lock()
		n.s.sh.restoreDelay = 3 * time.Second
		n.s.mu.Unlock()
	}
	const giver = 77
	if _, err := w1.Apply(persist.Op{User: giver, ReqID: "credit", Postings: []persist.Posting{{User: giver, Delta: 1000}}}); err != nil {
		t.Fatal(err)
	}
	gift := func(w *persist.SharedWallet, n *node, id string, room, v int64, req string) {
		t.Helper()
		if _, err := w.Apply(persist.Op{User: giver, ReqID: req, Postings: []persist.Posting{{User: giver, Delta: -v}},
			Tallies: []persist.Tally{{Name: TallyName(id), User: room, Delta: v}}}); err != nil {
			t.Fatal(err)
		}
		n.s.AddScore(room, id, v)
	}
	a, err := n1.s.Start(1, 2, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c, err := n2.s.Start(3, 4, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	poll(t, 10*time.Second, "both contests on both nodes", func() bool {
		_, _, ok1 := n1.s.Running(4)
		_, _, ok2 := n2.s.Running(1)
		return ok1 && ok2
	})
	gift(w1, n1, a.ID, 2, 6, "a1")
	gift(w2, n2, a.ID, 1, 4, "a2")
	gift(w2, n2, c.ID, 3, 8, "c1")
	poll(t, 10*time.Second, "the score pushes", func() bool {
		return len(pushes(a.ID, 1, n1, n2)) >= 3 && len(pushes(c.ID, 3, n1, n2)) >= 2
	})
	if d := time.Until(a.EndsAt) - 100*time.Millisecond; d > 0 {
		time.Sleep(d)
	} else {
		t.Logf("the loss comes %v after a's end time: a ends before it", -d)
	}
	cl := srv.Client(t)
	if err := cl.Do(context.Background(), cl.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	// Room 4 paired again before the write-back (the room index is empty).
	d, err := n1.s.Start(4, 5, time.Hour)
	if err != nil {
		t.Fatalf("room 4 paired again after the loss: %v", err)
	}
	for _, want := range []struct {
		id     string
		room   int64
		scores map[string]int64
	}{{a.ID, 1, map[string]int64{"1": 4, "2": 6}}, {c.ID, 3, map[string]int64{"3": 8, "4": 0}}} {
		poll(t, 30*time.Second, "the final push", func() bool { return len(finals(pushes(want.id, want.room, n1, n2))) > 0 })
		settled(t, 10*time.Second, want.id, n1, n2) // (no second final can come after)
		f := finals(pushes(want.id, want.room, n1, n2))
		t.Logf("final %+v", f)
		if len(f) != 1 || f[0].Scores[i64(want.room)] != want.scores[i64(want.room)] || len(f[0].Scores) != 2 {
			t.Fatalf("finals %+v, want one with %v", f, want.scores)
		}
		for r, v := range want.scores {
			if f[0].Scores[r] != v {
				t.Fatalf("final %+v, want scores %v", f[0], want.scores)
			}
		}
	}
	poll(t, 10*time.Second, "room 4 in the new contest through node 2", func() bool { id, _, ok := n2.s.Running(4); return ok && id == d.ID })
	if _, _, ok := n2.s.Running(3); ok {
		t.Fatal("c still running")
	}
}

// Redis loses the {pk} keys alone (the wallet's are there: no rebuild, no
// OnReady): a node whose sync finds its running contest gone keeps it, and
// after lostWait writes it back itself; it ends at its time with its score.
func TestSharedPKKeysAloneLostWrittenBack(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1 := newNode(t, rdb, w, 1, 2)
	n1.s.mu.Lock()
	n1.s.sh.lostWait = 300 * time.Millisecond
	n1.s.mu.Unlock()
	c, err := n1.s.Start(1, 2, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	w.add(TallyName(c.ID), 2, 9)
	n1.s.AddScore(2, c.ID, 9)
	poll(t, 10*time.Second, "the score push", func() bool { return len(pushes(c.ID, 2, n1)) == 2 })
	if err := rdb.Do(context.Background(), rdb.B().Del().Key(keyRunning, keyRooms, contestKey(c.ID)).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	// Written back: its hash is there again (running, or over if its end,
	// which waited for the write-back, came since).
	poll(t, 10*time.Second, "written back", func() bool { _, ok := n1.s.Get(c.ID); return ok })
	poll(t, 15*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 1, n1))) == 1 })
	if f := finals(pushes(c.ID, 1, n1)); f[0].Scores["2"] != 9 || f[0].Winner != 2 || f[0].Seq < 1<<32 {
		t.Fatalf("final %+v, want room 2 winning 9:0 in a new epoch", f[0])
	}
}

// winner is the room 1 (1) or 2 (2) wins with scores sc of rooms 1 and 2.
func winner(sc [2]int64) int64 {
	if sc[0] > sc[1] {
		return 1
	}
	return 2
}

// loseKeys deletes the {pk} keys of contest id (Redis lost them).
func loseKeys(t *testing.T, rdb rueidis.Client, keys ...string) {
	t.Helper()
	if err := rdb.Do(context.Background(), rdb.B().Del().Key(keys...).Build()).Error(); err != nil {
		t.Fatal(err)
	}
}

// listed tells whether contest id is in the running contests in Redis.
func listed(rdb rueidis.Client, id string) bool {
	ok, _ := rdb.Do(context.Background(), rdb.B().Hexists().Key(keyRunning).Field(id).Build()).AsBool()
	return ok
}

// settled waits until no node holds contest id: none can push it again.
func settled(t *testing.T, d time.Duration, id string, nodes ...*node) {
	t.Helper()
	poll(t, d, "no node holding "+id, func() bool {
		for _, n := range nodes {
			n.s.mu.Lock()
			held := n.s.sh.byID[id] != nil
			n.s.mu.Unlock()
			if held {
				return false
			}
		}
		return true
	})
}

// A gift counted in a tally when its contest is written back, whose score
// is added after the write-back (its score.lua call queued meanwhile, or its
// debit answered in doubt and settled later), counts once: the write-back
// puts the sums of gifts added (5) and the tallies as a floor (9), and the
// gift's 4 goes onto the sums. Before, the write-back put max(sums,
// tallies) = 9 into the sums and the gift's 4 went on top: 13.
func TestSharedPKWriteBackCountsEachGiftOnce(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1 := newNode(t, rdb, w, 1, 2)
	n1.s.sh.restoreDelay = 0
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	w.add(TallyName(c.ID), 1, 5)
	n1.s.AddScore(1, c.ID, 5)
	poll(t, 10*time.Second, "the score push", func() bool { return len(pushes(c.ID, 1, n1)) == 2 })
	w.add(TallyName(c.ID), 1, 4) // debited; its score comes after the write-back
	loseKeys(t, rdb, keyRunning, keyRooms, contestKey(c.ID))
	n1.s.RestoreLost()
	poll(t, 10*time.Second, "written back", func() bool { return listed(rdb, c.ID) })
	n1.s.AddScore(1, c.ID, 4)
	w.add(TallyName(c.ID), 2, 3)
	n1.s.AddScore(2, c.ID, 3)
	poll(t, 10*time.Second, "the score pushes", func() bool {
		for _, p := range pushes(c.ID, 1, n1) {
			if p.Scores["2"] == 3 {
				return true
			}
		}
		return false
	})
	n1.s.EndRoom(1)
	poll(t, 10*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 1, n1))) > 0 })
	for _, p := range pushes(c.ID, 1, n1) {
		if p.Scores["1"] > 9 {
			t.Fatalf("push %+v: room 1 above its 9 in gifts", p)
		}
	}
	if f := finals(pushes(c.ID, 1, n1)); len(f) != 1 || f[0].Scores["1"] != 9 || f[0].Scores["2"] != 3 {
		t.Fatalf("finals %+v, want one at 9:3", f)
	}
}

// A write-back that ends its contest at once (a room of it paired again)
// whose reply is lost (Redis unreachable right after it ran): the sync
// tries it again, and restore.lua answers the retry of the replica that
// ended it with the result, which is pushed. Before, the retry never came
// (the sync found the contest over and dropped it): no final push.
func TestSharedPKWriteBackEndedAtOnceReplyLost(t *testing.T) {
	px, rdb := proxiedRedis(t)
	if err := rdb.Do(context.Background(), rdb.B().ScriptLoad().Script(restoreLua).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	w := &fakeWallet{}
	n1 := newNode(t, rdb, w, 3, 4, 5)
	n1.s.sh.restoreDelay = 0
	c, err := n1.s.Start(3, 4, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	w.add(TallyName(c.ID), 3, 6)
	loseKeys(t, rdb, keyRunning, keyRooms, contestKey(c.ID))
	if _, err := n1.s.Start(4, 5, time.Hour); err != nil {
		t.Fatal(err)
	}
	px.LoseReply(fmt.Sprintf("%x", sha1.Sum([]byte(restoreLua))), 200*time.Millisecond)
	n1.s.RestoreLost()
	poll(t, 10*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 3, n1))) > 0 })
	if px.Fired() != 1 {
		t.Fatalf("the fault fired %d times", px.Fired())
	}
	settled(t, 10*time.Second, c.ID, n1)
	if f := finals(pushes(c.ID, 3, n1)); len(f) != 1 || f[0].Scores["3"] != 6 || f[0].Winner != 3 {
		t.Fatalf("finals %+v, want one with room 3 winning 6:0", f)
	}
}

// The end fails while Redis is unreachable, and Redis comes back without
// the {pk} keys (no wallet rebuild, no OnReady): the end's retry finds no
// contest; the sync writes it back after lostWait and it ends with its
// score. Before, the replica stayed "end unknown", which the sync skips:
// the end was retried for ever, the rooms stayed in the contest.
func TestSharedPKLostWhileItsEndFailed(t *testing.T) {
	srv := redistest.Start(t)
	px := redistest.StartProxy(t, srv.Addr)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{px.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	direct := srv.Client(t)
	w := &fakeWallet{}
	n1, c := scoredLostWaitNode(t, rdb, w)
	r := heldReplica(n1, c.ID)
	// Redis unreachable for 6 s (this command's reply is lost, connections
	// refused), and empty when it comes back.
	px.LoseReply("pk-test-cut", 6*time.Second)
	_ = rdb.Do(context.Background(), rdb.B().Echo().Message("pk-test-cut").Build()).Error()
	loseKeys(t, direct, keyRunning, keyRooms, contestKey(c.ID))
	n1.s.EndRoom(1)
	poll(t, 5*time.Second, "the end failing (Redis unreachable)", func() bool {
		n1.s.mu.Lock()
		defer n1.s.mu.Unlock()
		return r.endUnknown
	})
	poll(t, 30*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 1, n1))) > 0 })
	settled(t, 10*time.Second, c.ID, n1)
	if f := finals(pushes(c.ID, 1, n1)); len(f) != 1 || f[0].Scores["2"] != 9 || f[0].Winner != 2 {
		t.Fatalf("finals %+v, want one with room 2 winning 9:0", f)
	}
}

// scoredLostWaitNode is one node (rooms 1 and 2, lostWait 300 ms) running
// a contest of rooms 1 and 2 for an hour, room 2 scored 9 (its push seen).
func scoredLostWaitNode(t *testing.T, rdb rueidis.Client, w *fakeWallet) (*node, Contest) {
	t.Helper()
	n := newNode(t, rdb, w, 1, 2)
	n.s.grace = 50 * time.Millisecond
	n.s.mu.Lock()
	n.s.sh.lostWait = 300 * time.Millisecond
	n.s.mu.Unlock()
	c, err := n.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	w.add(TallyName(c.ID), 2, 9)
	n.s.AddScore(2, c.ID, 9)
	poll(t, 10*time.Second, "the score push", func() bool { return len(pushes(c.ID, 2, n)) == 2 })
	return n, c
}

// Redis loses a running contest's hash but not its entry in the running
// contests (e.g. evicted): the end finds no contest, the sync keeps the
// replica lost (its hash is gone, listed or not) and writes it back after
// lostWait; it ends with its score and its rooms are free. Before, each sync
// took "listed" for "written back", and the end found no contest for ever.
func TestSharedPKHashAloneLost(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1, c := scoredLostWaitNode(t, rdb, w)
	loseKeys(t, rdb, contestKey(c.ID))
	n1.s.EndRoom(1)
	poll(t, 15*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 1, n1))) > 0 })
	settled(t, 10*time.Second, c.ID, n1)
	if f := finals(pushes(c.ID, 1, n1)); len(f) != 1 || f[0].Scores["2"] != 9 || f[0].Seq < 1<<32 {
		t.Fatalf("finals %+v, want one with room 2 winning 9:0 in a new epoch", f)
	}
	if busy, _ := rdb.Do(context.Background(), rdb.B().Hexists().Key(keyRooms).Field("1").Build()).AsBool(); busy || listed(rdb, c.ID) {
		t.Fatal("room 1 still in the contest")
	}
}

// Redis loses a running contest's entry in the running contests alone: its
// hash still says run, so the contest is not lost, and its end is not held
// back. Before, a hash saying run was taken for lost (its end waited
// lostWait, for a write-back).
func TestSharedPKListAloneLostNotLost(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1 := newNode(t, rdb, w, 1, 2)
	n1.s.grace = 50 * time.Millisecond
	n1.s.mu.Lock()
	n1.s.sh.lostWait = time.Minute
	n1.s.mu.Unlock()
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	loseKeys(t, rdb, keyRunning)
	// Two sync passes done after the loss: the second began after it, so
	// it read the hash (run: not lost).
	passes := n1.s.sh.passes.Load()
	poll(t, 10*time.Second, "two syncs after the loss", func() bool { return n1.s.sh.passes.Load() >= passes+2 })
	n1.s.mu.Lock()
	lost := n1.s.sh.byID[c.ID].lost
	n1.s.mu.Unlock()
	if lost {
		t.Fatal("a contest whose hash says run taken for lost")
	}
	n1.s.EndRoom(1)
	poll(t, 10*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 1, n1))) > 0 })
}

// A contest ended on node 1, held running by node 2 (which missed the end),
// is written back running by node 2 before node 1 writes back its end (its
// wallet ready later): node 1's write-back of the end overrides it and
// pushes the final again, with a seq above node 2's push. Before, the
// contest ended silently: the rooms' last push said it was running.
func TestSharedPKEndWrittenBackOverARunningWriteBack(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1 := newNode(t, rdb, w, 1, 2)
	n2 := newNodeEvery(t, rdb, w, time.Hour, 1, 2)
	n1.s.sh.restoreDelay, n2.s.sh.restoreDelay = 0, 0
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, ok := n2.s.Running(1); !ok { // (read through node 2: it holds the contest)
		t.Fatal("not running through node 2")
	}
	w.add(TallyName(c.ID), 1, 4)
	n1.s.AddScore(1, c.ID, 4)
	n1.s.EndRoom(1)
	poll(t, 10*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 1, n1))) > 0 })
	settled(t, 10*time.Second, c.ID, n1)
	loseKeys(t, rdb, keyRunning, keyRooms, contestKey(c.ID))
	n2.s.RestoreLost()
	poll(t, 10*time.Second, "written back running by node 2", func() bool { return listed(rdb, c.ID) })
	n1.s.RestoreLost()
	poll(t, 10*time.Second, "over again", func() bool { got, ok := n1.s.Get(c.ID); return ok && got.Over })
	poll(t, 10*time.Second, "the final pushed again", func() bool { return len(finals(pushes(c.ID, 1, n1, n2))) == 2 })
	ps := pushes(c.ID, 1, n1, n2)
	sort.Slice(ps, func(x, y int) bool { return ps[x].Seq < ps[y].Seq })
	if last := ps[len(ps)-1]; !last.Over || last.Scores["1"] != 4 {
		t.Fatalf("the highest push %+v, want the final, 4:0", last)
	}
}

// Close does not wait for the write-back of many ended contests to a Redis
// that does not answer: they go in pipelines of tombChunk, and the
// write-back stops on Close (between chunks). Before, each was one call with
// its own 2 s timeout: Close waited about 2 s per contest.
func TestSharedPKCloseDuringWriteBackToASlowRedis(t *testing.T) {
	px, rdb := proxiedRedis(t)
	n1 := newNode(t, rdb, &fakeWallet{}, 1, 2)
	n1.s.mu.Lock()
	for i := int64(0); i < 3*tombChunk; i++ {
		n1.s.tombLocked(Contest{ID: fmt.Sprintf("ended%d", i), Rooms: [2]int64{100 + 2*i, 101 + 2*i}, EndsAt: time.Now()}, [2]int64{1, 0}, 2)
	}
	n1.s.mu.Unlock()
	px.Slow("EVALSHA", 3*time.Second)
	t.Cleanup(func() { px.Slow("", 0) })
	n1.s.RestoreLost()
	poll(t, 10*time.Second, "the write-back under way (held by the proxy)", func() bool { return px.Slowed() > 0 })
	start := time.Now()
	n1.s.Close()
	if d := time.Since(start); d > 8*time.Second {
		t.Fatalf("Close took %v", d)
	}
}

// Tombs (the contests a node knows ended) are bounded: beyond maxTombs the
// oldest go at once, and a sync that reads Redis with the wallet ready drops
// those older than tombKeep from the front of their queue (no walk of them
// all). writeTombs writes more than one pipeline's worth (tombChunk) back,
// every one over. Before, every node kept each ended contest 24 h and the
// sync walked them all every second.
func TestSharedPKTombsBounded(t *testing.T) {
	rdb := newRedis(t)
	n1 := newNode(t, rdb, &fakeWallet{}, 1, 2)
	tomb := func(id string) {
		n1.s.mu.Lock()
		n1.s.tombLocked(Contest{ID: id, Rooms: [2]int64{1, 2}, EndsAt: time.Now()}, [2]int64{1, 0}, 2)
		n1.s.mu.Unlock()
	}
	held := func() (int, int) {
		n1.s.mu.Lock()
		defer n1.s.mu.Unlock()
		return len(n1.s.sh.over), len(n1.s.sh.overQ)
	}
	n1.s.mu.Lock()
	n1.s.sh.maxTombs = 3
	n1.s.mu.Unlock()
	for i := 0; i < 5; i++ {
		tomb(fmt.Sprint("t", i))
	}
	n1.s.mu.Lock()
	_, old := n1.s.sh.over["t1"]
	_, last := n1.s.sh.over["t4"]
	n1.s.mu.Unlock()
	if m, q := held(); m != 3 || q != 3 || old || !last {
		t.Fatalf("tombs %d (queue %d), t1 kept %v, t4 kept %v: want the newest 3", m, q, old, last)
	}
	// Written back, more than a pipeline's worth.
	n1.s.mu.Lock()
	n1.s.sh.maxTombs = maxTombs
	n1.s.mu.Unlock()
	for i := 0; i < tombChunk+20; i++ {
		tomb(fmt.Sprint("w", i))
	}
	n1.s.writeTombs()
	for _, id := range []string{"w0", fmt.Sprint("w", tombChunk), fmt.Sprint("w", tombChunk+19)} {
		if got, ok := n1.s.Get(id); !ok || !got.Over {
			t.Fatalf("%s after writeTombs: %+v %v, want over", id, got, ok)
		}
	}
	n1.s.mu.Lock()
	failed, at := n1.s.sh.tombsFailed, n1.s.sh.tombsAt
	n1.s.mu.Unlock()
	if failed || at.IsZero() {
		t.Fatalf("tombsFailed %v, tombsAt %v after a full write-back", failed, at)
	}
	// Aged out by the sync.
	n1.s.mu.Lock()
	n1.s.sh.tombKeep = 100 * time.Millisecond
	n1.s.sh.readOK = time.Now().Add(-time.Second)
	n1.s.mu.Unlock()
	poll(t, 10*time.Second, "the tombs aged out", func() bool { m, q := held(); return m == 0 && q == 0 })
}

// Redis rolled back (an older snapshot, a failover to a lagging replica)
// after a contest ended: its hash, its running entry and its room index say
// it runs again. Every node knows it ended (a tomb) and adopts it no more;
// a node's sync writes its end back over (restore.lua's "over"), which frees
// the rooms, with the final pushed again — the same push: its scores and its
// seq (above the rolled-back state's), which a client that had it drops as a
// duplicate. Before, no node held it and nothing ended it: its
// rooms stayed "already in a PK".
func TestSharedPKEndedContestRolledBackRunningFreed(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1 := newNode(t, rdb, w, 1, 2, 3)
	n2 := newNode(t, rdb, w, 1, 2, 3)
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	poll(t, 10*time.Second, "the contest on node 2", func() bool { _, _, ok := n2.s.Running(1); return ok })
	w.add(TallyName(c.ID), 2, 6)
	n1.s.AddScore(2, c.ID, 6)
	poll(t, 10*time.Second, "the score push", func() bool {
		for _, p := range pushes(c.ID, 2, n1, n2) {
			if p.Scores["2"] == 6 {
				return true
			}
		}
		return false
	})
	// The snapshot: the running state's keys as they are now.
	ctx := context.Background()
	hash, err := rdb.Do(ctx, rdb.B().Hgetall().Key(contestKey(c.ID)).Build()).AsStrMap()
	if err != nil || hash["state"] != "run" {
		t.Fatalf("the contest's hash %v %v", hash, err)
	}
	rec, err := rdb.Do(ctx, rdb.B().Hget().Key(keyRunning).Field(c.ID).Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	n1.s.EndRoom(1)
	poll(t, 10*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 1, n1, n2))) > 0 })
	settled(t, 10*time.Second, c.ID, n1, n2)
	first := finals(pushes(c.ID, 1, n1, n2))[0]
	// The rollback.
	fields := []string{}
	for k, v := range hash {
		fields = append(fields, k, v)
	}
	for _, cmd := range []rueidis.Completed{
		rdb.B().Del().Key(contestKey(c.ID)).Build(),
		rdb.B().Arbitrary("HSET").Keys(contestKey(c.ID)).Args(fields...).Build(),
		rdb.B().Hset().Key(keyRunning).FieldValue().FieldValue(c.ID, rec).Build(),
		rdb.B().Hset().Key(keyRooms).FieldValue().FieldValue("1", c.ID).FieldValue("2", c.ID).Build(),
	} {
		if err := rdb.Do(ctx, cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
	if got, ok := n1.s.Get(c.ID); !ok || got.Over {
		t.Fatalf("after the rollback: %+v %v, want running", got, ok)
	}
	poll(t, 10*time.Second, "freed again (over, unlisted, rooms free)", func() bool {
		got, ok := n1.s.Get(c.ID)
		busy, _ := rdb.Do(ctx, rdb.B().Hexists().Key(keyRooms).Field("1").Build()).AsBool()
		return ok && got.Over && !busy && !listed(rdb, c.ID)
	})
	if _, err := n2.s.Start(1, 3, time.Hour); err != nil {
		t.Fatalf("room 1 paired again: %v", err)
	}
	poll(t, 10*time.Second, "the final pushed again", func() bool { return len(finals(pushes(c.ID, 1, n1, n2))) == 2 })
	for _, room := range []int64{1, 2} {
		ps := pushes(c.ID, room, n1, n2)
		f := finals(ps)
		if len(f) != 2 {
			t.Fatalf("room %d: finals %+v, want the final and its one re-push", room, f)
		}
		for _, x := range f {
			if x.Scores["1"] != 0 || x.Scores["2"] != 6 || x.Winner != 2 {
				t.Fatalf("room %d: final %+v, want room 2 winning 6:0", room, x)
			}
		}
		sort.Slice(ps, func(x, y int) bool { return ps[x].Seq < ps[y].Seq })
		if last := ps[len(ps)-1]; !last.Over || last.Seq != first.Seq {
			t.Fatalf("room %d: highest push %+v, want the final again (seq %d)", room, last, first.Seq)
		}
	}
	for i, n := range []*node{n1, n2} {
		n.s.mu.Lock()
		held := n.s.sh.byID[c.ID] != nil
		n.s.mu.Unlock()
		if held {
			t.Fatalf("node %d adopted the rolled-back contest", i+1)
		}
	}
}

// Node 1's end runs in Redis but its reply is lost; node 2 reads the
// contest over and buries it (not the ender: no push); Redis then loses
// the {pk} keys. Node 1, whose end may have been the one that ran and whose
// result nobody pushed, pushes it when it finds the contest over: (retry
// first) its retry finds the contest gone, node 2 writes its end back, and
// node 1's write-back finds it over; (tomb first) node 2 writes its end
// back before node 1's retry, which finds it over with no ender. Before,
// both nodes were silent: the rooms never got over:true.
func TestSharedPKEndReplyLostThenRedisLossStillPushed(t *testing.T) {
	t.Run("retry first", func(t *testing.T) { endLostThenRedisLoss(t, false) })
	t.Run("tomb first", func(t *testing.T) { endLostThenRedisLoss(t, true) })
}

func endLostThenRedisLoss(t *testing.T, tombFirst bool) {
	px, via, direct := proxiedAndDirect(t)
	if err := direct.Do(context.Background(), direct.B().ScriptLoad().Script(endLua).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	w := &fakeWallet{}
	n1 := newNodeEvery(t, via, w, time.Hour, 1, 2)
	n2 := newNode(t, direct, w, 1, 2)
	n1.s.sh.restoreDelay, n2.s.sh.restoreDelay = 0, 0
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, ok := n2.s.Running(1); !ok {
		t.Fatal("not running through node 2")
	}
	w.add(TallyName(c.ID), 2, 7)
	r := heldReplica(n1, c.ID)
	cut := 100 * time.Millisecond
	if tombFirst {
		cut = 3 * time.Second // node 1's retries fail meanwhile (connections refused)
	}
	px.LoseReply(fmt.Sprintf("%x", sha1.Sum([]byte(endLua))), cut)
	n1.s.EndRoom(1)
	poll(t, 5*time.Second, "node 1's end unanswered", func() bool {
		n1.s.mu.Lock()
		defer n1.s.mu.Unlock()
		return r.endUnknown
	})
	settled(t, 5*time.Second, c.ID, n2) // node 2 read it over: buried, silent
	loseKeys(t, direct, keyRunning, keyRooms, contestKey(c.ID))
	if !tombFirst {
		poll(t, 10*time.Second, "node 1's retry finding the contest gone", func() bool {
			n1.s.mu.Lock()
			defer n1.s.mu.Unlock()
			return r.lost && !r.endUnknown
		})
	}
	n2.s.RestoreLost()
	poll(t, 10*time.Second, "node 2's end written back", func() bool { got, ok := n2.s.Get(c.ID); return ok && got.Over })
	if tombFirst {
		n1.s.mu.Lock()
		unknown := r.endUnknown
		n1.s.mu.Unlock()
		if !unknown {
			t.Fatal("node 1's end retried before node 2's write-back")
		}
	} else {
		n1.s.RestoreLost()
	}
	poll(t, 10*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 1, n1, n2))) > 0 })
	settled(t, 10*time.Second, c.ID, n1)
	if f := finals(pushes(c.ID, 1, n1, n2)); len(f) != 1 || f[0].Scores["2"] != 7 || f[0].Winner != 2 {
		t.Fatalf("finals %+v, want one with room 2 winning 7:0", f)
	}
}

// Node 1's end runs, its reply is lost, and Redis loses the {pk} keys
// before node 2 (whose replica still runs) learns of the end: node 1's
// retry finds the contest gone. Node 2 writes it back running and ends it
// (end.lua names node 2 the ender; node 2 pushes the final). Node 1's
// write-back then finds it over, ended by another: it pushes nothing — one
// final per room. (With the first fix for a lost end, node 1 pushed it
// again: it took "over" for "over, ender unknown".)
func TestSharedPKFinalNotPushedAgainAfterAnotherNodeEndedIt(t *testing.T) {
	px, via, direct := proxiedAndDirect(t)
	if err := direct.Do(context.Background(), direct.B().ScriptLoad().Script(endLua).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	w := &fakeWallet{}
	n1 := newNodeEvery(t, via, w, time.Hour, 1, 2)
	n1.s.sh.restoreDelay = 0
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	n2 := newNodeEvery(t, direct, w, time.Hour, 1, 2) // adopts it at its Restore; never syncs again
	n2.s.sh.restoreDelay = 0
	if _, _, ok := n2.s.Running(1); !ok {
		t.Fatal("not running through node 2")
	}
	w.add(TallyName(c.ID), 2, 7)
	r := heldReplica(n1, c.ID)
	px.LoseReply(fmt.Sprintf("%x", sha1.Sum([]byte(endLua))), 100*time.Millisecond)
	n1.s.EndRoom(1)
	poll(t, 5*time.Second, "node 1's end unanswered", func() bool {
		n1.s.mu.Lock()
		defer n1.s.mu.Unlock()
		return r.endUnknown
	})
	loseKeys(t, direct, keyRunning, keyRooms, contestKey(c.ID))
	poll(t, 10*time.Second, "node 1's retry finding the contest gone", func() bool {
		n1.s.mu.Lock()
		defer n1.s.mu.Unlock()
		return r.lost && !r.endUnknown
	})
	n2.s.RestoreLost() // node 2 writes it back running
	poll(t, 10*time.Second, "written back", func() bool { return listed(direct, c.ID) })
	n2.s.EndRoom(1) // node 2's end (as its timer would)
	poll(t, 10*time.Second, "node 2's final", func() bool { return len(finals(pushes(c.ID, 1, n2))) == 1 })
	n1.s.RestoreLost()
	settled(t, 10*time.Second, c.ID, n1, n2)
	time.Sleep(300 * time.Millisecond)
	if f := finals(pushes(c.ID, 1, n1, n2)); len(f) != 1 || f[0].Scores["2"] != 7 {
		t.Fatalf("finals %+v to room 1, want one with room 2's 7", f)
	}
}

// Node 1's end ran (ender node 1) but its reply never came (endUnknown).
// Node 2 reads the contest over (a tomb, silent); Redis loses the keys;
// node 1 writes the contest back running, node 2's tomb lands over that
// and node 2 pushes the final; node 1's end retry then finds it over with
// no ender: it pushes nothing — its earlier end did not stand once the
// contest was found running. (Before: a second, identical final.)
func TestSharedPKEndUnknownClearedByARunningWriteBack(t *testing.T) {
	_, _, direct := proxiedAndDirect(t)
	w := &fakeWallet{}
	n1 := newNodeEvery(t, direct, w, time.Hour, 1, 2)
	n1.s.sh.restoreDelay = 0
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	n2 := newNodeEvery(t, direct, w, time.Hour, 1, 2)
	n2.s.sh.restoreDelay = 0
	w.add(TallyName(c.ID), 2, 7)
	n1.s.mu.Lock()
	r := n1.s.sh.byID[c.ID]
	r.timer.Stop()
	n1.s.mu.Unlock()
	// Node 1's end.lua runs; its reply is lost.
	if err := endScript.Exec(context.Background(), direct, []string{contestKey(c.ID), keyRooms, keyRunning},
		[]string{c.ID, "1", "2", "0", "7", "600000", r.token}).Error(); err != nil {
		t.Fatal(err)
	}
	n1.s.mu.Lock()
	r.endUnknown, r.closing = true, true
	n1.s.mu.Unlock()
	if err := n2.s.syncShared(); err != nil { // node 2 reads it over: a tomb, silent
		t.Fatal(err)
	}
	settled(t, 5*time.Second, c.ID, n2)
	loseKeys(t, direct, keyRunning, keyRooms, contestKey(c.ID))
	n1.s.restoreRunning(r) // written back running: {2}
	if !listed(direct, c.ID) {
		t.Fatal("not written back")
	}
	n2.s.writeTombs() // over the running write-back: node 2 pushes the final
	n1.s.endShared(r) // node 1's end retry: over, no ender
	time.Sleep(200 * time.Millisecond)
	if f := finals(pushes(c.ID, 1, n1, n2)); len(f) != 1 || f[0].Scores["2"] != 7 {
		t.Fatalf("finals %+v to room 1, want one with room 2's 7", f)
	}
}

// heldReplica is node n's replica of contest id (nil: none).
func heldReplica(n *node, id string) *running {
	n.s.mu.Lock()
	defer n.s.mu.Unlock()
	return n.s.sh.byID[id]
}
