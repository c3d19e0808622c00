package gateway_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

const paySecret = "test-pay-secret-0123456789"

// payEnv is a node wired to an in-process mock provider.
type payEnv struct {
	cfg  configs.Config
	node *gateway.Node
	prov *mockpay.Provider
	srv  *httptest.Server
}

func startPay(t *testing.T, pc mockpay.Config, mod func(*configs.Config)) *payEnv {
	t.Helper()
	pc.Secret = paySecret
	if pc.Factor == 0 {
		pc.Factor = 0.0005 // 4 min → 120 ms
	}
	prov := mockpay.New(pc)
	srv := httptest.NewServer(prov.Handler())
	t.Cleanup(func() { prov.Close(); srv.Close() })
	cfg := nodetest.Config(t)
	cfg.Pay.Secrets = []string{"old-secret-being-rotated-out", paySecret}
	cfg.Pay.ProviderURL = srv.URL
	if mod != nil {
		mod(&cfg)
	}
	e := &payEnv{cfg: cfg, prov: prov, srv: srv}
	e.node = nodetest.Start(t, cfg)
	return e
}

func (e *payEnv) restart(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.node.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	e.node = nodetest.Start(t, e.cfg)
}

// notifyURL is the node's webhook for the mock channel.
func (e *payEnv) notifyURL() string { return nodetest.HTTPURL(e.node) + "/api/v1/pay/notify/mock" }

func (e *payEnv) createOrder(t *testing.T, user int64, product int64, req string) pay.Order {
	t.Helper()
	var out struct {
		Code int       `json:"code"`
		Data pay.Order `json:"data"`
	}
	st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(e.node)+"/api/v1/pay/orders", nodetest.Token(t, e.node, user, gateway.RoleViewer),
		fmt.Sprintf(`{"product_id":%d,"channel":"mock","req_id":%q}`, product, req), &out)
	if st != 200 || out.Code != 0 || out.Data.Status != pay.StatusPaying || out.Data.PayURL == "" {
		t.Fatalf("create order: %d %+v", st, out)
	}
	return out.Data
}

func (e *payEnv) order(t *testing.T, id string) pay.Order {
	t.Helper()
	oid, _ := pay.ParseOrderID(id)
	o, err := e.node.Pay.Get(oid)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func (e *payEnv) balance(t *testing.T, user int64) int64 {
	t.Helper()
	b, err := e.node.Wallet.Balance(user)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// post delivers a notify body with the given signature header.
func (e *payEnv) post(t *testing.T, sig string, body []byte) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", e.notifyURL(), strings.NewReader(string(body)))
	req.Header.Set(pay.SignatureHeader, sig)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 256)
	n, _ := resp.Body.Read(buf)
	b.Write(buf[:n])
	return resp.StatusCode, b.String()
}

// Pay flow end to end over HTTP with the mock provider: order → pay →
// notify → PAYED → balance up by the product's coins → the SDK gets 5570.
func TestPayFlowEndToEnd(t *testing.T) {
	e := startPay(t, mockpay.Config{}, nil)
	const user = 600
	var got pushLog
	sdkDial(t, e.node, user, &got, nil)
	o := e.createOrder(t, user, 1, "buy-1")
	// Idempotent by req_id.
	if again := e.createOrder(t, user, 1, "buy-1"); again.OrderID != o.OrderID {
		t.Fatalf("second create gave %s, first %s", again.OrderID, o.OrderID)
	}
	if id, _ := pay.ParseOrderID(o.OrderID); pay.Shard(id) != user%(1<<pay.GeneBits) {
		t.Fatalf("order id %s does not carry the user's gene", o.OrderID)
	}
	// The user pays at the provider (pay_url), pointing it at our webhook.
	resp, err := http.Post(o.PayURL, "", nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("pay: %v %v", err, resp)
	}
	resp.Body.Close()
	nodetest.Eventually(t, 5*time.Second, func() bool { return e.order(t, o.OrderID).Status == pay.StatusPayed }, "order not PAYED")
	if b := e.balance(t, user); b != 300 {
		t.Fatalf("balance %d, want 300", b)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool {
		for _, p := range got.snapshot() {
			if p.Biz == proto.BizWalletCredit && p.Ack {
				return true
			}
		}
		return false
	}, "no biz 5570 push")
	nodetest.Eventually(t, 5*time.Second, func() bool { return countBiz(got.snapshot(), proto.BizOrderStatus, true) >= 1 },
		"no biz 5580 push")
	persisttest.CheckConservation(t, e.node.Ledger)
}

func signedEvent(e *payEnv, o pay.Order, eventID string, amount int64) ([]byte, string) {
	body, _ := proto.Marshal(pay.Event{EventID: eventID, OrderID: o.OrderID, Amount: amount, Status: "SUCCESS", PaidAt: time.Now().UnixMilli()})
	return body, e.prov.Sign(body)
}

// The same notify delivered 100 times concurrently, and again after a
// restart: exactly one credit.
func TestNotifyHundredTimesOneCredit(t *testing.T) {
	e := startPay(t, mockpay.Config{Lost: true}, nil)
	const user = 601
	o := e.createOrder(t, user, 3, "dup")
	body, sig := signedEvent(e, o, "evt-dup", o.Amount)
	deliver := func() {
		var wg sync.WaitGroup
		for i := 0; i < 100; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if st, b := e.post(t, sig, body); st != 200 || b != "success" {
					t.Errorf("delivery: %d %q", st, b)
				}
			}()
		}
		wg.Wait()
	}
	deliver()
	// A different event id for the same payment (providers do that) is still one credit.
	body2, sig2 := signedEvent(e, o, "evt-dup-2", o.Amount)
	if st, _ := e.post(t, sig2, body2); st != 200 {
		t.Fatalf("second event: %d", st)
	}
	if b := e.balance(t, user); b != 1000 {
		t.Fatalf("balance %d after 100 deliveries", b)
	}
	e.restart(t)
	deliver()
	if b := e.balance(t, user); b != 1000 {
		t.Fatalf("balance %d after restart and redelivery", b)
	}
	if st := e.order(t, o.OrderID).Status; st != pay.StatusPayed {
		t.Fatalf("status %s", st)
	}
	c, _, _ := persisttest.CheckConservation(t, e.node.Ledger)
	if c != 1000 {
		t.Fatalf("credits %d", c)
	}
}

// Wrong signature, stale t, signature over a different body, amount
// mismatch, unknown order: 401/401/401/409/404, nothing credited.
func TestNotifyRejections(t *testing.T) {
	e := startPay(t, mockpay.Config{Lost: true}, nil)
	const user = 602
	o := e.createOrder(t, user, 2, "rej")
	body, _ := signedEvent(e, o, "evt-1", o.Amount)
	otherBody, otherSig := signedEvent(e, o, "evt-other", o.Amount+1)
	_ = otherBody
	stale := pay.Sign(paySecret, time.Now().Add(-301*time.Second), body)
	future := pay.Sign(paySecret, time.Now().Add(301*time.Second), body)
	mismatch, mismatchSig := signedEvent(e, o, "evt-2", o.Amount+1)
	unknown, _ := proto.Marshal(pay.Event{EventID: "evt-3", OrderID: "123456789", Amount: 1, Status: "SUCCESS"})
	cases := []struct {
		name string
		sig  string
		body []byte
		want int
	}{
		{"wrong secret", pay.Sign("not-the-secret", time.Now(), body), body, 401},
		{"no header", "", body, 401},
		{"garbage header", "t=abc,v1=zz", body, 401},
		{"stale t", stale, body, 401},
		{"future t", future, body, 401},
		{"signature of another body", otherSig, body, 401},
		{"amount mismatch", mismatchSig, mismatch, 409},
		{"unknown order", e.prov.Sign(unknown), unknown, 404},
		{"bad JSON (signed)", e.prov.Sign([]byte("{nope")), []byte("{nope"), 400},
	}
	for _, tc := range cases {
		if st, _ := e.post(t, tc.sig, tc.body); st != tc.want {
			t.Fatalf("%s: %d, want %d", tc.name, st, tc.want)
		}
	}
	if b := e.balance(t, user); b != 0 {
		t.Fatalf("credited %d", b)
	}
	if st := e.order(t, o.OrderID).Status; st != pay.StatusPaying {
		t.Fatalf("status %s", st)
	}
	// Rotation: the old secret is still accepted.
	okBody, _ := signedEvent(e, o, "evt-rot", o.Amount)
	if st, _ := e.post(t, pay.Sign("old-secret-being-rotated-out", time.Now(), okBody), okBody); st != 200 {
		t.Fatalf("rotated secret: %d", st)
	}
	if b := e.balance(t, user); b != 500 {
		t.Fatalf("balance %d", b)
	}
}

// A notify that never arrives: the reconciliation loop marks the order PAYED
// through the provider's (signed) active query.
func TestReconcileLostNotify(t *testing.T) {
	e := startPay(t, mockpay.Config{Lost: true}, func(c *configs.Config) {
		c.Pay.ReconcileAfter = configs.Duration(200 * time.Millisecond)
		c.Pay.ReconcileEvery = configs.Duration(50 * time.Millisecond)
	})
	const user = 603
	o := e.createOrder(t, user, 1, "lost")
	e.prov.Pay(o.OrderID, o.Amount, e.notifyURL(), "SUCCESS")
	nodetest.Eventually(t, 5*time.Second, func() bool { return e.order(t, o.OrderID).Status == pay.StatusPayed }, "not reconciled")
	if b := e.balance(t, user); b != 300 {
		t.Fatalf("balance %d", b)
	}
	if e.prov.Attempts.Load() != 0 {
		t.Fatal("the provider was not supposed to notify")
	}
	persisttest.CheckConservation(t, e.node.Ledger)
}

// A payment of another amount for an order already IN_VALID (a user who
// paid late, and not the order's price): refunded as the provider reports
// it, nothing credited, and answered 409 as any payment not as its order
// (PROTOCOL.md: "Amount mismatch with the order: 409, nothing credited"; it
// was 200 success). The provider retries a 409: each copy — at once, and
// after a restart — is a duplicate, 409 again, the refund recorded once
// (one refund record, one PAY_BACK row in the order's log, unchanged).
func TestLateMismatchedPaymentIsRefunded(t *testing.T) {
	e := startClosingPay(t)
	const user = 605
	o := e.createOrder(t, user, 1, "late-other")
	id, _ := pay.ParseOrderID(o.OrderID)
	nodetest.Eventually(t, 5*time.Second, func() bool { return e.order(t, o.OrderID).Status == pay.StatusInvalid }, "not closed")
	body, sig := signedEvent(e, o, "evt-late-other", o.Amount+1)
	deliver := func(when string) {
		if st, b := e.post(t, sig, body); st != 409 || !strings.Contains(b, fmt.Sprint(proto.CodeConflict)) {
			t.Errorf("%s: late notify of another amount: %d %q, want 409 (%d)", when, st, b, proto.CodeConflict)
		}
	}
	var wg sync.WaitGroup
	for range 4 { // the delivery and its redeliveries, at once
		wg.Add(1)
		go func() {
			defer wg.Done()
			deliver("at once")
		}()
	}
	wg.Wait()
	var refund []byte
	check := func(when string) {
		t.Helper()
		if got := e.order(t, o.OrderID); got.Status != pay.StatusPayBack || !strings.Contains(got.Note, "amount mismatch") {
			t.Fatalf("%s: order %+v, want PAY_BACK noting the amount mismatch", when, got)
		}
		if b := e.balance(t, user); b != 0 {
			t.Fatalf("%s: credited %d for a closed order", when, b)
		}
		v, err := e.node.Store.Get(persist.Key([]byte("rec/refund/"), uint64(id)))
		if err != nil || !strings.Contains(string(v), fmt.Sprintf(`"amount":%d`, o.Amount+1)) {
			t.Fatalf("%s: refund record %s (%v), want one of %d", when, v, err, o.Amount+1)
		}
		if refund == nil {
			refund = v
		} else if string(v) != string(refund) {
			t.Fatalf("%s: refund record rewritten: %s, first %s", when, v, refund)
		}
		refunds := 0
		if err := e.node.Store.Scan(persist.Key([]byte("rec/orderlog/"), uint64(id)), func(_, v []byte) error {
			if strings.Contains(string(v), `"to":"`+pay.StatusPayBack+`"`) {
				refunds++
			}
			return nil
		}); err != nil || refunds != 1 {
			t.Fatalf("%s: %d PAY_BACK rows in the order's log (%v), want 1", when, refunds, err)
		}
		persisttest.CheckConservation(t, e.node.Ledger)
	}
	check("after the deliveries")
	e.restart(t)
	deliver("after the restart") // the provider's retry of a 409
	check("after the restart")
}

// startClosingPay is a payment node whose unpaid orders close within a few
// hundred milliseconds (the provider loses its notifies).
func startClosingPay(t *testing.T) *payEnv {
	t.Helper()
	return startPay(t, mockpay.Config{Lost: true}, func(c *configs.Config) {
		c.Pay.OrderTimeout = configs.Duration(150 * time.Millisecond)
		c.Pay.ReconcileAfter = configs.Duration(100 * time.Millisecond)
		c.Pay.ReconcileEvery = configs.Duration(50 * time.Millisecond)
	})
}

// A notify for an order already IN_VALID: the refund is recorded and pushed,
// nothing is credited.
func TestNotifyForClosedOrderIsRefunded(t *testing.T) {
	e := startClosingPay(t)
	const user = 604
	var got pushLog
	sdkDial(t, e.node, user, &got, nil)
	o := e.createOrder(t, user, 1, "late")
	nodetest.Eventually(t, 5*time.Second, func() bool { return e.order(t, o.OrderID).Status == pay.StatusInvalid }, "not closed")
	body, sig := signedEvent(e, o, "evt-late", o.Amount)
	if st, b := e.post(t, sig, body); st != 200 || b != "success" {
		t.Fatalf("late notify: %d %q", st, b)
	}
	if st := e.order(t, o.OrderID).Status; st != pay.StatusPayBack {
		t.Fatalf("status %s, want PAY_BACK", st)
	}
	if b := e.balance(t, user); b != 0 {
		t.Fatalf("credited %d for a closed order", b)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool {
		for _, p := range got.snapshot() {
			if p.Biz == proto.BizOrderStatus && strings.Contains(string(p.Data), pay.StatusPayBack) {
				return true
			}
		}
		return false
	}, "no PAY_BACK push")
	// Illegal transitions are refused with 40002.
	admin := nodetest.Token(t, e.node, 1, gateway.RoleAdmin)
	var out struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(e.node)+"/api/v1/admin/pay/orders/"+o.OrderID+"/refund", admin, "", &out); st != 409 || out.Code != proto.CodeOrderState {
		t.Fatalf("refund of PAY_BACK order: %d %d", st, out.Code)
	}
}

func TestRefundPaidOrder(t *testing.T) {
	e := startPay(t, mockpay.Config{Lost: true}, nil)
	const user = 605
	o := e.createOrder(t, user, 1, "r")
	body, sig := signedEvent(e, o, "evt-r", o.Amount)
	if st, _ := e.post(t, sig, body); st != 200 {
		t.Fatal(st)
	}
	admin := nodetest.Token(t, e.node, 1, gateway.RoleAdmin)
	refund := func() int {
		return nodetest.DoJSON(t, "POST", nodetest.HTTPURL(e.node)+"/api/v1/admin/pay/orders/"+o.OrderID+"/refund", admin, "", nil)
	}
	// 20 concurrent refunds of one order: exactly one succeeds.
	var mu sync.Mutex
	codes := map[int]int{}
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st := refund()
			mu.Lock()
			codes[st]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if codes[200] != 1 || codes[409] != 19 {
		t.Fatalf("concurrent refunds: %v", codes)
	}
	// After a restart the refund is still done once; a redelivered notify
	// does not credit the refunded order again.
	e.restart(t)
	if st := refund(); st != 409 {
		t.Fatalf("refund after restart: %d", st)
	}
	if st, _ := e.post(t, sig, body); st != 200 {
		t.Fatalf("redelivery after refund: %d", st)
	}
	if b := e.balance(t, user); b != 0 {
		t.Fatalf("balance after refund %d", b)
	}
	if st := e.order(t, o.OrderID).Status; st != pay.StatusPayBack {
		t.Fatalf("status %s", st)
	}
	// The money owed back is recorded once, with the debit, and kept
	// across the restart (one key per order: 20 refunds, one record).
	id, _ := pay.ParseOrderID(o.OrderID)
	var rec struct {
		OrderID string `json:"order_id"`
		Amount  int64  `json:"amount"`
		Reason  string `json:"reason"`
	}
	if v, err := e.node.Store.Get(pay.RefundRecordKey(id)); err != nil || proto.Unmarshal(v, &rec) != nil ||
		rec.OrderID != o.OrderID || rec.Amount != o.Amount || rec.Reason != "admin refund" {
		t.Fatalf("refund record %+v (%v), want the order's %d", rec, err, o.Amount)
	}
	c, d, _ := persisttest.CheckConservation(t, e.node.Ledger)
	if c != 300 || d != 300 {
		t.Fatalf("credits %d debits %d", c, d)
	}
}

// The provider's retry rhythm with injected faults (bad signatures first,
// duplicates) still ends in exactly one credit.
func TestProviderRetriesThroughFaults(t *testing.T) {
	e := startPay(t, mockpay.Config{BadSigs: 2, Duplicates: 3}, nil)
	const user = 606
	o := e.createOrder(t, user, 2, "faults")
	e.prov.Pay(o.OrderID, o.Amount, e.notifyURL(), "SUCCESS")
	nodetest.Eventually(t, 10*time.Second, func() bool { return e.prov.Delivered.Load() == 1 }, "provider never got success")
	if e.prov.Attempts.Load() < 12 {
		t.Fatalf("attempts %d: want ≥ 3 rounds × 4 copies", e.prov.Attempts.Load())
	}
	if b := e.balance(t, user); b != 500 {
		t.Fatalf("balance %d", b)
	}
}

// A declined payment attempt (FAILED) leaves the order open, and the
// user's next attempt pays it — through the mock provider, as with a real
// one (the provider answered the first FAILED event to every later
// attempt, so the order could only time out).
func TestDeclinedAttemptThenPaid(t *testing.T) {
	e := startPay(t, mockpay.Config{}, nil)
	const user = 607
	o := e.createOrder(t, user, 2, "declined-then-paid")
	e.prov.Pay(o.OrderID, o.Amount, e.notifyURL(), "FAILED")
	nodetest.Eventually(t, 10*time.Second, func() bool { return e.prov.Delivered.Load() == 1 }, "the declined attempt not delivered")
	if got := e.order(t, o.OrderID); got.Status != pay.StatusPaying {
		t.Fatalf("after a declined attempt: %s, want still %s", got.Status, pay.StatusPaying)
	}
	if ev := e.prov.Pay(o.OrderID, o.Amount, e.notifyURL(), "SUCCESS"); ev.Status != "SUCCESS" {
		t.Fatalf("the second attempt: %+v, want a SUCCESS event", ev)
	}
	nodetest.Eventually(t, 10*time.Second, func() bool { return e.order(t, o.OrderID).Status == pay.StatusPayed }, "the second attempt not credited")
	if b := e.balance(t, user); b != 500 {
		t.Fatalf("balance %d", b)
	}
}
