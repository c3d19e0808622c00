package pay_test

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
)

// logBuffer is a log destination safe for the reconciler's workers.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A recharge closed without the provider's word (the provider down past two
// timeouts) is kept to be closed at the provider (rec/payunasked) — but not
// for ever: past Config.UnaskedRetention from its close, the provider still
// not answering, it is logged once for an operator (warn, with its order
// id), counted (liveedge_pay_unasked_dropped_total) and dropped; later runs
// neither ask about it nor log it again. Before the retention it is kept
// and asked about at every run. Before, such a record stayed for good, each
// run asking again, nothing telling anyone. Nothing is credited.
func TestUnaskedDroppedPastTheRetentionWithAWarning(t *testing.T) {
	clock, advance := testClock()
	var asks atomic.Int64
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer asks.Add(1)
		http.Error(w, "unavailable", http.StatusServiceUnavailable) // down for good
	}))
	defer provider.Close()
	const timeout, retention = 15 * time.Minute, 2 * time.Hour
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = st.Close() }()
	l, err := persist.NewLedger(st, clock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var logs logBuffer
	svc, err := pay.New(st, l, router.NewLocal("rec", router.LocalConfig{}), pay.Config{Node: "rec",
		Secrets: []string{reconcileSecret}, ProviderURL: provider.URL, OrderTimeout: timeout,
		ReconcileAfter: time.Minute, ReconcileEvery: time.Hour, Now: clock, UnaskedRetention: retention,
		Log: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := pay.ParseOrderID(o.OrderID)
	key := persist.Key([]byte("rec/payunasked/"), uint64(id))
	kept := func() bool {
		has, err := st.Has(key)
		if err != nil {
			t.Fatal(err)
		}
		return has
	}
	dropped := func() float64 {
		var m dto.Metric
		for _, c := range svc.Collectors() {
			if err := c.(prometheus.Metric).Write(&m); err == nil && m.Counter != nil {
				return m.GetCounter().GetValue()
			}
		}
		t.Fatal("no unasked-dropped counter")
		return 0
	}
	warnings := func() int { return strings.Count(logs.String(), "dropped from the provider queries") }
	// runs runs the reconciler until the provider was asked n more times
	// (a run asks about an order again only once its last ask is over).
	runs := func(n int64) {
		t.Helper()
		start := asks.Load()
		deadline := time.Now().Add(10 * time.Second)
		for asks.Load() < start+n {
			if time.Now().After(deadline) {
				t.Fatal("the reconciler did not ask the provider")
			}
			svc.Reconcile()
			time.Sleep(5 * time.Millisecond)
		}
	}
	advance(2*timeout + time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if cur, err := svc.Get(id); err == nil && cur.Status == pay.StatusInvalid {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the order past two timeouts without an answer not closed")
		}
		svc.Reconcile()
		time.Sleep(5 * time.Millisecond)
	}
	runs(3)
	if !kept() || warnings() != 0 || dropped() != 0 {
		t.Fatalf("just closed: kept %v, %d warnings, %v dropped; want kept, none", kept(), warnings(), dropped())
	}
	advance(retention - time.Minute)
	runs(3)
	if !kept() || warnings() != 0 || dropped() != 0 {
		t.Fatalf("within the retention: kept %v, %d warnings, %v dropped; want kept, none", kept(), warnings(), dropped())
	}
	advance(time.Minute)
	deadline = time.Now().Add(10 * time.Second)
	for kept() || dropped() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("past the retention: kept %v, %v dropped; want dropped", kept(), dropped())
		}
		svc.Reconcile()
		time.Sleep(5 * time.Millisecond)
	}
	if warnings() != 1 || !strings.Contains(logs.String(), "order="+o.OrderID) || !strings.Contains(logs.String(), "level=WARN") {
		t.Fatalf("want one warning naming order %s, got:\n%s", o.OrderID, logs.String())
	}
	before := asks.Load()
	for range 20 {
		svc.Reconcile()
		time.Sleep(5 * time.Millisecond)
	}
	if n := asks.Load() - before; n != 0 || warnings() != 1 || dropped() != 1 {
		t.Fatalf("after the drop: asked %d more times, %d warnings, %v dropped; want 0, 1, 1", n, warnings(), dropped())
	}
	if cur, err := svc.Get(id); err != nil || cur.Status != pay.StatusInvalid {
		t.Fatalf("the order after the drop: %+v %v, want %s", cur, err, pay.StatusInvalid)
	}
	if b, _ := l.Balance(7); b != 0 {
		t.Fatalf("credited %d", b)
	}
	persisttest.CheckConservation(t, l)
}

// During a rotation of the shared secret (the node holds the new one first,
// the provider still the old one) an order at its deadline is closed at the
// provider all the same: the close is signed with every secret the node
// holds, and a refused one is logged. Before, it was signed with the first
// only: refused (401), taken for "provider down" — the order closed only
// after a second timeout, without the provider's word, and its buyer could
// still pay it meanwhile.
func TestCloseAtTheProviderDuringASecretRotation(t *testing.T) {
	clock, advance := testClock()
	provider := mockpay.New(mockpay.Config{Secret: reconcileSecret, Lost: true, Now: clock})
	defer provider.Close()
	srv := httptest.NewServer(provider.Handler())
	defer srv.Close()
	const timeout = 15 * time.Minute
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = st.Close() }()
	l, err := persist.NewLedger(st, clock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	svc, err := pay.New(st, l, router.NewLocal("rot", router.LocalConfig{}), pay.Config{Node: "rot",
		Secrets: []string{"the-new-secret-0123456789abcdef-0123456789", reconcileSecret}, ProviderURL: srv.URL, OrderTimeout: timeout,
		ReconcileAfter: time.Minute, ReconcileEvery: time.Hour, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := pay.ParseOrderID(o.OrderID)
	advance(timeout + time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if cur, err := svc.Get(id); err == nil && cur.Status == pay.StatusInvalid {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the order past its deadline not closed at the provider (its close refused?)")
		}
		svc.Reconcile()
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := provider.TryPay(o.OrderID, o.Amount, "", ""); err != mockpay.ErrOrderClosed {
		t.Fatalf("the buyer's payment after the close: %v, want refused (closed at the provider)", err)
	}
	if has, _ := st.Has(persist.Key([]byte("rec/payunasked/"), uint64(id))); has {
		t.Fatal("closed at the provider, yet kept to be asked about")
	}
	persisttest.CheckConservation(t, l)
}
