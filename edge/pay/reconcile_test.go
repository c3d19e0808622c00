package pay_test

import (
	"errors"
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
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
)

const reconcileSecret = "reconcile-test-secret-0123456789abcdef"

// A provider that cannot tell (down, failing) is not a "not paid": an expired
// order it was asked to close stays open for a second timeout (its payment,
// if any, is still credited when the notify comes); the provider's verified
// "closed" closes it at once.
func TestReconcileClosesOnlyOnAnAnswer(t *testing.T) {
	clock, advance := testClock()

	var failing atomic.Bool
	var mu sync.Mutex
	queries := map[string]int{} // by order
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("order_id")
		defer func() { mu.Lock(); queries[id]++; mu.Unlock() }()
		if failing.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		answer(w, clock, unpaid(r))
	}))
	defer provider.Close()
	queried := func(o pay.Order) int { mu.Lock(); defer mu.Unlock(); return queries[o.OrderID] }

	const timeout = 15 * time.Minute
	svc, _, l := reconcileService(t, provider.URL, timeout, clock)

	// reconcile runs the reconciler until its query of order o is over: o
	// was closed, or it was queried a second time (a run queries an order
	// again only once its previous query is done). Queries of other orders
	// do not count: a run also queries the orders it closed without an
	// answer (rec/payunasked).
	var closedFn func(pay.Order) func() bool
	reconcile := func(o pay.Order) {
		closed := closedFn(o)
		start := queried(o)
		deadline := time.Now().Add(10 * time.Second)
		for !closed() && queried(o) < start+2 {
			if time.Now().After(deadline) {
				t.Fatal("reconciler did not query the provider")
			}
			svc.Reconcile()
			time.Sleep(5 * time.Millisecond)
		}
	}
	var status func(pay.Order) string
	closedFn = func(o pay.Order) func() bool {
		return func() bool { return status(o) == pay.StatusInvalid }
	}
	status = func(o pay.Order) string {
		id, _ := pay.ParseOrderID(o.OrderID)
		cur, err := svc.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		return cur.Status
	}

	failing.Store(true)
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	advance(timeout + time.Second)
	reconcile(o)
	if s := status(o); s != pay.StatusPaying {
		t.Fatalf("expired order closed (%s) on a failed query, want it open until the provider answers", s)
	}
	advance(timeout)
	reconcile(o)
	if s := status(o); s != pay.StatusInvalid {
		t.Fatalf("order past two timeouts without an answer: %s, want %s", s, pay.StatusInvalid)
	}

	failing.Store(false)
	o2, err := svc.CreateOrder(8, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r2"})
	if err != nil {
		t.Fatal(err)
	}
	advance(timeout + time.Second)
	reconcile(o2)
	if s := status(o2); s != pay.StatusInvalid {
		t.Fatalf("expired order the provider says is unpaid: %s, want %s", s, pay.StatusInvalid)
	}
	persisttest.CheckConservation(t, l)
}

// An order the provider reports paid, but not as the order (another
// amount), is never credited; past two timeouts it is closed and the
// payment recorded as refunded — it stayed PAYING for ever, queried every
// run and holding one of the user's open-order places.
func TestReconcileRefundsAPaymentNotAsTheOrder(t *testing.T) {
	clock, advance := testClock()
	const timeout = 15 * time.Minute
	sp := newShortPayment(t, timeout, clock)
	svc, st, l, o, id, status := sp.svc, sp.st, sp.l, sp.o, sp.id, sp.status
	run := func() {
		for range 20 {
			svc.Reconcile()
			time.Sleep(10 * time.Millisecond)
		}
	}
	advance(timeout + time.Second)
	run()
	if s := status(); s != pay.StatusPaying {
		t.Fatalf("after one timeout: %s, want still %s", s, pay.StatusPaying)
	}
	advance(timeout)
	deadline := time.Now().Add(10 * time.Second)
	for status() != pay.StatusPayBack {
		if time.Now().After(deadline) {
			t.Fatalf("after two timeouts: %s, want %s", status(), pay.StatusPayBack)
		}
		run()
	}
	if b, _ := l.Balance(7); b != 0 {
		t.Fatalf("credited %d for a payment not as the order", b)
	}
	if v, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(id))); err != nil || !strings.Contains(string(v), fmt.Sprint(o.Amount-1)) {
		t.Fatalf("refund record %s (%v), want one of %d", v, err, o.Amount-1)
	}
	// The provider's notify of that payment, twice at once, then again
	// after a restart: a duplicate each time — 409 as any payment not as
	// its order, nothing credited, the order stays refunded.
	body, _ := proto.Marshal(pay.Event{EventID: "ev-short", OrderID: o.OrderID, Status: "SUCCESS", Amount: o.Amount - 1, PaidAt: clock().UnixMilli()})
	notifyTwice := func(svc *pay.Service) {
		t.Helper()
		var wg sync.WaitGroup
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if code, msg := svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body); code != pay.NotifyConflict {
					t.Errorf("redelivered notify: %d %s", code, msg)
				}
			}()
		}
		wg.Wait()
	}
	notifyTwice(svc)
	svc.Close()
	svc, err := pay.New(st, l, router.NewLocal("rec", router.LocalConfig{}), pay.Config{Node: "rec",
		Secrets: []string{reconcileSecret}, ProviderURL: sp.url, OrderTimeout: timeout,
		ReconcileAfter: time.Minute, ReconcileEvery: time.Hour, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	notifyTwice(svc)
	svc.Reconcile()
	if cur, err := svc.Get(id); err != nil || cur.Status != pay.StatusPayBack {
		t.Fatalf("after the restart: %+v %v, want %s", cur, err, pay.StatusPayBack)
	}
	if b, _ := l.Balance(7); b != 0 {
		t.Fatalf("credited %d after the redeliveries", b)
	}
	persisttest.CheckConservation(t, l)
}

// A payment not as its order that the query reported, on an order then
// closed otherwise than by its refund — here by the reconciler itself, past
// two timeouts with the provider no longer answering (a ticket order's
// sweep: edge/ticket TestQueriedMismatchRefundedOnceTheSweepClosed) — is
// refunded at the next run, once. Before, the closed order was never
// queried again: the payment was neither credited nor refunded.
func TestReconcileRefundsAReportedMismatchOnceClosed(t *testing.T) {
	clock, advance := testClock()
	const timeout = 15 * time.Minute
	sp := newShortPayment(t, timeout, clock)
	svc, st, l, o, id, status := sp.svc, sp.st, sp.l, sp.o, sp.id, sp.status
	failing, queries := &sp.failing, &sp.queries
	// reconcile runs the reconciler until the order is closed or its
	// query of the order is over (queried a second time).
	reconcile := func() {
		start := queries.Load()
		deadline := time.Now().Add(10 * time.Second)
		for pay.OpenStatus(status()) && queries.Load() < start+2 {
			if time.Now().After(deadline) {
				t.Fatal("reconciler did not query the provider")
			}
			svc.Reconcile()
			time.Sleep(5 * time.Millisecond)
		}
	}
	advance(timeout + time.Second)
	reconcile() // reported paid, one cent short: 409
	if s := status(); s != pay.StatusPaying {
		t.Fatalf("after one timeout: %s, want still %s", s, pay.StatusPaying)
	}
	failing.Store(true)
	advance(timeout)
	reconcile() // no answer past two timeouts: closed
	svc.Reconcile()
	if s := status(); s != pay.StatusPayBack {
		t.Fatalf("closed order whose payment the query reported: %s, want %s", s, pay.StatusPayBack)
	}
	refund, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(id)))
	if err != nil || !strings.Contains(string(refund), fmt.Sprintf(`"amount":%d`, o.Amount-1)) {
		t.Fatalf("refund record %s (%v), want one of %d", refund, err, o.Amount-1)
	}
	body, _ := proto.Marshal(pay.Event{EventID: "ev-short", OrderID: o.OrderID, Status: "SUCCESS", Amount: o.Amount - 1, PaidAt: clock().UnixMilli()})
	if code, msg := svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body); code != pay.NotifyConflict {
		t.Fatalf("the lost notify: %d %s, want 409", code, msg)
	}
	svc.Reconcile()
	if v, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(id))); err != nil || string(v) != string(refund) {
		t.Fatalf("refund record %s (%v), want it unchanged: %s", v, err, refund)
	}
	if s := status(); s != pay.StatusPayBack {
		t.Fatalf("at the end: %s, want %s", s, pay.StatusPayBack)
	}
	if err := st.Scan([]byte("rec/paymismatch/"), func(k, _ []byte) error {
		return fmt.Errorf("the report %x kept after its refund", k)
	}); err != nil {
		t.Fatal(err)
	}
	if b, _ := l.Balance(7); b != 0 {
		t.Fatalf("credited %d for a payment not as the order", b)
	}
	persisttest.CheckConservation(t, l)
}

// A recharge paid at the provider whose notifies are all lost, while the
// provider answers no query: past two timeouts the reconciler closes the
// order without the provider's word (IN_VALID), and keeps it to be queried
// after its close (rec/payunasked). Once the provider answers, the payment
// is refunded as a late one (PAY_BACK, one refund record of what was paid),
// never credited. Before, a closed order was never queried again: the money
// stayed at the provider. The lost notify arriving at last changes nothing.
func TestReconcileQueriesAnOrderItClosedWithoutAnAnswer(t *testing.T) {
	clock, advance := testClock()
	prov := mockpay.New(mockpay.Config{Secret: reconcileSecret, Lost: true, Now: clock})
	defer prov.Close()
	var failing atomic.Bool
	var queries atomic.Int64
	h := prov.Handler()
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer queries.Add(1)
		if failing.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		h.ServeHTTP(w, r)
	}))
	defer provider.Close()
	const timeout = 15 * time.Minute
	svc, st, l := reconcileService(t, provider.URL, timeout, clock)
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := pay.ParseOrderID(o.OrderID)
	ev := prov.Pay(o.OrderID, o.Amount, "", "")
	status := func(want string) func() bool {
		return func() bool { cur, err := svc.Get(id); return err == nil && cur.Status == want }
	}
	reconcile := func(done func() bool) {
		start := queries.Load()
		deadline := time.Now().Add(10 * time.Second)
		for !done() && queries.Load() < start+2 {
			if time.Now().After(deadline) {
				t.Fatal("reconciler did not query the provider")
			}
			svc.Reconcile()
			time.Sleep(5 * time.Millisecond)
		}
	}
	failing.Store(true)
	advance(2*timeout + time.Second)
	reconcile(status(pay.StatusInvalid))
	if !status(pay.StatusInvalid)() {
		t.Fatal("an order past two timeouts without an answer not closed")
	}
	failing.Store(false)
	reconcile(status(pay.StatusPayBack))
	if !status(pay.StatusPayBack)() {
		t.Fatal("the payment of the closed order not refunded")
	}
	refund, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(id)))
	if err != nil || !strings.Contains(string(refund), fmt.Sprintf(`"amount":%d`, o.Amount)) {
		t.Fatalf("refund record %s (%v), want one of %d", refund, err, o.Amount)
	}
	body, _ := proto.Marshal(ev)
	if code, msg := svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body); code != pay.NotifyOK {
		t.Fatalf("the lost notify: %d %s", code, msg)
	}
	svc.Reconcile()
	if v, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(id))); err != nil || string(v) != string(refund) || !status(pay.StatusPayBack)() {
		t.Fatalf("refund record %s (%v), want it unchanged: %s", v, err, refund)
	}
	// Forgotten once settled (by the query's worker, after the refund).
	deadline := time.Now().Add(10 * time.Second)
	for {
		has, err := st.Has(persist.Key([]byte("rec/payunasked/"), uint64(id)))
		if err == nil && !has {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the refunded order is still to be queried (%v)", err)
		}
		svc.Reconcile()
		time.Sleep(5 * time.Millisecond)
	}
	if b, _ := l.Balance(7); b != 0 {
		t.Fatalf("credited %d for a payment after the close", b)
	}
	persisttest.CheckConservation(t, l)
}

// reconcileService is a pay centre on a fresh Pebble ledger that asks
// provider (signed with reconcileSecret) about its orders, with clock.
func reconcileService(t *testing.T, provider string, timeout time.Duration, clock func() time.Time) (*pay.Service, *persist.Store, *persist.Ledger) {
	t.Helper()
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	l, err := persist.NewLedger(st, clock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return openReconcileService(t, st, l, provider, timeout, clock), st, l
}

// openReconcileService is reconcileService's pay service on st and l.
func openReconcileService(t *testing.T, st *persist.Store, l *persist.Ledger, provider string, timeout time.Duration, clock func() time.Time) *pay.Service {
	t.Helper()
	svc, err := pay.New(st, l, router.NewLocal("rec", router.LocalConfig{}), pay.Config{Node: "rec",
		Secrets: []string{reconcileSecret}, ProviderURL: provider, OrderTimeout: timeout,
		ReconcileAfter: time.Minute, ReconcileEvery: time.Hour, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	return svc
}

// restartReconcileService closes svc and opens its store and ledger again
// (a restart of the node's pay service).
func restartReconcileService(t *testing.T, svc *pay.Service, st *persist.Store, l *persist.Ledger, provider string, timeout time.Duration, clock func() time.Time) *pay.Service {
	t.Helper()
	svc.Close()
	return openReconcileService(t, st, l, provider, timeout, clock)
}

// unpaidProvider is a provider that has no payment of any order (unpaid).
func unpaidProvider(t *testing.T, clock func() time.Time) *httptest.Server {
	t.Helper()
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		answer(w, clock, unpaid(r))
	}))
	t.Cleanup(provider.Close)
	return provider
}

// One reconciler run queries every order due, however many there are: its
// ReconcileWorkers bound how many queries run at once, not how many a run
// makes. (A run holding the open-orders lock while it started workers that
// needed that lock to begin capped a run at ReconcileWorkers orders: 8 of 40
// expired orders closed per run, one run every 10 s by default.)
func TestReconcileRunReachesEveryDueOrder(t *testing.T) {
	clock, advance := testClock()
	var queries atomic.Int64
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		queries.Add(1)
		time.Sleep(5 * time.Millisecond) // a provider's round trip
		answer(w, clock, unpaid(r))
	}))
	defer provider.Close()
	const timeout = 15 * time.Minute
	svc, _, l := reconcileService(t, provider.URL, timeout, clock)
	const orders = 5 * pay.DefaultReconcileWorkers
	ids := make([]int64, orders)
	for i := range ids {
		o, err := svc.CreateOrder(int64(100+i), pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: fmt.Sprint("r", i)})
		if err != nil {
			t.Fatal(err)
		}
		ids[i], _ = pay.ParseOrderID(o.OrderID)
	}
	advance(timeout + time.Second)
	svc.Reconcile() // one run
	deadline := time.Now().Add(10 * time.Second)
	for _, id := range ids {
		for {
			o, err := svc.Get(id)
			if err != nil {
				t.Fatal(err)
			}
			if o.Status == pay.StatusInvalid {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("order %d still %s after one run (%d of %d orders queried)", id, o.Status, queries.Load(), orders)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if q := queries.Load(); q != orders {
		t.Fatalf("%d queries for %d orders in one run", q, orders)
	}
	persisttest.CheckConservation(t, l)
}

// testClock is a settable clock for the reconciler's tests: clock reads it,
// advance moves it on.
func testClock() (clock func() time.Time, advance func(time.Duration)) {
	var mu sync.Mutex
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	return func() time.Time { mu.Lock(); defer mu.Unlock(); return now },
		func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
}

// unpaid is the provider's answer about an order it has no payment of: to
// a query WAITING, to a close (POST /close?order_id=) CLOSED.
func unpaid(r *http.Request) pay.Event {
	ev := pay.Event{OrderID: r.URL.Query().Get("order_id"), Status: "WAITING"}
	if r.URL.Path == "/close" {
		ev.Status = mockpay.StatusClosed
	}
	return ev
}

// answer writes ev as the provider's signed answer to a query or a close.
func answer(w http.ResponseWriter, clock func() time.Time, ev pay.Event) {
	b, _ := proto.Marshal(ev)
	w.Header().Set(pay.SignatureHeader, pay.Sign(reconcileSecret, clock(), b))
	_, _ = w.Write(b)
}

// shortPayment is a recharge order whose provider's verified query reports
// it paid one cent short (503 while failing is set; queries counts the
// queries answered), with its service.
type shortPayment struct {
	svc     *pay.Service
	st      *persist.Store
	l       *persist.Ledger
	o       pay.Order
	id      int64
	url     string // the provider's
	failing atomic.Bool
	queries atomic.Int64
	t       *testing.T
}

func newShortPayment(t *testing.T, timeout time.Duration, clock func() time.Time) *shortPayment {
	sp := &shortPayment{t: t}
	var amount atomic.Int64
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer sp.queries.Add(1)
		if sp.failing.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		answer(w, clock, pay.Event{EventID: "ev-short", OrderID: r.URL.Query().Get("order_id"), Status: "SUCCESS",
			Amount: amount.Load(), PaidAt: clock().UnixMilli()})
	}))
	t.Cleanup(provider.Close)
	sp.url = provider.URL
	sp.svc, sp.st, sp.l = reconcileService(t, provider.URL, timeout, clock)
	var err error
	if sp.o, err = sp.svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r1"}); err != nil {
		t.Fatal(err)
	}
	sp.id, _ = pay.ParseOrderID(sp.o.OrderID)
	amount.Store(sp.o.Amount - 1) // paid one cent short
	return sp
}

// status is the order's status now.
func (sp *shortPayment) status() string {
	cur, err := sp.svc.Get(sp.id)
	if err != nil {
		sp.t.Fatal(err)
	}
	return cur.Status
}

// A provider that reuses an event id — a declined attempt (FAILED) while
// the order was open, the same id reporting the payment (SUCCESS) after the
// order closed unpaid — has the payment refunded as a late one: the id's
// record is of another status, not a duplicate of this notify. Before, it
// was answered as a duplicate: the payment neither credited nor refunded.
func TestEventIDReusedForASuccessAfterAFailureIsRefunded(t *testing.T) {
	clock, advance := testClock()
	provider := unpaidProvider(t, clock)
	const timeout = 15 * time.Minute
	svc, st, l := reconcileService(t, provider.URL, timeout, clock)
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, o.OrderID)
	notify := func(status string) int {
		body, _ := proto.Marshal(pay.Event{EventID: "ev-reused", OrderID: o.OrderID, Amount: o.Amount, Status: status, PaidAt: clock().UnixMilli()})
		code, _ := svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body)
		return code
	}
	status := func() string {
		cur, err := svc.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		return cur.Status
	}
	if code := notify("FAILED"); code != pay.NotifyOK || status() != pay.StatusPaying {
		t.Fatalf("declined attempt: %d, order %s", code, status())
	}
	advance(timeout + time.Second)
	for deadline := time.Now().Add(10 * time.Second); status() != pay.StatusInvalid; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("expired order not closed: %s", status())
		}
		svc.Reconcile()
	}
	// The notify and its redeliveries at once: one refund.
	var wg sync.WaitGroup
	codes := make([]int, 4)
	for i := range codes {
		wg.Add(1)
		go func() { defer wg.Done(); codes[i] = notify("SUCCESS") }()
	}
	wg.Wait()
	for i, code := range codes {
		if code != pay.NotifyOK {
			t.Fatalf("the payment under the reused id (%d): %d", i, code)
		}
	}
	if s := status(); s != pay.StatusPayBack {
		t.Fatalf("order %s after the payment under the reused id, want %s (refunded)", s, pay.StatusPayBack)
	}
	if v, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(id))); err != nil || !strings.Contains(string(v), fmt.Sprintf(`"amount":%d`, o.Amount)) {
		t.Fatalf("refund record %s (%v), want one of %d", v, err, o.Amount)
	}
	if bal, err := l.Balance(7); err != nil || bal != 0 {
		t.Fatalf("balance %d %v: a payment after the close is refunded, never credited", bal, err)
	}
	persisttest.CheckConservation(t, l)
}

// A provider reusing an event id: the late payment of a closed order under
// the id of another order's payment is refunded once, however many copies
// arrive at once (it was answered as that payment's duplicate — neither
// credited nor refunded, and the provider stopped retrying); after a
// restart the redeliveries of both change nothing.
func TestLatePaymentUnderAnotherOrdersEventIDIsRefunded(t *testing.T) {
	clock, advance := testClock()
	provider := unpaidProvider(t, clock)
	const timeout = 15 * time.Minute
	svc, st, l := reconcileService(t, provider.URL, timeout, clock)
	a, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := svc.CreateOrder(8, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "b"})
	if err != nil {
		t.Fatal(err)
	}
	deliver := func(o pay.Order) error {
		body, _ := proto.Marshal(pay.Event{EventID: "ev-shared", OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS", PaidAt: clock().UnixMilli()})
		if code, msg := svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body); code != pay.NotifyOK {
			return fmt.Errorf("notify of %s: %d %s", o.OrderID, code, msg)
		}
		return nil
	}
	notify := func(o pay.Order) {
		t.Helper()
		if err := deliver(o); err != nil {
			t.Fatal(err)
		}
	}
	status := func(o pay.Order) string {
		cur, err := svc.Get(mustID(t, o.OrderID))
		if err != nil {
			t.Fatal(err)
		}
		return cur.Status
	}
	notify(a)
	advance(timeout + time.Second)
	for deadline := time.Now().Add(10 * time.Second); status(b) != pay.StatusInvalid; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("b not closed past its timeout: %s", status(b))
		}
		svc.Reconcile()
	}
	var wg sync.WaitGroup // paid after its close, under a's event id: delivered 8 times at once
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := deliver(b); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if s := status(b); s != pay.StatusPayBack {
		t.Fatalf("b paid after its close under a reused event id: %s, want %s (refunded)", s, pay.StatusPayBack)
	}
	refund, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(mustID(t, b.OrderID))))
	if err != nil {
		t.Fatalf("no refund record of b: %v", err)
	}
	// A restart, then redeliveries of both: nothing changes.
	svc = restartReconcileService(t, svc, st, l, provider.URL, timeout, clock)
	notify(b)
	notify(a)
	if v, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(mustID(t, b.OrderID)))); err != nil || string(v) != string(refund) {
		t.Fatalf("b's refund record changed by a redelivery: %s (%v)", v, err)
	}
	if status(a) != pay.StatusPayed || status(b) != pay.StatusPayBack {
		t.Fatalf("after the redeliveries: a %s, b %s", status(a), status(b))
	}
	// Each order keeps the record of its own payment (b's no longer
	// overwrote a's: the audit of a's payment was lost).
	for o, before := range map[pay.Order]string{a: pay.StatusPaying, b: pay.StatusInvalid} {
		v, err := st.Get(pay.EventRecordKey(mustID(t, o.OrderID), "ev-shared"))
		var rec struct {
			Event        pay.Event `json:"event"`
			StatusBefore string    `json:"order_status_before"`
		}
		if err != nil || proto.Unmarshal(v, &rec) != nil || rec.Event.OrderID != o.OrderID || rec.StatusBefore != before {
			t.Fatalf("order %s's event record %s (%v), want its own payment applied to a %s order", o.OrderID, v, err, before)
		}
	}
	for user, want := range map[int64]int64{7: a.Coins, 8: 0} {
		if bal, err := l.Balance(user); err != nil || bal != want {
			t.Fatalf("user %d balance %d (%v), want %d", user, bal, err, want)
		}
	}
	persisttest.CheckConservation(t, l)
}

// An event recorded before events were kept per order (rec/payevent/<event
// id>, an earlier version's data directory, no longer read): its
// redeliveries change nothing — the settled order answers them by its
// status — the order credited once and not refunded.
func TestEventRecordedUnderTheEarlierKeyStillADuplicate(t *testing.T) {
	clock, _ := testClock()
	provider := unpaidProvider(t, clock)
	svc, st, l := reconcileService(t, provider.URL, 15*time.Minute, clock)
	a, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := proto.Marshal(pay.Event{EventID: "ev-old", OrderID: a.OrderID, Amount: a.Amount, Status: "SUCCESS", PaidAt: clock().UnixMilli()})
	notify := func() {
		t.Helper()
		if code, msg := svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body); code != pay.NotifyOK || msg != "success" {
			t.Fatalf("notify: %d %s", code, msg)
		}
	}
	notify()
	// The record moved where the earlier version kept it.
	key := pay.EventRecordKey(mustID(t, a.OrderID), "ev-old")
	v, err := st.Get(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Delete(key); err != nil {
		t.Fatal(err)
	}
	if err := st.Put([]byte("rec/payevent/ev-old"), v); err != nil {
		t.Fatal(err)
	}
	notify()
	if o, err := svc.Get(mustID(t, a.OrderID)); err != nil || o.Status != pay.StatusPayed {
		t.Fatalf("order after the redelivery: %+v (%v), want %s", o, err, pay.StatusPayed)
	}
	if _, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(mustID(t, a.OrderID)))); !errors.Is(err, persist.ErrNotFound) {
		t.Fatalf("a refund record for a redelivery: %v", err)
	}
	if bal, err := l.Balance(7); err != nil || bal != a.Coins {
		t.Fatalf("balance %d (%v), want %d", bal, err, a.Coins)
	}
	persisttest.CheckConservation(t, l)
	// A start drops such records (nothing reads them), and a redelivery
	// after it is still a duplicate.
	svc = restartReconcileService(t, svc, st, l, provider.URL, 15*time.Minute, clock)
	if has, err := st.Has([]byte("rec/payevent/ev-old")); err != nil || has {
		t.Fatalf("the earlier version's event record kept past a start: %v %v", has, err)
	}
	notify()
	if bal, err := l.Balance(7); err != nil || bal != a.Coins {
		t.Fatalf("balance %d (%v), want %d", bal, err, a.Coins)
	}
	if _, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(mustID(t, a.OrderID)))); !errors.Is(err, persist.ErrNotFound) {
		t.Fatalf("a refund record for a redelivery: %v", err)
	}
}

// A second payment of an order already paid — the provider's transaction id
// (txn_id) differs from the one that paid it — is recorded for refund once
// per transaction (its redeliveries, concurrent and after a restart, and
// another event of the same transaction change nothing); the order stays
// PAYED, credited once. The first payment re-sent under a new event id (the
// same txn_id), and a SUCCESS without txn_id, are recorded only. Before,
// every one of them was recorded only: the second payment was neither
// credited nor refunded.
func TestSecondPaymentOfAPaidOrderIsRefundedOnce(t *testing.T) {
	clock, _ := testClock()
	provider := unpaidProvider(t, clock)
	svc, st, l := reconcileService(t, provider.URL, 15*time.Minute, clock)
	a, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, a.OrderID)
	deliver := func(event, txn string) error {
		body, _ := proto.Marshal(pay.Event{EventID: event, TxnID: pay.TxnID(txn), OrderID: a.OrderID, Amount: a.Amount, Status: "SUCCESS", PaidAt: clock().UnixMilli()})
		if code, msg := svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body); code != pay.NotifyOK || msg != "success" {
			return fmt.Errorf("notify %s/%s: %d %s", event, txn, code, msg)
		}
		return nil
	}
	notify := func(event, txn string) {
		t.Helper()
		if err := deliver(event, txn); err != nil {
			t.Fatal(err)
		}
	}
	notify("ev-1", "txn-1")
	notify("ev-1b", "txn-1") // the same payment under another event id
	notify("ev-nt", "")      // no txn_id: cannot be told apart, recorded only
	var wg sync.WaitGroup    // the second payment, delivered 8 times at once
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := deliver("ev-2", "txn-2"); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	notify("ev-2b", "txn-2") // another event of the second payment
	refund, err := st.Get(pay.SecondPaymentKey(id, "txn-2"))
	if err != nil {
		t.Fatalf("no refund record of the second payment: %v", err)
	}
	var rec struct {
		Amount int64  `json:"amount"`
		Event  string `json:"event_id"`
		Txn    string `json:"txn_id"`
	}
	if err := proto.Unmarshal(refund, &rec); err != nil || rec.Amount != a.Amount || rec.Event != "ev-2" || rec.Txn != "txn-2" {
		t.Fatalf("second payment's refund record %s (%v)", refund, err)
	}
	for _, txn := range []string{"txn-1", ""} {
		if has, err := st.Has(pay.SecondPaymentKey(id, txn)); err != nil || has {
			t.Fatalf("refund record under txn %q: %v %v", txn, has, err)
		}
	}
	// A restart, then redeliveries of everything: nothing changes.
	svc = restartReconcileService(t, svc, st, l, provider.URL, 15*time.Minute, clock)
	for _, e := range [][2]string{{"ev-1", "txn-1"}, {"ev-2", "txn-2"}, {"ev-2c", "txn-2"}, {"ev-1c", "txn-1"}} {
		notify(e[0], e[1])
	}
	if v, err := st.Get(pay.SecondPaymentKey(id, "txn-2")); err != nil || string(v) != string(refund) {
		t.Fatalf("the second payment's refund record changed by a redelivery: %s (%v)", v, err)
	}
	if n := secondPaymentRecords(t, st); n != 1 {
		t.Fatalf("%d second-payment refund records, want 1", n)
	}
	if has, err := st.Has(persist.Key([]byte("rec/refund/"), uint64(id))); err != nil || has {
		t.Fatalf("the order's own payment refunded: %v %v", has, err)
	}
	cur, err := svc.Get(id)
	if err != nil || cur.Status != pay.StatusPayed || cur.TxnID != "txn-1" {
		t.Fatalf("order %+v (%v), want PAYED by txn-1", cur, err)
	}
	if bal, err := l.Balance(7); err != nil || bal != a.Coins {
		t.Fatalf("balance %d (%v), want %d: credited once", bal, err, a.Coins)
	}
	persisttest.CheckConservation(t, l)
}

// The second payments a notify cannot make plain: one not as the order
// (another amount) on a paid order — recorded for refund of what it reports
// and answered 409, its redeliveries 409 with nothing more; one of an order
// refunded already (a late payment, then another); one the provider's
// query reported not as the order before another transaction paid it (the
// reconciler records it when it drops the report). And txn_id in other
// forms: a number is its text, an object or an over-long string is none —
// the notify still applied (its payment credited), never refused.
func TestSecondPaymentsNotAsTheOrderRefundedOnce(t *testing.T) {
	clock, advance := testClock()
	// The order the provider's query reports paid: one cent short under
	// txn-short, then (paid) as the order under txn-c — neither answer with
	// an event_id (both applied as "query:<order>").
	var shortOf atomic.Value
	shortOf.Store("")
	var paid atomic.Bool
	var amounts sync.Map // order id → amount
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("order_id")
		if a, ok := amounts.Load(id); ok && id == shortOf.Load().(string) && r.URL.Path != "/close" {
			ev := pay.Event{TxnID: "txn-short", OrderID: id, Status: "SUCCESS", Amount: a.(int64) - 1, PaidAt: clock().UnixMilli()}
			if paid.Load() {
				ev.TxnID, ev.Amount = "txn-c", a.(int64)
			}
			answer(w, clock, ev)
			return
		}
		answer(w, clock, unpaid(r))
	}))
	defer provider.Close()
	const timeout = 15 * time.Minute
	svc, st, l := reconcileService(t, provider.URL, timeout, clock)
	order := func(user int64, req string) (pay.Order, int64) {
		t.Helper()
		o, err := svc.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: req})
		if err != nil {
			t.Fatal(err)
		}
		amounts.Store(o.OrderID, o.Amount)
		return o, mustID(t, o.OrderID)
	}
	notifyRaw := func(body []byte) (int, string) {
		return svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body)
	}
	notify := func(o pay.Order, event, txn string, amount int64, want int) {
		t.Helper()
		body, _ := proto.Marshal(pay.Event{EventID: event, TxnID: pay.TxnID(txn), OrderID: o.OrderID, Amount: amount, Status: "SUCCESS", PaidAt: clock().UnixMilli()})
		if code, msg := notifyRaw(body); code != want {
			t.Fatalf("notify %s/%s of %d: %d %s, want %d", event, txn, amount, code, msg, want)
		}
	}
	refundOf := func(id int64, txn string) int64 {
		t.Helper()
		v, err := st.Get(pay.SecondPaymentKey(id, txn))
		if errors.Is(err, persist.ErrNotFound) {
			return 0
		}
		var rec struct {
			Amount int64 `json:"amount"`
		}
		if err != nil || proto.Unmarshal(v, &rec) != nil {
			t.Fatalf("second payment record %s: %v", v, err)
		}
		return rec.Amount
	}
	status := func(id int64) pay.Order {
		t.Helper()
		o, err := svc.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		return o
	}

	// A paid order, then another transaction of another amount.
	a, aid := order(7, "a")
	notify(a, "ev-a", "txn-a", a.Amount, pay.NotifyOK)
	for range 3 {
		notify(a, "ev-a2", "txn-a2", a.Amount+5, pay.NotifyConflict)
	}
	if got := refundOf(aid, "txn-a2"); got != a.Amount+5 {
		t.Fatalf("second payment not as the order: refund record of %d, want %d", got, a.Amount+5)
	}

	// Refunded as paid after its close, then paid again.
	b, bid := order(8, "b")
	advance(timeout + time.Second)
	for deadline := time.Now().Add(10 * time.Second); status(bid).Status != pay.StatusInvalid; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("b not closed past its timeout: %s", status(bid).Status)
		}
		svc.Reconcile()
	}
	notify(b, "ev-b1", "txn-b1", b.Amount, pay.NotifyOK)
	notify(b, "ev-b2", "txn-b2", b.Amount, pay.NotifyOK)
	if o := status(bid); o.Status != pay.StatusPayBack || o.TxnID != "txn-b1" || refundOf(bid, "txn-b2") != b.Amount || refundOf(bid, "txn-b1") != 0 {
		t.Fatalf("b: %s by %q, second payment refund %d", o.Status, o.TxnID, refundOf(bid, "txn-b2"))
	}

	// Reported short by the query while open, then paid by another
	// transaction: the reconciler records the short one for refund.
	c, cid := order(9, "c")
	shortOf.Store(c.OrderID)
	advance(2 * time.Minute)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if has, _ := st.Has(persist.Key([]byte("rec/paymismatch/"), uint64(cid))); has {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the short payment the query reported was not remembered")
		}
		svc.Reconcile()
	}
	paid.Store(true) // its notify lost: the next query finds it, under the same "query:" event id
	for deadline := time.Now().Add(10 * time.Second); refundOf(cid, "txn-short") == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the reported short payment of an order paid by another transaction not recorded for refund")
		}
		svc.Reconcile()
	}
	if got := refundOf(cid, "txn-short"); got != c.Amount-1 {
		t.Fatalf("reported short payment: refund record of %d, want %d", got, c.Amount-1)
	}
	if has, _ := st.Has(persist.Key([]byte("rec/paymismatch/"), uint64(cid))); has {
		t.Fatal("the report kept after its refund was recorded")
	}
	if o := status(cid); o.Status != pay.StatusPayed || o.TxnID != "txn-c" {
		t.Fatalf("c: %s by %q, want PAYED by txn-c", o.Status, o.TxnID)
	}

	// txn_id in other forms.
	d, did := order(10, "d")
	if code, msg := notifyRaw([]byte(fmt.Sprintf(`{"event_id":"ev-d","txn_id":12345,"order_id":%q,"amount":%d,"status":"SUCCESS"}`, d.OrderID, d.Amount))); code != pay.NotifyOK {
		t.Fatalf("numeric txn_id: %d %s", code, msg)
	}
	e, eid := order(11, "e")
	if code, msg := notifyRaw([]byte(fmt.Sprintf(`{"event_id":"ev-e","txn_id":{"id":1},"order_id":%q,"amount":%d,"status":"SUCCESS"}`, e.OrderID, e.Amount))); code != pay.NotifyOK {
		t.Fatalf("txn_id object: %d %s", code, msg)
	}
	f, fid := order(12, "f")
	notify(f, "ev-f", strings.Repeat("x", pay.MaxTxnIDLen+1), f.Amount, pay.NotifyOK)
	for id, want := range map[int64]string{did: "12345", eid: "", fid: ""} {
		if o := status(id); o.Status != pay.StatusPayed || o.TxnID != want {
			t.Fatalf("order %d: %s by %q, want PAYED by %q", id, o.Status, o.TxnID, want)
		}
	}

	if n := secondPaymentRecords(t, st); n != 3 {
		t.Fatalf("%d second-payment refund records, want 3", n)
	}
	for user, want := range map[int64]int64{7: a.Coins, 8: 0, 9: c.Coins, 10: d.Coins, 11: e.Coins, 12: f.Coins} {
		if bal, err := l.Balance(user); err != nil || bal != want {
			t.Fatalf("user %d balance %d (%v), want %d", user, bal, err, want)
		}
	}
	persisttest.CheckConservation(t, l)
}

// A payment the query reported not as the order, whose order another
// transaction then paid by notify: recorded for refund by the reconciler
// under its own event id (free: its record written then), and not again
// when the provider's notify of that payment came first (its record and
// refund already there: nothing more written).
func TestReportedSecondPaymentRecordedOnceWhicheverComesFirst(t *testing.T) {
	clock, advance := testClock()
	var reports sync.Map // order id → the payment the query reports (short, txn "short-<order>")
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ev, ok := reports.Load(r.URL.Query().Get("order_id")); ok && r.URL.Path != "/close" {
			answer(w, clock, ev.(pay.Event))
			return
		}
		answer(w, clock, unpaid(r))
	}))
	t.Cleanup(provider.Close)
	svc, st, l := reconcileService(t, provider.URL, 15*time.Minute, clock)
	type order struct {
		o     pay.Order
		id    int64
		short pay.Event
	}
	var orders []order
	for user := int64(7); user <= 8; user++ {
		o, err := svc.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r"})
		if err != nil {
			t.Fatal(err)
		}
		short := pay.Event{EventID: "ev-short-" + o.OrderID, TxnID: pay.TxnID("short-" + o.OrderID), OrderID: o.OrderID,
			Status: "SUCCESS", Amount: o.Amount - 1, PaidAt: clock().UnixMilli()}
		reports.Store(o.OrderID, short)
		orders = append(orders, order{o, mustID(t, o.OrderID), short})
	}
	advance(2 * time.Minute)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		a, _ := st.Has(persist.Key([]byte("rec/paymismatch/"), uint64(orders[0].id)))
		b, _ := st.Has(persist.Key([]byte("rec/paymismatch/"), uint64(orders[1].id)))
		if a && b {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the short payments the query reported were not remembered")
		}
		svc.Reconcile()
	}
	notify := func(ev pay.Event, want int) {
		t.Helper()
		body, _ := proto.Marshal(ev)
		if code, msg := svc.Notify("mock", pay.Sign(reconcileSecret, clock(), body), body); code != want {
			t.Fatalf("notify %s: %d %s, want %d", ev.EventID, code, msg, want)
		}
	}
	for _, o := range orders {
		notify(pay.Event{EventID: "ev-" + o.o.OrderID, TxnID: pay.TxnID("paid-" + o.o.OrderID), OrderID: o.o.OrderID,
			Status: "SUCCESS", Amount: o.o.Amount, PaidAt: clock().UnixMilli()}, pay.NotifyOK)
	}
	// The second order's short payment notified before the reconciler runs.
	notify(orders[1].short, pay.NotifyConflict)
	before, err := st.Get(pay.SecondPaymentKey(orders[1].id, string(orders[1].short.TxnID)))
	if err != nil {
		t.Fatalf("the notified short payment not recorded for refund: %v", err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		a, _ := st.Has(persist.Key([]byte("rec/paymismatch/"), uint64(orders[0].id)))
		b, _ := st.Has(persist.Key([]byte("rec/paymismatch/"), uint64(orders[1].id)))
		if !a && !b {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the reports were not dropped")
		}
		svc.Reconcile()
	}
	for _, o := range orders {
		v, err := st.Get(pay.SecondPaymentKey(o.id, string(o.short.TxnID)))
		var rec struct {
			Amount int64  `json:"amount"`
			Event  string `json:"event_id"`
		}
		if err != nil || proto.Unmarshal(v, &rec) != nil || rec.Amount != o.o.Amount-1 || rec.Event != o.short.EventID {
			t.Fatalf("order %s: second payment's refund record %s (%v)", o.o.OrderID, v, err)
		}
		if has, err := st.Has(pay.EventRecordKey(o.id, o.short.EventID)); err != nil || !has {
			t.Fatalf("order %s: no record of the short payment's event: %v", o.o.OrderID, err)
		}
	}
	if after, err := st.Get(pay.SecondPaymentKey(orders[1].id, string(orders[1].short.TxnID))); err != nil || string(after) != string(before) {
		t.Fatalf("the notified short payment's refund record rewritten by the reconciler: %s (%v)", after, err)
	}
	if n := secondPaymentRecords(t, st); n != 2 {
		t.Fatalf("%d second-payment refund records, want 2", n)
	}
	for i, o := range orders {
		if bal, err := l.Balance(int64(7 + i)); err != nil || bal != o.o.Coins {
			t.Fatalf("user %d balance %d (%v), want %d (credited once)", 7+i, bal, err, o.o.Coins)
		}
	}
	persisttest.CheckConservation(t, l)
}

// secondPaymentRecords counts the second-payment refund records in st.
func secondPaymentRecords(t *testing.T, st *persist.Store) int {
	t.Helper()
	n := 0
	if err := st.Scan([]byte("rec/refundsecond/"), func(k, v []byte) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}
