package router

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// sink is a Session that records the mids it receives.
type sink struct {
	id   uint64
	user int64

	mu     sync.Mutex
	mids   []string
	frames int
	refuse atomic.Bool
}

func (s *sink) ID() uint64    { return s.id }
func (s *sink) UserID() int64 { return s.user }
func (s *sink) Send(f *Frame) bool {
	if s.refuse.Load() {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.frames++
	for _, m := range f.Msgs {
		s.mids = append(s.mids, m.Mid)
	}
	return true
}

func (s *sink) got() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.mids...)
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestRoomOrderAndMerging(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{})
	l.OpenRoom(1)
	a, b := &sink{id: 1, user: 10}, &sink{id: 2, user: 11}
	for _, s := range []*sink{a, b} {
		if _, err := l.Join(1, s); err != nil {
			t.Fatal(err)
		}
	}
	const n = 5000
	want := make([]string, n)
	for i := range want {
		mid, err := l.PublishRoom(1, proto.Push{Biz: proto.BizChat, Data: []byte(`{}`)})
		if err != nil {
			t.Fatal(err)
		}
		want[i] = mid
	}
	waitFor(t, func() bool { return len(a.got()) == n && len(b.got()) == n })
	for _, s := range []*sink{a, b} {
		got := s.got()
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("session %d: push %d is %s, want %s", s.id, i, got[i], want[i])
			}
		}
	}
	if a.frames >= n {
		t.Logf("no merging happened (%d frames for %d pushes)", a.frames, n)
	}
	seen := map[string]bool{}
	for _, m := range want {
		if seen[m] {
			t.Fatalf("duplicate mid %s", m)
		}
		seen[m] = true
	}
}

func TestCloseRoomFinalPushAndNoRejoin(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{})
	l.OpenRoom(7)
	a := &sink{id: 1, user: 10}
	if n, err := l.Join(7, a); err != nil || n != 1 {
		t.Fatalf("join: %d %v", n, err)
	}
	mid1, _ := l.PublishRoom(7, proto.Push{Biz: proto.BizChat})
	l.CloseRoom(7, &proto.Push{Biz: proto.BizRoomClosed})
	waitFor(t, func() bool { return len(a.got()) == 2 })
	if got := a.got(); got[0] != mid1 {
		t.Fatalf("final push overtook an earlier one: %v", got)
	}
	if _, err := l.Join(7, a); err != ErrNoRoom {
		t.Fatalf("join closed room: %v", err)
	}
	if _, err := l.PublishRoom(7, proto.Push{}); err != ErrNoRoom {
		t.Fatalf("publish to closed room: %v", err)
	}
	if l.Online(7) != 0 || l.IsMember(7, a) {
		t.Fatal("members remain after close")
	}
	if st := l.Stats(); st.MembersOnline != 0 || st.Rooms != 0 {
		t.Fatalf("stats after close: %+v", st)
	}
}

func TestUnregisterLeavesRoomsAndUserIndex(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{MaxRoomsPerSes: 2})
	for _, r := range []int64{1, 2, 3} {
		l.OpenRoom(r)
	}
	a := &sink{id: 1, user: 10}
	l.Register(a)
	if _, err := l.Join(1, a); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Join(2, a); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Join(3, a); err != ErrTooManyRooms {
		t.Fatalf("third room: %v", err)
	}
	if _, n := l.SendUser(10, proto.Push{Biz: proto.BizWalletCredit, Ack: true}); n != 1 {
		t.Fatalf("SendUser reached %d", n)
	}
	l.Unregister(a)
	if l.Online(1) != 0 || l.Online(2) != 0 {
		t.Fatal("still a member after Unregister")
	}
	if _, n := l.SendUser(10, proto.Push{}); n != 0 {
		t.Fatal("user index kept a gone session")
	}
}

func TestPublishBoundedPerRoom(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{MaxPending: 4})
	l.OpenRoom(1)
	block := make(chan struct{})
	s := &blockSink{sink: sink{id: 1}, block: block}
	if _, err := l.Join(1, s); err != nil {
		t.Fatal(err)
	}
	var busy int
	for i := 0; i < 100; i++ {
		if _, err := l.PublishRoom(1, proto.Push{}); err == ErrRoomBusy {
			busy++
		}
	}
	close(block)
	if busy == 0 {
		t.Fatal("room queue is unbounded")
	}
}

// blockSink blocks its first Send until released (a pump stuck in fan-out).
type blockSink struct {
	sink
	block chan struct{}
	once  sync.Once
}

func (b *blockSink) Send(f *Frame) bool {
	b.once.Do(func() { <-b.block })
	return b.sink.Send(f)
}

func TestMidSourceJSONSafe(t *testing.T) {
	m := NewMidSource(`gw"1\x`)
	mid := m.Next()
	for _, c := range mid {
		if c == '"' || c == '\\' {
			t.Fatalf("unsafe mid %q", mid)
		}
	}
}

// A cluster node whose fan-out of a room falls behind what the other nodes
// publish holds at most MaxPending of the room's pushes queued: the oldest
// go (counted), its members see the gap. It queued every push before.
func TestDeliverBoundedPerRoom(t *testing.T) {
	l, s, block := pumpBlocked(t, LocalConfig{MaxPending: 16, Sequenced: true})
	for o := int64(2); o <= 1001; o += 10 {
		l.Deliver(1, "E1", seqMsgs("E1", o, o+9))
	}
	r := l.room(1)
	r.mu.Lock()
	queued := len(r.pending)
	r.mu.Unlock()
	if queued > 16 || l.Stats().RoomOverrun != 1000-16 {
		t.Fatalf("%d pushes queued, %d overrun: want at most 16 queued, the other %d dropped", queued, l.Stats().RoomOverrun, 1000-16)
	}
	close(block)
	waitFor(t, func() bool { got := s.got(); return len(got) == 17 })
}

// Pushes a node drops from a room's queue when its fan-out falls behind
// count as taken: a join from before them gets them replayed from the
// history and then the rest from the pump — every offset once. Before, a
// join between two pump rounds found "nothing missed" at the pump's last
// take (recovered, no replay) and the dropped pushes never reached it (the
// end-to-end run below passes either way when the pump wins the lock; the
// taken offset is what decides).
func TestJoinDuringAnOverrunReplaysTheDropped(t *testing.T) {
	l, _, block := pumpBlocked(t, LocalConfig{MaxPending: 16, Sequenced: true, HistorySize: 2000, HistoryTTL: time.Hour})
	for o := int64(2); o <= 1001; o += 10 {
		l.Deliver(1, "E1", seqMsgs("E1", o, o+9)) // 2..985 dropped
	}
	// What a join now compares its since with: past the dropped pushes (a
	// join from before them replays them), not the pump's last take (1).
	r := l.room(1)
	r.mu.Lock()
	taken := r.taken
	r.mu.Unlock()
	if taken != 985 {
		t.Fatalf("after dropping 2..985 the room's taken offset is %d, want 985", taken)
	}
	joiner := &offSink{id: 2}
	joined := make(chan error, 1)
	go func() {
		j, err := l.JoinAt(1, joiner, &proto.Position{Off: 1, Ep: "E1"})
		if err == nil && !j.Recovered {
			err = errors.New("not recovered")
		}
		joined <- err
	}()
	// The join waits for the fan-out; waiting over a millisecond, it gets
	// the room's lock before the pump's next round (the mutex hands it to
	// a long waiter).
	time.Sleep(50 * time.Millisecond)
	close(block)
	if err := <-joined; err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(joiner.got()) >= 1000 })
	time.Sleep(20 * time.Millisecond)
	consecutive(t, joiner.got(), 2, 1001)
}

// Pushes of an older epoch dropped in an overrun right after the room moved
// to a new epoch leave the room's taken offset in the new epoch (a join
// compares its since with it): an old epoch's offset there would make a
// joiner of the new epoch skip its start.
func TestOverrunOfAnOldEpochKeepsTheNewEpochsPosition(t *testing.T) {
	l, _, block := pumpBlocked(t, LocalConfig{MaxPending: 16, Sequenced: true, HistorySize: 100})
	defer close(block)
	l.Deliver(1, "E1", seqMsgs("E1", 500, 509))
	l.Deliver(1, "E2", seqMsgs("E2", 1, 10)) // 20 queued: E1's 500..503 dropped
	r := l.room(1)
	r.mu.Lock()
	ep, taken, queued := r.ep, r.taken, len(r.pending)
	r.mu.Unlock()
	if ep != "E2" || taken != 0 || queued != 16 {
		t.Fatalf("epoch %s, taken %d, %d queued: want E2, 0 (its start), 16", ep, taken, queued)
	}
}

// pumpBlocked is a Sequenced router (cfg) with room 1 at E1/0 and member s,
// whose pump has taken offset 1 and is blocked in s's Send until block is
// closed.
func pumpBlocked(t *testing.T, cfg LocalConfig) (*Local, *blockSink, chan struct{}) {
	t.Helper()
	l := NewLocal("gw-1", cfg)
	l.OpenRoom(1)
	l.SetPosition(1, "E1", 0)
	block := make(chan struct{})
	s := &blockSink{sink: sink{id: 1}, block: block}
	if _, err := l.Join(1, s); err != nil {
		t.Fatal(err)
	}
	l.Deliver(1, "E1", seqMsgs("E1", 1, 1)) // the pump takes it and blocks in its fan-out
	waitFor(t, func() bool { r := l.room(1); r.mu.Lock(); defer r.mu.Unlock(); return len(r.pending) == 0 })
	return l, s, block
}
