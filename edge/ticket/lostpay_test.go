package ticket

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/persist"
)

// Payments made just before the deadline whose notifies are all lost: the
// money is at the provider, and only the pay centre's query can tell.

// lostProvider is the mock provider with every notify lost (mockpay.Lost),
// signing with the env's clock; down makes it answer no query (503);
// queries counts the queries it was sent.
type lostProvider struct {
	*mockpay.Provider
	srv     *httptest.Server
	down    atomic.Bool
	queries atomic.Int64
}

// newLostEnv is newEnv whose pay centre asks a lostProvider.
func newLostEnv(t *testing.T) (*env, *lostProvider) {
	t.Helper()
	c := &clock{}
	p := &lostProvider{Provider: mockpay.New(mockpay.Config{Secret: testSecret, Lost: true, Now: c.now})}
	h := p.Handler()
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/query") {
			defer p.queries.Add(1)
			if p.down.Load() {
				http.Error(w, "unavailable", http.StatusServiceUnavailable)
				return
			}
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(p.Close)
	t.Cleanup(p.srv.Close)
	e := &env{t: t, dir: t.TempDir(), clock: c, provider: p.srv.URL}
	e.open()
	t.Cleanup(e.close)
	return e, p
}

// pays pays ticket order id's pay order in full at the provider (its
// notifies all lost) and returns the provider's event.
func (p *lostProvider) pays(t *testing.T, e *env, id int64) pay.Event {
	t.Helper()
	po, err := e.pay.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	return p.Pay(po.OrderID, po.Amount, "", "")
}

// noRefund checks that pay order id has no refund record.
func (e *env) noRefund(id int64) {
	e.t.Helper()
	if v, err := e.store.Get(persist.Key([]byte("rec/refund/"), uint64(id))); err == nil {
		e.t.Fatalf("refund record %s of a payment that bought its seats", v)
	}
}

// A payment made just before the deadline, its notifies all lost: the sweep
// asks the provider before it closes the order (pay.AskBeforeClose), and
// the payment is taken as its notify would have been — the order PAID, its
// seats sold, the pay order PAYED, nothing refunded or credited. Before, the
// sweep closed the order (CANCELLED, seats freed) and its pay order
// (IN_VALID), which nothing queried again: the buyer's money stayed at the
// provider, neither sold nor refunded. More sweeps and reconciler runs, the
// lost notify arriving at last and a restart change nothing.
func TestLostPaymentBeforeTheDeadlineSold(t *testing.T) {
	e, p := newLostEnv(t)
	prog, o, id := e.mockOrder(2)
	ev := p.pays(t, e, id)
	e.clock.advance(DefaultPayTimeout)
	if n := e.svc.CloseExpired(); n != 0 {
		t.Fatalf("the sweep closed %d orders of a paid one", n)
	}
	e.payAndSeats(id, pay.StatusPayed, StatusPaid, prog, 2, 0, 2)
	check := func(when string) {
		t.Helper()
		e.svc.CloseExpired()
		e.pay.Reconcile()
		if st := e.notify(o.OrderID, ev.EventID, ev.Amount); st != pay.NotifyOK {
			t.Fatalf("%s: the lost notify: %d", when, st)
		}
		e.payAndSeats(id, pay.StatusPayed, StatusPaid, prog, 2, 0, 2)
		e.noRefund(id)
		if b := e.balance(7); b != 0 {
			t.Fatalf("%s: credited %d", when, b)
		}
		e.audit()
	}
	check("again")
	e.reopen()
	check("after a restart")
}

// The same payment while the provider answers no query at the sweep: the
// order closes at its deadline all the same (CANCELLED, its seats free) and
// its pay order IN_VALID — kept to be queried after its close
// (rec/payunasked, in the closing batch), across a restart. Once the
// provider answers, the payment is refunded as a late payment on a closed
// order is: the ticket order REFUNDED, the pay order PAY_BACK with one
// refund record of what was paid, nothing credited. Before, the closed pay
// order was never queried: the money stayed at the provider. More runs, the
// lost notify arriving at last and another restart change nothing.
func TestLostPaymentFoundAfterTheSweepRefundedOnce(t *testing.T) {
	e, p := newLostEnv(t)
	prog, o, id := e.mockOrder(2)
	ev := p.pays(t, e, id)
	p.down.Store(true)
	e.clock.advance(DefaultPayTimeout)
	if n := e.svc.CloseExpired(); n != 1 {
		t.Fatalf("the sweep closed %d orders, want 1", n)
	}
	e.payAndSeats(id, pay.StatusInvalid, StatusCancelled, prog, 4, 0, 0)
	e.reopen() // the node restarts, the provider still down
	e.pay.Reconcile()
	e.payAndSeats(id, pay.StatusInvalid, StatusCancelled, prog, 4, 0, 0)
	p.down.Store(false)
	e.reconcile(&p.queries, func() bool { cur, err := e.pay.Get(id); return err == nil && cur.Status == pay.StatusPayBack })
	e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
	rec := e.refunded(id, ev.Amount)
	check := func(when string) {
		t.Helper()
		e.svc.CloseExpired()
		e.pay.Reconcile()
		if st := e.notify(o.OrderID, ev.EventID, ev.Amount); st != pay.NotifyOK {
			t.Fatalf("%s: the lost notify: %d", when, st)
		}
		e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
		if v := e.refunded(id, ev.Amount); string(v) != string(rec) {
			t.Fatalf("%s: refund record rewritten: %s, first %s", when, v, rec)
		}
		if b := e.balance(7); b != 0 {
			t.Fatalf("%s: credited %d", when, b)
		}
		e.audit()
	}
	check("again")
	e.reopen()
	check("after a restart")
	if has, err := e.store.Has(persist.Key([]byte("rec/payunasked/"), uint64(id))); err != nil || has {
		t.Fatalf("the closed order is still to be queried (%v)", err)
	}
}

// A buyer who paid and then cancelled (the notifies lost): the pay order
// closed by the cancel is queried after its close too, and the payment
// refunded once.
func TestLostPaymentBeforeACancelRefundedOnce(t *testing.T) {
	e, p := newLostEnv(t)
	prog, _, id := e.mockOrder(1)
	ev := p.pays(t, e, id)
	if _, err := e.svc.Cancel(7, id); err != nil {
		t.Fatal(err)
	}
	e.reconcile(&p.queries, func() bool { cur, err := e.pay.Get(id); return err == nil && cur.Status == pay.StatusPayBack })
	e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
	e.refunded(id, ev.Amount)
	e.audit()
}
