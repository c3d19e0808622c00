package gift

import (
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// inProgressWallet is the real ledger, except that the gift with req_id
// "busy" (the gift service prefixes req_ids with "gift:") gets
// persist.ErrInProgress, as from the shared wallet while another node is
// still making the first request with that req_id durable.
type inProgressWallet struct{ *persist.Ledger }

func (w inProgressWallet) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	if op.ReqID == "gift:busy" {
		done(persist.Result{}, persist.ErrInProgress)
		return
	}
	w.Ledger.ApplyAsync(op, done)
}

// openLedger opens a ledger on a fresh store, closed when the test ends.
func openLedger(t *testing.T) (*persist.Store, *persist.Ledger) {
	t.Helper()
	return persisttest.OpenLedger(t)
}

// A gift whose req_id is still in progress elsewhere is answered 10409 and is
// not reported as failed (no biz 5557: it may well succeed); a real failure
// (insufficient balance) is.
func TestInProgressIsNotAFailure(t *testing.T) {
	st, led := openLedger(t)
	cat, err := NewCatalogue(PebbleCatalogue{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	sender := &routertest.Recorder{SessionID: 1, User: 100}
	rt.Register(sender)
	s := New(inProgressWallet{led}, rt, cat, Config{}, nil)

	req := Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "busy"}
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeConflict {
		t.Fatalf("in progress: %+v, want code %d", e, proto.CodeConflict)
	}
	req.ReqID = "poor" // balance 0
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeInsufficientBalance {
		t.Fatalf("insufficient: %+v", e)
	}
	time.Sleep(50 * time.Millisecond) // pushes are queued synchronously; this is slack
	var failed []string
	for _, r := range sender.Received() {
		failed = append(failed, string(r.Bytes))
	}
	if len(failed) != 1 {
		t.Fatalf("biz 5557 pushes %q, want exactly one (for the insufficient balance)", failed)
	}
}

// landsLateWallet is the real ledger, except that the gift with req_id
// "late" lands but is answered persist.ErrInDoubt the first time, as
// from the shared wallet whose script's reply was lost (its watcher
// settles it later): a retry then replays it.
type landsLateWallet struct {
	*persist.Ledger
	answered bool
}

func (w *landsLateWallet) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	if op.ReqID == "gift:late" && !w.answered {
		w.answered = true
		w.Ledger.ApplyAsync(op, func(persist.Result, error) { done(persist.Result{}, persist.ErrInDoubt) })
		return
	}
	w.Ledger.ApplyAsync(op, done)
}

// A gift answered "still being processed" whose debit landed anyway gets its
// effects when its retry replays it — once: the receiver's biz 5556 (it was
// never sent: a replay was taken for a gift whose effects went out the
// first time).
func TestGiftAnsweredInDoubtGetsItsEffectsOnRetry(t *testing.T) {
	st, led := openLedger(t)
	if _, err := led.Apply(persist.Op{User: 100, ReqID: "seed", Postings: []persist.Posting{{User: 100, Delta: 10_000, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	cat, err := NewCatalogue(PebbleCatalogue{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	receiver := &routertest.Recorder{SessionID: 2, User: 200}
	rt.Register(receiver)
	s := New(&landsLateWallet{Ledger: led}, rt, cat, Config{}, nil)
	gifts := func() int {
		n := 0
		for _, r := range receiver.Received() {
			if strings.Contains(string(r.Bytes), `"biz":5556`) {
				if !strings.Contains(string(r.Bytes), `"count":1`) {
					t.Fatalf("effect %s, want the first request's count 1", r.Bytes)
				}
				n++
			}
		}
		return n
	}
	req := Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "late"}
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeConflict {
		t.Fatalf("first answer: %+v, want %d", e, proto.CodeConflict)
	}
	if n := gifts(); n != 0 {
		t.Fatalf("%d gift pushes after the answer in doubt", n)
	}
	req.Count = 5 // a retry that says otherwise gets the effects of what the first request paid for
	for i := range 2 {
		rep, e := s.Send(100, true, req)
		if e != nil || rep.OrderID == "" {
			t.Fatalf("retry %d: %+v %+v", i, rep, e)
		}
		if n := gifts(); n != 1 {
			t.Fatalf("after retry %d: %d gift pushes to the receiver, want 1", i, n)
		}
	}
	if b, _ := led.Balance(100); b >= 10_000 {
		t.Fatalf("balance %d: not debited", b)
	}
}
