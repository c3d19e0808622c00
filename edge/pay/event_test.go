package pay_test

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
)

// Events are applied once per order: a redelivery of a paid order's event,
// or of its failure, changes nothing; an order's second event (another id)
// after it closed changes nothing either. Since an open order's events are
// not looked up (the order's state is the duplicate check), a provider that
// reuses an event id for another open order has that order credited too.
// Conservation: the buyer's balance is exactly the paid orders' coins.
func TestEventsAppliedOncePerOrder(t *testing.T) {
	svc, _, l := eventService(t)
	order := func(req string) pay.Order {
		o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: req})
		if err != nil {
			t.Fatal(err)
		}
		return o
	}
	notify := func(ev, status string, o pay.Order) int {
		body, _ := proto.Marshal(pay.Event{EventID: ev, OrderID: o.OrderID, Amount: o.Amount, Status: status, PaidAt: time.Now().UnixMilli()})
		code, _ := svc.Notify("mock", pay.Sign(eventSecret, time.Now(), body), body)
		return code
	}
	status := func(o pay.Order) string {
		got, err := svc.Get(mustID(t, o.OrderID))
		if err != nil {
			t.Fatal(err)
		}
		return got.Status
	}
	a, b, c := order("a"), order("b"), order("c")
	for i, step := range []struct {
		ev, status string
		o          pay.Order
		want       string
	}{
		{"ev-a", "SUCCESS", a, pay.StatusPayed},
		{"ev-a", "SUCCESS", a, pay.StatusPayed},  // redelivery
		{"ev-a2", "SUCCESS", a, pay.StatusPayed}, // a second payment event of a paid order: recorded, no credit
		{"ev-c", "FAILED", c, pay.StatusPaying},  // a declined attempt: recorded, the order stays open
		{"ev-c", "FAILED", c, pay.StatusPaying},
		{"ev-c2", "SUCCESS", c, pay.StatusPayed}, // the user pays again: credited (SPEC §4: act on success only)
		{"ev-a", "SUCCESS", b, pay.StatusPayed},  // ev-a reused for another, open order
		{"ev-a", "SUCCESS", b, pay.StatusPayed},
	} {
		if code := notify(step.ev, step.status, step.o); code != pay.NotifyOK {
			t.Fatalf("step %d: notify %d", i, code)
		}
		if got := status(step.o); got != step.want {
			t.Fatalf("step %d: order %s, want %s", i, got, step.want)
		}
	}
	if bal, err := l.Balance(7); err != nil || bal != a.Coins+b.Coins+c.Coins {
		t.Fatalf("balance %d (%v), want %d: each paid order credited once", bal, err, a.Coins+b.Coins+c.Coins)
	}
}

func mustID(t *testing.T, s string) int64 {
	t.Helper()
	id, ok := pay.ParseOrderID(s)
	if !ok {
		t.Fatalf("order id %q", s)
	}
	return id
}

// A declined attempt (FAILED) whose amount is not the order's — a provider
// reporting 0 for a decline, say — is recorded and answered 200 like any
// declined attempt, its redelivery too; the order stays open and the
// user's payment that follows is credited once. Before, it was answered
// 409 and never recorded: the provider retried it for its whole schedule.
func TestDeclinedAttemptOfAnotherAmountRecorded(t *testing.T) {
	svc, st, l := eventService(t)
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "d"})
	if err != nil {
		t.Fatal(err)
	}
	notify := func(ev, status string, amount int64) int {
		body, _ := proto.Marshal(pay.Event{EventID: ev, OrderID: o.OrderID, Amount: amount, Status: status, PaidAt: time.Now().UnixMilli()})
		code, _ := svc.Notify("mock", pay.Sign(eventSecret, time.Now(), body), body)
		return code
	}
	id := mustID(t, o.OrderID)
	for i := range 2 {
		if code := notify("ev-declined", "FAILED", 0); code != pay.NotifyOK {
			t.Fatalf("delivery %d of a declined attempt of 0: %d, want 200", i+1, code)
		}
	}
	if _, err := st.Get(pay.EventRecordKey(id, "ev-declined")); err != nil {
		t.Fatalf("the declined attempt not recorded: %v", err)
	}
	if got, _ := svc.Get(id); got.Status != pay.StatusPaying && got.Status != pay.StatusWaitingPay {
		t.Fatalf("order %s after a declined attempt, want it open", got.Status)
	}
	if code := notify("ev-paid", "SUCCESS", o.Amount); code != pay.NotifyOK {
		t.Fatalf("the payment: %d", code)
	}
	if bal, err := l.Balance(7); err != nil || bal != o.Coins {
		t.Fatalf("balance %d (%v), want %d", bal, err, o.Coins)
	}
}

// eventSecret signs eventService's notifies.
const eventSecret = "event-test-secret-0123456789abcdef"

// eventService is a pay service on a fresh single-node ledger, its store
// and ledger; notifies are signed with eventSecret.
func eventService(t *testing.T) (*pay.Service, *persist.Store, *persist.Ledger) {
	t.Helper()
	st, l := persisttest.OpenLedger(t)
	svc, err := pay.New(st, l, router.NewLocal("a", router.LocalConfig{}), pay.Config{Node: "a", Secrets: []string{eventSecret}, ReconcileEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	return svc, st, l
}
