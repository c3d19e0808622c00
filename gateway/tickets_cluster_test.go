package gateway_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// ticketCallAs does one ticket API call through n as user (of role).
func ticketCallAs(t *testing.T, n *gateway.Node, user int64, role, method, path, body string) (int, ticketReply[map[string]any]) {
	t.Helper()
	var r ticketReply[map[string]any]
	st := nodetest.DoJSON(t, method, nodetest.HTTPURL(n)+"/api/v1"+path, nodetest.Token(t, n, user, role), body, &r)
	return st, r
}

// ticketPair starts two cluster nodes on one Redis and NATS, and a program
// through each (one category of rows × cols seats at 10 coins; 4 seats an
// order, 6 a user): pids[i] is node i+1's.
func ticketPair(t *testing.T, rows, cols int) (n1, n2 *gateway.Node, pids [2]int64, rds *redistest.Server) {
	t.Helper()
	rds, nats := redistest.Start(t), natstest.Start(t)
	peers := []string{"gw-1", "gw-2"}
	n1 = nodetest.Start(t, clusterNodeConfig(t, "gw-1", peers, rds, nats))
	n2 = nodetest.Start(t, clusterNodeConfig(t, "gw-2", peers, rds, nats))
	prog := fmt.Sprintf(`{"name":"S","categories":[{"category_id":1,"name":"A","price":10,"rows":%d,"cols":%d}],"per_order_max":4,"per_user_max":6}`, rows, cols)
	for i, n := range []*gateway.Node{n1, n2} {
		st, r := ticketCallAs(t, n, 1, gateway.RoleAdmin, "POST", "/admin/programs", prog)
		if st != 200 || r.Code != 0 {
			t.Fatalf("program through node %d: %d %+v", i+1, st, r)
		}
		pids[i] = int64(r.Data["program_id"].(float64))
	}
	return n1, n2, pids, rds
}

// PROTOCOL §5 in a cluster: the same (user, req_id) sent for programs of two
// nodes is one order — each node's idempotency record knew its own orders
// only, and the second program's node placed (and charged, pay "coins") a
// second order. The req_id is bound in Redis to the program it was first
// sent for: sent again for another program, through any node, it answers
// the first order, nothing moves; after Redis lost its data the binding is
// rebuilt from the nodes' disks with the wallet. A program id no node's
// worker id holds is "not found" (10004, it was 50000 "retry" for ever),
// and an order without a program_id 10001.
func TestTicketReqIDNamesOneOrderAcrossTheCluster(t *testing.T) {
	const buyer = 900
	n1, n2, pids, rds := ticketPair(t, 2, 5)
	walletReady := func(what string) {
		t.Helper()
		nodetest.Eventually(t, 20*time.Second, func() bool {
			return getReadyz(t, n1).status == 200 && getReadyz(t, n2).status == 200
		}, what)
	}
	walletReady("the wallet ready")
	devCredit(t, n1, buyer, 100)
	order := func(n *gateway.Node, program int64) ticketReply[map[string]any] {
		t.Helper()
		st, r := ticketCallAs(t, n, buyer, gateway.RoleViewer, "POST", "/tickets/orders",
			fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":1,"req_id":"same","pay":"coins"}`, program))
		if st != 200 || r.Code != 0 {
			t.Fatalf("order for program %d: %d %+v", program, st, r)
		}
		return r
	}
	first := order(n1, pids[0])
	if first.Data["status"] != "PAID" {
		t.Fatalf("first order: %+v", first)
	}
	check := func(when string) {
		t.Helper()
		// The second program first: after a loss, a binding not rebuilt
		// would be made anew for it.
		for _, via := range []*gateway.Node{n2, n1} {
			for _, p := range []int64{pids[1], pids[0]} {
				if r := order(via, p); r.Data["order_id"] != first.Data["order_id"] || r.Data["program_id"] != float64(pids[0]) {
					t.Fatalf("%s: the req_id again for program %d: order %v of program %v, want the first, %v", when, p, r.Data["order_id"], r.Data["program_id"], first.Data["order_id"])
				}
			}
		}
		var w struct {
			Data struct {
				Balance int64 `json:"balance"`
			} `json:"data"`
		}
		if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n2)+"/api/v1/wallet", nodetest.Token(t, n2, buyer, gateway.RoleViewer), "", &w); st != 200 || w.Data.Balance != 90 {
			t.Fatalf("%s: balance %d (%d), want 90: one order paid", when, w.Data.Balance, st)
		}
		_, v := ticketCallAs(t, n1, buyer, gateway.RoleViewer, "GET", fmt.Sprintf("/programs/%d", pids[1]), "")
		cat := v.Data["categories"].([]any)[0].(map[string]any)
		if cat["remaining"] != float64(10) || cat["locked"] != float64(0) || cat["sold"] != float64(0) {
			t.Fatalf("%s: the second program's seats %v, want all 10 free", when, cat)
		}
	}
	check("bound")

	// Redis loses everything: the binding comes back with the wallet.
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{rds.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Do(context.Background(), c.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	nodetest.Eventually(t, 20*time.Second, func() bool {
		st, err := c.Do(context.Background(), c.B().Hget().Key(persist.SharedMetaKey).Field("state").Build()).ToString()
		return err == nil && st == "ready"
	}, "the wallet rebuilt")
	walletReady("the nodes ready again")
	check("after a Redis loss")

	// A program id whose worker bits no node holds.
	used := map[int64]bool{pids[0] & 31: true, pids[1] & 31: true}
	var w int64
	for ; used[w]; w++ {
	}
	bogus := pids[0]&^31 | w
	if st, r := ticketCallAs(t, n1, buyer, gateway.RoleViewer, "GET", fmt.Sprintf("/programs/%d", bogus), ""); st != 404 || r.Code != proto.CodeNotFound {
		t.Fatalf("GET an unknown program: %d %+v, want 404 10004", st, r)
	}
	if st, r := ticketCallAs(t, n1, buyer, gateway.RoleViewer, "POST", "/tickets/orders",
		fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":1,"req_id":"other"}`, bogus)); st != 404 || r.Code != proto.CodeNotFound {
		t.Fatalf("order for an unknown program: %d %+v, want 404 10004", st, r)
	}
	if st, r := ticketCallAs(t, n1, buyer, gateway.RoleViewer, "POST", "/tickets/orders", `{"category_id":1,"count":1,"req_id":"x"}`); st != 400 || r.Code != proto.CodeBadRequest {
		t.Fatalf("order without a program_id: %d %+v, want 400 10001", st, r)
	}
	// The typo's req_id is not held: sent again for the right program, it
	// places (it was bound to the unknown id, and answered "retry" for a
	// day).
	if st, r := ticketCallAs(t, n2, buyer, gateway.RoleViewer, "POST", "/tickets/orders",
		fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":1,"req_id":"other"}`, pids[1])); st != 200 || r.Code != 0 || r.Data["program_id"] != float64(pids[1]) {
		t.Fatalf("the typo's req_id for the right program: %d %+v, want the order placed", st, r)
	}
	// Refused requests hold no binding: a user sending many (over the
	// per-minute bound, past per_user_max) leaves no key a day each.
	for i := range 40 {
		ticketCallAs(t, n1, buyer, gateway.RoleViewer, "POST", "/tickets/orders",
			fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":4,"req_id":"many-%d"}`, pids[i%2], i))
	}
	keys, err := c.Do(context.Background(), c.B().Keys().Pattern("liveedge:tixreq:*").Build()).AsStrSlice()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) > 6 {
		t.Fatalf("%d req_id bindings after 40 mostly refused orders: %v", len(keys), keys)
	}
}

// One (user, req_id) sent at once for a program of each node, and once
// more refused (more seats than per_order_max): one order at most, paid
// once, and the req_id bound to its program (none when no order was made).
// Before, a refused request let go of the binding another request of the
// req_id was placing under, and a third request placed a second order on
// the other node (14 of 80 runs charged twice, in a review).
func TestTicketReqIDRacesPlaceOneOrder(t *testing.T) {
	n1, n2, pids, rds := ticketPair(t, 40, 40)
	nodetest.Eventually(t, 20*time.Second, func() bool {
		return getReadyz(t, n1).status == 200 && getReadyz(t, n2).status == 200
	}, "the nodes ready")
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{rds.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	runs := 40
	if raceEnabled {
		runs = 15
	}
	for i := range runs {
		user := int64(20000 + i)
		devCredit(t, n1, user, 100)
		var wg sync.WaitGroup
		call := func(n *gateway.Node, p int64, count int, delay time.Duration) {
			defer wg.Done()
			time.Sleep(delay)
			ticketCallAs(t, n, user, gateway.RoleViewer, "POST", "/tickets/orders",
				fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":%d,"req_id":"race","pay":"coins"}`, p, count))
		}
		d := time.Duration(i%10) * 200 * time.Microsecond
		wg.Add(3)
		go call(n2, pids[0], 5, 0)
		go call(n1, pids[0], 1, d)
		go call(n2, pids[1], 1, d+time.Duration(i%7)*300*time.Microsecond)
		wg.Wait()
		var made []int64
		for k, n := range []*gateway.Node{n1, n2} {
			if o, err := n.Tickets.PlacedFor(user, "race"); err == nil && o.ProgramID == pids[k] {
				made = append(made, pids[k])
			}
		}
		var w struct {
			Data struct {
				Balance int64 `json:"balance"`
			} `json:"data"`
		}
		nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n2)+"/api/v1/wallet", nodetest.Token(t, n2, user, gateway.RoleViewer), "", &w)
		if len(made) > 1 || w.Data.Balance != 100-10*int64(len(made)) {
			t.Fatalf("run %d: orders of one req_id on programs %v, balance %d", i, made, w.Data.Balance)
		}
		v, err := c.Do(context.Background(), c.B().Get().Key(fmt.Sprintf("liveedge:tixreq:{%d}:race", user)).Build()).ToString()
		switch {
		case len(made) == 1 && (err != nil || v != strconv.FormatInt(made[0], 10)):
			t.Fatalf("run %d: the order's program %d, the binding %q (%v)", i, made[0], v, err)
		case len(made) == 0 && !rueidis.IsRedisNil(err):
			t.Fatalf("run %d: no order, the binding %q (%v) kept", i, v, err)
		}
	}
}
