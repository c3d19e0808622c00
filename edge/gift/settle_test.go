package gift

import (
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// A gift answered "in doubt" by the shared wallet (its script ran, the reply
// was lost) gets its effects when the wallet's watcher settles it — with no
// retry from the sender, who may never retry — and only once: a retry then
// replays the debit without sending them again. Conservation: one debit.
func TestGiftInDoubtGetsItsEffectsWhenTheWalletSettlesIt(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	_, w, cat := giftWallet(t, t.TempDir(), px.Addr, true)
	g, _ := cat.Get(24)
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	receiver := &routertest.Recorder{SessionID: 2, User: 200}
	rt.Register(receiver)
	s := New(w, rt, cat, Config{}, nil)
	effects := func() int {
		n := 0
		for _, r := range receiver.Received() {
			if strings.Contains(string(r.Bytes), `"biz":5556`) {
				n++
			}
		}
		return n
	}

	px.LoseReply("le:seq:trade", 1500*time.Millisecond) // the apply script's reply
	req := Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "lost-reply"}
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeConflict {
		t.Fatalf("first answer: %+v, want %d (in doubt)", e, proto.CodeConflict)
	}
	if px.Fired() != 1 {
		t.Fatalf("the fault was not injected (fired %d)", px.Fired())
	}
	deadline := time.Now().Add(15 * time.Second)
	for effects() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no effect push once the wallet settled the gift (no retry)")
		}
		time.Sleep(20 * time.Millisecond)
	}
	rep, e := s.Send(100, true, req)
	if e != nil || rep.OrderID == "" || rep.Balance != 10_000-g.Price {
		t.Fatalf("retry: %+v %+v, want a replay to %d", rep, e, 10_000-g.Price)
	}
	time.Sleep(50 * time.Millisecond)
	if n := effects(); n != 1 {
		t.Fatalf("%d effect pushes to the receiver, want 1", n)
	}
	if b, err := w.Balance(100); err != nil || b != 10_000-g.Price {
		t.Fatalf("sender balance %d (%v), want %d: one debit", b, err, 10_000-g.Price)
	}
	if r, err := w.Tally(TallyReceived, 200); err != nil || r != g.Price {
		t.Fatalf("receiver tally %d (%v), want %d", r, err, g.Price)
	}
}

// A gift answered in doubt whose node stops before the wallet settles it
// (Redis unreachable until then) gets its effects when the node starts
// again — the restart settles the op from Redis: it ran — and not a second
// time at the sender's retry, which replays the one debit.
func TestGiftInDoubtAtAStopGetsItsEffectsAtTheNextStart(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	dir := t.TempDir()
	st, w, cat := giftWallet(t, dir, px.Addr, true)
	g, _ := cat.Get(24)
	s := New(w, router.NewLocal("t", router.LocalConfig{}), cat, Config{}, nil)
	px.LoseReply("le:seq:trade", time.Minute) // the apply script's reply; Redis unreachable after it
	req := Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 3, ReqID: "lost-at-stop"}
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeConflict {
		t.Fatalf("first answer: %+v, want %d (in doubt)", e, proto.CodeConflict)
	}
	w.Close() // the node stops with the op unsettled
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	st, w, cat = giftWallet(t, dir, rs.Addr, false)
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	receiver := &routertest.Recorder{SessionID: 2, User: 200}
	rt.Register(receiver)
	viewer := &routertest.Recorder{SessionID: 3, User: 300}
	if _, err := rt.Join(7, viewer); err != nil {
		t.Fatal(err)
	}
	s = New(w, rt, cat, Config{EffectWindow: 10 * time.Millisecond}, nil)
	w.TellSettledAtOpen()
	count := func(r *routertest.Recorder, biz string) (n int, last string) {
		for _, f := range r.Received() {
			if strings.Contains(string(f.Bytes), biz) {
				n, last = n+1, string(f.Bytes)
			}
		}
		return n, last
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, _ := count(receiver, `"biz":5556`)
		m, _ := count(viewer, `"count":3`)
		if n > 0 && m > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the restart: %d receiver pushes, %d room effects; want the gift's", n, m)
		}
		time.Sleep(20 * time.Millisecond)
	}
	rep, e := s.Send(100, true, req)
	if e != nil || rep.Balance != 10_000-3*g.Price {
		t.Fatalf("retry: %+v %+v, want a replay to %d", rep, e, 10_000-3*g.Price)
	}
	time.Sleep(100 * time.Millisecond)
	n, push := count(receiver, `"biz":5556`)
	if n != 1 || !strings.Contains(push, `"order_id":"`+rep.OrderID+`"`) || !strings.Contains(push, `"gift_id":24`) {
		t.Fatalf("%d receiver pushes (last %s), want 1 for order %s", n, push, rep.OrderID)
	}
	if m, _ := count(viewer, `"count":3`); m != 1 {
		t.Fatalf("%d room effects, want 1", m)
	}
	if b, err := w.Balance(100); err != nil || b != 10_000-3*g.Price {
		t.Fatalf("sender balance %d (%v), want %d: one debit", b, err, 10_000-3*g.Price)
	}
	if r, err := w.Tally(TallyReceived, 200); err != nil || r != 3*g.Price {
		t.Fatalf("receiver tally %d (%v), want %d", r, err, 3*g.Price)
	}
	w.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	persisttest.CheckSharedConservation(t, rs.Addr, dir)
}

// giftWallet opens node "a"'s shared wallet on the store in dir, with a
// Redis client to addr (a fault proxy, or Redis), and the catalogue on that
// store; seed credits user 100 with 10,000 coins.
func giftWallet(t *testing.T, dir, addr string, seed bool) (*persist.Store, *persist.SharedWallet, *Catalogue) {
	t.Helper()
	st, w := persisttest.OpenSharedWalletAt(t, dir, addr, persist.SharedConfig{Node: "a", CallTimeout: time.Second})
	if seed {
		if _, err := w.Apply(persist.Op{User: 100, ReqID: "seed", Postings: []persist.Posting{{User: 100, Delta: 10_000, Reason: persist.ReasonDev}}}); err != nil {
			t.Fatal(err)
		}
	}
	cat, err := NewCatalogue(PebbleCatalogue{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	return st, w, cat
}
