package pay_test

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
)

const reconcileSecret = "reconcile-test-secret-0123456789abcdef"

// A provider that cannot tell (down, failing) is not a "not paid": an expired
// order it was asked about stays open for a second timeout (its payment, if
// any, is still credited when the notify comes); a verified "not paid"
// closes it at once.
func TestReconcileClosesOnlyOnAnAnswer(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }

	var failing atomic.Bool
	var queries atomic.Int64
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer queries.Add(1)
		if failing.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		b, _ := proto.Marshal(pay.Event{OrderID: r.URL.Query().Get("order_id"), Status: "WAITING"})
		w.Header().Set(pay.SignatureHeader, pay.Sign(reconcileSecret, clock(), b))
		_, _ = w.Write(b)
	}))
	defer provider.Close()

	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l, err := persist.NewLedger(st, clock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	const timeout = 15 * time.Minute
	svc, err := pay.New(st, l, router.NewLocal("rec", router.LocalConfig{}), pay.Config{Node: "rec",
		Secrets: []string{reconcileSecret}, ProviderURL: provider.URL, OrderTimeout: timeout,
		ReconcileAfter: time.Minute, ReconcileEvery: time.Hour, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()

	// reconcile runs the reconciler until its query of the order is over:
	// the order was closed, or it was queried a second time (a run queries
	// an order again only once its previous query is done).
	reconcile := func(closed func() bool) {
		start := queries.Load()
		deadline := time.Now().Add(10 * time.Second)
		for !closed() && queries.Load() < start+2 {
			if time.Now().After(deadline) {
				t.Fatal("reconciler did not query the provider")
			}
			svc.Reconcile()
			time.Sleep(5 * time.Millisecond)
		}
	}
	var status func(pay.Order) string
	closedFn := func(o pay.Order) func() bool {
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
	reconcile(closedFn(o))
	if s := status(o); s != pay.StatusPaying {
		t.Fatalf("expired order closed (%s) on a failed query, want it open until the provider answers", s)
	}
	advance(timeout)
	reconcile(closedFn(o))
	if s := status(o); s != pay.StatusInvalid {
		t.Fatalf("order past two timeouts without an answer: %s, want %s", s, pay.StatusInvalid)
	}

	failing.Store(false)
	o2, err := svc.CreateOrder(8, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r2"})
	if err != nil {
		t.Fatal(err)
	}
	advance(timeout + time.Second)
	reconcile(closedFn(o2))
	if s := status(o2); s != pay.StatusInvalid {
		t.Fatalf("expired order the provider says is unpaid: %s, want %s", s, pay.StatusInvalid)
	}
	persisttest.CheckConservation(t, l)
}
