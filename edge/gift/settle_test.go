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
	st, w := persisttest.OpenSharedWallet(t, px.Addr, persist.SharedConfig{Node: "a", CallTimeout: time.Second})
	if _, err := w.Apply(persist.Op{User: 100, ReqID: "seed", Postings: []persist.Posting{{User: 100, Delta: 10_000, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	cat, err := NewCatalogue(PebbleCatalogue{Store: st})
	if err != nil {
		t.Fatal(err)
	}
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
