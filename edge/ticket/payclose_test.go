package ticket

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/persist"
)

// Closing an unpaid order at the provider as well as here (mockpay's
// POST /close, as Alipay's trade.close): a buyer can no longer pay an order
// we closed, so no payment of it reaches the provider unseen.

// userPays is the buyer following pay order id's pay_url at the provider
// (its notifies all lost): the HTTP status and, when paid, the payment.
func (p *lostProvider) userPays(t *testing.T, e *env, id int64) (int, pay.Event) {
	t.Helper()
	po, err := e.pay.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(po.PayURL, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var ev pay.Event
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, &ev); err != nil {
			t.Fatalf("the provider's answer %q: %v", b, err)
		}
	}
	return resp.StatusCode, ev
}

// unasked reports whether pay order id is kept to be asked about after its
// close (rec/payunasked).
func (e *env) unasked(id int64) bool {
	e.t.Helper()
	has, err := e.store.Has(persist.Key([]byte("rec/payunasked/"), uint64(id)))
	if err != nil {
		e.t.Fatal(err)
	}
	return has
}

// until runs the pay centre's reconciler until done (10 s at most).
func (e *env) until(done func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !done() {
		if time.Now().After(deadline) {
			e.t.Fatal("the reconciler did not get there")
		}
		e.pay.Reconcile()
		time.Sleep(5 * time.Millisecond)
	}
}

// runs runs the pay centre's reconciler and the ticket sweep a few times.
func (e *env) runs() {
	for range 10 {
		e.svc.CloseExpired()
		e.pay.Reconcile()
	}
	e.pay.Close() // waits for the reconciler's workers
	e.reopen()
}

// A buyer who pays after we closed the order — at its deadline (the sweep)
// or by their own cancel — is refused by the provider: the sweep and the
// cancel closed the order there first (the sweep within its AskBudget),
// and nothing reaches the provider: no payment to sell, refund or lose, the
// pay order IN_VALID with nothing left to ask (no rec/payunasked), the
// seats free, no coins moved. Before, the order was closed here only: the
// provider took the payment (200), and once the reconciler's query after
// the close had said "not paid", nothing asked again — the money stayed at
// the provider, neither sold nor refunded.
func TestPaymentAfterTheCloseRefusedByTheProvider(t *testing.T) {
	e, p := newLostEnv(t)
	prog, _, swept := e.mockOrder(2)
	prog2 := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 4, 8)
	o2, err := e.svc.Place(8, PlaceReq{ProgramID: prog2, CategoryID: 1, Count: 1, ReqID: "c"})
	if err != nil {
		t.Fatal(err)
	}
	cancelled := mustID(t, o2.OrderID)
	if _, err := e.svc.Cancel(8, cancelled); err != nil {
		t.Fatal(err)
	}
	e.clock.advance(DefaultPayTimeout)
	if n := e.svc.CloseExpired(); n != 1 {
		t.Fatalf("the sweep closed %d orders, want 1", n)
	}
	e.payAndSeats(swept, pay.StatusInvalid, StatusCancelled, prog, 4, 0, 0)
	e.payAndSeats(cancelled, pay.StatusInvalid, StatusCancelled, prog2, 4, 0, 0)
	e.runs() // the reconciler asks what it has to (before: its queries said "not paid")
	for _, id := range []int64{swept, cancelled} {
		if st, ev := p.userPays(t, e, id); st != http.StatusConflict {
			t.Fatalf("order %d paid after its close: %d %+v, want 409 (closed at the provider)", id, st, ev)
		}
		if ev, paid := p.Paid(strconv.FormatInt(id, 10)); paid {
			t.Fatalf("the provider has a payment of closed order %d: %+v", id, ev)
		}
		if e.unasked(id) {
			t.Fatalf("order %d closed at the provider still kept to be asked about", id)
		}
	}
	e.runs()
	e.payAndSeats(swept, pay.StatusInvalid, StatusCancelled, prog, 4, 0, 0)
	e.payAndSeats(cancelled, pay.StatusInvalid, StatusCancelled, prog2, 4, 0, 0)
	e.noRefund(swept)
	e.noRefund(cancelled)
	for _, u := range []int64{7, 8} {
		if b := e.balance(u); b != 0 {
			t.Fatalf("user %d credited %d", u, b)
		}
	}
	e.audit()
}

// The sweep's close at the deadline answered "already paid" (a payment made
// just before it, its notifies lost): the order is sold once — PAID, its
// seats sold, the pay order PAYED, nothing refunded or credited — and the
// provider keeps the payment (a paid order is not closed). The notify's
// copies arriving at once, after more runs and after a restart change
// nothing.
func TestCloseAnsweredPaidSoldOnce(t *testing.T) {
	e, p := newLostEnv(t)
	prog, o, id := e.mockOrder(2)
	ev := p.pays(t, e, id)
	e.clock.advance(DefaultPayTimeout)
	if n := e.svc.CloseExpired(); n != 0 {
		t.Fatalf("the sweep closed %d orders of a paid one", n)
	}
	e.payAndSeats(id, pay.StatusPayed, StatusPaid, prog, 2, 0, 2)
	if got, paid := p.Paid(o.OrderID); !paid || got.EventID != ev.EventID {
		t.Fatalf("the provider's payment: %+v (paid %v), want %+v", got, paid, ev)
	}
	check := func(when string) {
		t.Helper()
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if st := e.notify(o.OrderID, ev.EventID, ev.Amount); st != pay.NotifyOK {
					t.Errorf("%s: a copy of the lost notify: %d", when, st)
				}
			}()
		}
		wg.Wait()
		e.runs()
		e.payAndSeats(id, pay.StatusPayed, StatusPaid, prog, 2, 0, 2)
		e.noRefund(id)
		if b := e.balance(7); b != 0 {
			t.Fatalf("%s: credited %d", when, b)
		}
		e.audit()
	}
	check("at once")
	e.reopen()
	check("after a restart")
}

// The same close answered with a payment of another amount: never sold;
// the order closes at its deadline and the payment is refunded once — the
// ticket order REFUNDED, its pay order PAY_BACK with one refund record of
// what was paid. Copies of its notify (409 each), more runs and a restart
// change nothing.
func TestCloseAnsweredPaidNotAsTheOrderRefundedOnce(t *testing.T) {
	e, p := newLostEnv(t)
	prog, o, id := e.mockOrder(2)
	po, err := e.pay.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	ev := p.Pay(o.OrderID, po.Amount+1, "", "")
	e.clock.advance(DefaultPayTimeout)
	if n := e.svc.CloseExpired(); n != 1 {
		t.Fatalf("the sweep closed %d orders, want 1", n)
	}
	e.payAndSeats(id, pay.StatusInvalid, StatusCancelled, prog, 4, 0, 0)
	e.reconcile(&p.queries, func() bool { cur, err := e.pay.Get(id); return err == nil && cur.Status == pay.StatusPayBack })
	e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
	rec := e.refunded(id, po.Amount+1)
	check := func(when string) {
		t.Helper()
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if st := e.notify(o.OrderID, ev.EventID, ev.Amount); st != pay.NotifyConflict {
					t.Errorf("%s: a copy of the lost notify: %d, want 409", when, st)
				}
			}()
		}
		wg.Wait()
		e.runs()
		e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
		if v := e.refunded(id, po.Amount+1); string(v) != string(rec) {
			t.Fatalf("%s: refund record rewritten: %s, first %s", when, v, rec)
		}
		if b := e.balance(7); b != 0 {
			t.Fatalf("%s: credited %d", when, b)
		}
		e.audit()
	}
	check("at once")
	e.reopen()
	check("after a restart")
	if e.unasked(id) {
		t.Fatal("the refunded order is still to be asked about")
	}
}

// The provider down at the sweep's close (503 to every close): both due
// orders close here all the same (CANCELLED, seats free, pay orders
// IN_VALID) and are kept to be closed at the provider later
// (rec/payunasked), across a restart. Meanwhile one buyer pays at the
// provider (it never got the close). Once it answers, the reconciler closes
// both there: the paid one answers its payment, refunded once (REFUNDED,
// PAY_BACK, one refund record); the other is closed for good — its buyer's
// later payment refused (409), nothing to refund. Before, the reconciler
// only queried: the unpaid one's "not paid" dropped it, and its buyer's
// later payment stayed at the provider.
func TestProviderDownAtTheCloseClosedThereLater(t *testing.T) {
	e, p := newLostEnv(t)
	prog, o, paid := e.mockOrder(2)
	prog2 := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 4, 8)
	o2, err := e.svc.Place(8, PlaceReq{ProgramID: prog2, CategoryID: 1, Count: 1, ReqID: "u"})
	if err != nil {
		t.Fatal(err)
	}
	unpaid := mustID(t, o2.OrderID)
	p.down.Store(true)
	e.clock.advance(DefaultPayTimeout)
	if n := e.svc.CloseExpired(); n != 2 {
		t.Fatalf("the sweep closed %d orders, want 2", n)
	}
	e.reopen() // the node restarts, the provider still down
	e.pay.Reconcile()
	for _, id := range []int64{paid, unpaid} {
		if !e.unasked(id) {
			t.Fatalf("order %d closed without the provider's word not kept to be closed there", id)
		}
	}
	e.payAndSeats(paid, pay.StatusInvalid, StatusCancelled, prog, 4, 0, 0)
	e.payAndSeats(unpaid, pay.StatusInvalid, StatusCancelled, prog2, 4, 0, 0)
	st, ev := p.userPays(t, e, paid)
	if st != http.StatusOK || ev.Status != "SUCCESS" {
		t.Fatalf("the buyer's payment during the outage: %d %+v", st, ev)
	}
	p.down.Store(false)
	e.until(func() bool { return !e.unasked(paid) && !e.unasked(unpaid) })
	e.payAndSeats(paid, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
	rec := e.refunded(paid, ev.Amount)
	if st, ev := p.userPays(t, e, unpaid); st != http.StatusConflict {
		t.Fatalf("the unpaid order paid after the provider closed it: %d %+v, want 409", st, ev)
	}
	check := func(when string) {
		t.Helper()
		if st := e.notify(o.OrderID, ev.EventID, ev.Amount); st != pay.NotifyOK {
			t.Fatalf("%s: the lost notify: %d", when, st)
		}
		e.runs()
		e.payAndSeats(paid, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
		e.payAndSeats(unpaid, pay.StatusInvalid, StatusCancelled, prog2, 4, 0, 0)
		if v := e.refunded(paid, ev.Amount); string(v) != string(rec) {
			t.Fatalf("%s: refund record rewritten: %s, first %s", when, v, rec)
		}
		e.noRefund(unpaid)
		for _, u := range []int64{7, 8} {
			if b := e.balance(u); b != 0 {
				t.Fatalf("%s: user %d credited %d", when, u, b)
			}
		}
		e.audit()
	}
	check("again")
	e.reopen()
	check("after a restart")
	if _, isPaid := p.Paid(o2.OrderID); isPaid {
		t.Fatal("the provider has a payment of the order it closed")
	}
}

// Buyers paying at the deadline while the sweep closes their orders at the
// provider (10 ms a close, the payments spread over 40 ms; the
// notifies delivered, each in three copies at once, through the pay
// centre's webhook): every order ends settled exactly once — paid at the
// provider and sold (PAID, its seats sold, the pay order PAYED, nothing
// refunded), or refused by the provider (409: closed there first) and
// closed (CANCELLED, seats free, the pay order IN_VALID, nothing left to
// ask). No payment is refunded: each was made before its order's close at
// the provider, which answered it. Seats and coins are conserved.
func TestPaymentsRacingTheCloseSettledOnce(t *testing.T) {
	c := &clock{}
	p := mockpay.New(mockpay.Config{Secret: testSecret, Duplicates: 2, Factor: 0.001, Now: c.now})
	h := p.Handler()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/close" {
			time.Sleep(10 * time.Millisecond) // a provider's round trip: the sweep's closes spread over the payments
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(p.Close)
	t.Cleanup(srv.Close)
	e := &env{t: t, dir: t.TempDir(), clock: c, provider: srv.URL}
	e.open()
	t.Cleanup(e.close)
	webhook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		st, msg := e.pay.Notify("mock", r.Header.Get(pay.SignatureHeader), body)
		w.WriteHeader(st)
		_, _ = io.WriteString(w, msg)
	}))
	t.Cleanup(webhook.Close)
	const n = 40
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 5, Cols: 8}}, 4, 8)
	ids := make([]int64, n)
	for i := range ids {
		o, err := e.svc.Place(int64(100+i), PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "r" + strconv.Itoa(i)})
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = mustID(t, o.OrderID)
	}
	e.clock.advance(DefaultPayTimeout)
	status := make([]int, n)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		e.svc.CloseExpired()
	}()
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * time.Millisecond) // some before their order's close, some after
			po, err := e.pay.Get(id)
			if err != nil {
				t.Error(err)
				return
			}
			u := srv.URL + "/pay?order_id=" + po.OrderID + "&amount=" + strconv.FormatInt(po.Amount, 10) +
				"&notify_url=" + url.QueryEscape(webhook.URL+"/mock")
			resp, err := http.Post(u, "", nil)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			status[i] = resp.StatusCode
		}()
	}
	wg.Wait()
	paid := 0
	for i, id := range ids {
		_, atProvider := p.Paid(strconv.FormatInt(id, 10))
		if (status[i] == http.StatusOK) != atProvider || (status[i] != http.StatusOK && status[i] != http.StatusConflict) {
			t.Fatalf("order %d: the buyer's payment answered %d, the provider has it: %v", id, status[i], atProvider)
		}
		if atProvider {
			paid++
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for p.Delivered.Load() < int64(paid) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d payments' notifies acknowledged", p.Delivered.Load(), paid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.runs()
	for i, id := range ids {
		po, err := e.pay.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		o := e.order(po.OrderID)
		switch {
		case status[i] == http.StatusOK && (po.Status != pay.StatusPayed || o.Status != StatusPaid):
			t.Fatalf("order %d paid at the provider: pay order %s, ticket order %s; want %s, %s", id, po.Status, o.Status, pay.StatusPayed, StatusPaid)
		case status[i] != http.StatusOK && (po.Status != pay.StatusInvalid || o.Status != StatusCancelled || e.unasked(id)):
			t.Fatalf("order %d refused by the provider: pay order %s, ticket order %s, to be asked %v; want %s, %s, false",
				id, po.Status, o.Status, e.unasked(id), pay.StatusInvalid, StatusCancelled)
		}
		e.noRefund(id)
	}
	if free, locked, sold := e.counts(prog); sold != paid || locked != 0 || free != n-paid {
		t.Fatalf("free %d locked %d sold %d, want %d 0 %d", free, locked, sold, n-paid, paid)
	}
	t.Logf("%d of %d buyers paid before the close, the others refused", paid, n)
	e.conservation()
	e.audit()
}
