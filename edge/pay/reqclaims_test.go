package pay_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// takenOver is a pay.ReqClaims whose bindings another node takes over right
// after they are made — the window the cluster's Redis bindings
// (gateway/cluster_payreq.go) leave when a node stalls between binding a
// req_id and writing its order long enough for another node to re-bind it.
type takenOver struct {
	mu       sync.Mutex
	other    int64
	released []int64
}

func (c *takenOver) Claim(int64, string, int64) (int64, time.Duration, error) { return 0, 0, nil }
func (c *takenOver) Bound(int64, string) (int64, error)                       { return c.other, nil }
func (c *takenOver) Release(_ int64, _ string, id int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.released = append(c.released, id)
	return nil
}

// An order written after its req_id was bound to another order is closed at
// once (INVALID: a payment for it is refunded) and the caller is pointed at
// the other; a refusal after the binding (a limit) gives the binding back.
func TestOrderSupersededWhenItsReqIDWasTakenOver(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l, err := persist.NewLedger(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
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
	// The order this node wrote is closed: its replay here is INVALID.
	claims.other = 0
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, ReqID: "r1"})
	if err != nil || o.Status != pay.StatusInvalid {
		t.Fatalf("the superseded order: %+v %v, want INVALID", o, err)
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
