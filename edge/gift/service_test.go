package gift

import (
	"errors"
	"log/slog"
	"strconv"
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

// A retried gift whose first debit's record cannot be read (an unreadable
// idempotency row) is answered 10409 "retry with the same req_id", without
// a biz 5557: the debit stands. The ledger's read error was answered as
// is, which the service told as a failure (50000 and a 5557).
func TestGiftWhoseRecordIsUnreadableIsNotAFailure(t *testing.T) {
	st, led := openLedger(t)
	cat, err := NewCatalogue(PebbleCatalogue{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	sender := &routertest.Recorder{SessionID: 1, User: 100}
	rt.Register(sender)
	s := New(led, rt, cat, Config{}, slog.Default())
	if _, err := led.Apply(persist.Op{User: 100, ReqID: "c", Postings: []persist.Posting{{User: 100, Delta: 10, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	req := Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "g1"}
	if _, e := s.Send(100, true, req); e != nil {
		t.Fatal(e)
	}
	before, _ := led.Balance(100)
	var keys [][]byte
	if err := st.Scan(persist.PrefixIdemG, func(k, _ []byte) error { keys = append(keys, append([]byte(nil), k...)); return nil }); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys { // a bad block: the group rows no longer decode
		if err := st.Put(k, []byte{1, 0x80}); err != nil {
			t.Fatal(err)
		}
	}
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeConflict {
		t.Fatalf("retry with an unreadable record: %+v, want code %d", e, proto.CodeConflict)
	}
	time.Sleep(50 * time.Millisecond) // pushes are queued synchronously; this is slack
	if got := sender.Received(); len(got) != 0 {
		t.Fatalf("pushes to the sender %q, want none (no biz 5557)", got[0].Bytes)
	}
	if b, _ := led.Balance(100); b != before || before >= 10 {
		t.Fatalf("balance %d → %d, want debited once", before, b)
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

// seededRoom is a ledger where user 100 has 10,000 coins, the seed
// catalogue, and a router with room 7 open.
func seededRoom(t *testing.T) (*persist.Ledger, *Catalogue, *router.Local) {
	t.Helper()
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
	return led, cat, rt
}

// A gift answered "still being processed" whose debit landed anyway gets its
// effects when its retry replays it — once: the receiver's biz 5556 (it was
// never sent: a replay was taken for a gift whose effects went out the
// first time).
func TestGiftAnsweredInDoubtGetsItsEffectsOnRetry(t *testing.T) {
	led, cat, rt := seededRoom(t)
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

// countingWallet is landsLateWallet counting the ops that reach it.
type countingWallet struct {
	landsLateWallet
	ops int
}

func (w *countingWallet) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	w.ops++
	w.landsLateWallet.ApplyAsync(op, done)
}

// A sender's gift requests reach the wallet at most AttemptFactor × the gift
// rate a second: a flood of fresh req_ids to a room the sender is not in
// (refused by the rules only after the wallet claimed each req_id — two
// Redis scripts each with a shared wallet) is answered 10429 beyond it,
// without a 5557 push. A gift answered in doubt still gets its retry
// through (its replay, not a 10429), and the money moved once.
func TestGiftAttemptsBoundedBeforeTheWallet(t *testing.T) {
	led, cat, rt := seededRoom(t)
	sender := &routertest.Recorder{SessionID: 1, User: 100}
	rt.Register(sender)
	w := &countingWallet{landsLateWallet: landsLateWallet{Ledger: led}}
	const rate = 5
	s := New(w, rt, cat, Config{PerSecond: rate}, nil)

	late := Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "late"}
	if _, e := s.Send(100, true, late); e == nil || e.Code != proto.CodeConflict {
		t.Fatalf("first answer: %+v, want %d (in doubt)", e, proto.CodeConflict)
	}
	codes := map[int]int{}
	for i := range 100 {
		req := Req{RoomID: 9, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "flood" + strconv.Itoa(i)}
		_, e := s.Send(100, false, req)
		if e == nil {
			t.Fatalf("gift %d to a room the sender is not in went through", i)
		}
		codes[e.Code]++
	}
	if reached := w.ops - 1; reached > AttemptFactor*rate+2 || codes[proto.CodeRateLimited] < 100-AttemptFactor*rate-2 {
		t.Fatalf("%d of 100 requests reached the wallet, answers %v: want at most %d (%d× the rate) there, the rest 10429", reached, codes, AttemptFactor*rate, AttemptFactor)
	}
	// The gift answered in doubt: its retry is its replay, limit or not.
	rep, e := s.Send(100, true, late)
	if e != nil || rep.OrderID == "" {
		t.Fatalf("retry of the gift answered in doubt, over the attempts: %+v %+v", rep, e)
	}
	time.Sleep(50 * time.Millisecond)
	failed := 0
	for _, r := range sender.Received() {
		if strings.Contains(string(r.Bytes), `"biz":5557`) {
			failed++
		}
	}
	if want := 100 - codes[proto.CodeRateLimited]; failed != want {
		t.Fatalf("%d biz 5557 pushes, want %d (one per request refused by the rules; none for a 10429 before the wallet)", failed, want)
	}
	g, _ := cat.Get(24)
	if b, _ := led.Balance(100); b != 10_000-g.Price {
		t.Fatalf("balance %d, want %d: one gift debited once", b, 10_000-g.Price)
	}
}

// A retry of a gift debited through another node whose catalogue has the
// gift, reaching a node whose catalogue does not (not loaded there yet, or
// lost), replays the first result: refused at once before the wallet's
// req_id lookup, it was told "gift not found, nothing moved" (with a 5557)
// and paid again under a new req_id. A new request for that gift is still
// refused (20002). Gifts to oneself, like unknown ones, are refused no more
// often than the attempts' rate allows (10429 beyond, no 5557).
func TestGiftRetryReplayedWhereTheCatalogueLacksIt(t *testing.T) {
	led, cat, rt := seededRoom(t)
	sender := &routertest.Recorder{SessionID: 1, User: 100}
	rt.Register(sender)
	if _, err := cat.Create(Gift{ID: 500, Name: "new", Price: 70, Status: StatusEnabled}); err != nil {
		t.Fatal(err)
	}
	a := New(led, rt, cat, Config{}, nil)
	req := Req{RoomID: 7, GiftID: 500, ReceiverID: 200, Count: 1, ReqID: "r1"}
	first, e := a.Send(100, true, req)
	if e != nil {
		t.Fatal(e)
	}
	st2, _ := openLedger(t)
	other, err := NewCatalogue(PebbleCatalogue{Store: st2})
	if err != nil {
		t.Fatal(err)
	}
	b := New(led, rt, other, Config{PerSecond: 5}, nil)
	if rep, e := b.Send(100, true, req); e != nil || rep.OrderID != first.OrderID {
		t.Fatalf("the retry where the catalogue lacks the gift: %+v %+v, want the first result %+v", rep, e, first)
	}
	req.ReqID = "r2"
	if _, e := b.Send(100, true, req); e == nil || e.Code != proto.CodeGiftUnavailable {
		t.Fatalf("a new gift the catalogue lacks: %+v, want %d", e, proto.CodeGiftUnavailable)
	}
	if bal, _ := led.Balance(100); bal != 10_000-70 {
		t.Fatalf("balance %d, want %d: debited once", bal, 10_000-70)
	}
	codes := map[int]int{}
	for i := range 100 {
		_, e := b.Send(100, true, Req{RoomID: 7, GiftID: 24, ReceiverID: 100, Count: 1, ReqID: "self" + strconv.Itoa(i)})
		codes[e.Code]++
	}
	if codes[proto.CodeGiftToSelf] > AttemptFactor*5+2 {
		t.Fatalf("gifts to oneself answered %v: want at most %d refused (with a 5557), the rest 10429", codes, AttemptFactor*5)
	}
}

// changeWallet changes the catalogue (as an admin meanwhile) before the
// request reaches the ledger.
type changeWallet struct {
	*persist.Ledger
	change func()
}

func (w changeWallet) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	w.change()
	w.Ledger.ApplyAsync(op, done)
}

// A gift disabled or repriced while its request waited for the wallet is
// refused, nothing debited (20002; 20005 for a new price) — before,
// the price and status read at arrival were charged.
func TestGiftChangedWhileWaitingIsNotDebitedAtTheOldTerms(t *testing.T) {
	for _, c := range []struct {
		name  string
		patch func(*Gift)
		code  int
	}{
		{"disabled", func(g *Gift) { g.Status = StatusDisabled }, proto.CodeGiftUnavailable},
		{"repriced", func(g *Gift) { g.Price *= 3 }, proto.CodeGiftPriceChanged},
	} {
		t.Run(c.name, func(t *testing.T) {
			led, cat, rt := seededRoom(t)
			w := changeWallet{Ledger: led, change: func() {
				if _, err := cat.Update(24, func(g *Gift) error { c.patch(g); return nil }); err != nil {
					t.Error(err)
				}
			}}
			s := New(w, rt, cat, Config{}, nil)
			_, e := s.Send(100, true, Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "c"})
			if e == nil || e.Code != c.code {
				t.Fatalf("%+v, want %d", e, c.code)
			}
			if b, _ := led.Balance(100); b != 10_000 {
				t.Fatalf("balance %d, want 10000 (nothing debited)", b)
			}
		})
	}
}

// receivers answers CanReceive with err (nil: everyone may receive).
type receivers struct{ err error }

func (r receivers) CanReceive(int64, int64) (bool, error) { return r.err == nil, r.err }

// A gift whose receiver's presence cannot be read (a cluster's Redis did
// not answer) is 50000 "retry with the same req_id", nothing debited — not
// 10003 "receiver not in the room", a final answer; its retry once the
// presence is read goes through, debited once.
func TestGiftReceiverPresenceUnreadableIsRetry(t *testing.T) {
	led, cat, rt := seededRoom(t)
	sender := &routertest.Recorder{SessionID: 1, User: 100}
	rt.Register(sender)
	recv := &receivers{err: errors.New("redis: timeout")}
	s := New(led, rt, cat, Config{Receivers: recv}, nil)
	req := Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "r1"}
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeInternal {
		t.Fatalf("presence unread: %+v, want 50000", e)
	}
	// The sender is told (biz 5557, as for the other 50000s of a gift:
	// an account status unread, the wallet unavailable), with the code.
	if got := sender.Received(); len(got) != 1 || !strings.Contains(string(got[0].Bytes), `"biz":5557`) ||
		!strings.Contains(string(got[0].Bytes), "50000") {
		t.Fatalf("pushes to the sender %d, want one 5557 with 50000", len(got))
	}
	if b, _ := led.Balance(100); b != 10_000 {
		t.Fatalf("balance %d after a refused gift, want 10000", b)
	}
	recv.err = nil
	if _, e := s.Send(100, true, req); e != nil {
		t.Fatalf("the retry once the presence is read: %+v", e)
	}
	if b, _ := led.Balance(100); b >= 10_000 {
		t.Fatalf("balance %d: the retry debited nothing", b)
	}
	persisttest.CheckConservation(t, led)
}
