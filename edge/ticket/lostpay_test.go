package ticket

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/persist"
)

// Payments made just before the deadline whose notifies are all lost: the
// money is at the provider, and only the pay centre's query can tell.

// lostProvider is the mock provider with every notify lost (mockpay.Lost),
// signing with the env's clock; down makes it answer no query or close
// (503), slow answer each after that long; queries counts the queries and
// closes it was sent, asked those of each order.
type lostProvider struct {
	*mockpay.Provider
	srv     *httptest.Server
	down    atomic.Bool
	slow    atomic.Int64 // time.Duration
	queries atomic.Int64

	mu       sync.Mutex
	asked    map[string]int // order id → queries
	answered time.Time      // the last query's answer
}

// newLostEnv is newEnv whose pay centre asks a lostProvider.
func newLostEnv(t *testing.T) (*env, *lostProvider) {
	t.Helper()
	return newLostEnvWith(t, Config{})
}

// newLostEnvWith is newLostEnv with the ticket service's cfg.
func newLostEnvWith(t *testing.T, cfg Config) (*env, *lostProvider) {
	t.Helper()
	c := &clock{}
	p := &lostProvider{Provider: mockpay.New(mockpay.Config{Secret: testSecret, Lost: true, Now: c.now}), asked: map[string]int{}}
	h := p.Handler()
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/query" || r.URL.Path == "/close" {
			defer p.queries.Add(1)
			id := r.URL.Query().Get("order_id")
			p.mu.Lock()
			p.asked[id]++
			p.mu.Unlock()
			time.Sleep(time.Duration(p.slow.Load()))
			defer func() {
				p.mu.Lock()
				p.answered = time.Now()
				p.mu.Unlock()
			}()
			if p.down.Load() {
				http.Error(w, "unavailable", http.StatusServiceUnavailable)
				return
			}
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(p.Close)
	t.Cleanup(p.srv.Close)
	e := &env{t: t, dir: t.TempDir(), clock: c, cfg: cfg, provider: p.srv.URL}
	e.open()
	t.Cleanup(e.close)
	return e, p
}

// queried returns the queries of each order so far, and when the last one
// was answered.
func (p *lostProvider) queried() (map[string]int, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := make(map[string]int, len(p.asked))
	for id, n := range p.asked {
		m[id] = n
	}
	return m, p.answered
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

// A buyer who paid and then cancelled (the notifies lost): the cancel's
// close of the pay order at the provider answers the payment (a provider
// not answering: the reconciler's close after it), refunded once.
func TestLostPaymentBeforeACancelRefundedOnce(t *testing.T) {
	e, p := newLostEnv(t)
	prog, _, id := e.mockOrder(1)
	ev := p.pays(t, e, id)
	got, err := e.svc.Cancel(7, id)
	if err != nil {
		t.Fatal(err)
	}
	if now, err := e.svc.Get(7, id); err != nil || got.Status != now.Status {
		t.Fatalf("the cancel answered %s, the order is %s (%v) right after", got.Status, now.Status, err)
	}
	e.reconcile(&p.queries, func() bool { cur, err := e.pay.Get(id); return err == nil && cur.Status == pay.StatusPayBack })
	e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
	// The cancel retried (its answer lost): the order as it is, REFUNDED —
	// as a first cancel may answer it — not 40002; nothing moves again.
	again, err := e.svc.Cancel(7, id)
	if err != nil || again.Status != StatusRefunded {
		t.Fatalf("a retried cancel of a REFUNDED order: %+v %v", again, err)
	}
	e.payAndSeats(id, pay.StatusPayBack, StatusRefunded, prog, 4, 0, 0)
	e.refunded(id, ev.Amount)
	e.audit()
}

// A slow provider that still answers (each close 100 ms, "closed") holds a
// sweep about its AskBudget, not orders/closeWorkers × its latency: past
// the budget the sweep's other due orders close without asking, every one
// CANCELLED and its seats free, and the pay centre closes those at the
// provider after their close (rec/payunasked) — a payment found then is
// refunded once (TestLostPaymentFoundAfterTheSweepRefundedOnce). Before, the sweep asked
// about every order (the shortcut took only an unanswered query): 256
// orders took 16 rounds of 100 ms, 10,000 at 2 s an answer 21 min, their
// seats locked meanwhile.
func TestSweepAsksTheProviderWithinItsBudget(t *testing.T) {
	const (
		n       = 256
		latency = 100 * time.Millisecond
		budget  = 250 * time.Millisecond
	)
	e, p := newLostEnvWith(t, Config{AskBudget: budget})
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 16, Cols: 16}}, 4, 8)
	orders := make([]Order, n)
	for i := range orders {
		o, err := e.svc.Place(int64(100+i), PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "r" + strconv.Itoa(i)})
		if err != nil {
			t.Fatal(err)
		}
		orders[i] = o
	}
	p.slow.Store(int64(latency))
	e.clock.advance(DefaultPayTimeout)
	start := time.Now()
	closed := e.svc.CloseExpired()
	took := time.Since(start)
	asked, answered := p.queried()
	asking := answered.Sub(start)
	t.Logf("the sweep closed %d of %d orders in %v, %d of them asked about, the last answer after %v",
		closed, n, took.Round(time.Millisecond), len(asked), asking.Round(time.Millisecond))
	// A worker asks only before the budget ends, each query takes latency:
	// at most ⌈budget/latency⌉ each, the last answer within budget +
	// latency (and a second for a loaded machine; -race's closes alone take
	// seconds there, with or without a provider). Asking about every order
	// takes n/closeWorkers × latency = 1.6 s.
	if most := closeWorkers * int((budget+latency-1)/latency); len(asked) > most || asking > budget+latency+time.Second {
		t.Fatalf("the sweep asked about %d of %d orders (at most %d), the last answered after %v: a budget of %v not kept",
			len(asked), n, most, asking, budget)
	}
	if closed != n {
		t.Fatalf("the sweep closed %d of %d orders", closed, n)
	}
	var unasked []Order
	for _, o := range orders {
		id := mustID(t, o.OrderID)
		if got := e.order(o.OrderID); got.Status != StatusCancelled {
			t.Fatalf("order %s is %s, want %s", o.OrderID, got.Status, StatusCancelled)
		}
		if po, _ := e.pay.Get(id); po.Status != pay.StatusInvalid {
			t.Fatalf("pay order %s is %s, want %s", o.OrderID, po.Status, pay.StatusInvalid)
		}
		if asked[o.OrderID] == 0 {
			if has, err := e.store.Has(persist.Key([]byte("rec/payunasked/"), uint64(id))); err != nil || !has {
				t.Fatalf("order %s closed without asking is not kept to be queried (%v)", o.OrderID, err)
			}
			unasked = append(unasked, o)
		}
	}
	if free, locked, sold := e.counts(prog); free != n || locked != 0 || sold != 0 {
		t.Fatalf("free %d locked %d sold %d, want %d 0 0", free, locked, sold, n)
	}
	e.conservation()
	// The reconciler closes each order closed without asking at the
	// provider, and forgets it on the provider's "closed".
	p.slow.Store(0)
	deadline := time.Now().Add(20 * time.Second)
	for left := len(unasked); left > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d orders closed without asking not queried after their close", left, len(unasked))
		}
		e.pay.Reconcile()
		time.Sleep(5 * time.Millisecond)
		now, _ := p.queried()
		left = 0
		for _, o := range unasked {
			has, err := e.store.Has(persist.Key([]byte("rec/payunasked/"), uint64(mustID(t, o.OrderID))))
			if err != nil || has || now[o.OrderID] == 0 {
				left++
			}
		}
	}
	for _, o := range unasked {
		if got := e.order(o.OrderID); got.Status != StatusCancelled {
			t.Fatalf("order %s is %s after its query, want %s", o.OrderID, got.Status, StatusCancelled)
		}
	}
	if free, locked, sold := e.counts(prog); free != n || locked != 0 || sold != 0 {
		t.Fatalf("free %d locked %d sold %d, want %d 0 0", free, locked, sold, n)
	}
	e.conservation()
	e.audit()
}
