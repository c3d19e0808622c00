package gateway_test

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
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
