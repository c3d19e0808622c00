package gift

import (
	"sync"
	"testing"
	"time"

	"github.com/bytedance/sonic"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// effectPushes decodes the effect pushes v received, with their arrival times.
func effectPushes(v *routertest.Recorder) ([]EffectPush, []time.Time) {
	var got []EffectPush
	var when []time.Time
	for _, r := range v.Received() {
		var push struct {
			D EffectPush `json:"d"`
		}
		if err := sonic.Unmarshal(r.Bytes, &push); err == nil {
			got = append(got, push.D)
			when = append(when, r.At)
		}
	}
	return got, when
}

// A busy room's effect pushes are paced, not burst: 50 distinct senders at
// once, with a cap of 100 pushes/s and a 20-ms window, reach the viewer as
// two pushes per 20-ms tick, the longest-waiting first (first-arrival
// order), over ~0.5 s; senders who give again while they wait are merged
// into their waiting combo (counts summed), so nothing is lost from the
// display.
func TestRoomEffectsPacedLongestWaitingFirst(t *testing.T) {
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	v := &routertest.Recorder{SessionID: 1, User: 1000}
	if _, err := rt.Join(7, v); err != nil {
		t.Fatal(err)
	}
	e := newEffects(rt, 20*time.Millisecond, 100)
	if e.tick != 20*time.Millisecond || e.quota != 2 {
		t.Fatalf("tick %v quota %d, want 20ms and 2", e.tick, e.quota)
	}
	for from := int64(1); from <= 50; from++ {
		e.add(7, EffectPush{From: from, To: 99, GiftID: 1, Count: 1})
	}
	// The last ten senders give four times more while they wait.
	for i := 0; i < 4; i++ {
		for from := int64(41); from <= 50; from++ {
			e.add(7, EffectPush{From: from, To: 99, GiftID: 1, Count: 2})
		}
	}
	waitFor(t, func() bool { got, _ := effectPushes(v); return len(got) == 50 })
	got, when := effectPushes(v)
	total := 0
	for i, p := range got {
		if p.From != int64(i+1) {
			t.Fatalf("push %d is from %d: not in first-arrival order", i, p.From)
		}
		wantCombo, wantCount := 1, 1
		if p.From > 40 {
			wantCombo, wantCount = 5, 9
		}
		if p.Combo != wantCombo || p.Count != wantCount {
			t.Fatalf("push from %d: combo %d count %d, want %d and %d", p.From, p.Combo, p.Count, wantCombo, wantCount)
		}
		total += p.Count
	}
	if total != 40+10*9 {
		t.Fatalf("count %d, want 130", total)
	}
	// 25 ticks of 2, each at least a tick after the last (timers fire late,
	// never early): the first and last are ≥ 24 ticks apart.
	if span := when[49].Sub(when[0]); span < 24*20*time.Millisecond-10*time.Millisecond {
		t.Fatalf("50 effects arrived within %v: not paced at 100/s", span)
	}
	e.mu.Lock()
	left := len(e.rooms)
	e.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d rooms still waiting after the drain", left)
	}
}

// A room holds at most maxEffectKeys waiting effects: each new distinct
// effect beyond that sends the oldest at once.
func TestRoomEffectsWaitingBounded(t *testing.T) {
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	v := &routertest.Recorder{SessionID: 1, User: 1000}
	if _, err := rt.Join(7, v); err != nil {
		t.Fatal(err)
	}
	e := newEffects(rt, time.Hour, 1) // no tick during the test
	for from := int64(1); from <= maxEffectKeys+10; from++ {
		e.add(7, EffectPush{From: from, To: 99, GiftID: 1, Count: 1})
	}
	e.mu.Lock()
	waiting := len(e.rooms[7].order)
	e.mu.Unlock()
	if waiting != maxEffectKeys {
		t.Fatalf("%d effects waiting, want %d", waiting, maxEffectKeys)
	}
	waitFor(t, func() bool { got, _ := effectPushes(v); return len(got) == 10 })
	got, _ := effectPushes(v)
	for i, p := range got {
		if p.From != int64(i+1) {
			t.Fatalf("sent early: %+v, want the oldest (from %d)", p, i+1)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A node stopping sends every room's waiting effects at once (FlushEffects):
// before, those still waiting for their pace were dropped with the node —
// gifts answered ok missing from their room's display on the other nodes.
func TestRoomEffectsFlushedAtStop(t *testing.T) {
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	v := &routertest.Recorder{SessionID: 1, User: 1000}
	if _, err := rt.Join(7, v); err != nil {
		t.Fatal(err)
	}
	s := &Service{effects: newEffects(rt, time.Hour, 1)} // no tick during the test
	for from := int64(1); from <= 50; from++ {
		s.effects.add(7, EffectPush{From: from, To: 99, GiftID: 1, Count: 1})
	}
	s.FlushEffects()
	waitFor(t, func() bool { got, _ := effectPushes(v); return len(got) == 50 })
	got, _ := effectPushes(v)
	for i, p := range got {
		if p.From != int64(i+1) {
			t.Fatalf("effect %d: %+v, want from %d (first arrival first)", i, p, i+1)
		}
	}
	s.effects.flush(7) // a tick after the flush finds nothing
	time.Sleep(20 * time.Millisecond)
	if got, _ := effectPushes(v); len(got) != 50 {
		t.Fatalf("%d effects after a late tick, want 50", len(got))
	}
}

// gatedRouter holds the first PublishRoom until release is closed.
type gatedRouter struct {
	router.Router
	once     sync.Once
	held     chan struct{} // closed when the first publish is held
	heldRoom int64         // its room (set before held is closed)
	release  chan struct{}
}

func (g *gatedRouter) PublishRoom(room int64, p proto.Push) (string, error) {
	first := false
	g.once.Do(func() { first = true })
	if first {
		g.heldRoom = room
		close(g.held)
		<-g.release
	}
	return g.Router.PublishRoom(room, p)
}

// A stop's flush takes every room's effects at once: an effect added to a
// room while the flush still publishes another room (a new queue, ticked)
// goes out behind that room's older ones — it once went first, the room's
// older effects not yet handed to the publisher.
func TestRoomEffectsAddedDuringTheStopsFlushGoOutBehind(t *testing.T) {
	rt := router.NewLocal("t", router.LocalConfig{})
	viewers := map[int64]*routertest.Recorder{}
	for _, room := range []int64{7, 8} {
		rt.OpenRoom(room)
		viewers[room] = &routertest.Recorder{SessionID: uint64(room), User: 1000 + room}
		if _, err := rt.Join(room, viewers[room]); err != nil {
			t.Fatal(err)
		}
	}
	g := &gatedRouter{Router: rt, held: make(chan struct{}), release: make(chan struct{})}
	s := &Service{effects: newEffects(g, time.Hour, 0)} // ticks only when called
	for _, room := range []int64{7, 8} {
		for from := int64(1); from <= 3; from++ {
			s.effects.add(room, EffectPush{From: from, To: 99, GiftID: 1, Count: 1})
		}
	}
	flushed := make(chan struct{})
	go func() { s.FlushEffects(); close(flushed) }()
	<-g.held
	other := map[int64]int64{7: 8, 8: 7}[g.heldRoom]
	s.effects.add(other, EffectPush{From: 4, To: 99, GiftID: 1, Count: 1})
	go s.effects.flush(other) // its tick, while the flush is held on the first room
	time.Sleep(100 * time.Millisecond)
	close(g.release)
	<-flushed
	waitFor(t, func() bool { got, _ := effectPushes(viewers[other]); return len(got) == 4 })
	got, _ := effectPushes(viewers[other])
	for i, p := range got {
		if p.From != int64(i+1) {
			t.Fatalf("room %d effect %d from %d, want %d (the new one behind the flushed ones)", other, i, p.From, i+1)
		}
	}
}

// A room's effects reach the router in the order they left its queue: a
// stop's flush while a tick is still publishing its share waits behind it
// (it once published its own at once, ahead of the tick's) and returns
// only when both are out.
func TestRoomEffectsFlushedAtStopKeepOrderBehindATick(t *testing.T) {
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	v := &routertest.Recorder{SessionID: 1, User: 1000}
	if _, err := rt.Join(7, v); err != nil {
		t.Fatal(err)
	}
	g := &gatedRouter{Router: rt, held: make(chan struct{}), release: make(chan struct{})}
	s := &Service{effects: newEffects(g, time.Millisecond, 1)} // one effect a tick, a tick a second
	for from := int64(1); from <= 5; from++ {
		s.effects.add(7, EffectPush{From: from, To: 99, GiftID: 1, Count: 1})
	}
	go s.effects.flush(7) // sends from 1, held in the router
	<-g.held
	flushed := make(chan struct{})
	go func() { s.FlushEffects(); close(flushed) }()
	select {
	case <-flushed:
		t.Fatal("the stop's flush returned while the tick's effect was still held")
	case <-time.After(100 * time.Millisecond):
	}
	if got, _ := effectPushes(v); len(got) != 0 {
		t.Fatalf("%d effects published ahead of the held one: %+v", len(got), got)
	}
	close(g.release)
	<-flushed
	waitFor(t, func() bool { got, _ := effectPushes(v); return len(got) == 5 })
	got, _ := effectPushes(v)
	for i, p := range got {
		if p.From != int64(i+1) {
			t.Fatalf("effect %d from %d, want %d (the order they left the queue)", i, p.From, i+1)
		}
	}
}
