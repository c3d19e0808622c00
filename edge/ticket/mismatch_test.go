package ticket

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Payments the provider reports, by its answer to the pay centre's query
// alone (the notifies lost), for another amount than the order's.

// A ticket payment of another amount that only the query reports is
// refunded whatever closes its order first: the ticket sweep closes the pay
// order at the deadline (CloseBizOrder: IN_VALID), after which the
// reconciler never asked the provider again — the buyer's money was neither
// sold nor refunded. The query's report is remembered, and the
// reconciler's next run after the close refunds it: the ticket order
// REFUNDED, its pay order PAY_BACK with one refund record of what was paid,
// nothing credited. More runs, the lost notify arriving at last (409) and a
// restart change nothing.
func TestQueriedMismatchRefundedOnceTheSweepClosed(t *testing.T) {
	e, p := newQueriedEnv(t)
	prog, o, id := e.mockOrder(2)
	po, err := e.pay.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	p.pay(o.OrderID, po.Amount+1)
	e.clock.advance(2 * time.Minute) // due for a query (pay.Config.ReconcileAfter), before the deadline
	e.reconcile(&p.queries, func() bool { return false })
	e.payAndSeats(id, pay.StatusPaying, StatusPendingPay, prog, 2, 2, 0) // 409: nothing sold, nothing credited
	e.clock.advance(DefaultPayTimeout)
	if n := e.svc.CloseExpired(); n != 1 {
		t.Fatalf("the sweep closed %d orders, want 1", n)
	}
	e.payAndSeats(id, pay.StatusInvalid, StatusCancelled, prog, 4, 0, 0)
	e.clock.advance(DefaultPayTimeout) // past two deadlines too
	e.pay.Reconcile()
	e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
	rec := e.refunded(id, po.Amount+1)
	check := func(when string) {
		t.Helper()
		e.pay.Reconcile()
		if st := e.notify(o.OrderID, "ev-q", po.Amount+1); st != pay.NotifyConflict {
			t.Fatalf("%s: the lost notify: %d, want 409", when, st)
		}
		e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
		if v := e.refunded(id, po.Amount+1); string(v) != string(rec) {
			t.Fatalf("%s: refund record rewritten: %s, first %s", when, v, rec)
		}
		if b := e.balance(7); b != 0 {
			t.Fatalf("%s: credited %d", when, b)
		}
	}
	check("again")
	e.reopen()
	check("after a restart")
}

// A payment not as its order that the query reports is refunded past two
// deadlines by the reconciler — which pay.New starts before ticket.New
// registers the ticket service (a node starting). Until its business is
// registered the refund waits, as a late payment's does
// (TestLatePaymentWaitsForItsBusiness): made without it, the pay order
// became PAY_BACK beside a ticket order still PENDING_PAY, which its
// timeout then closed CANCELLED (tickets.md pairs REFUNDED with PAY_BACK).
func TestQueriedMismatchWaitsForItsBusiness(t *testing.T) {
	e, p := newQueriedEnv(t)
	prog, o, id := e.mockOrder(1)
	po, err := e.pay.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	p.pay(o.OrderID, po.Amount+1)
	e.close()
	e.noBiz = true
	e.open()
	e.clock.advance(2*DefaultPayTimeout + time.Minute) // past both deadlines
	payStatus := func(want string) func() bool {
		return func() bool { cur, err := e.pay.Get(id); return err == nil && cur.Status == want }
	}
	e.reconcile(&p.queries, payStatus(pay.StatusPayBack))
	e.payAndSeats(id, pay.StatusPaying, StatusPendingPay, prog, 3, 1, 0)
	e.pay.RegisterBusiness(Biz, e.svc)
	e.reconcile(&p.queries, payStatus(pay.StatusPayBack))
	e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
	e.refunded(id, po.Amount+1)
}

// queryProvider is a provider whose signed answer to the pay centre's
// query or close reports the payment set by pay (SUCCESS, event "ev-q")
// for its order; for any other, "WAITING" to a query and "CLOSED" to a
// close; queries counts the answers.
type queryProvider struct {
	srv     *httptest.Server
	queries atomic.Int64

	mu     sync.Mutex
	order  string
	amount int64
}

// pay makes the provider report order paid with amount.
func (p *queryProvider) pay(order string, amount int64) {
	p.mu.Lock()
	p.order, p.amount = order, amount
	p.mu.Unlock()
}

// newQueriedEnv is newEnv whose pay centre asks a queryProvider (signing
// with the env's clock).
func newQueriedEnv(t *testing.T) (*env, *queryProvider) {
	t.Helper()
	c := &clock{}
	p := &queryProvider{}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer p.queries.Add(1)
		id := r.URL.Query().Get("order_id")
		ev := pay.Event{OrderID: id, Status: "WAITING"}
		if r.URL.Path == "/close" {
			ev.Status = mockpay.StatusClosed
		}
		p.mu.Lock()
		if id == p.order {
			ev = pay.Event{EventID: "ev-q", OrderID: id, Amount: p.amount, Status: "SUCCESS", PaidAt: c.now().UnixMilli()}
		}
		p.mu.Unlock()
		b, _ := proto.Marshal(ev)
		w.Header().Set(pay.SignatureHeader, pay.Sign(testSecret, c.now(), b))
		_, _ = w.Write(b)
	}))
	t.Cleanup(p.srv.Close)
	e := &env{t: t, dir: t.TempDir(), clock: c, provider: p.srv.URL}
	e.open()
	t.Cleanup(e.close)
	return e, p
}

// reconcile runs the pay centre's reconciler until done, or until the
// provider has answered two more queries: the first one's answer was acted
// on (an order is queried again only once its last query is over).
func (e *env) reconcile(queries *atomic.Int64, done func() bool) {
	e.t.Helper()
	start := queries.Load()
	deadline := time.Now().Add(10 * time.Second)
	for !done() && queries.Load() < start+2 {
		if time.Now().After(deadline) {
			e.t.Fatal("the reconciler did not query the provider")
		}
		e.pay.Reconcile()
		time.Sleep(5 * time.Millisecond)
	}
}

// refunded checks that pay order id has one refund record, of amount, and
// one PAY_BACK row in its log; it returns the record.
func (e *env) refunded(id, amount int64) []byte {
	e.t.Helper()
	v, err := e.store.Get(persist.Key([]byte("rec/refund/"), uint64(id)))
	if err != nil || !strings.Contains(string(v), fmt.Sprintf(`"amount":%d`, amount)) {
		e.t.Fatalf("refund record %s (%v), want one of %d", v, err, amount)
	}
	rows := 0
	if err := e.store.Scan(persist.Key([]byte("rec/orderlog/"), uint64(id)), func(_, v []byte) error {
		if strings.Contains(string(v), `"to":"`+pay.StatusPayBack+`"`) {
			rows++
		}
		return nil
	}); err != nil || rows != 1 {
		e.t.Fatalf("%d PAY_BACK rows in the pay order's log (%v), want 1", rows, err)
	}
	return v
}

// A ticket order PAID on a payment as the order (Paid ran; its pay order's
// PAYED write was lost and the pay order closed: IN_VALID, as in
// TestTicketPaidBeforeItsPayOrderClosed) whose query had reported another
// payment, not as the order: that one is left to an operator (logged), as a
// PAYED order's is, and forgotten. Before, its rec/paymismatch record was
// kept — applied at every reconciler run (409: the business took another
// payment) and warned about, for good. Nothing is refunded, the seats stay
// sold.
func TestQueriedMismatchOfATicketPaidBeforeItsPayOrderClosed(t *testing.T) {
	e, p := newQueriedEnv(t)
	prog, o, id := e.mockOrder(2)
	po, err := e.pay.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	p.pay(o.OrderID, po.Amount+1)
	e.clock.advance(2 * time.Minute) // due for a query, before the deadline
	e.reconcile(&p.queries, func() bool { return false })
	mismatch := persist.Key([]byte("rec/paymismatch/"), uint64(id))
	if has, err := e.store.Has(mismatch); err != nil || !has {
		t.Fatalf("the reported payment not remembered (%v)", err)
	}
	if err := e.svc.Paid(po); err != nil { // the pay centre's markBizPaid, up to its crash
		t.Fatal(err)
	}
	if err := e.pay.CloseBizOrder(id, "unpaid timeout"); err != nil {
		t.Fatal(err)
	}
	e.pay.Reconcile()
	e.payAndSeats(id, pay.StatusInvalid, StatusPaid, prog, 2, 0, 2)
	if has, err := e.store.Has(mismatch); err != nil || has {
		t.Fatalf("the reported payment of a paid ticket order still kept (%v)", err)
	}
	e.noRefund(id)
	if b := e.balance(7); b != 0 {
		t.Fatalf("credited %d", b)
	}
}
