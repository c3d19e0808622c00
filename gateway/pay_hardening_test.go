package gateway_test

import (
	"context"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
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
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
)

// A channel without a provider of ours ("alipay", made-up ones) is refused
// with 10001 when an order is created and on the webhook path: no order
// gets a pay_url of a provider it does not use, nothing is credited.
func TestPayUnknownChannelRefused(t *testing.T) {
	e := startPay(t, mockpay.Config{Lost: true}, nil)
	const user = 620
	tok := nodetest.Token(t, e.node, user, gateway.RoleViewer)
	for _, ch := range []string{"alipay", "wechat", "bitcoin", "MOCK"} {
		var out struct {
			Code int `json:"code"`
			Data struct {
				OrderID string `json:"order_id"`
				PayURL  string `json:"pay_url"`
			} `json:"data"`
		}
		st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(e.node)+"/api/v1/pay/orders", tok,
			fmt.Sprintf(`{"product_id":1,"channel":%q,"req_id":"ch-%s"}`, ch, ch), &out)
		if st != 400 || out.Code != proto.CodeBadRequest || out.Data.OrderID != "" || out.Data.PayURL != "" {
			t.Fatalf("channel %q: %d %+v", ch, st, out)
		}
	}
	// The webhook of an unknown channel: 10001 in the envelope, even for a
	// validly signed event of a real order.
	o := e.createOrder(t, user, 1, "ch-ok")
	body, sig := signedEvent(e, o, "evt-ch", o.Amount)
	for _, ch := range []string{"alipay", "nope"} {
		req, _ := http.NewRequest("POST", nodetest.HTTPURL(e.node)+"/api/v1/pay/notify/"+ch, strings.NewReader(string(body)))
		req.Header.Set("X-Pay-Signature", sig)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var env struct {
			Code int `json:"code"`
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		derr := proto.Unmarshal(raw, &env)
		if resp.StatusCode != 400 || derr != nil || env.Code != proto.CodeBadRequest {
			t.Fatalf("notify on %q: %d %v %+v", ch, resp.StatusCode, derr, env)
		}
	}
	if b := e.balance(t, user); b != 0 {
		t.Fatalf("credited %d through an unknown channel", b)
	}
	// The known channel still works.
	if st, b := e.post(t, sig, body); st != 200 || b != "success" {
		t.Fatalf("mock notify: %d %q", st, b)
	}
	if b := e.balance(t, user); b != 300 {
		t.Fatalf("balance %d", b)
	}
	persisttest.CheckConservation(t, e.node.Ledger)
}

// N concurrent deliveries of one event id whose bodies differ (paid_at):
// exactly one credit, and the stored event record is the one that was
// applied (its paid_at is the order's) — no later copy overwrites it.
func TestNotifyDuplicateEventKeepsFirstRecord(t *testing.T) {
	e := startPay(t, mockpay.Config{Lost: true}, nil)
	const user, n = 621, 40
	o := e.createOrder(t, user, 1, "dup-first")
	type delivery struct {
		body []byte
		sig  string
	}
	ds := make([]delivery, n)
	for i := range ds {
		body, _ := proto.Marshal(pay.Event{EventID: "evt-same", OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS",
			PaidAt: 1_700_000_000_000 + int64(i)})
		ds[i] = delivery{body, e.prov.Sign(body)}
	}
	var wg sync.WaitGroup
	for _, d := range ds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if st, b := e.post(t, d.sig, d.body); st != 200 || b != "success" {
				t.Errorf("delivery: %d %q", st, b)
			}
		}()
	}
	wg.Wait()
	paid := e.order(t, o.OrderID)
	if paid.Status != pay.StatusPayed || paid.EventID != "evt-same" {
		t.Fatalf("order %+v", paid)
	}
	id, ok := pay.ParseOrderID(o.OrderID)
	if !ok {
		t.Fatalf("order id %q", o.OrderID)
	}
	v, err := e.node.Store.Get(pay.EventRecordKey(id, "evt-same"))
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		Event        pay.Event `json:"event"`
		StatusBefore string    `json:"order_status_before"`
	}
	if err := proto.Unmarshal(v, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.Event.PaidAt != paid.PaidAt || rec.StatusBefore != pay.StatusPaying {
		t.Fatalf("event record %+v is not the applied delivery's (order paid_at %d)", rec, paid.PaidAt)
	}
	if b := e.balance(t, user); b != 300 {
		t.Fatalf("balance %d, want one credit of 300", b)
	}
	if c, _, _ := persisttest.CheckConservation(t, e.node.Ledger); c != 300 {
		t.Fatalf("credits %d", c)
	}
}

// Two nodes sharing Redis never make order ids with the same worker bits,
// even when their node ids hash to the same worker (the old derivation,
// fnv(node) % 32, collided); a node configured with a worker id another
// node holds refuses to start.
func TestSharedNodesNeverShareWorkerID(t *testing.T) {
	srv := redistest.Start(t)
	// Two node ids whose hash picks the same worker.
	byHash := map[uint32]string{}
	var a, b string
	for i := 0; a == ""; i++ {
		name := fmt.Sprintf("gw-%d", i)
		h := fnv.New32a()
		h.Write([]byte(name))
		w := h.Sum32() % pay.MaxWorkers
		if other, ok := byHash[w]; ok {
			a, b = other, name
		}
		byHash[w] = name
	}
	cfgFor := func(node string, worker int) configs.Config {
		c := nodetest.Config(t)
		c.Node.ID = node
		c.Wallet.Mode = "shared"
		c.Wallet.Nodes = []string{a, b}
		c.Redis.Addr = srv.Addr
		c.Pay.WorkerID = worker
		return c
	}
	workerOf := func(n *gateway.Node, user int64) int64 {
		o, err := n.Pay.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "w"})
		if err != nil {
			t.Fatal(err)
		}
		id, _ := pay.ParseOrderID(o.OrderID)
		return (id >> (7 + pay.GeneBits)) & (pay.MaxWorkers - 1)
	}
	na := nodetest.Start(t, cfgFor(a, -1))
	nb := nodetest.Start(t, cfgFor(b, -1))
	wa, wb := workerOf(na, 1), workerOf(nb, 2)
	if wa == wb {
		t.Fatalf("nodes %s and %s both make order ids with worker %d", a, b, wa)
	}
	// An explicit worker id that node a holds.
	if n, err := gateway.New(cfgFor("gw-third", int(wa)), nil); err == nil {
		_ = n.Shutdown(context.Background())
		t.Fatalf("a node with worker id %d (held by %s) started", wa, a)
	}
}

func createOrderRaw(t *testing.T, e *payEnv, user int64, req string) (int, int, string, pay.Order) {
	t.Helper()
	var out struct {
		Code int       `json:"code"`
		Msg  string    `json:"msg"`
		Data pay.Order `json:"data"`
	}
	st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(e.node)+"/api/v1/pay/orders", nodetest.Token(t, e.node, user, gateway.RoleViewer),
		fmt.Sprintf(`{"product_id":4,"channel":"mock","req_id":%q}`, req), &out)
	return st, out.Code, out.Msg, out.Data
}

// A user has at most pay.max_open_orders_per_user unpaid orders and creates
// at most pay.orders_per_minute: more → 10429 (HTTP 429). A replayed
// req_id is not a creation; a paid order frees its slot.
func TestPayOrderLimits(t *testing.T) {
	e := startPay(t, mockpay.Config{Lost: true}, func(c *configs.Config) {
		c.Pay.MaxOpenOrdersPerUser = 5
		c.Pay.OrdersPerMinute = 10
	})
	const user = 622
	var open []pay.Order
	create := func(req string) pay.Order {
		t.Helper()
		st, code, msg, o := createOrderRaw(t, e, user, req)
		if st != 200 || code != 0 {
			t.Fatalf("create %s: %d %d %s", req, st, code, msg)
		}
		return o
	}
	payAll := func() {
		t.Helper()
		for _, o := range open {
			body, sig := signedEvent(e, o, "evt-"+o.OrderID, o.Amount)
			if st, _ := e.post(t, sig, body); st != 200 {
				t.Fatalf("pay %s: %d", o.OrderID, st)
			}
		}
		open = nil
	}
	for i := 0; i < 5; i++ {
		open = append(open, create(fmt.Sprint("a", i)))
	}
	st, code, msg, _ := createOrderRaw(t, e, user, "a5")
	if st != 429 || code != proto.CodeRateLimited || !strings.Contains(msg, "unpaid") {
		t.Fatalf("6th open order: %d %d %q", st, code, msg)
	}
	if again := create("a0"); again.OrderID != open[0].OrderID {
		t.Fatalf("replay of a0 gave %s", again.OrderID)
	}
	// Another user is not affected.
	if st, code, _, _ := createOrderRaw(t, e, user+1, "b0"); st != 200 || code != 0 {
		t.Fatalf("other user: %d %d", st, code)
	}
	payAll()
	for i := 5; i < 10; i++ {
		open = append(open, create(fmt.Sprint("a", i)))
	}
	payAll()
	// Nothing open, but 10 creations this minute.
	st, code, msg, _ = createOrderRaw(t, e, user, "a10")
	if st != 429 || code != proto.CodeRateLimited || !strings.Contains(msg, "per minute") {
		t.Fatalf("11th order in a minute: %d %d %q", st, code, msg)
	}
	if b := e.balance(t, user); b != 10 {
		t.Fatalf("balance %d", b)
	}
	persisttest.CheckConservation(t, e.node.Ledger)
}

// Reconciliation of many open orders while the provider's active query
// hangs for some of them: the others are still reconciled (PAYED) promptly,
// since each query runs on one of a bounded set of workers with its own
// timeout (5 s) and a hanging order holds only its own worker.
func TestReconcileHangingQueriesDoNotBlockOthers(t *testing.T) {
	e := startPay(t, mockpay.Config{Lost: true}, func(c *configs.Config) {
		c.Pay.ReconcileAfter = configs.Duration(time.Millisecond)
		c.Pay.ReconcileEvery = configs.Duration(50 * time.Millisecond)
	})
	const users, hung = 30, 6
	var orders []pay.Order
	for u := int64(0); u < users; u++ {
		orders = append(orders, e.createOrder(t, 700+u, 1, "rec"))
	}
	for i, o := range orders {
		if i < hung {
			e.prov.HangQuery(o.OrderID)
		}
		e.prov.Pay(o.OrderID, o.Amount, e.notifyURL(), "SUCCESS")
	}
	nodetest.Eventually(t, 10*time.Second, func() bool {
		for _, o := range orders[hung:] {
			if e.order(t, o.OrderID).Status != pay.StatusPayed {
				return false
			}
		}
		return true
	}, "orders with an answering provider not reconciled while %d queries hang", hung)
	for u := int64(hung); u < users; u++ {
		if b := e.balance(t, 700+u); b != 300 {
			t.Fatalf("user %d balance %d", 700+u, b)
		}
	}
	for _, o := range orders[:hung] {
		if st := e.order(t, o.OrderID).Status; st != pay.StatusPaying {
			t.Fatalf("hung order %s is %s", o.OrderID, st)
		}
	}
	persisttest.CheckConservation(t, e.node.Ledger)
}
