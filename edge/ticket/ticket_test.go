package ticket

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
)

// 10,000 concurrent buyers (in-process service calls, one goroutine each)
// for 1,000 seats: exactly 1,000 seats are taken, none twice, and free +
// locked + sold = seats after every phase (placing, paying some, cancelling
// some, the timeout closing the rest, a restart, re-selling what was freed).
func TestTicketTenThousandBuyersThousandSeats(t *testing.T) {
	e := newEnv(t, Config{PayTimeout: time.Minute})
	prog := e.program([]CategoryDef{
		{ID: 1, Name: "A", Price: 380, Rows: 10, Cols: 50},
		{ID: 2, Name: "B", Price: 180, Rows: 10, Cols: 50},
	}, 4, 4)
	const buyers = 10_000
	type won struct {
		user  int64
		order Order
	}
	var (
		mu   sync.Mutex
		wins []won
		bad  []error
		wg   sync.WaitGroup
	)
	start := make(chan struct{})
	for u := int64(1); u <= buyers; u++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			var r PlaceReq
			switch u % 3 {
			case 0: // two adjacent seats
				r = PlaceReq{ProgramID: prog, CategoryID: int(1 + u%2), Count: 2}
			case 1: // one seat the server picks
				r = PlaceReq{ProgramID: prog, CategoryID: int(1 + u%2), Count: 1}
			default: // a manual seat, often contended
				r = PlaceReq{ProgramID: prog, SeatIDs: []string{fmt.Sprintf("%d-%d-%d", 1+u%2, 1+u%10, 1+u%50)}}
			}
			r.ReqID = fmt.Sprintf("r%d", u)
			o, err := e.svc.Place(u, r)
			mu.Lock()
			defer mu.Unlock()
			switch codeOf(err) {
			case 0:
				wins = append(wins, won{u, o})
			case proto.CodeSoldOut:
			default:
				bad = append(bad, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	if len(bad) > 0 {
		t.Fatalf("%d unexpected errors, first %v", len(bad), bad[0])
	}
	owner := map[string]string{}
	taken := 0
	for _, w := range wins {
		if w.order.Status != StatusPendingPay || w.order.PayURL == "" {
			t.Fatalf("order %+v", w.order)
		}
		for _, s := range w.order.SeatIDs {
			if prev, dup := owner[s]; dup {
				t.Fatalf("seat %s sold to orders %s and %s", s, prev, w.order.OrderID)
			}
			owner[s] = w.order.OrderID
			taken++
		}
	}
	free, locked, sold := e.counts(prog)
	if taken != 1000 || locked != 1000 || free != 0 || sold != 0 {
		t.Fatalf("taken %d, counts free %d locked %d sold %d; want all 1000 locked", taken, free, locked, sold)
	}
	e.audit()
	t.Logf("%d buyers, %d orders took the 1000 seats", buyers, len(wins))

	// Pay a third through the webhook (a duplicate of each notify changes
	// nothing), cancel a third, let the timeout close the rest.
	paidSeats, cancelledSeats, left := 0, 0, 0
	for i, w := range wins {
		switch i % 3 {
		case 0:
			for k := 0; k < 2; k++ {
				if st := e.notify(w.order.OrderID, "ev-"+w.order.OrderID, w.order.PayAmount); st != pay.NotifyOK {
					t.Fatalf("notify %d", st)
				}
			}
			paidSeats += len(w.order.SeatIDs)
		case 1:
			if _, err := e.svc.Cancel(w.user, mustID(t, w.order.OrderID)); err != nil {
				t.Fatal(err)
			}
			cancelledSeats += len(w.order.SeatIDs)
		default:
			left++
		}
	}
	free, locked, sold = e.counts(prog)
	if sold != paidSeats || free != cancelledSeats || locked != 1000-paidSeats-cancelledSeats {
		t.Fatalf("after pay/cancel: free %d locked %d sold %d; paid %d cancelled %d", free, locked, sold, paidSeats, cancelledSeats)
	}
	e.audit()
	e.clock.advance(2 * time.Minute)
	closed := e.svc.CloseExpired()
	if again := e.svc.CloseExpired(); again != 0 {
		t.Fatalf("second sweep closed %d more", again)
	}
	if closed != left {
		t.Fatalf("the timeout closed %d orders, %d were unpaid", closed, left)
	}
	free, locked, sold = e.counts(prog)
	if sold != paidSeats || locked != 0 || free != 1000-paidSeats {
		t.Fatalf("after the timeout: free %d locked %d sold %d", free, locked, sold)
	}
	e.audit()
	// The seats are rebuilt from the orders after a restart.
	e.reopen()
	if f, l, s := e.counts(prog); f != free || l != 0 || s != sold {
		t.Fatalf("after restart: free %d locked %d sold %d, before %d/0/%d", f, l, s, free, sold)
	}
	e.audit()
}

func mustID(t testing.TB, s string) int64 {
	id, ok := pay.ParseOrderID(s)
	if !ok {
		t.Fatalf("bad order id %q", s)
	}
	return id
}

// The server's adjacent pick finds N adjacent free seats in one row or
// answers 40003; a manual order with one taken seat takes none.
func TestTicketAdjacentAndAllOrNothing(t *testing.T) {
	e := newEnv(t, Config{})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 10, Rows: 2, Cols: 5}}, 5, 20)
	// Row 1: take seats 3 and 5 → free runs of 2 (1,2) and 1 (4).
	if _, err := e.svc.Place(1, PlaceReq{ProgramID: prog, SeatIDs: []string{"1-1-3", "1-1-5"}, ReqID: "a"}); err != nil {
		t.Fatal(err)
	}
	// Row 2: take seat 3 → runs of 2 and 2.
	if _, err := e.svc.Place(2, PlaceReq{ProgramID: prog, SeatIDs: []string{"1-2-3"}, ReqID: "a"}); err != nil {
		t.Fatal(err)
	}
	_, err := e.svc.Place(3, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 3, ReqID: "a"})
	wantCode(t, err, proto.CodeSoldOut)
	o, err := e.svc.Place(3, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "b"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(o.SeatIDs, ",") != "1-1-1,1-1-2" {
		t.Fatalf("adjacent pick gave %v", o.SeatIDs)
	}
	// Manual: one of the seats is taken → none is taken.
	before, _, _ := e.counts(prog)
	_, err = e.svc.Place(4, PlaceReq{ProgramID: prog, SeatIDs: []string{"1-2-1", "1-2-2", "1-1-3"}, ReqID: "a"})
	wantCode(t, err, proto.CodeSoldOut)
	if after, _, _ := e.counts(prog); after != before {
		t.Fatalf("a refused manual order took seats: free %d → %d", before, after)
	}
	if o, err := e.svc.Place(4, PlaceReq{ProgramID: prog, SeatIDs: []string{"1-2-1", "1-2-2"}, ReqID: "b"}); err != nil || len(o.SeatIDs) != 2 {
		t.Fatalf("the free seats are still free: %v %v", o, err)
	}
	// Bad input: clear codes.
	for _, r := range []PlaceReq{
		{ProgramID: prog, SeatIDs: []string{"1-x-1"}, ReqID: "c"},
		{ProgramID: prog, SeatIDs: []string{"1-9-1"}, ReqID: "c"},
		{ProgramID: prog, SeatIDs: []string{"1-2-4", "1-2-4"}, ReqID: "c"},
		{ProgramID: prog, CategoryID: 7, Count: 1, ReqID: "c"},
		{ProgramID: prog, ReqID: "c"},
		{ProgramID: prog, CategoryID: 1, Count: 1},
		{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "c", Pay: "gold"},
	} {
		_, err := e.svc.Place(5, r)
		wantCode(t, err, proto.CodeBadRequest)
	}
	_, err = e.svc.Place(5, PlaceReq{ProgramID: 999, CategoryID: 1, Count: 1, ReqID: "c"})
	wantCode(t, err, proto.CodeNotFound)
}

// Per-order and per-user limits (40004), the repeat guard (10409 while an
// order of the same user and program is being placed), and the same req_id
// returning the same order.
func TestTicketLimitsGuardAndIdempotency(t *testing.T) {
	e := newEnv(t, Config{})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 10, Rows: 10, Cols: 10}}, 3, 4)
	_, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 4, ReqID: "a"})
	wantCode(t, err, proto.CodeTicketLimit)
	o1, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 3, ReqID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	again, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 3, ReqID: "a"})
	if err != nil || again.OrderID != o1.OrderID || again.PayURL == "" {
		t.Fatalf("same req_id: %+v %v, first %s", again, err, o1.OrderID)
	}
	_, err = e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "b"})
	wantCode(t, err, proto.CodeTicketLimit) // 3 held + 2 > 4
	if _, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "c"}); err != nil {
		t.Fatal(err)
	}
	// Cancelling gives the seats back to the user's allowance.
	if _, err := e.svc.Cancel(1, mustID(t, o1.OrderID)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 3, ReqID: "d"}); err != nil {
		t.Fatal(err)
	}
	// The repeat guard: while user 2's order is held inside the saga, a
	// second submit for the same program is refused with 10409.
	e2 := newEnv(t, Config{Hook: nil})
	inside, release := make(chan struct{}), make(chan struct{})
	e2.svc.cfg.Hook = func(p string) error {
		if p == "fail:lock" {
			close(inside)
			<-release
		}
		return nil
	}
	prog2 := e2.program([]CategoryDef{{ID: 1, Name: "A", Price: 0, Rows: 1, Cols: 10}}, 2, 4)
	done := make(chan error)
	go func() {
		_, err := e2.svc.Place(2, PlaceReq{ProgramID: prog2, CategoryID: 1, Count: 1, ReqID: "x", Pay: PayCoins})
		done <- err
	}()
	<-inside
	_, err = e2.svc.Place(2, PlaceReq{ProgramID: prog2, CategoryID: 1, Count: 1, ReqID: "y"})
	wantCode(t, err, proto.CodeConflict)
	_, err = e2.svc.Place(2, PlaceReq{ProgramID: prog2, CategoryID: 1, Count: 1, ReqID: "x"})
	wantCode(t, err, proto.CodeConflict)
	if _, err := e2.svc.Place(3, PlaceReq{ProgramID: prog2, CategoryID: 1, Count: 1, ReqID: "x"}); err != nil {
		t.Fatalf("another user is not held back: %v", err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := e2.svc.Place(2, PlaceReq{ProgramID: prog2, CategoryID: 1, Count: 1, ReqID: "y"}); err != nil {
		t.Fatalf("after the first finished: %v", err)
	}
}

// A provider-paid order asks the provider for its amount in cents: its pay
// order (and pay_url) carry amount × pay.CentsPerCoin, the reply says so in
// pay_amount, and a notify of the coin amount is refused (409), nothing
// sold. Before, the coins were asked as cents: a seat of 380 coins (38 元)
// cost 3.80 元 through the provider, and a notify of 380 sold it.
func TestTicketPayOrderChargesCents(t *testing.T) {
	e := newEnv(t, Config{})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 380, Rows: 1, Cols: 10}}, 4, 8)
	c, err := e.svc.CreateCoupon(1, 30)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		req   PlaceReq
		coins int64
	}{
		{PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "two"}, 760},
		{PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "coupon", CouponID: c.ID}, 350},
	} {
		o, err := e.svc.Place(1, tc.req)
		if err != nil || o.Status != StatusPendingPay || o.Amount != tc.coins {
			t.Fatalf("%s: %+v %v", tc.req.ReqID, o, err)
		}
		cents := tc.coins * pay.CentsPerCoin
		po, err := e.pay.Get(mustID(t, o.OrderID))
		if err != nil || po.Amount != cents || o.PayAmount != cents || !strings.Contains(o.PayURL, "amount="+strconv.FormatInt(cents, 10)+"&") {
			t.Fatalf("%s: order of %d coins, pay_amount %d, pay_url %s; its pay order asks %d (%v), want %d cents",
				tc.req.ReqID, o.Amount, o.PayAmount, o.PayURL, po.Amount, err, cents)
		}
		if st := e.notify(o.OrderID, "coins-"+o.OrderID, o.Amount); st != pay.NotifyConflict {
			t.Fatalf("%s: a notify of the coin amount answered %d, want %d", tc.req.ReqID, st, pay.NotifyConflict)
		}
		if got := e.order(o.OrderID); got.Status != StatusPendingPay {
			t.Fatalf("%s: after the coin-amount notify: %+v", tc.req.ReqID, got)
		}
		if st := e.notify(o.OrderID, "cents-"+o.OrderID, cents); st != pay.NotifyOK {
			t.Fatalf("%s: a notify of the cents amount answered %d", tc.req.ReqID, st)
		}
		if got := e.order(o.OrderID); got.Status != StatusPaid || got.PayAmount != cents {
			t.Fatalf("%s: after the payment: %+v", tc.req.ReqID, got)
		}
		if got, err := e.pay.Get(mustID(t, o.OrderID)); err != nil || got.Status != pay.StatusPayed {
			t.Fatalf("%s: pay order %+v %v", tc.req.ReqID, got, err)
		}
	}
	if free, locked, sold := e.counts(prog); free != 7 || locked != 0 || sold != 3 {
		t.Fatalf("seats: free %d locked %d sold %d", free, locked, sold)
	}
	e.audit()
	e.conservation()
}

// An unpaid order closes after the pay timeout and releases its seats
// once; a payment that lands after the close is refunded, not sold; cancel
// releases; only the buyer sees and cancels an order, only PENDING_PAY.
func TestTicketTimeoutLatePaymentAndCancel(t *testing.T) {
	e := newEnv(t, Config{PayTimeout: time.Minute})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 10}}, 4, 8)
	o, err := e.svc.Place(7, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "t"})
	if err != nil {
		t.Fatal(err)
	}
	if n := e.svc.CloseExpired(); n != 0 {
		t.Fatalf("closed %d before the timeout", n)
	}
	e.clock.advance(61 * time.Second)
	if n := e.svc.CloseExpired(); n != 1 {
		t.Fatalf("closed %d, want 1", n)
	}
	if n := e.svc.CloseExpired(); n != 0 {
		t.Fatalf("closed again: %d", n)
	}
	if free, _, _ := e.counts(prog); free != 10 {
		t.Fatalf("free %d after the close", free)
	}
	// Someone else takes the seats; then the late payment lands.
	o2, err := e.svc.Place(8, PlaceReq{ProgramID: prog, SeatIDs: o.SeatIDs, ReqID: "t"})
	if err != nil {
		t.Fatal(err)
	}
	if st := e.notify(o.OrderID, "late-1", o.PayAmount); st != pay.NotifyOK {
		t.Fatalf("late notify %d", st)
	}
	if st := e.notify(o.OrderID, "late-1", o.PayAmount); st != pay.NotifyOK {
		t.Fatalf("duplicate late notify %d", st)
	}
	if got := e.order(o.OrderID); got.Status != StatusRefunded {
		t.Fatalf("late-paid order is %s", got.Status)
	}
	po, _ := e.pay.Get(mustID(t, o.OrderID))
	if po.Status != pay.StatusPayBack {
		t.Fatalf("pay order %s, want PAY_BACK (refunded)", po.Status)
	}
	if _, locked, sold := e.counts(prog); sold != 0 || locked != 2 {
		t.Fatalf("late payment sold seats: locked %d sold %d", locked, sold)
	}
	// A late payment racing the close: the ticket is closed but the pay
	// order still open → Paid refuses, the pay centre refunds.
	o3, err := e.svc.Place(9, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "t"})
	if err != nil {
		t.Fatal(err)
	}
	id3 := mustID(t, o3.OrderID)
	unlock := e.svc.orders.Lock(id3)
	cur, _ := e.svc.load1(id3)
	cur.Status = StatusCancelled
	cur.Steps.Released = true
	r := cur.record()
	_ = e.store.Put(r.Key, r.Value)
	e.svc.release(cur)
	unlock()
	if st := e.notify(o3.OrderID, "race-1", o3.PayAmount); st != pay.NotifyOK {
		t.Fatalf("racing notify %d", st)
	}
	if got := e.order(o3.OrderID); got.Status != StatusRefunded {
		t.Fatalf("racing payment: order %s", got.Status)
	}
	// The pay centre closes its side first (its reconciler at the order's
	// deadline), then the payment lands: the ticket order closes and is
	// refunded, its seats freed — and nothing waits on the pay order's lock.
	o5, err := e.svc.Place(11, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "t"})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.pay.CloseBizOrder(mustID(t, o5.OrderID), "reconciler: unpaid at its deadline"); err != nil {
		t.Fatal(err)
	}
	if st := e.notify(o5.OrderID, "after-pay-close", o5.PayAmount); st != pay.NotifyOK {
		t.Fatalf("notify after the pay order closed: %d", st)
	}
	if got := e.order(o5.OrderID); got.Status != StatusRefunded || !got.Steps.Released {
		t.Fatalf("order after its pay order closed and a payment: %+v", got)
	}
	e.audit()
	// Cancel: buyer only, PENDING_PAY only.
	_, err = e.svc.Cancel(99, mustID(t, o2.OrderID))
	wantCode(t, err, proto.CodeNotFound)
	_, err = e.svc.Get(99, mustID(t, o2.OrderID))
	wantCode(t, err, proto.CodeNotFound)
	if c, err := e.svc.Cancel(8, mustID(t, o2.OrderID)); err != nil || c.Status != StatusCancelled {
		t.Fatalf("cancel: %+v %v", c, err)
	}
	// A retried cancel (its answer lost) answers the cancelled order and
	// releases nothing again.
	if c, err := e.svc.Cancel(8, mustID(t, o2.OrderID)); err != nil || c.Status != StatusCancelled {
		t.Fatalf("retried cancel: %+v %v", c, err)
	}
	if free, locked, _ := e.counts(prog); free != 10 || locked != 0 {
		t.Fatalf("after cancel free %d locked %d", free, locked)
	}
	// A payment of a cancelled order is refunded too.
	if st := e.notify(o2.OrderID, "late-2", o2.PayAmount); st != pay.NotifyOK {
		t.Fatalf("notify %d", st)
	}
	if got := e.order(o2.OrderID); got.Status != StatusRefunded {
		t.Fatalf("paid after cancel: %s", got.Status)
	}
	if free, _, sold := e.counts(prog); free != 10 || sold != 0 {
		t.Fatalf("refunded payments sold seats: free %d sold %d", free, sold)
	}
	e.audit()
	// A paid order: PAID once, seats sold, duplicate notify changes nothing.
	o4, err := e.svc.Place(10, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "t"})
	if err != nil {
		t.Fatal(err)
	}
	for k := 0; k < 2; k++ {
		if st := e.notify(o4.OrderID, fmt.Sprint("pay-", k), o4.PayAmount); st != pay.NotifyOK {
			t.Fatalf("notify %d", st)
		}
	}
	if got := e.order(o4.OrderID); got.Status != StatusPaid {
		t.Fatalf("paid order %s", got.Status)
	}
	if _, _, sold := e.counts(prog); sold != 1 {
		t.Fatalf("sold %d", sold)
	}
	e.clock.advance(time.Hour)
	e.svc.CloseExpired()
	if _, _, sold := e.counts(prog); sold != 1 {
		t.Fatalf("the timeout touched a paid order: sold %d", sold)
	}
	_, err = e.svc.Cancel(10, mustID(t, o4.OrderID))
	wantCode(t, err, proto.CodeOrderState)
}

// Coupons: one use, the buyer's only (40005 otherwise), taken off the
// amount, given back when the order closes.
func TestCouponRules(t *testing.T) { testCouponRules(t, newEnv) }

// TestCouponRulesSharedCoupons: the same rules with a cluster's coupons
// (Redis), plus the timeout close giving the coupon back.
func TestCouponRulesSharedCoupons(t *testing.T) { testCouponRules(t, newSharedEnv) }

func testCouponRules(t *testing.T, newEnv func(testing.TB, Config) *env) {
	e := newEnv(t, Config{PayTimeout: time.Minute})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 10}}, 4, 8)
	c, err := e.svc.CreateCoupon(1, 30)
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.svc.CreateCoupon(1, 0)
	wantCode(t, err, proto.CodeBadRequest)
	_, err = e.svc.Place(2, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "a", CouponID: c.ID})
	wantCode(t, err, proto.CodeCouponUnusable)
	_, err = e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "a", CouponID: "c-nope"})
	wantCode(t, err, proto.CodeCouponUnusable)
	if free, _, _ := e.counts(prog); free != 10 {
		t.Fatalf("a refused coupon kept seats: free %d", free)
	}
	o, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "b", CouponID: c.ID})
	if err != nil || o.Amount != 70 || o.Discount != 30 {
		t.Fatalf("with coupon: %+v %v", o, err)
	}
	_, err = e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "c", CouponID: c.ID})
	wantCode(t, err, proto.CodeCouponUnusable) // used
	if _, err := e.svc.Cancel(1, mustID(t, o.OrderID)); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.svc.Coupon(c.ID); got.UsedBy != "" {
		t.Fatalf("coupon not given back: %+v", got)
	}
	// Covers the whole price: sold at once, nothing to pay.
	big, _ := e.svc.CreateCoupon(1, 1000)
	o2, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "d", CouponID: big.ID})
	if err != nil || o2.Status != StatusPaid || o2.Amount != 0 {
		t.Fatalf("free order: %+v %v", o2, err)
	}
	e.audit()

	// The timeout close gives it back, once; a payment after it is refunded.
	o3, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "e", CouponID: c.ID})
	if err != nil || o3.Amount != 70 {
		t.Fatalf("coupon again after the cancel: %+v %v", o3, err)
	}
	// The buyer is told CANCELLED once the coupon is back: an order placed
	// again at once can use it (before, the push came first and the
	// give-back at the sweep's end).
	var usedAtPush []string
	e.router.Register(&pushHook{id: 99, user: 1, fn: func(b []byte) {
		if bytes.Contains(b, []byte(StatusCancelled)) && bytes.Contains(b, []byte(o3.OrderID)) {
			got, _ := e.svc.Coupon(c.ID)
			usedAtPush = append(usedAtPush, got.UsedBy)
		}
	}})
	e.clock.advance(2 * time.Minute)
	if n := e.svc.CloseExpired(); n != 1 {
		t.Fatalf("closed %d", n)
	}
	if n := e.svc.CloseExpired(); n != 0 {
		t.Fatalf("closed %d more", n)
	}
	if got, _ := e.svc.Coupon(c.ID); got.UsedBy != "" {
		t.Fatalf("coupon not given back by the timeout: %+v", got)
	}
	if len(usedAtPush) != 1 || usedAtPush[0] != "" {
		t.Fatalf("the CANCELLED push came with the coupon used by %q (pushes %d), want it back first", usedAtPush, len(usedAtPush))
	}
	if st := e.notify(o3.OrderID, "late-e", o3.PayAmount); st != 200 {
		t.Fatalf("late notify: %d", st)
	}
	if got := e.order(o3.OrderID); got.Status != StatusRefunded || !got.Steps.CouponBack {
		t.Fatalf("late payment: %+v", got)
	}
	e.audit()

	// A give-back that fails is owed: the order is CANCELLED at once, the
	// coupon stays held by it (consistently), and the sweep or the next
	// start gives it back.
	for _, settle := range []string{"sweep", "restart"} {
		o4, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "f-" + settle, CouponID: c.ID})
		if err != nil {
			t.Fatal(err)
		}
		flaky := &flakyCoupons{CouponStore: e.svc.cstore}
		flaky.failBack.Store(true)
		e.svc.cstore = flaky
		if got, err := e.svc.Cancel(1, mustID(t, o4.OrderID)); err != nil || got.Status != StatusCancelled || got.Steps.CouponBack {
			t.Fatalf("cancel with the coupon store failing: %+v %v", got, err)
		}
		if got, _ := e.svc.Coupon(c.ID); got.UsedBy != o4.OrderID {
			t.Fatalf("coupon after a failed give-back: %+v", got)
		}
		e.audit()
		flaky.failBack.Store(false)
		if settle == "sweep" {
			e.svc.CloseExpired()
		} else {
			e.reopen()
		}
		if got, _ := e.svc.Coupon(c.ID); got.UsedBy != "" {
			t.Fatalf("%s: owed coupon not given back: %+v", settle, got)
		}
		if got := e.order(o4.OrderID); !got.Steps.CouponBack {
			t.Fatalf("%s: order %+v", settle, got)
		}
		e.audit()
	}
	if free, locked, sold := e.counts(prog); free != 9 || locked != 0 || sold != 1 {
		t.Fatalf("seats: free %d locked %d sold %d", free, locked, sold)
	}
}

// A coupon is not used on an order that costs nothing (price 0 seats): it
// would take nothing off. Such an order with a coupon is refused with 40005
// for a provider order and a coins order alike, nothing written (the req_id
// stays free), no seat kept, the coupon still usable; without the coupon
// the order goes through. Before, the order took the coupon with a
// discount of 0, for good.
func TestCouponNotUsedOnAFreeOrder(t *testing.T) { testCouponNotUsedOnAFreeOrder(t, newEnv) }

// TestCouponNotUsedOnAFreeOrderSharedCoupons: the same with a cluster's
// coupons (Redis).
func TestCouponNotUsedOnAFreeOrderSharedCoupons(t *testing.T) {
	testCouponNotUsedOnAFreeOrder(t, newSharedEnv)
}

func testCouponNotUsedOnAFreeOrder(t *testing.T, newEnv func(testing.TB, Config) *env) {
	for _, kind := range []string{PayMock, PayCoins} {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, Config{})
			prog := e.program([]CategoryDef{{ID: 1, Name: "Free", Price: 0, Rows: 1, Cols: 4}, {ID: 2, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 2, 4)
			c, err := e.svc.CreateCoupon(1, 30)
			if err != nil {
				t.Fatal(err)
			}
			e.credit(1, 1000)
			sold := 0 // seats sold by the orders without the coupon
			for _, r := range []PlaceReq{
				{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "count"},
				{ProgramID: prog, SeatIDs: []string{"1-1-3"}, ReqID: "seats"},
			} {
				r.Pay, r.CouponID = kind, c.ID
				o, err := e.svc.Place(1, r)
				wantCode(t, err, proto.CodeCouponUnusable)
				if !strings.Contains(err.Error(), "costs nothing") {
					t.Fatalf("%s: refused as %q, want it said why", r.ReqID, err)
				}
				if got, _ := e.svc.Coupon(c.ID); got.UsedBy != "" {
					t.Fatalf("%s: coupon used by %q (order %+v)", r.ReqID, got.UsedBy, o)
				}
				if f, l, s := e.counts(prog); f != 8-sold || l != 0 || s != sold {
					t.Fatalf("%s: seats free %d locked %d sold %d after the refusal, want %d sold", r.ReqID, f, l, s, sold)
				}
				e.audit()
				// Nothing recorded: the same req_id without the coupon is a
				// new order, sold at once (nothing to pay).
				r.CouponID = ""
				o, err = e.svc.Place(1, r)
				if err != nil || o.Status != StatusPaid || o.Amount != 0 || o.CouponID != "" {
					t.Fatalf("%s without the coupon: %+v %v", r.ReqID, o, err)
				}
				sold += len(o.SeatIDs)
			}
			// The coupon is still the buyer's to use, on an order it takes
			// something off (per_user_max 4: the refusals kept no count).
			o, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 2, Count: 1, ReqID: "priced", Pay: kind, CouponID: c.ID})
			if err != nil || o.Discount != 30 || o.Amount != 70 {
				t.Fatalf("priced order with the coupon: %+v %v", o, err)
			}
			if got, _ := e.svc.Coupon(c.ID); got.UsedBy != o.OrderID {
				t.Fatalf("coupon used by %q, want %s", got.UsedBy, o.OrderID)
			}
			if free, locked, sold := e.counts(prog); free != 4 || sold+locked != 4 {
				t.Fatalf("seats free %d locked %d sold %d", free, locked, sold)
			}
			if want := map[string]int64{PayMock: 1000, PayCoins: 930}[kind]; e.balance(1) != want {
				t.Fatalf("balance %d, want %d", e.balance(1), want)
			}
			e.audit()
			e.conservation()
		})
	}
}

// flakyCoupons fails GiveBack while failBack is set; backs counts the calls.
type flakyCoupons struct {
	CouponStore
	failBack atomic.Bool
	backs    atomic.Int64
}

func (f *flakyCoupons) GiveBack(id string, user int64, order string, commit func(bool, []persist.Record) error) error {
	f.backs.Add(1)
	if f.failBack.Load() {
		return errors.New("injected: coupon store unavailable")
	}
	return f.CouponStore.GiveBack(id, user, order, commit)
}

// Program sizes are bounded (10001 beyond), and programs survive a restart
// with their ids.
func TestTicketProgramBounds(t *testing.T) {
	e := newEnv(t, Config{MaxPrograms: 2, MaxSeats: 100})
	_, err := e.svc.CreateProgram(ProgramDef{Name: "x", PerOrderMax: 1, PerUserMax: 1,
		Categories: []CategoryDef{{ID: 1, Name: "A", Rows: 10, Cols: 11}}})
	wantCode(t, err, proto.CodeBadRequest) // 110 seats > 100
	_, err = e.svc.CreateProgram(ProgramDef{Name: "x", PerOrderMax: 1, PerUserMax: 1,
		Categories: []CategoryDef{{ID: 1, Name: "A", Rows: 1, Cols: 1}, {ID: 1, Name: "B", Rows: 1, Cols: 1}}})
	wantCode(t, err, proto.CodeBadRequest) // duplicate category id
	a := e.program([]CategoryDef{{ID: 2, Name: "B", Rows: 1, Cols: 2}, {ID: 1, Name: "A", Rows: 1, Cols: 2}}, 1, 1)
	b := e.program([]CategoryDef{{ID: 1, Name: "A", Rows: 1, Cols: 2}}, 1, 1)
	if a != 1 || b != 2 {
		t.Fatalf("ids %d %d", a, b)
	}
	_, err = e.svc.CreateProgram(ProgramDef{Name: "x", PerOrderMax: 1, PerUserMax: 1,
		Categories: []CategoryDef{{ID: 1, Name: "A", Rows: 1, Cols: 1}}})
	wantCode(t, err, proto.CodeBadRequest) // over MaxPrograms
	e.reopen()
	v, err := e.svc.Program(a)
	if err != nil || len(v.Categories) != 2 || v.Categories[0].ID != 1 || len(v.Seats) != 4 {
		t.Fatalf("after restart: %+v %v", v, err)
	}
}

// GET /programs/{id} is a cached snapshot: served again while no seat
// changed, rebuilt after any change (one rebuild however many readers).
func TestTicketProgramViewCache(t *testing.T) {
	e := newEnv(t, Config{})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 1, Rows: 2, Cols: 2}}, 2, 2)
	v1, _ := e.svc.Program(prog)
	v2, _ := e.svc.Program(prog)
	if &v1.Seats[0] != &v2.Seats[0] {
		t.Fatal("an unchanged program was rebuilt")
	}
	if _, err := e.svc.Place(1, PlaceReq{ProgramID: prog, SeatIDs: []string{"1-2-2"}, ReqID: "a"}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	views := make([]View, 8)
	for i := range views {
		wg.Add(1)
		go func() { defer wg.Done(); views[i], _ = e.svc.Program(prog) }()
	}
	wg.Wait()
	for _, v := range views {
		if v.Seats[3].Status != SeatLocked || v.Categories[0].Locked != 1 || &v.Seats[0] != &views[0].Seats[0] {
			t.Fatalf("after a change: %+v", v.Categories[0])
		}
	}
	// Encoded once per change too: every read of an unchanged program
	// shares the bytes (a view of 20,000 seats is ~1.3 MB to encode).
	b1, _ := e.svc.ProgramJSON(prog)
	b2, _ := e.svc.ProgramJSON(prog)
	var decoded View
	if &b1[0] != &b2[0] || proto.Unmarshal(b1, &decoded) != nil || decoded.Categories[0].Locked != 1 || decoded.Seats[3].Status != SeatLocked {
		t.Fatalf("encoded view: shared %v, %s", &b1[0] == &b2[0], b1)
	}
	if _, err := e.svc.Place(2, PlaceReq{ProgramID: prog, SeatIDs: []string{"1-1-1"}, ReqID: "b"}); err != nil {
		t.Fatal(err)
	}
	b3, _ := e.svc.ProgramJSON(prog)
	if proto.Unmarshal(b3, &decoded) != nil || decoded.Categories[0].Locked != 2 || decoded.Seats[0].Status != SeatLocked {
		t.Fatalf("encoded view after a change: %s", b3)
	}
}

// Viewers waiting while a snapshot is rebuilt take that snapshot even when
// seats changed during the rebuild: it was begun after they arrived, so it
// shows everything before their call. (Before, each waiter found the
// version moved and rebuilt again, one after another — under a flash sale's
// steady orders, a rebuild per viewer, each holding the category's lock.)
func TestTicketViewWaitersShareTheRebuild(t *testing.T) {
	e := newEnv(t, Config{})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 1, Rows: 10, Cols: 10}}, 2, 2)
	p := e.svc.inv.(*memInventory).program(prog)
	p.viewMu.Lock() // a rebuild in progress
	const waiters = 8
	views := make(chan View, waiters)
	for range waiters {
		go func() { v, _ := e.svc.Program(prog); views <- v }()
	}
	time.Sleep(300 * time.Millisecond) // the waiters arrive and wait for the rebuild
	ver := p.version.Load()
	built := p.build()
	p.view, p.viewVer = &built, ver
	// A seat changes while the rebuild finishes.
	if _, err := e.svc.Place(1, PlaceReq{ProgramID: prog, SeatIDs: []string{"1-1-1"}, ReqID: "a"}); err != nil {
		t.Fatal(err)
	}
	p.viewMu.Unlock()
	for range waiters {
		if v := <-views; &v.Seats[0] != &built.Seats[0] {
			t.Fatal("a viewer waiting for the rebuild rebuilt again")
		}
	}
	if v, _ := e.svc.Program(prog); v.Seats[0].Status != SeatLocked {
		t.Fatalf("a viewer arriving after the change: seat 1-1-1 %v, want locked", v.Seats[0].Status)
	}
}

// A payment, the buyer's cancel and the timeout racing on the same orders:
// each order ends exactly one way — PAID with its seats sold, or closed
// (CANCELLED, or REFUNDED when the payment lost the race) with its seats
// freed once — and the pay centre agrees (PAYED, or PAY_BACK/IN_VALID).
func TestTicketPayCancelTimeoutRace(t *testing.T) {
	e := newEnv(t, Config{PayTimeout: time.Minute})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 5, Rows: 20, Cols: 10}}, 2, 2)
	const n = 100
	orders := make([]Order, n)
	for i := range orders {
		o, err := e.svc.Place(int64(i+1), PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "r"})
		if err != nil {
			t.Fatal(err)
		}
		orders[i] = o
	}
	e.clock.advance(2 * time.Minute) // every order is due
	var wg sync.WaitGroup
	for i, o := range orders {
		wg.Add(3)
		go func() { defer wg.Done(); e.notify(o.OrderID, "race-"+o.OrderID, o.PayAmount) }()
		go func() { defer wg.Done(); _, _ = e.svc.Cancel(int64(i+1), mustID(t, o.OrderID)) }()
		go func() { defer wg.Done(); e.svc.CloseExpired() }()
	}
	wg.Wait()
	paidSeats := 0
	for _, o := range orders {
		got := e.order(o.OrderID)
		po, err := e.pay.Get(mustID(t, o.OrderID))
		if err != nil {
			t.Fatal(err)
		}
		switch got.Status {
		case StatusPaid:
			paidSeats += len(got.SeatIDs)
			if po.Status != pay.StatusPayed {
				t.Fatalf("ticket PAID, pay order %s", po.Status)
			}
		case StatusRefunded:
			if po.Status != pay.StatusPayBack {
				t.Fatalf("ticket REFUNDED, pay order %s", po.Status)
			}
		default:
			t.Fatalf("order %s ended %s (pay order %s)", o.OrderID, got.Status, po.Status)
		}
	}
	free, locked, sold := e.counts(prog)
	if sold != paidSeats || locked != 0 || free != 200-paidSeats {
		t.Fatalf("free %d locked %d sold %d, paid seats %d", free, locked, sold, paidSeats)
	}
	e.audit()
	t.Logf("%d of %d orders paid, the rest closed first and refunded", paidSeats/2, n)
}

// The pay centre's refund (admin) of a ticket order's payment is refused:
// it would mark the money refunded while the seats stay sold (and a
// business order carries no coins to take back).
func TestPayRefundOfATicketOrderRefused(t *testing.T) {
	e := newEnv(t, Config{})
	prog, o, id := e.mockOrder(2)
	if st := e.notify(o.OrderID, "ev-1", o.PayAmount); st != pay.NotifyOK {
		t.Fatalf("notify %d", st)
	}
	_, err := e.pay.Refund(id)
	wantCode(t, err, proto.CodeOrderState)
	e.payAndSeats(id, pay.StatusPayed, StatusPaid, prog, 2, 0, 2)
}

// A user places at most OrdersPerMinute ticket orders per minute: a cancel
// frees the seats (per_user_max), not the records every order writes — a
// place-and-cancel loop was unbounded. A replay of a req_id is free.
func TestTicketOrdersPerMinute(t *testing.T) {
	e := newEnv(t, Config{OrdersPerMinute: 2})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 10}}, 4, 8)
	place := func(req string) (Order, error) {
		return e.svc.Place(7, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: req})
	}
	for _, req := range []string{"a", "b"} {
		o, err := place(req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.svc.Cancel(7, mustID(t, o.OrderID)); err != nil {
			t.Fatal(err)
		}
	}
	_, err := place("c")
	wantCode(t, err, proto.CodeRateLimited)
	if o, err := place("a"); err != nil || o.Status != StatusCancelled {
		t.Fatalf("replay of a: %+v %v", o, err)
	}
	if _, err := e.svc.Place(8, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "c"}); err != nil {
		t.Fatalf("another user: %v", err)
	}
	e.clock.advance(31 * time.Second)
	if _, err := place("c"); err != nil {
		t.Fatalf("half a minute later: %v", err)
	}
	e.conservation()
}

// An attempt stopped by an internal failure before any order was recorded
// spends none of the per-minute count (protocol.md): two such failures and
// then two orders fit a rate of two a minute. A refusal (the per-user limit)
// still counts.
func TestTicketOrdersPerMinuteSpareFailedAttempts(t *testing.T) {
	f := &failAt{points: map[string]int{"fail:lock": 2}}
	e := newEnv(t, Config{OrdersPerMinute: 2, Hook: f.hook})
	e.credit(7, 1000)
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 10}}, 1, 2)
	place := func(req string) error {
		_, err := e.svc.Place(7, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: req, Pay: PayCoins})
		return err
	}
	for _, req := range []string{"x", "y"} {
		wantCode(t, place(req), proto.CodeInternal)
	}
	for _, req := range []string{"a", "b"} {
		if err := place(req); err != nil {
			t.Fatalf("order %s after two attempts that failed inside: %v", req, err)
		}
	}
	wantCode(t, place("c"), proto.CodeRateLimited)
	e.clock.advance(time.Minute)
	wantCode(t, place("d"), proto.CodeTicketLimit) // per_user_max 2: a refusal, counted
	wantCode(t, place("e"), proto.CodeTicketLimit)
	wantCode(t, place("f"), proto.CodeRateLimited)
	e.conservation()
	e.audit()
}

// A payment the ticket order took (Paid ran: seats sold) whose pay order
// was closed before it recorded PAYED (a crash or a failed write in
// between, then the reconciler's close at the deadline): the provider's
// redelivery records the pay order PAYED — it was refunded (PAY_BACK, a
// refund record) while the buyer kept the seats.
func TestTicketPaidBeforeItsPayOrderClosed(t *testing.T) {
	e := newEnv(t, Config{})
	prog, o, id := e.mockOrder(2)
	po, err := e.pay.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.svc.Paid(po); err != nil { // the pay centre's markBizPaid, up to its crash
		t.Fatal(err)
	}
	if err := e.pay.CloseBizOrder(id, "unpaid timeout"); err != nil { // what the reconciler does at the deadline
		t.Fatal(err)
	}
	for _, ev := range []string{"ev-1", "ev-1", "ev-2"} { // redelivered, and a second event
		if st := e.notify(o.OrderID, ev, o.PayAmount); st != pay.NotifyOK {
			t.Fatalf("notify %s: %d", ev, st)
		}
	}
	e.payAndSeats(id, pay.StatusPayed, StatusPaid, prog, 2, 0, 2) // PAYED: the seats were sold on it
}

// A payment after its pay order closed, delivered while the ticket service
// is not registered with the pay centre yet (a node starting), is answered
// "retry": refunded then, it would leave the ticket order unaware (CANCELLED
// instead of REFUNDED). Once registered, the redelivery is refunded as usual.
func TestLatePaymentWaitsForItsBusiness(t *testing.T) {
	e := newEnv(t, Config{})
	prog, o, id := e.mockOrder(1)
	if err := e.pay.CloseBizOrder(id, "unpaid timeout"); err != nil {
		t.Fatal(err)
	}
	e.close()
	e.noBiz = true
	e.open()
	if st := e.notify(o.OrderID, "ev-1", o.PayAmount); st != pay.NotifyRetry {
		t.Fatalf("notify before the business is registered: %d, want retry", st)
	}
	e.pay.RegisterBusiness(Biz, e.svc)
	if st := e.notify(o.OrderID, "ev-1", o.PayAmount); st != pay.NotifyOK {
		t.Fatalf("notify: %d", st)
	}
	e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
}

// mockOrder places, for user 7, an order of count seats of a new program
// (one category of 4 seats at 100) paid through the provider (PENDING_PAY).
func (e *env) mockOrder(count int) (prog int64, o Order, id int64) {
	e.t.Helper()
	prog = e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 4, 8)
	o, err := e.svc.Place(7, PlaceReq{ProgramID: prog, CategoryID: 1, Count: count, ReqID: "s"})
	if err != nil {
		e.t.Fatal(err)
	}
	return prog, o, mustID(e.t, o.OrderID)
}

// payAndSeats checks pay order id's status, its ticket order's, and the
// program's seats, then the conservation.
func (e *env) payAndSeats(id int64, payStatus, status string, prog int64, free, locked, sold int) {
	e.t.Helper()
	if po, _ := e.pay.Get(id); po.Status != payStatus {
		e.t.Fatalf("pay order %s, want %s", po.Status, payStatus)
	}
	if got := e.order(strconv.FormatInt(id, 10)); got.Status != status {
		e.t.Fatalf("ticket order %s, want %s", got.Status, status)
	}
	if f, l, s := e.counts(prog); f != free || l != locked || s != sold {
		e.t.Fatalf("free %d locked %d sold %d, want %d %d %d", f, l, s, free, locked, sold)
	}
	e.conservation()
}

// A user's ticket orders are counted on every node (Config.SharedPlaces, in
// Redis): at 2 a minute, orders through two nodes (each its own programs
// and disk) make two, not two on each.
func TestTicketOrdersPerMinuteAcrossNodes(t *testing.T) {
	addr := redistest.Start(t).Addr
	var envs []*env
	var progs []int64
	for range 2 {
		e := newEnv(t, Config{OrdersPerMinute: 2, SharedPlaces: limit.NewShared(newRedisClient(t, addr), "tkorder", 2, time.Minute, 2)})
		envs = append(envs, e)
		progs = append(progs, e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 10}}, 4, 8))
	}
	for i, req := range []string{"a", "b"} {
		if _, err := envs[i].svc.Place(7, PlaceReq{ProgramID: progs[i], CategoryID: 1, Count: 1, ReqID: req}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range envs {
		_, err := envs[i].svc.Place(7, PlaceReq{ProgramID: progs[i], CategoryID: 1, Count: 1, ReqID: "c"})
		wantCode(t, err, proto.CodeRateLimited)
	}
	for _, e := range envs {
		e.conservation()
	}
}

// The pay-timeout sweep frees the seats of every due order before any coupon
// waits on the coupon store, and a failing store is asked once a sweep, not
// once per owed coupon: with Redis hanging each call waited for its timeout,
// so a sweep of 500 such orders took ~17 minutes, their seats locked.
func TestSweepClosesBeforeGivingCouponsBack(t *testing.T) {
	e := newEnv(t, Config{PayTimeout: time.Minute})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 10}}, 1, 1)
	var orders []string
	for u := int64(1); u <= 5; u++ {
		c, err := e.svc.CreateCoupon(u, 30)
		if err != nil {
			t.Fatal(err)
		}
		o, err := e.svc.Place(u, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "x", CouponID: c.ID})
		if err != nil || o.Status != StatusPendingPay {
			t.Fatalf("place: %+v %v", o, err)
		}
		orders = append(orders, o.OrderID)
	}
	flaky := &flakyCoupons{CouponStore: e.svc.cstore}
	flaky.failBack.Store(true)
	e.svc.cstore = flaky
	e.clock.advance(2 * time.Minute)
	if n := e.svc.CloseExpired(); n != 5 {
		t.Fatalf("closed %d, want 5", n)
	}
	if free, locked, sold := e.counts(prog); free != 10 || locked != 0 || sold != 0 {
		t.Fatalf("seats after the sweep: free %d locked %d sold %d", free, locked, sold)
	}
	if k := flaky.backs.Load(); k != 1 {
		t.Fatalf("the failing coupon store was asked %d times in one sweep, want 1", k)
	}
	e.audit()
	flaky.failBack.Store(false)
	e.svc.CloseExpired()
	for _, id := range orders {
		if got := e.order(id); got.Status != StatusCancelled || !got.Steps.CouponBack {
			t.Fatalf("after the store is back: %+v", got)
		}
	}
	e.audit()
}

// pushHook is a router session that calls fn with each message it is sent,
// as it is sent.
type pushHook struct {
	id   uint64
	user int64
	fn   func(b []byte)
}

func (p *pushHook) ID() uint64    { return p.id }
func (p *pushHook) UserID() int64 { return p.user }
func (p *pushHook) Send(f *router.Frame) bool {
	for _, m := range f.Msgs {
		p.fn(m.Bytes)
	}
	return true
}

// A node restarted with its clock set back makes no ticket order id again,
// nor one below those it made: an order paid with coins has no pay order,
// so the ticket service names its highest to the pay centre at start.
func TestOrderIDsAboveEveryStoredAfterAClockSetBack(t *testing.T) {
	e := newEnv(t, Config{})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 10, Rows: 1, Cols: 4}}, 2, 4)
	e.credit(7, 100)
	first, err := e.svc.Place(7, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "first", Pay: PayCoins})
	if err != nil {
		t.Fatal(err)
	}
	e.clock.advance(-3 * time.Hour)
	e.reopen()
	second, err := e.svc.Place(7, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "second", Pay: PayCoins})
	if err != nil {
		t.Fatal(err)
	}
	a, _ := strconv.ParseInt(first.OrderID, 10, 64)
	b, _ := strconv.ParseInt(second.OrderID, 10, 64)
	if b <= a {
		t.Fatalf("ticket order %d made after %d (the clock set back 3 h): want a greater id", b, a)
	}
	if got := e.order(first.OrderID); got.Status != StatusPaid || got.ReqID != "first" {
		t.Fatalf("the first order reads %+v", got)
	}
	e.conservation()
}

// sameIDs makes the pay centre's next order ids the ones listed (as a clock
// set back makes ids again), then its own.
type sameIDs struct {
	Payments
	mu   sync.Mutex
	next []int64
}

func (p *sameIDs) NewOrderID(user int64) (int64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.next) > 0 {
		id := p.next[0]
		p.next = p.next[1:]
		return id, nil
	}
	return p.Payments.NewOrderID(user)
}

// A coupon id made again (ids come from the clock: one set back across a
// restart makes them again) never overwrites the coupon that has it — its
// owner kept it and whoever holds it kept holding it — the new coupon gets
// the next free id. Before, the grant wrote the new coupon over the old one
// (on one node; in Redis the new owner inherited its holder).
func TestCouponIDMadeAgainNeverOverwrites(t *testing.T) { testCouponIDMadeAgain(t, newEnv) }

// TestCouponIDMadeAgainNeverOverwritesSharedCoupons: the same in Redis.
func TestCouponIDMadeAgainNeverOverwritesSharedCoupons(t *testing.T) {
	testCouponIDMadeAgain(t, newSharedEnv)
}

func testCouponIDMadeAgain(t *testing.T, newEnv func(testing.TB, Config) *env) {
	e := newEnv(t, Config{})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 2, 4)
	first, err := e.svc.CreateCoupon(7, 30)
	if err != nil {
		t.Fatal(err)
	}
	// The first coupon is held by a pending order.
	o, err := e.svc.Place(7, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "held", CouponID: first.ID})
	if err != nil || o.Status != StatusPendingPay {
		t.Fatalf("%+v %v", o, err)
	}
	id, _ := strconv.ParseInt(first.ID[1:], 10, 64)
	e.svc.pay = &sameIDs{Payments: e.svc.pay, next: []int64{id, id}}
	second, err := e.svc.CreateCoupon(8+1024, 50)
	if err != nil {
		t.Fatal(err)
	}
	if second.ID == first.ID {
		t.Fatalf("a second coupon got the first one's id %s", first.ID)
	}
	if n, _ := strconv.ParseInt(second.ID[1:], 10, 64); n <= id {
		t.Fatalf("second coupon id %s, want one above %s", second.ID, first.ID)
	}
	if got, err := e.svc.Coupon(first.ID); err != nil || got.UserID != 7 || got.Amount != 30 || got.UsedBy != o.OrderID {
		t.Fatalf("the first coupon reads %+v (%v); want user 7's, 30, held by %s", got, err, o.OrderID)
	}
	if got, err := e.svc.Coupon(second.ID); err != nil || got.UserID != 8+1024 || got.Amount != 50 || got.UsedBy != "" {
		t.Fatalf("the second coupon reads %+v (%v)", got, err)
	}
	// Each still works for its owner: the first's order pays, the second
	// takes 50 off a new order.
	e.credit(8+1024, 100)
	p, err := e.svc.Place(8+1024, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "new", Pay: PayCoins, CouponID: second.ID})
	if err != nil || p.Status != StatusPaid || p.Amount != 50 {
		t.Fatalf("%+v %v", p, err)
	}
	e.conservation()
}

// An order placed before the cents upgrade (its pay order asks the coins as
// cents, no pay_amount recorded) and paid so is not sold: it closes at once,
// its seats go back on sale, and the payment is refunded as a late one. It
// waited for its timeout before — where the sweep asks the provider first,
// which answers paid, so it stayed PENDING_PAY with its seats locked.
func TestPreUpgradeOrderPaidAsCoinsIsRefundedAndReleased(t *testing.T) {
	e := newEnv(t, Config{PayTimeout: time.Minute})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 380, Rows: 1, Cols: 10}}, 4, 8)
	o, err := e.svc.Place(7, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 2, ReqID: "old"})
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, o.OrderID)
	// As the version before the upgrade wrote them.
	old := e.order(o.OrderID)
	old.PayAmount = 0
	if r := old.record(); e.store.Put(r.Key, r.Value) != nil {
		t.Fatal("order not rewritten")
	}
	poKey := persist.Key(append(append([]byte{}, persist.PrefixRec...), "order/"...), uint64(id))
	var po map[string]any
	if v, err := e.store.Get(poKey); err != nil || proto.Unmarshal(v, &po) != nil {
		t.Fatalf("pay order record: %v", err)
	}
	po["amount"] = o.Amount
	if v, _ := proto.Marshal(po); e.store.Put(poKey, v) != nil {
		t.Fatal("pay order not rewritten")
	}
	e.reopen()
	if got, err := e.pay.Get(id); err != nil || got.Amount != o.Amount {
		t.Fatalf("pay order %+v %v, want one asking %d", got, err, o.Amount)
	}

	// The provider's notify and its redeliveries, at once: one refund.
	var wg sync.WaitGroup
	codes := make([]int, 6)
	for i := range codes {
		wg.Add(1)
		go func() { defer wg.Done(); codes[i] = e.notify(o.OrderID, "paid-old", o.Amount) }()
	}
	wg.Wait()
	for i, st := range codes {
		if st != pay.NotifyOK {
			t.Fatalf("notify %d answered %d", i, st)
		}
	}
	if got := e.order(o.OrderID); got.Status != StatusRefunded {
		t.Fatalf("order %s after the payment, want REFUNDED", got.Status)
	}
	e.refunded(id, o.Amount)
	e.reopen() // a restart keeps all of it
	if got, err := e.pay.Get(id); err != nil || got.Status != pay.StatusPayBack {
		t.Fatalf("pay order %+v %v, want PAY_BACK", got, err)
	}
	if free, locked, sold := e.counts(prog); free != 10 || locked != 0 || sold != 0 {
		t.Fatalf("seats: free %d locked %d sold %d", free, locked, sold)
	}
	// Its seats sell again; a redelivery changes nothing.
	if _, err := e.svc.Place(8, PlaceReq{ProgramID: prog, SeatIDs: o.SeatIDs, ReqID: "new"}); err != nil {
		t.Fatalf("its seats not on sale again: %v", err)
	}
	if st := e.notify(o.OrderID, "paid-old", o.Amount); st != pay.NotifyOK {
		t.Fatalf("redelivery answered %d", st)
	}
	if got := e.order(o.OrderID); got.Status != StatusRefunded {
		t.Fatalf("order %s after the redelivery", got.Status)
	}
	e.refunded(id, o.Amount)
	e.conservation()
}

// An admin's coupon grant with a req_id is granted once: sent again (its
// reply lost), at once from several goroutines, or after a restart, it
// answers the first coupon; the same req_id for another user or amount is a
// conflict (10409); another admin's same req_id is its own grant. Before,
// every retry granted one more coupon.
func TestCouponGrantIdempotentByReqID(t *testing.T) { testCouponGrantIdempotent(t, newEnv) }

func TestCouponGrantIdempotentByReqIDSharedCoupons(t *testing.T) {
	testCouponGrantIdempotent(t, newSharedEnv)
}

func testCouponGrantIdempotent(t *testing.T, newEnv func(testing.TB, Config) *env) {
	e := newEnv(t, Config{PayTimeout: time.Minute})
	const admin = 900
	var wg sync.WaitGroup
	got := make([]Coupon, 8)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := e.svc.GrantCoupon(admin, "grant-1", 42, 500)
			if err != nil {
				t.Error(err)
			}
			got[i] = c
		}()
	}
	wg.Wait()
	for _, c := range got[1:] {
		if c.ID != got[0].ID || c.UserID != 42 || c.Amount != 500 || c.CreatedAt != got[0].CreatedAt {
			t.Fatalf("grants of one req_id answered %+v and %+v", got[0], c)
		}
	}
	if e.redis != "" {
		// The granting node died between Redis and its disk: the grant
		// answered again is kept on this node's disk before the answer.
		if err := e.store.Delete(couponKey(got[0].ID)); err != nil {
			t.Fatal(err)
		}
	}
	e.reopen()
	if c, err := e.svc.GrantCoupon(admin, "grant-1", 42, 500); err != nil || c.ID != got[0].ID {
		t.Fatalf("after a restart: %+v %v, want %s", c, err, got[0].ID)
	}
	if _, err := e.store.Get(couponKey(got[0].ID)); err != nil {
		t.Fatalf("the grant answered again is not on this node's disk: %v", err)
	}
	_, err := e.svc.GrantCoupon(admin, "grant-1", 42, 600)
	wantCode(t, err, proto.CodeConflict)
	_, err = e.svc.GrantCoupon(admin, "grant-1", 43, 500)
	wantCode(t, err, proto.CodeConflict)
	_, err = e.svc.GrantCoupon(admin, strings.Repeat("x", 65), 42, 500)
	wantCode(t, err, proto.CodeBadRequest)
	other, err := e.svc.GrantCoupon(admin+1, "grant-1", 42, 500)
	if err != nil || other.ID == got[0].ID {
		t.Fatalf("another admin's grant-1: %+v %v, want a coupon of its own", other, err)
	}
	// Two coupons for user 42, each usable once.
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 1000, Rows: 1, Cols: 10}}, 4, 8)
	for i, id := range []string{got[0].ID, other.ID, got[0].ID} {
		_, err := e.svc.Place(42, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: fmt.Sprint("p", i), CouponID: id})
		if i < 2 && err != nil {
			t.Fatalf("coupon %s: %v", id, err)
		}
		if i == 2 {
			wantCode(t, err, proto.CodeCouponUnusable)
		}
	}
	e.conservation()
}
