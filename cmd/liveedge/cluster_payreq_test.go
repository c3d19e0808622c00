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
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// One (user, req_id) names one order through every node (PROTOCOL §5: "the
// same (user, req_id) returns the same order"; §8: any request may go to any
// node). Before, each node checked only its own store: the same request
// through three nodes made three orders. A req_id bound to an order its node
// does not have is answered 10409 while that order may still be being
// written, and bound afresh once the binding is old (its node died before
// writing it).
func TestClusterOrderReqIDOnceAcrossNodes(t *testing.T) {
	c := startCluster(t, 3, "LIVEEDGE_PAY_SECRETS=cluster-test-pay-secret-0123")
	const user = 600
	tok := devToken(t, c.nodes[0].http, user, "viewer")
	create := func(i int, req string) (pay.Order, int, int) {
		var out struct {
			Code int       `json:"code"`
			Data pay.Order `json:"data"`
		}
		st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[i].http+"/api/v1/pay/orders", tok,
			fmt.Sprintf(`{"product_id":1,"channel":"mock","req_id":%q}`, req), &out)
		return out.Data, st, out.Code
	}
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

	// Bindings to an order nobody has (an id of node 1's worker, made
	// now): fresh → 10409; old (its node died before writing it) → the
	// req_id is bound afresh, to one new order for every node.
	first, _ := strconv.ParseInt(ids[0], 10, 64)
	ghost := pay.NewIDGen("test", pay.WorkerOf(first), time.Now).Next(user)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{c.redis.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	bind := func(req string, at time.Time) {
		v := strconv.FormatInt(ghost, 10) + ":" + strconv.FormatInt(at.UnixMilli(), 10)
		key := "le:payreq:{" + strconv.Itoa(user) + "}:" + req
		if err := rdb.Do(context.Background(), rdb.B().Set().Key(key).Value(v).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	bind("fresh", time.Now())
	if _, st, code := create(1, "fresh"); st != 409 || code != proto.CodeConflict {
		t.Fatalf("a req_id bound just now to an order not written yet: %d %d, want 409 10409", st, code)
	}
	bind("stale", time.Now().Add(-time.Minute))
	o, st, _ := create(1, "stale")
	if st != 200 || o.OrderID == strconv.FormatInt(ghost, 10) {
		t.Fatalf("a req_id bound a minute ago to an order nobody has: %d %+v, want a new order", st, o)
	}
	for i := range c.nodes {
		if again, st, _ := create(i, "stale"); st != 200 || again.OrderID != o.OrderID {
			t.Fatalf("the re-bound req_id through node %d: %d %q, want %s", i, st, again.OrderID, o.OrderID)
		}
	}
}
