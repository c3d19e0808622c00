package pay

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// The wallet's late "your credit landed" pushes PAYED and the credit only
// while the order is still PAYED: after an admin refund came first (it
// pushed its own PAY_BACK), a late PAYED and an older balance would be
// stale.
func TestSettledCreditPushedOnlyWhileTheOrderIsPaid(t *testing.T) {
	st, led := persisttest.OpenLedger(t)
	rt := router.NewLocal("a", router.LocalConfig{})
	buyer := &routertest.Recorder{SessionID: 1, User: 7}
	rt.Register(buyer)
	const secret = "settle-internal-secret-0123456789abcdef"
	s, err := New(st, led, rt, Config{Node: "a", Secrets: []string{secret}, ReconcileEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	paid := func(req string) Order {
		t.Helper()
		o, err := s.CreateOrder(7, CreateReq{ProductID: 1, Channel: "mock", ReqID: req})
		if err != nil {
			t.Fatal(err)
		}
		body, _ := proto.Marshal(Event{EventID: "ev-" + req, OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS", PaidAt: time.Now().UnixMilli()})
		if code, msg := s.Notify("mock", Sign(secret, time.Now(), body), body); code != NotifyOK {
			t.Fatalf("notify: %d %s", code, msg)
		}
		return o
	}
	settled := func(o Order) persist.Settled {
		return persist.Settled{User: 7, ReqID: "pay:" + o.OrderID, Ran: true,
			Postings: []persist.Posting{{User: 7, Delta: o.Coins, Reason: persist.ReasonRecharge}},
			Result:   persist.Result{TradeIDs: []int64{1}, Balances: []int64{o.Coins}, Replayed: true}}
	}

	refunded := paid("r1")
	id, _ := ParseOrderID(refunded.OrderID)
	if _, err := s.Refund(id); err != nil {
		t.Fatal(err)
	}
	// The admin refund records the money owed back, as every PAY_BACK
	// does (before: no rec/refund row for it).
	var rec struct {
		OrderID string `json:"order_id"`
		Amount  int64  `json:"amount"`
	}
	if v, err := st.Get(RefundRecordKey(id)); err != nil || proto.Unmarshal(v, &rec) != nil ||
		rec.OrderID != refunded.OrderID || rec.Amount != refunded.Amount {
		t.Fatalf("refund record %+v (%v), want %s's %d", rec, err, refunded.OrderID, refunded.Amount)
	}
	before := len(buyer.Received())
	s.onSettled(settled(refunded))
	if n := len(buyer.Received()) - before; n != 0 {
		t.Fatalf("%d pushes for a refunded order, want none", n)
	}

	o := paid("r2")
	before = len(buyer.Received())
	s.onSettled(settled(o))
	if n := len(buyer.Received()) - before; n != 2 {
		t.Fatalf("%d pushes for a paid order, want 2 (credit and PAYED)", n)
	}
	persisttest.CheckConservation(t, led)
}
