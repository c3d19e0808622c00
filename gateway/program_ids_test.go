package gateway_test

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// A node that takes over another node's worker id (its lease free: that
// node stopped) never makes that node's program ids again: a program id
// names its node by the worker id in its low bits, so a second program
// with the same id would take the first one's requests — GET /programs and
// new orders through any node reached a different show. Now ids carry the
// time of their making, after the lease moved; and the new holder answers
// the earlier holder's program "retry" (50000), not "not found" or its own.
func TestClusterProgramIDsNeverMadeAgainByTheNextWorkerHolder(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	cfgFor := func(id string) configs.Config {
		c := clusterNodeConfig(t, id, []string{"gw-1", "gw-2"}, rds, nats)
		c.Pay.WorkerID = 3
		return c
	}
	type created struct {
		Code int `json:"code"`
		Data struct {
			ProgramID int64 `json:"program_id"`
		} `json:"data"`
	}
	create := func(n *gateway.Node) int64 {
		t.Helper()
		var out created
		st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/admin/programs", nodetest.Token(t, n, 1, gateway.RoleAdmin), programBody, &out)
		if st != 200 || out.Code != 0 || out.Data.ProgramID <= 0 {
			t.Fatalf("create program: status %d %+v", st, out)
		}
		return out.Data.ProgramID
	}
	a := nodetest.Start(t, cfgFor("gw-1"))
	first := create(a)
	if err := a.Shutdown(context.Background()); err != nil { // its worker lease released
		t.Fatal(err)
	}
	b := nodetest.Start(t, cfgFor("gw-2")) // takes worker 3 over
	second := create(b)
	if second == first {
		t.Fatalf("gw-2, the next holder of worker 3, made program id %d again", first)
	}
	if second&31 != 3 || second > 1<<53 {
		t.Fatalf("program id %d: want worker 3 in its low bits and below 2^53", second)
	}
	var got struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
	}
	if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(b)+fmt.Sprintf("/api/v1/programs/%d", first), nodetest.Token(t, b, 700, gateway.RoleViewer), "", &got); st != 500 || got.Code != 50000 || !strings.Contains(got.Msg, "retry") {
		t.Fatalf("GET gw-1's program through gw-2: status %d %+v, want 50000 retry", st, got)
	}
	if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(b)+fmt.Sprintf("/api/v1/programs/%d", second), nodetest.Token(t, b, 700, gateway.RoleViewer), "", &got); st != 200 || got.Code != 0 {
		t.Fatalf("GET gw-2's program: status %d code %d", st, got.Code)
	}
}

// clusterNodeConfig is node id of a cluster of nodes on one Redis and one
// NATS (PROTOCOL §8), the shared wallet across them.
func clusterNodeConfig(t *testing.T, id string, nodes []string, rds *redistest.Server, nats *natstest.Server) configs.Config {
	c := nodetest.Config(t)
	c.Node.ID = id
	c.Cluster.Enabled = true
	c.NATS.Embedded = false
	c.NATS.URL = nats.URL
	c.Wallet.Mode = "shared"
	c.Wallet.Nodes = nodes
	c.Redis.Addr = rds.Addr
	return c
}

// clusterPairViaProxy starts two cluster nodes (gw-1, gw-2) on one Redis and
// NATS, gw-2 reaching Redis through the returned proxy (a test cuts it off).
func clusterPairViaProxy(t *testing.T) (n1, n2 *gateway.Node, px *redistest.Proxy) {
	t.Helper()
	rds, nats := redistest.Start(t), natstest.Start(t)
	px = redistest.StartProxy(t, rds.Addr)
	peers := []string{"gw-1", "gw-2"}
	n1 = nodetest.Start(t, clusterNodeConfig(t, "gw-1", peers, rds, nats))
	c2 := clusterNodeConfig(t, "gw-2", peers, rds, nats)
	c2.Redis.Addr = px.Addr
	return n1, nodetest.Start(t, c2), px
}

// replyCodes reads the replies to the n frames sent with ids from first on
// (pushes skipped) and counts those answered code.
func replyCodes(t *testing.T, r *nodetest.Raw, first int64, n, code int) int {
	t.Helper()
	k := 0
	for got := 0; got < n; {
		f := r.Next(10 * time.Second)
		if f.T == "" {
			t.Fatalf("%d of %d replies", got, n)
		}
		if f.ID < first {
			continue // a push, or an earlier reply
		}
		got++
		if f.Code == code {
			k++
		}
	}
	return k
}

// A node that comes back under another worker id (its old one taken, or
// set so) still serves the rains it made before: its anchor cancels a
// prepared rain through it and gets the total back. Before, the rain's code
// named the old worker id, whose lease nobody held: 50000 "unreachable",
// the anchor's coins held by a rain no node would serve.
func TestRainOfAnEarlierWorkerIDServedByItsNode(t *testing.T) {
	n1, cfg := workerNode(t, 3)
	const anchor = 1
	room := nodetest.OpenRoom(t, n1, anchor, 0)
	devCredit(t, n1, anchor, 100)
	st, r := rpCall(t, n1, anchor, "POST", fmt.Sprintf("/rooms/%d/redpackets", room), `{"total_amount":100,"total_count":5,"duration_s":10}`)
	if st != 200 {
		t.Fatalf("create: %d", st)
	}
	code := r.Data.Code
	if st, _ := rpCall(t, n1, anchor, "POST", "/redpackets/"+code+"/prepare", ""); st != 200 {
		t.Fatalf("prepare: %d", st)
	}
	if err := n1.Shutdown(context.Background()); err != nil { // its worker lease released
		t.Fatal(err)
	}
	cfg.Pay.WorkerID = 5
	n2 := nodetest.Start(t, cfg)
	if st, c := rpCall(t, n2, anchor, "POST", "/redpackets/"+code+"/cancel", ""); st != 200 || !c.Data.Cancelled || c.Data.Refunded != 100 {
		t.Fatalf("cancel through its node, now worker 5: %d %+v", st, c)
	}
	if b, _ := n2.Wallet.Balance(anchor); b != 100 {
		t.Fatalf("anchor balance %d, want 100", b)
	}
	// A code of worker 3 that no rain has (its first character kept, the
	// rest reversed): no node holds worker 3 now, and a grab is "not
	// found", not a "retry" a client would repeat for ever.
	made := []byte(code)
	slices.Reverse(made[1:])
	if st, g := rpCall(t, n2, 300, "POST", "/redpackets/"+string(made)+"/grab", ""); g.Code != proto.CodeRedPacketNotFound {
		t.Fatalf("grab of a made-up code of an unheld worker id: %d %+v, want 30001", st, g)
	}
}

// A payment order made by a node that came back under another worker id is
// still served by that node (it is on its disk): GET through it answers the
// order. Before, the order's worker id routed it to the id's lease, held by
// nobody: 50000 "unreachable" for good (and a webhook the same).
func TestOrderOfAnEarlierWorkerIDServedByItsNode(t *testing.T) {
	n1, cfg := workerNode(t, 3)
	const user = 77
	o, err := n1.Pay.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "w"})
	if err != nil {
		t.Fatal(err)
	}
	if err := n1.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	cfg.Pay.WorkerID = 5
	n2 := nodetest.Start(t, cfg)
	if st, got := orderThrough(t, n2, user, o.OrderID); st != 200 || got.Data.OrderID != o.OrderID {
		t.Fatalf("GET the order through its node, now worker 5: %d %+v", st, got)
	}
}

// A program made by a node that came back under another worker id is still
// served by that node (it holds the program): GET and an order through it
// work. Before, the program id's worker bits routed it to the old id's
// lease, held by nobody: 50000 "unreachable" for as long as the ids stayed
// swapped — the show could neither be viewed nor sold.
func TestProgramOfAnEarlierWorkerIDServedByItsNode(t *testing.T) {
	n1, cfg := workerNode(t, 3)
	var made struct {
		Data struct {
			ProgramID int64 `json:"program_id"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n1)+"/api/v1/admin/programs", nodetest.Token(t, n1, 1, gateway.RoleAdmin), programBody, &made); st != 200 || made.Data.ProgramID&31 != 3 {
		t.Fatalf("create program: %d %+v", st, made)
	}
	if err := n1.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	cfg.Pay.WorkerID = 5
	n2 := nodetest.Start(t, cfg)
	var got struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
	}
	if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n2)+fmt.Sprintf("/api/v1/programs/%d", made.Data.ProgramID), nodetest.Token(t, n2, 700, gateway.RoleViewer), "", &got); st != 200 || got.Code != 0 {
		t.Fatalf("GET the program through its node, now worker 5: %d %+v", st, got)
	}
}

// workerNode starts a one-node cluster (its own Redis and NATS) on worker
// id worker, and returns its config to restart it with.
func workerNode(t *testing.T, worker int) (*gateway.Node, configs.Config) {
	t.Helper()
	cfg := clusterNodeConfig(t, "gw-1", []string{"gw-1"}, redistest.Start(t), natstest.Start(t))
	cfg.Pay.WorkerID = worker
	return nodetest.Start(t, cfg), cfg
}

// A node away (a restart, an outage) keeps its worker id: gw-1 and gw-23 both
// start from id 1 (their hash); gw-1 holds it, gw-23 takes the next. With
// gw-1 down, gw-23 restarts: it takes its own id again, not gw-1's free one;
// gw-1 comes back to 1, and the order it made is reached through gw-23
// (forwarded by the id's lease). Before, gw-23 restarting took id 1, gw-1
// came back under another, and the order was routed to gw-23, which does
// not have it.
func TestWorkerIDKeptWhileItsNodeIsAway(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	peers := []string{"gw-1", "gw-23"}
	cfg1, cfg23 := clusterNodeConfig(t, "gw-1", peers, rds, nats), clusterNodeConfig(t, "gw-23", peers, rds, nats)
	n1 := nodetest.Start(t, cfg1)
	n23 := nodetest.Start(t, cfg23)
	const user = 77
	o, err := n1.Pay.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "w"})
	if err != nil {
		t.Fatal(err)
	}
	if w := pay.WorkerOf(mustID(t, o.OrderID)); w != 1 {
		t.Fatalf("gw-1's order has worker %d, want its hash's 1", w)
	}
	for _, n := range []*gateway.Node{n1, n23} { // gw-1 away; gw-23 restarts meanwhile
		if err := n.Shutdown(context.Background()); err != nil { // its lease released
			t.Fatal(err)
		}
	}
	n23 = nodetest.Start(t, cfg23)
	n1 = nodetest.Start(t, cfg1)
	if st, got := orderThrough(t, n23, user, o.OrderID); st != 200 || got.Data.OrderID != o.OrderID {
		t.Fatalf("GET gw-1's order through gw-23: %d %+v", st, got)
	}
	// Each node makes new orders under its own id.
	for _, n := range []*gateway.Node{n1, n23} {
		if _, err := n.Pay.CreateOrder(user+1, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "x" + n.Config.Node.ID}); err != nil {
			t.Fatalf("%s: %v", n.Config.Node.ID, err)
		}
	}
}

func mustID(t *testing.T, s string) int64 {
	t.Helper()
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// A second process started under a node.id another running node holds is
// refused (its presence keeps being refreshed): the two would share the
// worker lease, the forwarded requests of le.pay.<id> and the shared
// wallet's records of the id. Once the first stops (gracefully: its presence
// goes), the id is free. Before, the second started.
func TestNodeIDInUseRefused(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	cfg := func() configs.Config {
		c := clusterNodeConfig(t, "gw-1", []string{"gw-1"}, rds, nats)
		c.Cluster.PresenceTTL = configsDuration(time.Second)
		return c
	}
	first := nodetest.Start(t, cfg())
	if n, err := gateway.New(cfg(), nil); err == nil || !strings.Contains(err.Error(), "in use") {
		if n != nil {
			_ = n.Shutdown(context.Background())
		}
		t.Fatalf("a second node gw-1: %v, want refused", err)
	}
	if err := first.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	nodetest.Start(t, cfg())
}

// orderReply is the envelope of GET /pay/orders/{id}.
type orderReply struct {
	Code int       `json:"code"`
	Msg  string    `json:"msg"`
	Data pay.Order `json:"data"`
}

// orderThrough GETs order id as user through node n.
func orderThrough(t *testing.T, n *gateway.Node, user int64, id string) (int, orderReply) {
	t.Helper()
	var got orderReply
	st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n)+"/api/v1/pay/orders/"+id, nodetest.Token(t, n, user, gateway.RoleViewer), "", &got)
	return st, got
}
