package pk

import (
	"context"
	"crypto/sha1"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// fakeWallet stands for the shared wallet's tallies: a PK gift's debit adds
// to its tally before the gift service calls AddScore.
type fakeWallet struct {
	mu sync.Mutex
	t  map[string]int64
}

func (w *fakeWallet) add(name string, room, v int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.t == nil {
		w.t = map[string]int64{}
	}
	w.t[fmt.Sprint(name, "/", room)] += v
}

func (w *fakeWallet) tally(name string, room int64) (int64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.t[fmt.Sprint(name, "/", room)], nil
}

// node is one cluster node's PK service: its own router, with a watcher per
// room, and the cluster's Redis.
type node struct {
	s        *Service
	watchers map[int64]*routertest.Recorder
}

func newRedis(t *testing.T) rueidis.Client {
	t.Helper()
	srv := redistest.Start(t)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	return rdb
}

func newNode(t *testing.T, rdb rueidis.Client, w *fakeWallet, rooms ...int64) *node {
	t.Helper()
	return newNodeEvery(t, rdb, w, 50*time.Millisecond, rooms...)
}

// watchedNode is a node whose router has rooms open, each watched by a
// viewer of its own (the node's service is the caller's to make).
func watchedNode(t *testing.T, rooms ...int64) (*router.Local, *node) {
	t.Helper()
	rt := router.NewLocal("t", router.LocalConfig{})
	n := &node{watchers: map[int64]*routertest.Recorder{}}
	for i, room := range rooms {
		rt.OpenRoom(room)
		v := &routertest.Recorder{SessionID: uint64(i + 1), User: 1000 + int64(i)}
		if _, err := rt.Join(room, v); err != nil {
			t.Fatal(err)
		}
		n.watchers[room] = v
	}
	return rt, n
}

// newNodeEvery is newNode with its sync every every.
func newNodeEvery(t *testing.T, rdb rueidis.Client, w *fakeWallet, every time.Duration, rooms ...int64) *node {
	t.Helper()
	rt, n := watchedNode(t, rooms...)
	n.s = NewShared(rt, func(int64) (bool, error) { return true, nil }, rdb, w.tally, nil)
	n.s.sh.every = every
	if err := n.s.Restore(time.Now()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.s.Close)
	return n
}

// pushes returns the 5558 pushes of contest id that room's watchers on nodes
// saw.
func pushes(id string, room int64, nodes ...*node) []Progress {
	var out []Progress
	for _, n := range nodes {
		for _, p := range progress(n.watchers[room]) {
			if p.PKID == id {
				out = append(out, p)
			}
		}
	}
	return out
}

func poll(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// An invitation made through one node is seen, declined or accepted through
// another; the per-inviter pending limit and "a room is already in a PK"
// hold across nodes.
func TestSharedPKInvitationsAcrossNodes(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1, n2 := newNode(t, rdb, w, 1, 2, 3), newNode(t, rdb, w, 1, 2, 3)
	var ids []string
	for i := 0; i < MaxInvitesPerInviter; i++ {
		via := []*node{n1, n2}[i%2]
		inv, err := via.s.Invite(7, 1, 2, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, inv.ID)
	}
	if _, err := n2.s.Invite(7, 1, 3, time.Minute); proto.AsError(err).Code != proto.CodeRateLimited {
		t.Fatalf("4th invitation through another node: %v", err)
	}
	inv, ok := n2.s.Invitation(ids[0])
	if !ok || inv.Inviter != 7 || inv.Rooms != [2]int64{1, 2} || inv.Duration != time.Minute {
		t.Fatalf("invitation through node 2: %+v %v", inv, ok)
	}
	if err := n2.s.Decline(ids[0]); err != nil {
		t.Fatal(err)
	}
	if _, ok := n1.s.Invitation(ids[0]); ok {
		t.Fatal("declined invitation still pending through node 1")
	}
	if _, err := n1.s.Accept(ids[0]); proto.AsError(err).Code != proto.CodeNotFound {
		t.Fatalf("accept of a declined invitation: %v", err)
	}
	// The slot is free again, cluster-wide.
	if _, err := n1.s.Invite(7, 1, 3, time.Minute); err != nil {
		t.Fatal(err)
	}
	c, err := n2.s.Accept(ids[1])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n1.s.Accept(ids[1]); proto.AsError(err).Code != proto.CodeNotFound {
		t.Fatalf("second accept: %v", err)
	}
	if _, err := n1.s.Accept(ids[2]); proto.AsError(err).Code != proto.CodeConflict {
		t.Fatalf("accept while a room is in a PK: %v", err)
	}
	if _, err := n1.s.Invite(8, 2, 3, time.Minute); proto.AsError(err).Code != proto.CodeConflict {
		t.Fatalf("invite a room in a PK: %v", err)
	}
	if id, _, ok := n1.s.Running(2); !ok || id != c.ID {
		t.Fatalf("running through node 1: %q %v", id, ok)
	}
	if got, ok := n1.s.Get(c.ID); !ok || got.Over || got.Rooms != [2]int64{1, 2} || got.Seq != 1 {
		t.Fatalf("get through node 1: %+v %v", got, ok)
	}
	if o := n1.s.Opponent(1); o != 2 {
		t.Fatalf("opponent through node 1: %d", o)
	}
	// The start push, seq 1, went out once (from the accepting node).
	if p := pushes(c.ID, 1, n1, n2); len(p) != 1 || p[0].Seq != 1 {
		t.Fatalf("start pushes: %+v", p)
	}
}

// Many contests whose end timers fire on two nodes at once: each ends
// exactly once (one final push per room, from one node), with one winner
// from the final scores. PK gifts through both nodes, concurrently, move
// the shared scores; the pushes' seq is unique per contest and the scores
// never go back as seq grows; the final push has the highest seq and the
// sums of the gifts — including a gift whose debit was acknowledged but
// whose score never reached Redis (its node died), through the tally.
func TestSharedPKEndsOnceAcrossRacingNodes(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	const contests = 8
	var rooms []int64
	for i := 1; i <= 2*contests; i++ {
		rooms = append(rooms, int64(i))
	}
	n1, n2 := newNode(t, rdb, w, rooms...), newNode(t, rdb, w, rooms...)
	ids := make([]string, contests)
	for i := range ids {
		c, err := n1.s.Start(rooms[2*i], rooms[2*i+1], 1500*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = c.ID
	}
	poll(t, 10*time.Second, "node 2 knows every contest (sync)", func() bool {
		n2.s.mu.Lock()
		defer n2.s.mu.Unlock()
		return len(n2.s.sh.byID) == contests
	})
	var want [contests][2]int64
	var wg sync.WaitGroup
	for i := range ids {
		a, b := rooms[2*i], rooms[2*i+1]
		for j, nd := range []*node{n1, n2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for k := 0; k < 50; k++ {
					room := []int64{a, b}[(k+j)%2]
					v := int64(1 + (k*7+i)%5)
					if i%2 == 0 && room == a {
						v += 3 // even contests: room a wins
					}
					w.add(TallyName(ids[i]), room, v) // the debit
					nd.s.AddScore(room, ids[i], v)
				}
			}()
		}
	}
	wg.Wait()
	for i := range ids {
		a, b := rooms[2*i], rooms[2*i+1]
		for k := 0; k < 50; k++ {
			for j := 0; j < 2; j++ {
				room := []int64{a, b}[(k+j)%2]
				v := int64(1 + (k*7+i)%5)
				if i%2 == 0 && room == a {
					v += 3
				}
				want[i][(k+j)%2] += v
			}
		}
	}
	// A debit whose node died before adding its score: only the tally has it.
	w.add(TallyName(ids[1]), rooms[3], 1000)
	want[1][1] += 1000
	for i, id := range ids {
		a, b := rooms[2*i], rooms[2*i+1]
		poll(t, 5*time.Second, "the final pushes", func() bool {
			c, ok := n2.s.Get(id)
			return ok && c.Over && len(finals(pushes(id, a, n1, n2))) > 0 && len(finals(pushes(id, b, n1, n2))) > 0
		})
		c, _ := n1.s.Get(id)
		if c.Scores != want[i] {
			t.Fatalf("contest %d: final scores %v, want %v", i, c.Scores, want[i])
		}
		winner := a
		if want[i][1] > want[i][0] {
			winner = b
		} else if want[i][1] == want[i][0] {
			winner = 0
		}
		for _, room := range []int64{a, b} {
			ps := pushes(id, room, n1, n2)
			f := finals(ps)
			if len(f) != 1 {
				t.Fatalf("contest %d room %d: %d final pushes, want 1", i, room, len(f))
			}
			if f[0].Winner != winner || f[0].Seq != c.Seq || f[0].Scores[fmt.Sprint(a)] != want[i][0] {
				t.Fatalf("contest %d room %d: final %+v, want winner %d seq %d", i, room, f[0], winner, c.Seq)
			}
			sort.Slice(ps, func(x, y int) bool { return ps[x].Seq < ps[y].Seq })
			for k := 1; k < len(ps); k++ {
				prev, cur := ps[k-1], ps[k]
				if cur.Seq == prev.Seq {
					t.Fatalf("contest %d: seq %d pushed twice", i, cur.Seq)
				}
				for r, v := range cur.Scores {
					if v < prev.Scores[r] {
						t.Fatalf("contest %d: room %s's score went back at seq %d: %d < %d", i, r, cur.Seq, v, prev.Scores[r])
					}
				}
			}
			if last := ps[len(ps)-1]; !last.Over {
				t.Fatalf("contest %d: the highest seq is not the final push: %+v", i, last)
			}
		}
		// Nothing more moves the score of an ended contest.
		n2.s.AddScore(a, id, 5)
		if _, _, ok := n2.s.Running(a); ok {
			t.Fatalf("contest %d still running on node 2", i)
		}
	}
	// Each replica forgets an ended contest once its own end attempt (at
	// the end time plus endGrace, by its own timer) finds it over — the
	// other node's may have ended it a moment before.
	for _, nd := range []*node{n1, n2} {
		poll(t, 5*time.Second, "every ended contest gone from the replica", func() bool {
			nd.s.mu.Lock()
			defer nd.s.mu.Unlock()
			return len(nd.s.sh.byID) == 0
		})
	}
}

func finals(ps []Progress) []Progress {
	var out []Progress
	for _, p := range ps {
		if p.Over {
			out = append(out, p)
		}
	}
	return out
}

// A node that restarts picks up the running contests from Redis and arms
// their timers: with the node that started it gone, the contest still ends
// (once) at its time, through the restarted node.
func TestSharedPKRestartedNodeEndsRunningContest(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1 := newNode(t, rdb, w, 1, 2)
	c, err := n1.s.Start(1, 2, 1500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	w.add(TallyName(c.ID), 2, 9)
	n1.s.AddScore(2, c.ID, 9)
	poll(t, 10*time.Second, "the score push", func() bool { return len(pushes(c.ID, 2, n1)) == 2 })
	n1.s.Close() // the node stops; its timer with it
	n2 := newNode(t, rdb, w, 1, 2)
	poll(t, 5*time.Second, "the final push from the restarted node, to both rooms", func() bool {
		return len(finals(pushes(c.ID, 1, n2))) == 1 && len(finals(pushes(c.ID, 2, n2))) == 1
	})
	f := finals(pushes(c.ID, 2, n2))
	if len(f) != 1 || f[0].Winner != 2 || f[0].Seq != 3 || f[0].Scores["2"] != 9 {
		t.Fatalf("final: %+v", f)
	}
	if len(finals(pushes(c.ID, 1, n1))) != 0 {
		t.Fatal("the stopped node pushed a final")
	}
}

// A node's end script ran in Redis but its reply was lost (the call timed
// out): its retry finds the contest over — and, being the node that ended
// it, still gets the result and pushes the one final 5558; another node's
// end finds it over and pushes nothing.
func TestSharedPKEndReplyLostStillPushed(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1, n2 := newNode(t, rdb, w, 1, 2), newNode(t, rdb, w, 1, 2)
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	w.add(TallyName(c.ID), 1, 7)
	n1.s.mu.Lock()
	r := n1.s.sh.byID[c.ID]
	n1.s.mu.Unlock()
	// The script runs as n1's would; n1 never hears the answer.
	ctx := context.Background()
	if err := endScript.Exec(ctx, rdb, []string{contestKey(c.ID), keyRooms, keyRunning},
		[]string{c.ID, "1", "2", "7", "0", "60000", r.token}).Error(); err != nil {
		t.Fatal(err)
	}
	n2.s.mu.Lock()
	r2 := n2.s.sh.byID[c.ID]
	n2.s.mu.Unlock()
	if r2 != nil {
		if ended, _, err := n2.s.endScript(r2); err != nil || ended {
			t.Fatalf("another node's end after it: ended %v, %v", ended, err)
		}
	}
	n1.s.endShared(r) // the retry
	for _, room := range []int64{1, 2} {
		poll(t, 10*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, room, n1, n2))) > 0 })
		time.Sleep(50 * time.Millisecond) // a second final, if any, would be here by now
		f := finals(pushes(c.ID, room, n1, n2))
		if len(f) != 1 || f[0].Scores["1"] != 7 || f[0].Winner != 1 {
			t.Fatalf("room %d: final pushes %+v, want one with room 1 winning 7:0", room, f)
		}
	}
}

// An inviter's invitations are counted on every node: an invite/withdraw
// loop spread over two nodes gets InviteBurst in the minute between them,
// not InviteBurst on each.
func TestInviteRateCountedAcrossNodes(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	nodes := []*node{newNode(t, rdb, w, 1, 2), newNode(t, rdb, w, 1, 2)}
	for i := 0; i < InviteBurst; i++ {
		s := nodes[i%2].s
		inv, err := s.Invite(7, 1, 2, time.Minute)
		if err != nil {
			t.Fatalf("invitation %d: %v", i, err)
		}
		if err := s.Decline(inv.ID); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range nodes {
		if _, err := n.s.Invite(7, 1, 2, time.Minute); proto.AsError(err).Code != proto.CodeRateLimited {
			t.Fatalf("invitation %d in the minute, through node %d: %v, want 10429", InviteBurst+1, i+1, err)
		}
	}
}

// A room closed during its contest (EndRoom on the node where it closed)
// ends the contest cluster-wide at once: one final push, and the other room
// can be paired again through any node.
func TestSharedPKEndsWhenItsRoomCloses(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1, n2 := newNode(t, rdb, w, 1, 2, 3), newNode(t, rdb, w, 1, 2, 3)
	c, err := n1.s.Start(1, 2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	poll(t, 10*time.Second, "the start seen on node 2", func() bool { _, _, ok := n2.s.Running(2); return ok })
	n2.s.EndRoom(1)
	poll(t, 5*time.Second, "one final push to room 2", func() bool { return len(finals(pushes(c.ID, 2, n1, n2))) == 1 })
	// Node 1's replica learns it ended (its sync): no PK gift joins it.
	poll(t, 5*time.Second, "node 1 forgets the ended contest", func() bool { _, _, _, ok := n1.s.Enter(2); return !ok })
	poll(t, 5*time.Second, "room 2 paired again", func() bool { _, err := n1.s.Start(2, 3, time.Minute); return err == nil })
	if f := finals(pushes(c.ID, 2, n1, n2)); len(f) != 1 {
		t.Fatalf("finals %+v, want one", f)
	}
}

// In a cluster, a node's end waits for its own PK gifts still being debited
// (Enter), so a debit that lands after endGrace still scores.
func TestSharedPKEndWaitsForGiftsInFlight(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1 := newNode(t, rdb, w, 1, 2)
	c, err := n1.s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	id, _, leave, ok := n1.s.Enter(2)
	if !ok || id != c.ID {
		t.Fatalf("enter %q %v", id, ok)
	}
	time.Sleep(time.Until(c.EndsAt) + n1.s.grace + 300*time.Millisecond)
	if f := finals(pushes(c.ID, 2, n1)); len(f) != 0 {
		t.Fatalf("final %+v while a PK gift was still being debited", f)
	}
	w.add(TallyName(c.ID), 2, 9) // its debit lands
	leave()
	poll(t, 5*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 2, n1))) == 1 })
	if f := finals(pushes(c.ID, 2, n1)); f[0].Scores["2"] != 9 || f[0].Winner != 2 {
		t.Fatalf("final %+v, want room 2's late gift (9) scored", f[0])
	}
}

// The other nodes' ends wait too: a PK gift still being debited on node 2
// at the end time marks the contest in Redis, and node 1's end (end.lua)
// waits for the mark to go; the late gift scores.
func TestSharedPKEndWaitsForAnotherNodesGifts(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1, n2 := newNode(t, rdb, w, 1, 2), newNode(t, rdb, w, 1, 2)
	c, err := n1.s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var leave func()
	poll(t, 10*time.Second, "the contest on node 2", func() bool {
		var ok bool
		_, _, leave, ok = n2.s.Enter(2)
		return ok
	})
	time.Sleep(time.Until(c.EndsAt) + n1.s.grace + 300*time.Millisecond)
	if f := finals(pushes(c.ID, 2, n1, n2)); len(f) != 0 {
		t.Fatalf("final %+v while node 2's PK gift was still being debited", f)
	}
	w.add(TallyName(c.ID), 2, 9) // its debit lands
	leave()
	poll(t, 5*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 2, n1, n2))) == 1 })
	if f := finals(pushes(c.ID, 2, n1, n2)); f[0].Scores["2"] != 9 || f[0].Winner != 2 {
		t.Fatalf("final %+v, want room 2's late gift (9) scored", f[0])
	}
}

// The last PK gift another node had in flight at the end lands just after
// this node's end read the tallies, and its score.lua is held up (behind
// that node's previous push): its node's wait mark stays until the score is
// in Redis, so the end waits and the final counts the gift. Before, the
// mark went as soon as the debit was answered (leave), the end ran with
// the tallies read before the debit, and the score came after "over": a
// paid, tallied gift missing from the final scores and the winner.
func TestSharedPKMarkStaysUntilTheLastGiftIsScored(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n2 := newNode(t, rdb, w, 1, 2)
	var (
		once  sync.Once
		armed atomic.Int64 // unix ns after which node 1's end reads trip it
		id    string
		leave func()
	)
	marked := func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		keys, _ := rdb.Do(ctx, rdb.B().Hkeys().Key(contestKey(id)).Build()).AsStrSlice()
		for _, k := range keys {
			if len(k) > 2 && k[:2] == "w:" {
				return true
			}
		}
		return false
	}
	tallies := func(name string, room int64) (int64, error) {
		v, err := w.tally(name, room)
		if a := armed.Load(); room == 2 && a != 0 && time.Now().UnixNano() > a {
			once.Do(func() {
				n2.s.mu.Lock()
				r := n2.s.sh.byID[id]
				n2.s.mu.Unlock()
				r.pub.Lock()            // node 2's score.lua waits behind its last push
				w.add(name, 2, 9)       // node 2's debit lands, after this read
				n2.s.AddScore(2, id, 9) // its gift callback: the score queued…
				leave()                 // …then the gift answered
				for end := time.Now().Add(300 * time.Millisecond); marked() && time.Now().Before(end); {
					time.Sleep(5 * time.Millisecond)
				}
				go func() { time.Sleep(500 * time.Millisecond); r.pub.Unlock() }()
			})
		}
		return v, err
	}
	rt, n1 := watchedNode(t, 1, 2)
	n1.s = NewShared(rt, func(int64) (bool, error) { return true, nil }, rdb, tallies, nil)
	n1.s.sh.every = 50 * time.Millisecond
	if err := n1.s.Restore(time.Now()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n1.s.Close)
	c, err := n1.s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	id = c.ID
	poll(t, 10*time.Second, "the contest on node 2", func() bool {
		var ok bool
		_, _, leave, ok = n2.s.Enter(2)
		return ok
	})
	// Node 2 marks at the end (a gift in flight); node 1's end waits for
	// the mark and reads the tallies again each time.
	armed.Store(c.EndsAt.Add(n1.s.grace + 300*time.Millisecond).UnixNano())
	poll(t, 15*time.Second, "the final push", func() bool { return len(finals(pushes(c.ID, 2, n1, n2))) >= 1 })
	f := finals(pushes(c.ID, 2, n1, n2))
	if f[0].Scores["2"] != 9 || f[0].Winner != 2 {
		t.Fatalf("final %+v, want room 2's last gift (9, debited and tallied) scored", f[0])
	}
	time.Sleep(700 * time.Millisecond) // node 2's held score goes through (the contest over: adds nothing)
	if g, ok, err := n1.s.Find(c.ID); err != nil || !ok || g.Scores[1] != 9 {
		t.Fatalf("contest %+v %v %v, want room 2's score 9", g, ok, err)
	}
}

// In a cluster an accept that cannot start its contest (a room busy in
// another PK) leaves the invitation standing, as on one node: the anchor's
// accept, through any node, once the room is free, starts it. Before,
// pair.lua dropped the invitation before its check: "not found" then.
func TestSharedFailedAcceptKeepsTheInvitation(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1, n2 := newNode(t, rdb, w, 1, 2, 3), newNode(t, rdb, w, 1, 2, 3)
	inv, err := n1.s.Invite(7, 1, 2, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	busy, err := n1.s.Start(2, 3, time.Hour) // room 2 pairs with room 3 first
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n2.s.Accept(inv.ID); proto.AsError(err).Code != proto.CodeConflict {
		t.Fatalf("accept while room 2 is busy: %v, want 10409", err)
	}
	if _, ok := n1.s.Invitation(inv.ID); !ok {
		t.Fatal("the failed accept consumed the invitation")
	}
	n2.s.EndRoom(3) // room 3 closes: its contest ends, room 2 is free
	poll(t, 5*time.Second, "room 3's contest over", func() bool { c, ok := n1.s.Get(busy.ID); return ok && c.Over })
	c, err := n2.s.Accept(inv.ID)
	if err != nil || c.ID != inv.ID {
		t.Fatalf("accept again: %+v %v", c, err)
	}
	poll(t, 10*time.Second, "the start push", func() bool { return len(pushes(c.ID, 1, n1, n2)) > 0 })
	if p := pushes(c.ID, 1, n1, n2); len(p) != 1 || p[0].Seq != 1 {
		t.Fatalf("start pushes: %+v", p)
	}
}

// A shared accept whose pair.lua ran in Redis but whose reply was lost (the
// connection cut) started the contest: the node finds it (startedUnseen)
// and answers the contest, with its start push — not "retry", whose retry
// was "not found" with the contest running unannounced.
func TestSharedAcceptWhoseReplyWasLost(t *testing.T) {
	px, rdb := proxiedRedis(t)
	w := &fakeWallet{}
	n1 := newNode(t, rdb, w, 1, 2)
	inv, err := n1.s.Invite(7, 1, 2, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	px.LoseReply("accept", 500*time.Millisecond) // pair.lua's accept runs; its reply is lost
	c, err := n1.s.Accept(inv.ID)
	if px.Fired() != 1 {
		t.Fatalf("the fault fired %d times", px.Fired())
	}
	if err != nil || c.ID != inv.ID || c.Seq != 1 {
		t.Fatalf("accept whose reply was lost: %+v %v, want the contest", c, err)
	}
	if id, _, ok := n1.s.Running(1); !ok || id != inv.ID {
		t.Fatalf("running: %q %v", id, ok)
	}
	poll(t, 10*time.Second, "the start push", func() bool { return len(pushes(c.ID, 1, n1)) > 0 })
	if p := pushes(c.ID, 1, n1); len(p) != 1 || p[0].Seq != 1 {
		t.Fatalf("start pushes: %+v", p)
	}
}

// In a cluster every node drops its share of an ended contest's tallies
// once end.lua has made the scores final: the node that ended it, and the
// others when they learn it ended.
func TestSharedEndedContestsTalliesDropped(t *testing.T) {
	rdb, w := newRedis(t), &fakeWallet{}
	n1, n2 := newNode(t, rdb, w, 1, 2), newNode(t, rdb, w, 1, 2)
	var mu sync.Mutex
	dropped := map[*node][]string{}
	for _, n := range []*node{n1, n2} {
		n.s.SetTallyDrop(func(name string, rooms [2]int64) {
			mu.Lock()
			defer mu.Unlock()
			dropped[n] = append(dropped[n], fmt.Sprint(name, rooms))
		})
	}
	c, err := n1.s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprint(TallyName(c.ID), [2]int64{1, 2})
	poll(t, 10*time.Second, "both nodes drop the contest's tallies", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(dropped[n1]) == 1 && len(dropped[n2]) == 1
	})
	if f := finals(pushes(c.ID, 1, n1, n2)); len(f) != 1 {
		t.Fatalf("finals %+v, want one", f)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, n := range []*node{n1, n2} {
		if dropped[n][0] != want {
			t.Fatalf("dropped %v, want [%s]", dropped[n], want)
		}
	}
}

// Two accepts of one invitation through two nodes, the first one's reply
// lost: the contest the second started is not the first one's — the first
// answers "retry" (its retry: "not found"), not the contest with a start
// push and an end time of its own. Before, startedUnseen saw the contest
// running and took it for the first accept's.
func TestSharedLostAcceptDoesNotClaimAnotherAcceptsContest(t *testing.T) {
	px, via, direct := proxiedAndDirect(t)
	w := &fakeWallet{}
	n1, n2 := newNode(t, via, w, 1, 2), newNode(t, direct, w, 1, 2)
	inv, err := n2.s.Invite(7, 1, 2, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	px.Slow("accept", 500*time.Millisecond)
	px.LoseReply("accept", 200*time.Millisecond)
	first := make(chan error, 1)
	go func() { _, err := n1.s.Accept(inv.ID); first <- err }()
	poll(t, 10*time.Second, "node 1's accept on its way (held by the proxy)", func() bool { return px.Slowed() > 0 })
	px.Slow("", 0)
	c, err := n2.s.Accept(inv.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-first; err == nil || proto.AsError(err).Code != proto.CodeInternal {
		t.Fatalf("the accept whose reply was lost: %v, want 50000 (retry)", err)
	}
	poll(t, 10*time.Second, "the start push", func() bool { return len(pushes(c.ID, 1, n1, n2)) > 0 })
	time.Sleep(100 * time.Millisecond)
	if p := pushes(c.ID, 1, n1, n2); len(p) != 1 {
		t.Fatalf("start pushes %+v, want one (the accept that started it)", p)
	}
}

// A contest's end whose end.lua reply was lost (the script ran: the contest
// is over in Redis, ended by this replica) is still announced: the retry
// learns it ended the contest and pushes the result. Before, the next sync
// saw the contest no longer running and forgot the replica first — the
// retry never ran, and no node pushed the final 5558.
func TestSharedEndWhoseReplyWasLost(t *testing.T) {
	px, rdb := proxiedRedis(t)
	// end.lua loaded, so that its first call is the EVALSHA the fault hits.
	if err := rdb.Do(context.Background(), rdb.B().ScriptLoad().Script(endLua).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	n1 := newNode(t, rdb, &fakeWallet{}, 1, 2)
	c, err := n1.s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	px.LoseReply(fmt.Sprintf("%x", sha1.Sum([]byte(endLua))), 200*time.Millisecond)
	poll(t, 10*time.Second, "the final push", func() bool {
		for _, p := range pushes(c.ID, 1, n1) {
			if p.Over {
				return true
			}
		}
		return false
	})
	if px.Fired() != 1 {
		t.Fatalf("the fault fired %d times", px.Fired())
	}
}

// proxiedRedis is a throwaway Redis reached through a fault proxy, and a
// client of it through the proxy.
func proxiedRedis(t *testing.T) (*redistest.Proxy, rueidis.Client) {
	t.Helper()
	px, via, _ := proxiedAndDirect(t)
	return px, via
}

// proxiedAndDirect is a fresh Redis, a fault proxy before it, a client
// through the proxy and one straight to Redis.
func proxiedAndDirect(t *testing.T) (px *redistest.Proxy, via, direct rueidis.Client) {
	t.Helper()
	srv := redistest.Start(t)
	px = redistest.StartProxy(t, srv.Addr)
	via, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{px.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(via.Close)
	return px, via, srv.Client(t)
}

// A contest or invitation whose shared state cannot be read (Redis gone) is
// an error (50000, retry), not "not found" — which a client takes as final.
func TestSharedPKUnreadableIsNotNotFound(t *testing.T) {
	srv := redistest.Start(t)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	n := newNode(t, rdb, &fakeWallet{}, 1, 2)
	inv, err := n.s.Invite(7, 1, 2, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, found, err := n.s.FindInvitation(inv.ID); !found || err != nil {
		t.Fatalf("invitation: %v %v", found, err)
	}
	if _, found, err := n.s.Find("no-such-pk"); found || err != nil {
		t.Fatalf("unknown contest: %v %v, want not found", found, err)
	}
	srv.Stop()
	if _, _, err := n.s.FindInvitation(inv.ID); err == nil || proto.AsError(err).Code != proto.CodeInternal {
		t.Fatalf("invitation with Redis gone: %v, want 50000", err)
	}
	if _, _, err := n.s.Find(inv.ID); err == nil || proto.AsError(err).Code != proto.CodeInternal {
		t.Fatalf("contest with Redis gone: %v, want 50000", err)
	}
}
