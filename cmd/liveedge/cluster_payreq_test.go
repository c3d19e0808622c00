package main

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// createOrderVia creates an order of product 1 through httpAddr: the
// order, the HTTP status and the envelope's code.
func createOrderVia(t *testing.T, httpAddr, tok, req string) (pay.Order, int, int) {
	t.Helper()
	var out struct {
		Code int       `json:"code"`
		Data pay.Order `json:"data"`
	}
	st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/pay/orders", tok,
		fmt.Sprintf(`{"product_id":1,"channel":"mock","req_id":%q}`, req), &out)
	return out.Data, st, out.Code
}

// clusterWithOrder starts two nodes and creates user's order of req through
// gw-1: the cluster, the user's token and the order.
func clusterWithOrder(t *testing.T, user int64, req string) (*testCluster, string, pay.Order) {
	t.Helper()
	c := startCluster(t, 2, "LIVEEDGE_PAY_SECRETS=cluster-test-pay-secret-0123")
	tok := devToken(t, c.nodes[0].http, user, "viewer")
	o, st, code := createOrderVia(t, c.nodes[0].http, tok, req)
	if st != 200 {
		t.Fatalf("create: %d %d", st, code)
	}
	return c, tok, o
}

// One (user, req_id) names one order through every node (PROTOCOL §5: "the
// same (user, req_id) returns the same order"; §8: any request may go to any
// node). Before, each node checked only its own store: the same request
// through three nodes made three orders. A req_id bound to an order its node
// does not have is answered 10409 while that order may still be being
// written, and bound afresh once that binding, pending until the order is
// written, lapses (its node died before writing it).
func TestClusterOrderReqIDOnceAcrossNodes(t *testing.T) {
	c := startCluster(t, 3, "LIVEEDGE_PAY_SECRETS=cluster-test-pay-secret-0123")
	const user = 600
	tok := devToken(t, c.nodes[0].http, user, "viewer")
	create := func(i int, req string) (pay.Order, int, int) { return createOrderVia(t, c.nodes[i].http, tok, req) }
	// The same request through the three nodes at once: one order. A node
	// that finds the order still being written answers 10409: retry.
	ids := make([]string, 3)
	var wg sync.WaitGroup
	for i := range c.nodes {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				o, st, code := create(i, "same")
				if st == 200 {
					ids[i] = o.OrderID
					return
				}
				if code != proto.CodeConflict {
					t.Errorf("through node %d: %d %d", i, st, code)
					return
				}
			}
			t.Errorf("through node %d: still 10409 after 5 s", i)
		}(i)
	}
	wg.Wait()
	if ids[0] == "" || ids[0] != ids[1] || ids[1] != ids[2] {
		t.Fatalf("one req_id through three nodes made orders %v, want one", ids)
	}
	// And again, one after the other.
	for i := range c.nodes {
		if o, st, _ := create(i, "same"); st != 200 || o.OrderID != ids[0] {
			t.Fatalf("replay through node %d: %d %q, want %s", i, st, o.OrderID, ids[0])
		}
	}

	// A binding still pending for an order its node has not written: 10409
	// (retry); once that binding lapses (its node died before writing),
	// the req_id is bound afresh — one new order, the same through every
	// node.
	first, _ := strconv.ParseInt(ids[0], 10, 64)
	ghost := pay.NewIDGen("test", pay.WorkerOf(first), time.Now).Next(user)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{c.redis.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	key := "liveedge:payreq:{" + strconv.Itoa(user) + "}:lapsing"
	if err := rdb.Do(context.Background(), rdb.B().Set().Key(key).Value("p"+strconv.FormatInt(ghost, 10)).Px(time.Second).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if _, st, code := create(1, "lapsing"); st != 409 || code != proto.CodeConflict {
		t.Fatalf("a req_id bound, pending, to an order not written: %d %d, want 409 10409", st, code)
	}
	time.Sleep(1200 * time.Millisecond)
	o, st, _ := create(2, "lapsing")
	if st != 200 || o.OrderID == strconv.FormatInt(ghost, 10) {
		t.Fatalf("the req_id after its pending binding lapsed: %d %+v, want a new order", st, o)
	}
	for i := range c.nodes {
		if again, st, _ := create(i, "lapsing"); st != 200 || again.OrderID != o.OrderID {
			t.Fatalf("the re-bound req_id through node %d: %d %q, want %s", i, st, again.OrderID, o.OrderID)
		}
	}
	// Confirmed: the binding now lasts (the idempotency window).
	if ttl, err := rdb.Do(context.Background(), rdb.B().Pttl().Key(key).Build()).AsInt64(); err != nil || ttl < int64(time.Hour/time.Millisecond) {
		t.Fatalf("the confirmed binding's TTL: %d ms %v, want the idempotency window", ttl, err)
	}
}

// Redis restarts empty: the req_id bindings are rebuilt with the shared
// wallet from the orders on the nodes' disks, so the same request through
// another node still answers the order made before (before, a second order
// was made: the binding was gone). While the wallet rebuilds, bindings are
// neither made nor confirmed: "retry".
func TestClusterOrderReqIDOnceAfterRedisLoss(t *testing.T) {
	c, tok, first := clusterWithOrder(t, 601, "before-the-loss")
	c.redis.Restart()
	var st, code int
	for _, i := range []int{1, 0} { // the other node first: the order's own would bind it again
		var o pay.Order
		pollUntil(t, 20*time.Second, "an answer other than retry", func() bool {
			o, st, code = createOrderVia(t, c.nodes[i].http, tok, "before-the-loss")
			return code != proto.CodeInternal && code != proto.CodeConflict
		})
		if st != 200 || o.OrderID != first.OrderID {
			t.Fatalf("the same req_id through node %d after Redis lost its data: %d %d order %q, want %s", i+1, st, code, o.OrderID, first.OrderID)
		}
	}
	// A new req_id binds as before.
	if o, st, _ := createOrderVia(t, c.nodes[1].http, tok, "after-the-loss"); st != 200 || o.OrderID == first.OrderID {
		t.Fatalf("a new req_id after the rebuild: %d %+v", st, o)
	}
}

// A user's order creations are counted on every node: with 4 a minute,
// eight requests spread over two nodes make four orders, not four on each.
func TestClusterOrderRateCountedAcrossNodes(t *testing.T) {
	c := startCluster(t, 2, "LIVEEDGE_PAY_SECRETS=cluster-test-pay-secret-0123", "LIVEEDGE_PAY_ORDERS_PER_MINUTE=4")
	const user = 602
	tok := devToken(t, c.nodes[0].http, user, "viewer")
	made := 0
	for i := range 8 {
		switch _, st, code := createOrderVia(t, c.nodes[i%2].http, tok, "rate-"+strconv.Itoa(i)); {
		case st == 200:
			made++
		case code != proto.CodeRateLimited:
			t.Fatalf("order %d: %d %d", i, st, code)
		}
	}
	if made != 4 {
		t.Fatalf("%d orders made through two nodes, want 4 (the minute's count, shared)", made)
	}
}

// A user's unpaid orders are bounded across the cluster (before: each node
// counted its own, so N nodes let a user hold N × the bound, each one
// queried by the reconciler): six creations through two nodes at a bound of
// 3 make three; once one is paid (its notify through the other node), one
// more is made.
func TestClusterOpenOrdersCountedAcrossNodes(t *testing.T) {
	const secret = "cluster-test-pay-secret-0123"
	prov := mockpay.New(mockpay.Config{Secret: secret})
	t.Cleanup(prov.Close)
	c := startCluster(t, 2, "LIVEEDGE_PAY_SECRETS="+secret, "LIVEEDGE_PAY_MAX_OPEN_ORDERS_PER_USER=3",
		"LIVEEDGE_PAY_ORDERS_PER_MINUTE=100")
	const user = 604
	tok := devToken(t, c.nodes[0].http, user, "viewer")
	var made []pay.Order
	for i := range 6 {
		switch o, st, code := createOrderVia(t, c.nodes[i%2].http, tok, "open-"+strconv.Itoa(i)); {
		case st == 200:
			made = append(made, o)
		case code != proto.CodeRateLimited:
			t.Fatalf("order %d: %d %d", i, st, code)
		}
	}
	if len(made) != 3 {
		t.Fatalf("%d unpaid orders made through two nodes, want 3 (the bound, shared)", len(made))
	}
	paid := made[0]
	prov.Pay(paid.OrderID, paid.Amount, "http://"+c.nodes[1].http+"/api/v1/pay/notify/mock", "SUCCESS")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var out struct {
			Data pay.Order `json:"data"`
		}
		nodetest.DoJSON(t, "GET", "http://"+c.nodes[1].http+"/api/v1/pay/orders/"+paid.OrderID, tok, "", &out)
		if out.Data.Status == pay.StatusPayed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("order %s not paid: %+v", paid.OrderID, out.Data)
		}
	}
	// The paid order's place is freed by its node shortly after (a Redis
	// call off the order's path).
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, st, code := createOrderVia(t, c.nodes[1].http, tok, "after-paid")
		if st == 200 {
			break
		}
		if code != proto.CodeRateLimited || time.Now().After(deadline) {
			t.Fatalf("an order after one of three was paid: %d %d", st, code)
		}
	}
	if _, st, code := createOrderVia(t, c.nodes[0].http, tok, "one-too-many"); code != proto.CodeRateLimited {
		t.Fatalf("a fourth unpaid order: %d %d, want 10429", st, code)
	}
}

// Redis restarts empty: an order is still read through a node that does not
// own it at once — the owner's worker lease is gone until the owner writes
// it again (within a second), and meanwhile the node it was last seen on is
// asked (before: "unreachable, retry" for that second).
func TestClusterOrderReadRightAfterRedisLoss(t *testing.T) {
	c, tok, o := clusterWithOrder(t, 603, "read-after-loss")
	get := func() (int, int) {
		var out struct {
			Code int       `json:"code"`
			Data pay.Order `json:"data"`
		}
		st := nodetest.DoJSON(t, "GET", "http://"+c.nodes[1].http+"/api/v1/pay/orders/"+o.OrderID, tok, "", &out)
		return st, out.Code
	}
	if st, code := get(); st != 200 {
		t.Fatalf("read through gw-2: %d %d", st, code)
	}
	c.redis.Restart()
	for i := range 5 {
		if st, code := get(); st != 200 {
			t.Fatalf("read %d through gw-2 right after Redis lost its data: %d %d", i, st, code)
		}
	}
}
