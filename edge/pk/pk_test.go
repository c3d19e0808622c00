package pk

import (
	"errors"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// progress decodes the PK pushes v received.
func progress(v *routertest.Recorder) []Progress {
	var out []Progress
	for _, r := range v.Received() {
		var push struct {
			D Progress `json:"d"`
		}
		if err := proto.Unmarshal(r.Bytes, &push); err == nil && push.D.PKID != "" {
			out = append(out, push.D)
		}
	}
	return out
}

// flakyStore is a real Pebble store whose writes fail while failing is set,
// as a full or broken disk would.
type flakyStore struct {
	*persist.Store
	failing atomic.Bool
}

var errDisk = errors.New("disk full")

func (s *flakyStore) Put(k, v []byte) error {
	if s.failing.Load() {
		return errDisk
	}
	return s.Store.Put(k, v)
}

// A contest whose final record cannot be written does not end: no final
// push, and its scores stay frozen at its end time; once the disk recovers
// the end is retried and pushed exactly once, and a restart sees it over.
func TestEndRetriedUntilDurableAndPushedOnce(t *testing.T) {
	dir := t.TempDir()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	fs := &flakyStore{Store: st}
	rt, v := twoRooms(t)
	noTallies := func(string, int64) (int64, error) { return 0, nil }
	s := New(rt, func(int64) (bool, error) { return true, nil }, fs, noTallies, nil)
	s.grace = 0 // the final score at the end time: this test is about its record's retries
	c, err := s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	id, _, ok := s.Running(1)
	if !ok || id != c.ID {
		t.Fatalf("running %q %v", id, ok)
	}
	s.AddScore(1, c.ID, 20)
	s.AddScore(2, "another contest", 99) // not this contest: ignored
	fs.failing.Store(true)
	time.Sleep(1500 * time.Millisecond) // the end comes and cannot be recorded
	for _, p := range progress(v) {
		if p.Over {
			t.Fatalf("final push without a durable end: %+v", p)
		}
	}
	if got, _ := s.Get(c.ID); got.Over {
		t.Fatal("over without a durable end")
	}
	if _, _, ok := s.Running(1); ok {
		t.Fatal("a contest past its end still takes PK gifts")
	}
	s.AddScore(1, c.ID, 500) // a gift that raced the end: not counted
	fs.failing.Store(false)
	deadline := time.Now().Add(5 * time.Second)
	for {
		pushes := progress(v)
		if n := len(pushes); n > 0 && pushes[n-1].Over {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the end was not retried")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(1200 * time.Millisecond) // a second end would come by now
	pushes := progress(v)
	overs := 0
	for i, p := range pushes {
		if p.Over {
			overs++
		}
		if i > 0 && p.Seq <= pushes[i-1].Seq {
			t.Fatalf("seq not increasing: %+v", pushes)
		}
	}
	last := pushes[len(pushes)-1]
	if overs != 1 || last.Winner != 1 || last.Scores["1"] != 20 || last.Scores["2"] != 0 {
		t.Fatalf("pushes %+v", pushes)
	}
	s.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	// After a restart the contest is over with the pushed result, and is not
	// ended again.
	st2, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st2.Close()
	v2 := &routertest.Recorder{SessionID: 2, User: 1000}
	rt2 := router.NewLocal("t", router.LocalConfig{})
	rt2.OpenRoom(1)
	if _, err := rt2.Join(1, v2); err != nil {
		t.Fatal(err)
	}
	s2 := New(rt2, func(int64) (bool, error) { return true, nil }, st2, noTallies, nil)
	if err := s2.Restore(time.Now()); err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	got, ok := s2.Get(c.ID)
	if !ok || !got.Over || got.Scores != [2]int64{20, 0} || got.Seq != last.Seq {
		t.Fatalf("restored %+v (found %v), want over, [20 0], seq %d", got, ok, last.Seq)
	}
	if _, _, running := s2.Running(1); running {
		t.Fatal("an ended contest runs again after a restart")
	}
	time.Sleep(100 * time.Millisecond)
	if p := progress(v2); len(p) != 0 {
		t.Fatalf("pushes after restoring an ended contest: %+v", p)
	}
}

// An ended contest is forgotten after the keep period: no longer readable,
// and its record is gone from storage (nothing accumulates on disk).
func TestEndedContestForgotten(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rt, _ := twoRooms(t)
	s := New(rt, func(int64) (bool, error) { return true, nil }, st, func(string, int64) (int64, error) { return 0, nil }, nil)
	s.keep = 200 * time.Millisecond
	s.grace = 0 // ended at its end time: this test is about forgetting it
	defer s.Close()
	c, err := s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	records := func() int {
		n := 0
		_ = st.Scan(keyPrefix, func(k, v []byte) error { n++; return nil })
		return n
	}
	time.Sleep(1100 * time.Millisecond)
	if got, ok := s.Get(c.ID); !ok || !got.Over || records() != 1 {
		t.Fatalf("just ended: %+v found %v, %d records", got, ok, records())
	}
	deadline := time.Now().Add(5 * time.Second)
	for records() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the ended contest's record was not deleted")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, ok := s.Get(c.ID); ok {
		t.Fatal("forgotten contest still readable")
	}
}

// A PK gift on its way when the contest's time is up — past Running, its
// debit in the group commit — still scores: from the end time no gift
// joins (Enter says no), and the final score is taken endGrace later,
// never below the contest's durable tallies (a PK gift whose score was
// never added still counts). Before, the timer froze the scores at the
// end time: the last-second gift was debited and tallied, and left out.
func TestGiftOnItsWayAtTheEndStillScores(t *testing.T) {
	s, v, tally := tallied(t, 2) // room 2's durable tally (the wallet's)
	s.grace = 400 * time.Millisecond
	c, err := s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	id, _, ok := s.Running(1) // a PK gift to room 1 sets off
	if !ok || id != c.ID {
		t.Fatalf("running %q %v", id, ok)
	}
	time.Sleep(time.Until(c.EndsAt) + 50*time.Millisecond) // the end time passes while it is in the commit
	if _, _, ok := s.Running(1); ok {
		t.Fatal("a new PK gift joins after the contest's end time")
	}
	s.AddScore(1, c.ID, 20) // its debit is durable now
	tally.Store(7)          // room 2: a PK gift debited whose score was never added
	var final *Progress
	for deadline := time.Now().Add(3 * time.Second); final == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		for _, p := range progress(v) {
			if p.Over {
				final = &p
			}
		}
	}
	if final == nil {
		t.Fatal("no final push")
	}
	if final.Scores["1"] != 20 || final.Scores["2"] != 7 || final.Winner != 1 {
		t.Fatalf("final %+v, want 20:7 won by room 1", *final)
	}
}

// A PK gift whose debit takes longer than endGrace (a shared wallet's slow
// call) still scores: the end waits for the gifts that entered (Enter) and
// are not answered yet, then reads the tallies. Before, the end read them
// after endGrace and the late debit's tally grew after it: charged, never
// scored.
func TestPKEndWaitsForGiftsInFlight(t *testing.T) {
	s, v, tally := tallied(t, 1) // room 1's durable tally (the wallet's)
	s.grace = 100 * time.Millisecond
	c, err := s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	id, _, leave, ok := s.Enter(1) // a PK gift to room 1 sets off
	if !ok || id != c.ID {
		t.Fatalf("enter %q %v", id, ok)
	}
	time.Sleep(time.Until(c.EndsAt) + s.grace + 300*time.Millisecond) // past the grace, still in the wallet
	for _, p := range progress(v) {
		if p.Over {
			t.Fatalf("final push %+v while a PK gift was still being debited", p)
		}
	}
	tally.Store(20) // its debit lands, with its tally
	leave()
	var final *Progress
	for deadline := time.Now().Add(3 * time.Second); final == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		for _, p := range progress(v) {
			if p.Over {
				final = &p
			}
		}
	}
	if final == nil || final.Scores["1"] != 20 || final.Winner != 1 {
		t.Fatalf("final %+v, want room 1's late gift (20) scored", final)
	}
	// Bounded: a gift that never answers holds the end endWait at most.
	s.endWait = 500 * time.Millisecond
	c2, err := s.Start(1, 2, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, ok := s.Enter(1); !ok {
		t.Fatal("enter")
	}
	deadline := c2.EndsAt.Add(s.grace + s.endWait + time.Second)
	for {
		if got, _ := s.Get(c2.ID); got.Over {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("an unanswered PK gift held the end past endWait")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// tallied is a single node's PK service of rooms 1 and 2, a watcher in room
// 1, and the durable tally of room tallyRoom (the wallet's; the other's 0).
func tallied(t *testing.T, tallyRoom int64) (*Service, *routertest.Recorder, *atomic.Int64) {
	t.Helper()
	rt, v := twoRooms(t)
	tally := new(atomic.Int64)
	tallies := func(name string, room int64) (int64, error) {
		if room == tallyRoom {
			return tally.Load(), nil
		}
		return 0, nil
	}
	return New(rt, func(int64) (bool, error) { return true, nil }, nil, tallies, nil), v, tally
}

// An ended contest's tallies go with its record (SetTallyDrop: the wallet's
// tally rows, two per contest, stayed on disk for good): the scores are
// final in the record by then. A restart drops the tallies of the records
// it drops as stale.
func TestEndedContestsTalliesDropped(t *testing.T) {
	st, led := persisttest.OpenLedger(t)
	rt, _ := twoRooms(t)
	rows := func(id string) int {
		n := 0
		for _, room := range []int64{1, 2} {
			if v, _ := led.Tally(TallyName(id), room); v != 0 {
				n++
			}
		}
		return n
	}
	start := func(keep time.Duration) (*Service, string) {
		s := New(rt, func(int64) (bool, error) { return true, nil }, st, led.Tally, nil)
		s.keep, s.grace = keep, 0
		s.SetTallyDrop(func(name string, rooms [2]int64) {
			for _, room := range rooms {
				if err := led.DropTally(name, room); err != nil {
					t.Error(err)
				}
			}
		})
		if err := s.Restore(time.Now()); err != nil {
			t.Fatal(err)
		}
		c, err := s.Start(1, 2, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		for i, room := range c.Rooms { // PK gifts' debits add to the tallies
			if _, err := led.Apply(persist.Op{User: 500, ReqID: c.ID + strconv.Itoa(i), Postings: []persist.Posting{{User: 500, Delta: 10, Reason: persist.ReasonDev}},
				Tallies: []persist.Tally{{Name: TallyName(c.ID), User: room, Delta: 10 * int64(i+1)}}}); err != nil {
				t.Fatal(err)
			}
		}
		return s, c.ID
	}
	s, id := start(200 * time.Millisecond)
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, ok := s.Get(id)
		if !ok && rows(id) == 0 {
			break
		}
		if ok && got.Over && (got.Scores != [2]int64{10, 20}) {
			t.Fatalf("final scores %v, want the tallies [10 20]", got.Scores)
		}
		if time.Now().After(deadline) {
			t.Fatalf("contest forgotten: %v; tally rows left: %d", !ok, rows(id))
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Close()
	// Ended, then the node stops before its keep period is over: the next
	// start drops the stale record and its tallies.
	s, id = start(time.Hour)
	time.Sleep(1200 * time.Millisecond)
	if got, ok := s.Get(id); !ok || !got.Over || rows(id) != 2 {
		t.Fatalf("ended: %+v %v, %d tally rows (kept for the keep period)", got, ok, rows(id))
	}
	s.Close()
	s = New(rt, func(int64) (bool, error) { return true, nil }, st, led.Tally, nil)
	s.keep = 0
	s.SetTallyDrop(func(name string, rooms [2]int64) {
		for _, room := range rooms {
			_ = led.DropTally(name, room)
		}
	})
	if err := s.Restore(time.Now()); err != nil {
		t.Fatal(err)
	}
	s.Close() // waits for the drops
	if n := rows(id); n != 0 {
		t.Fatalf("%d tally rows of a stale contest left after a restart", n)
	}
}

// twoRooms is a router with rooms 1 and 2 open and a watcher joined to room 1.
func twoRooms(t *testing.T) (*router.Local, *routertest.Recorder) {
	t.Helper()
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(1)
	rt.OpenRoom(2)
	v := &routertest.Recorder{SessionID: 1, User: 1000}
	if _, err := rt.Join(1, v); err != nil {
		t.Fatal(err)
	}
	return rt, v
}

// closingStore closes a room (as DELETE /rooms does: the room service
// first, then EndRoom) while a contest's start record is being written.
type closingStore struct {
	*persist.Store
	open  atomic.Bool // room 2's state
	onPut func()
}

func (s *closingStore) Put(k, v []byte) error {
	if f := s.onPut; f != nil {
		s.onPut = nil
		f()
	}
	return s.Store.Put(k, v)
}

// A room closed while its contest's start was being recorded ends the
// contest once it is live: the close's EndRoom found it not live yet and
// left it to the start. Before, the contest ran its whole duration against
// the closed room (and the open one could not be paired again).
func TestContestStartedAsItsRoomClosedEnds(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	cs := &closingStore{Store: st}
	cs.open.Store(true)
	rt, v := twoRooms(t)
	var s *Service
	s = New(rt, func(room int64) (bool, error) { return room != 2 || cs.open.Load(), nil }, cs, func(string, int64) (int64, error) { return 0, nil }, nil)
	s.grace = 0
	cs.onPut = func() { cs.open.Store(false); s.EndRoom(2) }
	if _, err := s.Start(1, 2, time.Hour); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		over := false
		for _, p := range progress(v) {
			over = over || p.Over
		}
		if over {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a contest whose room closed as it started runs on (no final push)")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, _, ok := s.Running(1); ok {
		t.Fatal("room 1 still in the contest")
	}
}
