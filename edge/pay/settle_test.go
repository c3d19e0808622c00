package pay_test

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// A payment whose credit the shared wallet answered "in doubt" (its script
// ran, the reply was lost: the provider is told to retry) gets its pushes —
// the credit (5570) and the order's PAYED (5580) — when the wallet's watcher
// settles it, and only then: the provider's redelivery finds the event
// recorded by the settled op and pushes nothing (before, nothing ever
// did). Conservation: credited once.
func TestPaymentInDoubtPushedWhenTheWalletSettlesIt(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	st, w := persisttest.OpenSharedWallet(t, px.Addr, persist.SharedConfig{Node: "a", CallTimeout: time.Second})
	// Load the apply script (else the lost reply is its NOSCRIPT: it did
	// not run).
	if _, err := w.Apply(persist.Op{User: 1, ReqID: "warm", Postings: []persist.Posting{{User: 1, Delta: 1, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	rt := router.NewLocal("a", router.LocalConfig{})
	buyer := &routertest.Recorder{SessionID: 1, User: 7}
	rt.Register(buyer)
	const secret = "settle-test-secret-0123456789abcdef"
	svc, err := pay.New(st, w, rt, pay.Config{Node: "a", Secrets: []string{secret}, ReconcileEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := proto.Marshal(pay.Event{EventID: "ev1", OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS", PaidAt: time.Now().UnixMilli()})
	notify := func() int {
		code, _ := svc.Notify("mock", pay.Sign(secret, time.Now(), body), body)
		return code
	}
	pushes := func(biz string) int {
		n := 0
		for _, r := range buyer.Received() {
			if strings.Contains(string(r.Bytes), `"biz":`+biz) {
				n++
			}
		}
		return n
	}

	px.LoseReply("le:seq:trade", 1500*time.Millisecond) // the credit script's reply
	if code := notify(); code != pay.NotifyRetry {
		t.Fatalf("notify with the credit's reply lost: %d, want %d (retry)", code, pay.NotifyRetry)
	}
	if px.Fired() != 1 {
		t.Fatalf("the fault was not injected (fired %d)", px.Fired())
	}
	deadline := time.Now().Add(15 * time.Second)
	for pushes("5570") == 0 || pushes("5580") == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("pushes 5570 %d, 5580 %d once the wallet settled the credit (no redelivery)", pushes("5570"), pushes("5580"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code := notify(); code != pay.NotifyOK {
		t.Fatalf("redelivery: %d, want %d", code, pay.NotifyOK)
	}
	time.Sleep(50 * time.Millisecond)
	if c, s := pushes("5570"), pushes("5580"); c != 1 || s != 1 {
		t.Fatalf("pushes 5570 %d, 5580 %d, want one each", c, s)
	}
	id, _ := pay.ParseOrderID(o.OrderID)
	if cur, err := svc.Get(id); err != nil || cur.Status != pay.StatusPayed {
		t.Fatalf("order %+v %v, want %s", cur, err, pay.StatusPayed)
	}
	if b, err := w.Balance(7); err != nil || b != o.Coins {
		t.Fatalf("balance %d (%v), want %d: credited once", b, err, o.Coins)
	}
}

// An order whose credit is in doubt is not closed by its timeout (nor by a
// FAILED event) until the wallet settles the credit: closed first, the late
// credit still landed (with the order's PAYED record) and a redelivered
// payment on the closed order was refunded on top — coins credited and a
// refund owed for the same payment.
func TestOrderWithACreditInDoubtIsNotClosed(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	st, w := persisttest.OpenSharedWallet(t, px.Addr, persist.SharedConfig{Node: "a", CallTimeout: time.Second})
	if _, err := w.Apply(persist.Op{User: 1, ReqID: "warm", Postings: []persist.Posting{{User: 1, Delta: 1, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	var off atomic.Int64
	clock := func() time.Time { return time.Now().Add(time.Duration(off.Load())) }
	const secret = "settle-test-secret-0123456789abcdef"
	svc, err := pay.New(st, w, router.NewLocal("a", router.LocalConfig{}), pay.Config{Node: "a", Secrets: []string{secret},
		OrderTimeout: time.Minute, ReconcileAfter: time.Second, ReconcileEvery: time.Hour, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := pay.ParseOrderID(o.OrderID)
	notify := func(ev, status string) int {
		body, _ := proto.Marshal(pay.Event{EventID: ev, OrderID: o.OrderID, Amount: o.Amount, Status: status, PaidAt: clock().UnixMilli()})
		code, _ := svc.Notify("mock", pay.Sign(secret, clock(), body), body)
		return code
	}
	px.LoseReply("le:seq:trade", 3*time.Second) // the credit ran in Redis; its reply is lost
	if code := notify("ev1", "SUCCESS"); code != pay.NotifyRetry {
		t.Fatalf("notify with the credit's reply lost: %d, want retry", code)
	}
	off.Store(int64(10 * time.Minute)) // past the timeout; no provider to ask: "not paid"
	svc.Reconcile()
	time.Sleep(200 * time.Millisecond) // the reconciler's worker
	if cur, err := svc.Get(id); err != nil || !pay.OpenStatus(cur.Status) {
		t.Fatalf("order %+v (%v) closed while its credit is in doubt", cur, err)
	}
	if code := notify("ev2", "FAILED"); code == pay.NotifyOK {
		if cur, _ := svc.Get(id); !pay.OpenStatus(cur.Status) {
			t.Fatalf("FAILED while the credit is in doubt closed the order: %s", cur.Status)
		}
	}
	if code := notify("ev1", "SUCCESS"); code == pay.NotifyOK {
		if cur, _ := svc.Get(id); cur.Status != pay.StatusPayed {
			t.Fatalf("redelivery answered OK with the order %s", cur.Status)
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		cur, err := svc.Get(id)
		if err == nil && cur.Status == pay.StatusPayed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the credit never settled: order %+v %v", cur, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code := notify("ev1", "SUCCESS"); code != pay.NotifyOK {
		t.Fatalf("redelivery after the settle: %d", code)
	}
	if b, err := w.Balance(7); err != nil || b != o.Coins {
		t.Fatalf("balance %d (%v), want %d", b, err, o.Coins)
	}
	if _, err := st.Get(persist.Key([]byte("rec/refund/"), uint64(id))); err == nil {
		t.Fatal("a refund is recorded for the payment that was credited")
	}
	if cur, _ := svc.Get(id); cur.Status != pay.StatusPayed {
		t.Fatalf("order %s, want PAYED", cur.Status)
	}
}
