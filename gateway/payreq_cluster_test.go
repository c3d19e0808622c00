package gateway_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// A retry of an order's creation through another node whose confirmation
// of the req_id's binding fails (Redis did not answer) is told "retry",
// not handed the order: a binding left pending lapses and a later request
// makes a second payable order of the same req_id. The retry once Redis
// answers gets the first order.
func TestClusterOrderNotHandedOutUnconfirmed(t *testing.T) {
	n1, n2, px := clusterPairViaProxy(t)
	const user = 42
	body := `{"product_id":1,"channel":"mock","req_id":"r1"}`
	create := func(n *gateway.Node) (int, int, pay.Order) {
		var out struct {
			Code int       `json:"code"`
			Data pay.Order `json:"data"`
		}
		st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/pay/orders", nodetest.Token(t, n, user, gateway.RoleViewer), body, &out)
		return st, out.Code, out.Data
	}
	st, code, first := create(n1)
	if st != 200 || code != 0 || first.OrderID == "" {
		t.Fatalf("create through gw-1: %d %d %+v", st, code, first)
	}
	px.LoseReply(gateway.ConfirmReqSHA, time.Second) // gw-2's confirmation runs; it never hears back
	if st, code, o := create(n2); st == 200 || code == 0 {
		t.Fatalf("through gw-2 with its confirmation unanswered: %d %d %+v, want a retry", st, code, o)
	}
	var got pay.Order
	nodetest.Eventually(t, 15*time.Second, func() bool {
		st, code, o := create(n2)
		got = o
		return st == 200 && code == 0
	}, "the retry through gw-2 never answered")
	if got.OrderID != first.OrderID {
		t.Fatalf("retry through gw-2: order %s, want %s", got.OrderID, first.OrderID)
	}
}

// A user at the open-order bound costs no Redis script per refused create
// (the node's count is checked first; one read points a retry of an order
// made elsewhere at it): before, each refused attempt took a req_id
// binding and gave it back, two Lua calls, however fast the user sent.
func TestClusterOrderAtTheOpenBoundRunsNoScript(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	c := clusterNodeConfig(t, "gw-1", []string{"gw-1"}, rds, nats)
	c.Pay.MaxOpenOrdersPerUser, c.Pay.OrdersPerMinute = 2, 0
	n := nodetest.Start(t, c)
	const user = 43
	create := func(req string) (int, int) {
		var out struct {
			Code int `json:"code"`
		}
		st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/pay/orders", nodetest.Token(t, n, user, gateway.RoleViewer),
			fmt.Sprintf(`{"product_id":1,"channel":"mock","req_id":%q}`, req), &out)
		return st, out.Code
	}
	for _, req := range []string{"o1", "o2"} {
		if st, code := create(req); st != 200 || code != 0 {
			t.Fatalf("order %s: %d %d", req, st, code)
		}
	}
	scripts := func() int64 { return redisCalls(t, rds, "evalsha", "eval") }
	before := scripts()
	for i := range 20 {
		if st, code := create(fmt.Sprint("over", i)); st != 429 || code != proto.CodeRateLimited {
			t.Fatalf("create over the bound: %d %d, want 429 10429", st, code)
		}
	}
	if d := scripts() - before; d != 0 {
		t.Fatalf("%d Redis scripts for 20 creates refused at the bound, want none", d)
	}
	if st, code := create("o1"); st != 200 || code != 0 { // a retry of an order made: its order, not refused
		t.Fatalf("retry of o1 at the bound: %d %d", st, code)
	}
}
