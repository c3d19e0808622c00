package router

import (
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// offSink records the offsets of the room pushes it receives, in order.
type offSink struct {
	id uint64

	mu   sync.Mutex
	offs []int64
}

func (s *offSink) ID() uint64    { return s.id }
func (s *offSink) UserID() int64 { return int64(s.id) }
func (s *offSink) Send(f *Frame) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range f.Msgs {
		s.offs = append(s.offs, m.Off)
	}
	return true
}

func (s *offSink) got() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int64(nil), s.offs...)
}

func consecutive(t *testing.T, offs []int64, from, to int64) {
	t.Helper()
	if int64(len(offs)) != to-from+1 {
		t.Fatalf("got %d offsets %v, want %d..%d", len(offs), offs, from, to)
	}
	for i, o := range offs {
		if o != from+int64(i) {
			t.Fatalf("offset #%d = %d, want %d (all: %v)", i, o, from+int64(i), offs)
		}
	}
}

func TestRoomPushesNumberedAndReplayedSince(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{HistorySize: 100})
	l.OpenRoom(1)
	a := &offSink{id: 1}
	j, err := l.JoinAt(1, a, nil)
	if err != nil || j.Off != 0 || j.Ep == "" || j.Recovered {
		t.Fatalf("fresh join = %+v, %v", j, err)
	}
	for i := 0; i < 50; i++ {
		if _, err := l.PublishRoom(1, proto.Push{Biz: proto.BizChat, Data: []byte(`{"i":` + strconv.Itoa(i) + `}`)}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return len(a.got()) == 50 })
	consecutive(t, a.got(), 1, 50)

	// A client that saw up to 20 comes back: 21..50 are replayed, then new ones.
	b := &offSink{id: 2}
	j, err = l.JoinAt(1, b, &proto.Position{Off: 20, Ep: j.Ep})
	if err != nil || !j.Recovered || j.Off != 50 {
		t.Fatalf("join since 20 = %+v, %v", j, err)
	}
	if _, err := l.PublishRoom(1, proto.Push{Biz: proto.BizChat}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(b.got()) == 31 })
	consecutive(t, b.got(), 21, 51)

	// Another epoch, or a position the ring no longer holds: not recovered.
	c := &offSink{id: 3}
	if j, _ := l.JoinAt(1, c, &proto.Position{Off: 20, Ep: "other"}); j.Recovered {
		t.Fatalf("other epoch recovered: %+v", j)
	}
	for i := 0; i < 120; i++ {
		_, _ = l.PublishRoom(1, proto.Push{Biz: proto.BizChat})
	}
	waitFor(t, func() bool { return len(a.got()) == 171 })
	d := &offSink{id: 4}
	if j, _ := l.JoinAt(1, d, &proto.Position{Off: 30, Ep: j.Ep}); j.Recovered {
		t.Fatalf("position older than the ring recovered: %+v", j)
	}
	// Up to date: recovered with nothing to replay.
	e := &offSink{id: 5}
	if j2, _ := l.JoinAt(1, e, &proto.Position{Off: 171, Ep: j.Ep}); !j2.Recovered || j2.Off != 171 {
		t.Fatalf("up-to-date join = %+v", j2)
	}
	// Ahead of the room (a position it never handed out, in its epoch): not
	// recovered — the client takes the reply's position; told recovered, it
	// kept its own and dropped the room's next pushes as seen.
	if j2, _ := l.JoinAt(1, &offSink{id: 7}, &proto.Position{Off: 1_000_000, Ep: j.Ep}); j2.Recovered || j2.Off != 171 {
		t.Fatalf("join since a position ahead of the room = %+v, want not recovered at 171", j2)
	}
	// A room reopened (node restart) has a new epoch.
	l.CloseRoom(1, nil)
	l.OpenRoom(1)
	if j3, _ := l.JoinAt(1, &offSink{id: 6}, &proto.Position{Off: 171, Ep: j.Ep}); j3.Recovered || j3.Ep == j.Ep {
		t.Fatalf("reopened room kept its epoch: %+v", j3)
	}
}

// Pushes published while clients rejoin with since: every client ends with
// one gap-free, duplicate-free sequence.
func TestJoinSinceUnderConcurrentPublish(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{HistorySize: 10000})
	l.OpenRoom(1)
	first := &offSink{id: 1}
	j0, _ := l.JoinAt(1, first, nil)
	const total = 3000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < total; i++ {
			_, _ = l.PublishRoom(1, proto.Push{Biz: proto.BizChat})
		}
	}()
	var sinks []*offSink
	var sinces []int64
	for i := 0; i < 50; i++ {
		s := &offSink{id: uint64(10 + i)}
		seen := first.got()
		since := int64(0)
		if len(seen) > 0 {
			since = seen[len(seen)/2]
		}
		if _, err := l.JoinAt(1, s, &proto.Position{Off: since, Ep: j0.Ep}); err != nil {
			t.Fatal(err)
		}
		sinks, sinces = append(sinks, s), append(sinces, since)
	}
	<-done
	waitFor(t, func() bool { return len(first.got()) == total })
	for i, s := range sinks {
		waitFor(t, func() bool { return int64(len(s.got())) == total-sinces[i] })
		consecutive(t, s.got(), sinces[i]+1, total)
	}
}

// A join whose replay needs cfg.History (Redis in a cluster) reads it with
// no lock held: the room's other members keep getting pushes meanwhile —
// before, the read held the room's fan-out lock, and one slow read (or a
// join storm after a node died) stalled the whole room on this node. The
// joiner still gets one gap-free sequence: the read, what the pump took
// meanwhile, then the rest.
func TestJoinHistoryReadDoesNotStallTheRoom(t *testing.T) {
	release := make(chan struct{})
	reading := make(chan struct{}, 1)
	l := NewLocal("gw-1", LocalConfig{HistorySize: 100, History: func(room int64, ep string, from, to int64) ([]Msg, error) {
		reading <- struct{}{}
		<-release
		return keptPushes(from, to), nil
	}})
	l.OpenRoom(1)
	l.SetPosition(1, "E1", 100) // as a cluster node that just subscribed: nothing in the ring
	a := &offSink{id: 1}
	if _, err := l.JoinAt(1, a, nil); err != nil {
		t.Fatal(err)
	}
	b := &offSink{id: 2}
	joined := make(chan Joined)
	go func() {
		j, err := l.JoinAt(1, b, &proto.Position{Off: 90, Ep: "E1"})
		if err != nil {
			t.Error(err)
		}
		joined <- j
	}()
	<-reading
	for range 5 {
		if _, err := l.PublishRoom(1, proto.Push{Biz: proto.BizChat}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(a.got()) < 5 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	close(release)
	if got := a.got(); len(got) != 5 {
		t.Fatalf("the room's member got %v while a joiner's history read was under way, want 101..105 at once", got)
	}
	if j := <-joined; !j.Recovered {
		t.Fatalf("join since 90: %+v", j)
	}
	if _, err := l.PublishRoom(1, proto.Push{Biz: proto.BizChat}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(b.got()) >= 16 })
	consecutive(t, b.got(), 91, 106)
}

// tightSink's queue has room for room bytes.
type tightSink struct {
	offSink
	room int
}

func (s *tightSink) QueueRoom() int { return s.room }

// A replay larger than the joiner's queue can take is not sent: the join
// answers recovered:false (the client re-syncs). Before, it was queued and
// overflowed the queue — the session closed as a slow consumer, and the
// same join after its reconnect closed it again.
func TestJoinReplayTooBigForTheQueueIsNotRecovered(t *testing.T) {
	l := NewLocal("gw-1", LocalConfig{HistorySize: 100})
	l.OpenRoom(1)
	a := &offSink{id: 1}
	j, _ := l.JoinAt(1, a, nil)
	for range 10 {
		if _, err := l.PublishRoom(1, proto.Push{Biz: proto.BizChat, Data: []byte(`{"text":"0123456789012345678901234567890123456789"}`)}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return len(a.got()) == 10 })
	small := &tightSink{offSink: offSink{id: 2}, room: 200}
	if j2, err := l.JoinAt(1, small, &proto.Position{Off: 0, Ep: j.Ep}); err != nil || j2.Recovered || len(small.got()) != 0 {
		t.Fatalf("a replay of 10 pushes into 200 bytes of room: %+v %v, replayed %v", j2, err, small.got())
	}
	roomy := &tightSink{offSink: offSink{id: 3}, room: 64 << 10}
	if j3, err := l.JoinAt(1, roomy, &proto.Position{Off: 5, Ep: j.Ep}); err != nil || !j3.Recovered {
		t.Fatalf("a replay that fits: %+v %v", j3, err)
	}
	consecutive(t, roomy.got(), 6, 10)
}

// A join with since whose pushes must be read from the shared history, when
// that read fails (Redis did not answer), is ErrUnavailable (50000: the
// client joins again) and leaves the session out of the room — not
// recovered:false, which sends the app to a full re-sync though the pushes
// are still kept. Only "not kept" (errNotKept) is recovered:false.
func TestJoinHistoryReadFailureIsUnavailable(t *testing.T) {
	var fail error
	l := NewLocal("gw-1", LocalConfig{HistorySize: 100, History: func(room int64, ep string, from, to int64) ([]Msg, error) {
		if fail != nil {
			return nil, fail
		}
		return keptPushes(from, to), nil
	}})
	l.OpenRoom(1)
	l.SetPosition(1, "E1", 100) // as a cluster node that just subscribed: nothing in the ring
	s := &offSink{id: 1}
	since := &proto.Position{Off: 90, Ep: "E1"}
	fail = errors.New("redis: i/o timeout")
	if _, err := l.JoinAt(1, s, since); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("join while the history read fails: %v, want ErrUnavailable", err)
	}
	if l.IsMember(1, s) {
		t.Fatal("the failed join left the session in the room")
	}
	fail = nil
	if j, err := l.JoinAt(1, s, since); err != nil || !j.Recovered || j.Off != 100 {
		t.Fatalf("the join again: %+v %v, want recovered at 100", j, err)
	}
	fail = errNotKept
	s2 := &offSink{id: 2}
	if j, err := l.JoinAt(1, s2, since); err != nil || j.Recovered {
		t.Fatalf("join whose pushes are not kept: %+v %v, want joined, not recovered", j, err)
	}
	// A join again of a room the session is in, failing so: it stays a
	// member, and its Unregister still takes it out of the room.
	fail = errors.New("redis: i/o timeout")
	if _, err := l.JoinAt(1, s, since); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("a join again while the read fails: %v", err)
	}
	if !l.IsMember(1, s) {
		t.Fatal("a member's failed join again took it out of the room")
	}
	l.Unregister(s)
	l.Unregister(s2)
	if l.IsMember(1, s) || l.Online(1) != 0 {
		t.Fatalf("after Unregister: member %v, online %d", l.IsMember(1, s), l.Online(1))
	}
}

// keptPushes are pushes from..to as a shared history keeps them.
func keptPushes(from, to int64) []Msg {
	var out []Msg
	for o := from; o <= to; o++ {
		out = append(out, Msg{Off: o, Bytes: []byte(`{}`)})
	}
	return out
}
