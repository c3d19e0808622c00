package pay_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
)

// takenOver is a pay.ReqClaims whose bindings name another order by the
// time they are confirmed — the window the cluster's Redis bindings
// (gateway/cluster_payreq.go) leave when a node stalls between binding a
// req_id and writing its order past the binding's pending lease, and a
// retry through another node made that other order.
type takenOver struct {
	mu       sync.Mutex
	other    int64
	released []int64
}

func (c *takenOver) Claim(int64, string, int64) (int64, error) { return 0, nil }
func (c *takenOver) Confirm(_ int64, _ string, id int64) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.other != 0 {
		return c.other, nil
	}
	return id, nil
}
func (c *takenOver) Bound(int64, string) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.other, nil
}
func (c *takenOver) Release(_ int64, _ string, id int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.released = append(c.released, id)
	return nil
}

// An order whose req_id names another order when it is confirmed is closed
// at once (INVALID: a payment for it is refunded) and the caller — and any
// replay on this node — is pointed at the other; a refusal after the
// binding (a limit) gives the binding back.
func TestOrderSupersededWhenItsReqIDWasTakenOver(t *testing.T) {
	st, l := persisttest.OpenLedger(t)
	claims := &takenOver{other: 4242}
	svc, err := pay.New(st, l, router.NewLocal("req", router.LocalConfig{}), pay.Config{Node: "req",
		Secrets: []string{reconcileSecret}, ReconcileEvery: time.Hour, OrdersPerMinute: 1, ReqClaims: claims})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	_, err = svc.CreateOrder(7, pay.CreateReq{ProductID: 1, ReqID: "r1"})
	var el *pay.OrderElsewhere
	if !errors.As(err, &el) || el.ID != 4242 {
		t.Fatalf("create: %v, want the other order 4242", err)
	}
	// A replay here points at the other order too, never at this node's
	// closed one.
	if _, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, ReqID: "r1"}); !errors.As(err, &el) || el.ID != 4242 {
		t.Fatalf("replay: %v, want the other order 4242", err)
	}
	// The order this node wrote was closed: were the binding ever to name
	// it again (Redis lost it), it is INVALID, not a second live order.
	claims.mu.Lock()
	claims.other = 0
	claims.mu.Unlock()
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, ReqID: "r1"})
	if err != nil || o.Status != pay.StatusInvalid {
		t.Fatalf("this node's order: %+v %v, want INVALID", o, err)
	}
	// Closed without the provider's word (its pay_url may have gone out):
	// the reconciler asks the provider about it after the close.
	id, _ := pay.ParseOrderID(o.OrderID)
	if _, err := st.Get(persist.Key(append(append([]byte{}, persist.PrefixRec...), "payunasked/"...), uint64(id))); err != nil {
		t.Fatalf("the superseded order has no rec/payunasked record: %v", err)
	}
	// Over the per-minute limit: refused, the binding given back.
	if _, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, ReqID: "r2"}); err == nil {
		t.Fatal("a second creation in the minute was not refused")
	}
	claims.mu.Lock()
	defer claims.mu.Unlock()
	if len(claims.released) != 1 {
		t.Fatalf("bindings given back: %v, want the refused one's", claims.released)
	}
}
