package ticket

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// sagaWorld is the state a saga may touch: the buyer's balance, the
// coupon's holder and the program's seats.
type sagaWorld struct {
	balance            int64
	couponUsedBy       string
	free, locked, sold int
}

func (e *env) world(user int64, coupon string, prog int64) sagaWorld {
	e.t.Helper()
	w := sagaWorld{balance: e.balance(user)}
	if c, err := e.svc.Coupon(coupon); err == nil {
		w.couponUsedBy = c.UsedBy
	}
	w.free, w.locked, w.sold = e.counts(prog)
	return w
}

// failAt is a Config.Hook failing the named points (each as many times as
// given; -1 = always).
type failAt struct {
	mu     sync.Mutex
	points map[string]int
}

func (f *failAt) hook(p string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n := f.points[p]; n != 0 {
		f.points[p] = n - 1
		return errors.New("injected failure at " + p)
	}
	return nil
}

// The coins saga with a failure injected at each step (and the real
// failures: another user's coupon, too few coins): afterwards only what
// happened is undone, exactly once — balance, coupon and seats are as
// before, the ledger conserves coins — and running the compensation again
// (directly, through recovery, after a restart) changes nothing.
func TestSagaFailureAtEachStep(t *testing.T) { testSagaFailureAtEachStep(t, newEnv) }

// TestSagaFailureAtEachStepSharedCoupons is TestSagaFailureAtEachStep with a
// cluster's coupons (SharedCoupons, real Redis), whose use is not in the
// order's batch: a failed order write after the use ("coupon_write") leaves
// a use only Redis knows of, given back by the compensation.
func TestSagaFailureAtEachStepSharedCoupons(t *testing.T) {
	testSagaFailureAtEachStep(t, newSharedEnv)
}

func testSagaFailureAtEachStep(t *testing.T, newEnv func(testing.TB, Config) *env) {
	const user, credit, price, discount = 1, 1000, 100, 30
	cases := []struct {
		name      string
		fail      map[string]int
		user      int64 // 0 = user
		coupon    string
		code      int
		durable   bool // an order record exists (the lock step was written)
		couponHit bool // the coupon step happened (and was undone)
		debited   bool // the debit happened (and was refunded)
		// the coupon store took the coupon, the order never recorded it:
		// given back (CouponBack) only where that can happen (Redis)
		unrecorded bool
	}{
		// Nothing recorded: "internal", and the same req_id places anew.
		{name: "lock", fail: map[string]int{"fail:lock": 1}, code: proto.CodeInternal},
		// An internal failure after the order was recorded, undone at once:
		// its final answer (errUndone, 40002), where it said "internal
		// error, retry with the same req_id for the final state" — and the
		// retry said that again, for ever.
		{name: "coupon", fail: map[string]int{"fail:coupon": 1}, code: proto.CodeOrderState, durable: true},
		// Another user's coupon: refused before the order is recorded (as a
		// provider-paid order's), so no order names a coupon id not the
		// buyer's — a rebuild would mark that coupon for it.
		{name: "coupon-not-theirs", coupon: "other", code: proto.CodeCouponUnusable},
		{name: "coupon-write", fail: map[string]int{"fail:coupon_write": 1}, code: proto.CodeOrderState, durable: true, unrecorded: true},
		{name: "debit", fail: map[string]int{"fail:debit": 1}, code: proto.CodeOrderState, durable: true, couponHit: true},
		{name: "debit-insufficient", user: 2, code: proto.CodeInsufficientBalance, durable: true, couponHit: true},
		{name: "confirm", fail: map[string]int{"fail:confirm": 1}, code: proto.CodeOrderState, durable: true, couponHit: true, debited: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := &failAt{points: tc.fail}
			e := newEnv(t, Config{Hook: f.hook})
			buyer := int64(user)
			if tc.user != 0 {
				buyer = tc.user
			}
			e.credit(user, credit)
			e.credit(2, 10)
			prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: price, Rows: 1, Cols: 10}}, 4, 8)
			mine, _ := e.svc.CreateCoupon(buyer, discount)
			other, _ := e.svc.CreateCoupon(99, discount)
			coupon := mine.ID
			if tc.coupon == "other" {
				coupon = other.ID
			}
			before := e.world(buyer, mine.ID, prog)
			_, err := e.svc.Place(buyer, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "s", Pay: PayCoins, CouponID: coupon})
			wantCode(t, err, tc.code)
			if after := e.world(buyer, mine.ID, prog); after != before {
				t.Fatalf("after the failed saga %+v, before %+v", after, before)
			}
			e.conservation()
			e.audit()
			v, gerr := e.store.Get(orderReqKey(buyer, "s"))
			if (gerr == nil) != tc.durable {
				t.Fatalf("order recorded: %v, want %v", gerr == nil, tc.durable)
			}
			if tc.durable {
				o := e.order(fmt.Sprint(persist.DecodeUint64(v)))
				back := tc.couponHit || (tc.unrecorded && e.redis != "")
				if o.Status != StatusCancelled || o.Saga != SagaCompensated || o.FailCode != tc.code ||
					o.Steps.CouponUsed != tc.couponHit || o.Steps.CouponBack != back ||
					o.Steps.Debited != tc.debited || o.Steps.Refunded != tc.debited || !o.Steps.Released {
					t.Fatalf("order after compensation: %+v", o)
				}
				// The same req_id answers the same failure.
				_, err := e.svc.Place(buyer, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "s", Pay: PayCoins, CouponID: coupon})
				wantCode(t, err, tc.code)
				// Duplicate compensations change nothing: undo again, recover
				// again, restart.
				unlock := e.svc.orders.Lock(o.id)
				cur, _ := e.svc.load1(o.id)
				cur.Status, cur.Saga = StatusPlacing, SagaCompensating // as if the last write were lost
				if err := e.svc.undo(cur); err != nil {
					t.Fatal(err)
				}
				unlock()
				if err := e.svc.recoverSaga(o.id); err != nil {
					t.Fatal(err)
				}
				e.reopen()
				if after := e.world(buyer, mine.ID, prog); after != before {
					t.Fatalf("after duplicate compensations %+v, before %+v", after, before)
				}
				e.conservation()
				e.audit()
			}
			// What was undone can be used again: the seat and the coupon.
			e.svc.cfg.Hook = nil
			e.credit(buyer, credit)
			o, err := e.svc.Place(buyer, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "again", Pay: PayCoins, CouponID: mine.ID})
			if err != nil || o.Status != StatusPaid || o.Amount != price-discount {
				t.Fatalf("retry: %+v %v", o, err)
			}
			e.conservation()
			e.audit()
		})
	}
}

// A compensation that fails (the refund's ledger write) leaves the order
// PLACING/COMPENSATING, never lost: the sweep resumes it, and it completes
// exactly once.
func TestSagaCompensationResumedBySweep(t *testing.T) {
	f := &failAt{points: map[string]int{"fail:confirm": 1, "fail:refund": 1}}
	e := newEnv(t, Config{Hook: f.hook})
	e.credit(1, 500)
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 4, 8)
	_, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "s", Pay: PayCoins})
	wantCode(t, err, proto.CodeInternal)
	v, _ := e.store.Get(orderReqKey(1, "s"))
	o := e.order(fmt.Sprint(persist.DecodeUint64(v)))
	if o.Status != StatusPlacing || o.Saga != SagaCompensating || !o.Steps.Debited || o.Steps.Refunded {
		t.Fatalf("after a failed compensation: %+v", o)
	}
	if b := e.balance(1); b != 300 {
		t.Fatalf("balance %d before the refund", b)
	}
	e.svc.CloseExpired() // the sweep
	o = e.order(o.OrderID)
	if o.Status != StatusCancelled || !o.Steps.Refunded || !o.Steps.Released || o.FailCode != proto.CodeOrderState {
		t.Fatalf("after the sweep: %+v", o)
	}
	// The retry the first answer asked for gets the final state: undone,
	// place again (it said "internal error, retry" for ever before).
	_, err = e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "s", Pay: PayCoins})
	wantCode(t, err, proto.CodeOrderState)
	if b := e.balance(1); b != 500 {
		t.Fatalf("balance %d after the refund", b)
	}
	e.svc.CloseExpired()
	e.reopen()
	if b := e.balance(1); b != 500 {
		t.Fatalf("balance %d after a second sweep and a restart", b)
	}
	if free, _, _ := e.counts(prog); free != 4 {
		t.Fatalf("free %d", free)
	}
	e.conservation()
	e.audit()
}

// A saga refused by a business rule (too few coins) whose compensation
// then stops (the coupon's give-back fails) answers "being settled, retry
// with the same req_id", not the refusal: the refusal says every earlier
// step is undone, while the coupon and the seat are still held. The retry
// answers the order PLACING until the sweep settles it, then the refusal.
func TestSagaRefusalWithAStoppedCompensation(t *testing.T) {
	for _, shared := range []bool{false, true} {
		t.Run(map[bool]string{false: "pebble-coupons", true: "shared-coupons"}[shared], func(t *testing.T) {
			mk := newEnv
			if shared {
				mk = newSharedEnv
			}
			f := &failAt{points: map[string]int{"fail:coupon_back": 1}}
			e := mk(t, Config{Hook: f.hook})
			e.credit(2, 10) // a seat costs 100, 70 with the coupon
			prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 4, 8)
			c, _ := e.svc.CreateCoupon(2, 30)
			req := PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "s", Pay: PayCoins, CouponID: c.ID}
			_, err := e.svc.Place(2, req)
			wantCode(t, err, proto.CodeInternal)
			if free, locked, _ := e.counts(prog); free != 3 || locked != 1 {
				t.Fatalf("free %d locked %d while the compensation is stopped", free, locked)
			}
			o, err := e.svc.Place(2, req)
			if err != nil || o.Status != StatusPlacing {
				t.Fatalf("retry before the sweep: %+v %v, want the order PLACING", o, err)
			}
			e.svc.CloseExpired() // the sweep
			_, err = e.svc.Place(2, req)
			wantCode(t, err, proto.CodeInsufficientBalance)
			if cur, err := e.svc.Coupon(c.ID); err != nil || cur.UsedBy != "" {
				t.Fatalf("coupon after the sweep: %+v %v", cur, err)
			}
			if free, locked, sold := e.counts(prog); free != 4 || locked != 0 || sold != 0 {
				t.Fatalf("seats after the sweep: free %d locked %d sold %d", free, locked, sold)
			}
			if b := e.balance(2); b != 10 {
				t.Fatalf("balance %d", b)
			}
			e.conservation()
			e.audit()
		})
	}
}

// The coins saga that succeeds: PAID, coins debited once, coupon used,
// seats sold; the same req_id returns the same order and debits nothing.
func TestSagaCoinsSuccess(t *testing.T) { testSagaCoinsSuccess(t, newEnv) }

// TestSagaCoinsSuccessSharedCoupons: the same with the coupon in Redis.
func TestSagaCoinsSuccessSharedCoupons(t *testing.T) { testSagaCoinsSuccess(t, newSharedEnv) }

func testSagaCoinsSuccess(t *testing.T, newEnv func(testing.TB, Config) *env) {
	e := newEnv(t, Config{})
	e.credit(1, 1000)
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 4, 8)
	c, _ := e.svc.CreateCoupon(1, 50)
	o, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "s", Pay: PayCoins, CouponID: c.ID})
	if err != nil || o.Status != StatusPaid || o.Amount != 150 {
		t.Fatalf("%+v %v", o, err)
	}
	again, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "s", Pay: PayCoins, CouponID: c.ID})
	if err != nil || again.OrderID != o.OrderID {
		t.Fatalf("replay %+v %v", again, err)
	}
	if b := e.balance(1); b != 850 {
		t.Fatalf("balance %d", b)
	}
	if got, _ := e.svc.Coupon(c.ID); got.UsedBy != o.OrderID {
		t.Fatalf("coupon %+v", got)
	}
	if _, _, sold := e.counts(prog); sold != 2 {
		t.Fatalf("sold %d", sold)
	}
	e.conservation()
	e.audit()
}

// doubtWallet answers ticket debits ("ticket:" request ids) from answers,
// in turn, as the shared wallet may while the first attempt's outcome is
// unknown: ErrInDoubt (the first), ErrInProgress, or a retry's own failure (ErrWalletUnavailable:
// this attempt moved nothing, the first may still land). A nil answer
// applies the op, as the watcher's settling of the first attempt would
// (the op lands, with the order record it carries); after the answers run
// out every op is applied.
type doubtWallet struct {
	*persist.Ledger
	mu      sync.Mutex
	answers []error
}

func (w *doubtWallet) Apply(op persist.Op) (persist.Result, error) {
	if strings.HasPrefix(op.ReqID, "ticket:") {
		w.mu.Lock()
		var err error
		if len(w.answers) > 0 {
			err, w.answers = w.answers[0], w.answers[1:]
		}
		w.mu.Unlock()
		if err != nil {
			return persist.Result{}, err
		}
	}
	return w.Ledger.Apply(op)
}

// A debit whose outcome the wallet cannot tell (the shared wallet's
// ErrInProgress) neither completes nor compensates the order: it stays
// PLACING with its seats and coupon held — also when a retry fails on its
// own — the sweep asks the wallet again (backing off), and once the debit
// is known to have landed the order is PAID: the buyer debited once, the
// seats sold. (It was compensated at once: nothing refunded, the coupon
// freed, the seats released — and the late debit's record then revived the
// order over its CANCELLED one.) A debit refused for the balance on a retry
// is final: the order is compensated.
func TestSagaDebitInDoubtWaitsForItsOutcome(t *testing.T) {
	for _, landed := range []bool{true, false} {
		t.Run(fmt.Sprint("landed=", landed), func(t *testing.T) {
			const credit, price, discount = 1000, 100, 30
			e := newEnv(t, Config{})
			w := &doubtWallet{Ledger: e.ledger, answers: []error{persist.ErrInDoubt, persist.ErrWalletUnavailable, persist.ErrInProgress}}
			if !landed {
				w.answers = append(w.answers, persist.ErrInsufficient)
			}
			e.svc.wallet = w
			e.credit(1, credit)
			prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: price, Rows: 1, Cols: 4}}, 4, 8)
			c, _ := e.svc.CreateCoupon(1, discount)
			_, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "s", Pay: PayCoins, CouponID: c.ID})
			wantCode(t, err, proto.CodeInternal)
			v, _ := e.store.Get(orderReqKey(1, "s"))
			id := fmt.Sprint(persist.DecodeUint64(v))
			held := func(when string) {
				t.Helper()
				o := e.order(id)
				if o.Status != StatusPlacing || !o.Steps.CouponUsed || o.Steps.Released {
					t.Fatalf("%s: %+v", when, o)
				}
				if free, locked, sold := e.counts(prog); free != 3 || locked != 1 || sold != 0 {
					t.Fatalf("%s: free %d locked %d sold %d", when, free, locked, sold)
				}
				if cp, _ := e.svc.Coupon(c.ID); cp.UsedBy != id {
					t.Fatalf("%s: coupon used by %q", when, cp.UsedBy)
				}
				if b := e.balance(1); b != credit {
					t.Fatalf("%s: balance %d", when, b)
				}
			}
			held("debit in doubt")
			left := len(w.answers)
			e.svc.CloseExpired() // the sweep, before the back-off: not retried
			if len(w.answers) != left {
				t.Fatalf("retried before its back-off: %d answers left of %d", len(w.answers), left)
			}
			for _, when := range []string{"a retry failed on its own", "still in doubt"} {
				e.clock.advance(time.Minute)
				e.svc.CloseExpired()
				held(when)
			}
			e.clock.advance(time.Minute)
			e.svc.CloseExpired() // the debit landed after all, or is refused
			o := e.order(id)
			free, locked, sold := e.counts(prog)
			cp, _ := e.svc.Coupon(c.ID)
			switch {
			case landed && (o.Status != StatusPaid || !o.Steps.Debited || o.Steps.Refunded || sold != 1 || locked != 0 || e.balance(1) != credit-(price-discount)):
				t.Fatalf("after the debit landed: %+v, free %d locked %d sold %d, balance %d", o, free, locked, sold, e.balance(1))
			case !landed && (o.Status != StatusCancelled || o.Steps.Debited || !o.Steps.CouponBack || free != 4 || cp.UsedBy != "" || e.balance(1) != credit):
				t.Fatalf("after the debit was refused: %+v, free %d locked %d sold %d, coupon %q, balance %d", o, free, locked, sold, cp.UsedBy, e.balance(1))
			}
			want := int64(credit)
			if landed {
				want -= price - discount
			}
			e.svc.CloseExpired()
			if o2 := e.order(id); o2.Status != o.Status || e.balance(1) != want {
				t.Fatalf("after another sweep: %+v, balance %d, want %d", o2, e.balance(1), want)
			}
			e.conservation()
			e.audit()
		})
	}
}

// A first debit answered a plain ErrInProgress — a wallet refusing every op
// (a single-node ledger after a failed commit), nothing reserved — is not
// in doubt: this order's req id is used by no other call, so its own op did
// not run. The order is compensated at once, not held until a restart.
func TestSagaDebitRefusedAsRetryIsUndone(t *testing.T) {
	e := newEnv(t, Config{})
	e.svc.wallet = &doubtWallet{Ledger: e.ledger, answers: []error{persist.ErrInProgress}}
	e.credit(1, 1000)
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 4, 8)
	_, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "s", Pay: PayCoins})
	wantCode(t, err, proto.CodeOrderState) // undone at once: its final answer
	v, _ := e.store.Get(orderReqKey(1, "s"))
	if o := e.order(fmt.Sprint(persist.DecodeUint64(v))); o.Status != StatusCancelled || o.Steps.Debited {
		t.Fatalf("order %+v, want compensated", o)
	}
	if free, _, _ := e.counts(prog); free != 4 || e.balance(1) != 1000 {
		t.Fatalf("free %d, balance %d", free, e.balance(1))
	}
	e.conservation()
}

// Start-up recovery stops at the first saga it cannot settle (the wallet,
// the store or the coupon store failing) and leaves it and the rest to the
// sweep: each would wait as long (a hanging coupon store: its timeout per
// order, minutes before the node serves). Before, it tried every one. The
// sweep then settles them all once the failure is gone.
func TestStartupRecoveryStopsAtTheFirstFailure(t *testing.T) {
	f := &failAt{points: map[string]int{"fail:confirm": 3, "fail:refund": 3}}
	var refunds atomic.Int32
	hook := func(p string) error {
		if p == "fail:refund" {
			refunds.Add(1)
		}
		return f.hook(p)
	}
	e := newEnv(t, Config{Hook: hook})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 8}}, 4, 8)
	for user := int64(1); user <= 3; user++ {
		e.credit(user, 500)
		_, err := e.svc.Place(user, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "s", Pay: PayCoins})
		wantCode(t, err, proto.CodeInternal) // its compensation stopped at the refund
	}
	f.mu.Lock()
	f.points["fail:refund"] = 1000 // the wallet keeps failing through the restart
	f.mu.Unlock()
	refunds.Store(0)
	e.reopen()
	if n := refunds.Load(); n != 1 {
		t.Fatalf("start-up tried %d refunds with the wallet failing, want 1 (then the rest left to the sweep)", n)
	}
	f.mu.Lock()
	f.points["fail:refund"] = 0
	f.mu.Unlock()
	e.svc.CloseExpired()
	for user := int64(1); user <= 3; user++ {
		if b := e.balance(user); b != 500 {
			t.Fatalf("user %d balance %d after the sweep, want 500 (refunded)", user, b)
		}
	}
	if free, _, _ := e.counts(prog); free != 8 {
		t.Fatalf("free %d after the sweep, want 8", free)
	}
	e.conservation()
	e.audit()
}
