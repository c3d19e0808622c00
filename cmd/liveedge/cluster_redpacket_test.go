package main

import (
	"context"
	binenc "encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

// rainView is GET /redpackets/{code}'s d.
type rainView struct {
	State         string `json:"state"`
	GrantedCount  int    `json:"granted_count"`
	GrantedAmount int64  `json:"granted_amount"`
	Refunded      int64  `json:"refunded"`
	EndsAt        int64  `json:"ends_at"`
	FinishedAt    int64  `json:"finished_at"`
	Nodes         []struct {
		Node    string `json:"node"`
		Count   int    `json:"count"`
		Granted int    `json:"granted"`
	} `json:"nodes"`
}

// clusterRain is a rain owned by gw-1 in a room whose grabbers are spread
// over every node of c.
type clusterRain struct {
	c         *testCluster
	anchorTok string
	room      int64
	code      string
	cls       []*clientsdk.Client
	logs      []*pushLog
	users     []int64
}

// fundAnchor credits user through httpAddr (dev credit, req_id reqID).
func fundAnchor(t *testing.T, httpAddr string, user, amount int64, reqID string) {
	t.Helper()
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":%d,"req_id":%q}`, user, amount, reqID), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
}

// createRainVia creates a rain in room through httpAddr (that node owns
// it) and returns its code.
func createRainVia(t *testing.T, httpAddr, anchorTok string, room, total int64, count int, dur time.Duration) string {
	t.Helper()
	var created struct {
		Data struct {
			Code string `json:"code"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "POST", fmt.Sprintf("http://%s/api/v1/rooms/%d/redpackets", httpAddr, room), anchorTok,
		fmt.Sprintf(`{"total_amount":%d,"total_count":%d,"duration_s":%d}`, total, count, int(dur.Seconds())), &created); st != 200 {
		t.Fatalf("create a rain through %s: %d", httpAddr, st)
	}
	return created.Data.Code
}

// newClusterRain opens a room on gw-1, funds and creates a rain of total in
// count packets lasting dur, and connects grabbers viewers (user ids from
// 100,000), spread round-robin over the nodes, each joined to the room.
func newClusterRain(t *testing.T, c *testCluster, total int64, count, grabbers int, dur time.Duration) *clusterRain {
	t.Helper()
	const anchor = 1
	r := &clusterRain{c: c, anchorTok: devToken(t, c.nodes[0].http, anchor, "anchor")}
	r.room = openRoom(t, c.nodes[0].http, r.anchorTok)
	fundAnchor(t, c.nodes[0].http, anchor, total, "seed")
	r.code = createRainVia(t, c.nodes[0].http, r.anchorTok, r.room, total, count, dur)
	r.cls, r.logs, r.users = make([]*clientsdk.Client, grabbers), make([]*pushLog, grabbers), make([]int64, grabbers)
	ctx := context.Background()
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := range r.cls {
		r.logs[i], r.users[i] = &pushLog{}, int64(100_000+i)
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer func() { <-sem; wg.Done() }()
			nd := c.nodes[i%len(c.nodes)]
			var others []string // a client whose node dies goes on through another
			for j := 1; j < len(c.nodes); j++ {
				others = append(others, "ws://"+c.nodes[(i+j)%len(c.nodes)].ws+"/ws")
			}
			// A minute per request and per frame write, not the SDK's 10 s:
			// under -race this process's thousands of clients take both
			// cores (measured in TestClusterRedPacketGrabStorm), and a client's
			// goroutine can wait that long between setting its write
			// deadline and writing ("write: i/o timeout" on a 3-frame
			// connection, with another test package running beside it).
			cl, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + nd.ws + "/ws", URLs: others,
				Token: devTokenCached(t, nd.http, r.users[i]), OnPush: r.logs[i].add, RequestTimeout: time.Minute})
			if err != nil {
				t.Error(err)
				return
			}
			r.cls[i] = cl
			if _, err := cl.Join(ctx, r.room); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, cl := range r.cls {
			if cl != nil {
				cl.Close()
			}
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	pollUntil(t, 10*time.Second, "every grabber in the room's presence", func() bool {
		return roomOnline(t, c.nodes[0].http, r.anchorTok, r.room) == grabbers
	})
	for i, op := range []string{"prepare", "start"} {
		nd := c.nodes[(i+1)%len(c.nodes)]
		if st := nodetest.DoJSON(t, "POST", "http://"+nd.http+"/api/v1/redpackets/"+r.code+"/"+op, r.anchorTok, "", nil); st != 200 {
			t.Fatalf("%s: %d", op, st)
		}
	}
	return r
}

// view reads the rain through node i.
func (r *clusterRain) view(t *testing.T, i int) rainView {
	t.Helper()
	v, st := r.tryView(t, i)
	if st != 200 {
		t.Fatalf("GET rain through node %d: %d", i+1, st)
	}
	return v
}

// tryView reads the rain through node i: its view and the HTTP status.
func (r *clusterRain) tryView(t *testing.T, i int) (rainView, int) {
	t.Helper()
	var v struct {
		Data rainView `json:"data"`
	}
	st := nodetest.DoJSON(t, "GET", "http://"+r.c.nodes[i].http+"/api/v1/redpackets/"+r.code, r.anchorTok, "", &v)
	return v.Data, st
}

// waitFinished waits for the rain to be settled and returns its view.
func (r *clusterRain) waitFinished(t *testing.T, d time.Duration) rainView {
	t.Helper()
	var v rainView
	pollUntil(t, d, "the rain settled", func() bool { v = r.view(t, 1); return v.State == "FINISHED" })
	return v
}

// checkGrants stops the nodes and checks, from their Pebble stores and the
// shared wallet in Redis: no packet granted on two nodes, Σ grants + refund
// = total, every grab answered ok is among the durable grants (exact: they
// are all of them — no node died with answers in flight), every grabber's
// balance is exactly what its durable grants credited (credited once), and
// money conserved across every ledger.
func (r *clusterRain) checkGrants(t *testing.T, total int64, v rainView, okAmount map[int64]int64, exact bool) {
	t.Helper()
	dirs := r.c.stopAll()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{r.c.redis.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	seen := map[uint32]bool{}
	granted := map[int64]int64{}
	var sum int64
	for _, d := range dirs {
		st, err := persist.Open(d)
		if err != nil {
			t.Fatal(err)
		}
		err = st.Scan([]byte("rec/rpgrant/"+r.code+"/"), func(k, val []byte) error {
			idx := binenc.BigEndian.Uint32(k[len(k)-4:])
			if seen[idx] {
				t.Errorf("packet %d granted on two nodes", idx)
			}
			seen[idx] = true
			var g struct {
				User   int64 `json:"user"`
				Amount int64 `json:"amount"`
			}
			if err := proto.Unmarshal(val, &g); err != nil {
				return err
			}
			granted[g.User] += g.Amount
			sum += g.Amount
			return nil
		})
		_ = st.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(seen) != v.GrantedCount || sum != v.GrantedAmount || sum+v.Refunded != total {
		t.Fatalf("durable grants %d (%d coins); view %d (%d) refund %d; total %d", len(seen), sum, v.GrantedCount, v.GrantedAmount, v.Refunded, total)
	}
	for u, a := range okAmount {
		if granted[u] < a || exact && granted[u] != a {
			t.Errorf("user %d was answered ok for %d coins, durable grants %d", u, a, granted[u])
		}
	}
	for _, u := range r.users {
		bal, err := persist.RedisBalance(rdb, u)
		if err != nil {
			t.Fatal(err)
		}
		if bal != granted[u] {
			t.Errorf("user %d balance %d, granted %d: credited %s", u, bal, granted[u], map[bool]string{true: "twice", false: "not once"}[bal > granted[u]])
		}
	}
	cr, db, bal := persisttest.CheckSharedConservation(t, r.c.redis.Addr, dirs...)
	if bal != total || cr-db != total {
		t.Fatalf("credits %d debits %d balances %d, want balances %d", cr, db, bal, total)
	}
}

// envInt reads a test knob (def when unset).
func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// Issue 13 item 2: grabbers spread over three node processes all grab a
// rain of 1,000 packets at once. Exactly 1,000 grants, Σ = T, no packet
// twice, each grant credited once, every node granted from its own slice,
// conservation. LIVEEDGE_TEST_GRABBERS sets the grabbers (10,000 for the
// issue's run; make test runs 2,000 to keep its time).
func TestClusterRedPacketGrabStorm(t *testing.T) {
	grabbers := envInt("LIVEEDGE_TEST_GRABBERS", 2000)
	const count, total = 1000, 100_000
	c := startCluster(t, 3, "LIVEEDGE_REDPACKET_ONE_PER_USER=true")
	r := newClusterRain(t, c, total, count, grabbers, 60*time.Second)
	started := time.Now()
	var mu sync.Mutex
	okAmount := map[int64]int64{}
	var last atomic.Int64
	var wg sync.WaitGroup
	// Each grab may take up to a minute (the clients' RequestTimeout, set
	// in newClusterRain): under -race the 2,000 clients of this test process
	// take 1.5–1.9 of the 2 cores (top; the three nodes 0.1–0.4 each), so
	// the storm's last answer came 2.4–6.3 s after the start here and past
	// 10 s in one CI run. What is checked is exactly-once, not this
	// process's speed.
	ctx := context.Background()
	for i, cl := range r.cls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var pe *proto.Error
			rep, err := cl.Grab(ctx, r.code)
			switch {
			case err == nil:
				mu.Lock()
				okAmount[r.users[i]] += rep.Amount
				mu.Unlock()
				last.Store(int64(time.Since(started)))
			case errors.As(err, &pe) && pe.Code == proto.CodeRedPacketEmpty:
			default:
				t.Errorf("grab %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	if len(okAmount) != count {
		t.Fatalf("%d grabbers answered ok for %d packets", len(okAmount), count)
	}
	v := r.waitFinished(t, 10*time.Second)
	if v.GrantedCount != count || v.GrantedAmount != total || v.Refunded != 0 || len(v.Nodes) != 3 {
		t.Fatalf("view %+v", v)
	}
	for _, ns := range v.Nodes {
		if ns.Granted == 0 {
			t.Errorf("node %s granted nothing: %+v", ns.Node, v.Nodes)
		}
	}
	// Every ok grabber got its 5570 once (deduplicated by mid).
	credits := 0
	for i, lg := range r.logs {
		mids := map[string]bool{}
		for _, p := range lg.get(proto.BizWalletCredit) {
			mids[p.Mid] = true
		}
		if _, ok := okAmount[r.users[i]]; ok != (len(mids) == 1) || len(mids) > 1 {
			t.Errorf("grabber %d: %d credit pushes, granted %v", i, len(mids), ok)
		}
		credits += len(mids)
	}
	t.Logf("%d grabbers over 3 nodes, %d packets: last grant %v after the start request; per node %+v",
		grabbers, count, time.Duration(last.Load()).Round(time.Millisecond), v.Nodes)
	r.checkGrants(t, total, v, okAmount, true)
}

// Issue 13 item 4: a node holding a slice is killed (SIGKILL) in the middle
// of a grab storm and restarted; the rain ends on time; every grab answered
// ok is credited exactly once and Σ granted + refunded = T.
func TestClusterRedPacketNodeKilledMidRain(t *testing.T) {
	// Each grabber comes back every 500 ms (≤ 1,800 grabs/s in all), so
	// 6,000 packets last beyond the kill and the restart. The rain may last
	// 20 s (it ends sooner once its packets are gone): with 8 s, a loaded
	// machine (a race build beside other tests) once took the whole rain to
	// reach the kill, and no grant could follow it.
	const count, total, grabbers = 6000, 600_000, 900
	c := startCluster(t, 3, "LIVEEDGE_REDPACKET_ONE_PER_USER=false", "LIVEEDGE_REDPACKET_GRAB_INTERVAL=0s")
	r := newClusterRain(t, c, total, count, grabbers, 20*time.Second)
	var mu sync.Mutex
	okAmount := map[int64]int64{}
	var wg sync.WaitGroup
	var granted atomic.Int64
	ctx := context.Background()
	stop := make(chan struct{})
	// grabLoop has user grab through cl until the rain is over (or stop),
	// coming back every 500 ms, recording what each ok answer said.
	grabLoop := func(cl *clientsdk.Client, user int64) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				rep, err := cl.Grab(ctx, r.code)
				if err == nil {
					mu.Lock()
					okAmount[user] += rep.Amount
					mu.Unlock()
					granted.Add(1)
				}
				var pe *proto.Error
				if errors.As(err, &pe) && pe.Code == proto.CodeRedPacketEmpty || errors.Is(err, clientsdk.ErrClosed) {
					return
				}
				time.Sleep(500 * time.Millisecond)
			}
		}()
	}
	for i, cl := range r.cls {
		grabLoop(cl, r.users[i])
	}
	// A third of the packets took 3.3–4.5 s here, with this process's
	// race-built clients the bottleneck; in the CI run where GrabStorm's
	// grabs passed 10 s this test failed too. A quarter within 15 s still
	// kills the node mid-rain, 5 s or more before its end.
	pollUntil(t, 15*time.Second, "a quarter of the packets granted", func() bool { return granted.Load() >= count/4 })
	victim := c.nodes[2]
	if err := syscall.Kill(victim.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-victim.p.done
	killedAt := granted.Load()
	time.Sleep(300 * time.Millisecond)
	victim.p = start(t, "", victim.env, binary(t))
	waitReady(t, victim.p, victim.http)
	// New viewers on the restarted node grab through it too (its earlier
	// clients went on through the other nodes).
	for u := int64(8000); u < 8030; u++ {
		cl := dialLogged(t, victim.ws, devToken(t, victim.http, u, "viewer"), &pushLog{})
		if _, err := cl.Join(ctx, r.room); err != nil {
			t.Fatal(err)
		}
		r.users = append(r.users, u)
		grabLoop(cl, u)
	}
	v := r.waitFinished(t, 30*time.Second)
	close(stop)
	wg.Wait()
	if v.State != "FINISHED" || granted.Load() <= killedAt {
		t.Fatalf("view %+v; %d grants answered ok, %d of them before the kill", v, granted.Load(), killedAt)
	}
	t.Logf("granted %d (%d coins), refunded %d, %d grabs answered ok (%d before the kill); nodes %+v",
		v.GrantedCount, v.GrantedAmount, v.Refunded, granted.Load(), killedAt, v.Nodes)
	// Ended as "none left" before its time: the killed node's unused slice
	// was found missing there after its restart and granted elsewhere, not
	// stranded until the end and refunded.
	if v.FinishedAt < v.EndsAt && (v.GrantedCount != count || v.Refunded != 0) {
		t.Errorf("the rain ended as none left with %d of %d packets granted, %d refunded", v.GrantedCount, count, v.Refunded)
	}
	// A grant made durable on the killed node whose answer died with it is
	// credited, though its grabber never heard "ok".
	r.checkGrants(t, total, v, okAmount, false)
}

// secondRainPrepared starts two nodes with a one-packet rain running in a
// room, owned by gw-1, and a second rain of that room prepared through gw-2
// (base: its URL there).
func secondRainPrepared(t *testing.T) (*testCluster, *clusterRain, string) {
	t.Helper()
	c := startCluster(t, 2, "LIVEEDGE_REDPACKET_PREPARE_INTERVAL=0s", "LIVEEDGE_REDPACKET_START_INTERVAL=0s")
	r := newClusterRain(t, c, 10, 1, 1, 30*time.Second)
	second := createRainVia(t, c.nodes[1].http, r.anchorTok, r.room, 10, 1, 30*time.Second)
	fundAnchor(t, c.nodes[0].http, 1, 10, "seed2")
	base := "http://" + c.nodes[1].http + "/api/v1/redpackets/" + second
	if st := nodetest.DoJSON(t, "POST", base+"/prepare", r.anchorTok, "", nil); st != 200 {
		t.Fatalf("prepare the second: %d", st)
	}
	return c, r, base
}

// One running rain per room holds cluster-wide: a second rain of the room,
// owned by another node, cannot start while the first runs (10409), and can
// once the first has ended.
func TestClusterOneRunningRainPerRoom(t *testing.T) {
	_, r, base := secondRainPrepared(t)
	var refused struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "POST", base+"/start", r.anchorTok, "", &refused); st != 409 || refused.Code != proto.CodeConflict {
		t.Fatalf("second rain started on another node while the first runs: HTTP %d code %d", st, refused.Code)
	}
	if _, err := r.cls[0].Grab(context.Background(), r.code); err != nil { // the only packet: the first rain ends
		t.Fatal(err)
	}
	r.waitFinished(t, 5*time.Second)
	if st := nodetest.DoJSON(t, "POST", base+"/start", r.anchorTok, "", nil); st != 200 {
		t.Fatalf("second rain after the first ended: HTTP %d", st)
	}
}

// Redis restarts empty while a rain runs: its owner writes it again as the
// room's running rain within a second, so a second rain of the room, owned
// by another node, still cannot start.
func TestClusterOneRunningRainPerRoomAfterRedisLoss(t *testing.T) {
	c, r, base := secondRainPrepared(t)
	c.redis.Restart() // empty: the room's running-rain key is gone
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{c.redis.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	pollUntil(t, 10*time.Second, "the room's running rain written again", func() bool {
		v, err := rdb.Do(context.Background(), rdb.B().Get().Key("le:rprun:{"+strconv.FormatInt(r.room, 10)+"}").Build()).ToString()
		return err == nil && v == r.code
	})
	var refused struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "POST", base+"/start", r.anchorTok, "", &refused); st != 409 || refused.Code != proto.CodeConflict {
		t.Fatalf("second rain started after Redis lost the room's key: HTTP %d code %d", st, refused.Code)
	}
}

// Redis restarts empty while a rain runs: the one-per-user places are
// rebuilt from the nodes' durable grants with the wallet, so a user granted
// a packet before — on the rain's node or on another one — is refused a
// second (30002), and a user who had none is still served. Money conserved,
// each grant credited once.
func TestClusterOnePacketPerUserAfterRedisLoss(t *testing.T) {
	c := startCluster(t, 2, "LIVEEDGE_REDPACKET_ONE_PER_USER=true", "LIVEEDGE_REDPACKET_GRAB_INTERVAL=0s")
	const total = 300
	// Four packets, three grabbers: the rain ends by time, the fourth packet
	// refunded (what this test checks is one packet per user).
	r := newClusterRain(t, c, total, 4, 3, 12*time.Second) // grabbers on gw-1, gw-2, gw-1
	ctx := context.Background()
	ok := map[int64]int64{}
	for i := range 2 {
		g, err := r.cls[i].Grab(ctx, r.code)
		if err != nil {
			t.Fatalf("grabber %d: %v", i, err)
		}
		ok[r.users[i]] = g.Amount
		if _, err := r.cls[i].Grab(ctx, r.code); nodetest.CodeOf(err) != proto.CodeRedPacketTaken {
			t.Fatalf("grabber %d's second grab before the loss: %v", i, err)
		}
	}
	c.redis.Restart() // empty: the rain's set of users is gone
	c.waitReady(t, "the shared wallet rebuilt")
	for i := range 2 {
		var err error
		pollUntil(t, 10*time.Second, "an answer other than unavailable", func() bool {
			_, err = r.cls[i].Grab(ctx, r.code)
			return nodetest.CodeOf(err) != proto.CodeInternal
		})
		if nodetest.CodeOf(err) != proto.CodeRedPacketTaken {
			t.Fatalf("grabber %d (on gw-%d) grabbed again after Redis lost the set: %v", i, i%2+1, err)
		}
	}
	var g clientsdk.GrabResult
	var err error
	pollUntil(t, 10*time.Second, "the third grabber served", func() bool {
		g, err = r.cls[2].Grab(ctx, r.code)
		return nodetest.CodeOf(err) != proto.CodeInternal
	})
	if err != nil {
		t.Fatalf("a grabber with no packet after the rebuild: %v", err)
	}
	ok[r.users[2]] = g.Amount
	// Through gw-2, forwarded to the owner: found through its worker lease,
	// which the owner writes again within a second of Redis losing it
	// ("unreachable, retry" meanwhile).
	var v rainView
	pollUntil(t, 30*time.Second, "the rain settled", func() bool {
		var st int
		v, st = r.tryView(t, 1)
		return st == 200 && v.State == "FINISHED"
	})
	r.checkGrants(t, total, v, ok, true)
}

// A viewer who joins on a node other than the rain's and grabs at once is
// served: the node checks its own members (the cluster's presence reaches
// the owner only up to 200 ms later).
func TestClusterGrabRightAfterJoin(t *testing.T) {
	c := startCluster(t, 2)
	r := newClusterRain(t, c, 100, 10, 1, 30*time.Second) // its one grabber is on gw-1
	for u := int64(7000); u < 7005; u++ {
		cl := dialLogged(t, c.nodes[1].ws, devToken(t, c.nodes[1].http, u, "viewer"), &pushLog{})
		if _, err := cl.Join(context.Background(), r.room); err != nil {
			t.Fatal(err)
		}
		if _, err := cl.Grab(context.Background(), r.code); err != nil {
			t.Fatalf("grab right after joining through gw-2: %v", err)
		}
	}
}

// An anchor's prepares are limited across the nodes (one per
// redpacket.prepare_interval, limit.Shared): a second rain prepared through
// another node right after the first is 10429.
func TestClusterPrepareIntervalAcrossNodes(t *testing.T) {
	c := startCluster(t, 2, "LIVEEDGE_REDPACKET_PREPARE_INTERVAL=1m")
	r := newClusterRain(t, c, 10, 1, 1, 30*time.Second) // prepared through gw-2
	second := createRainVia(t, c.nodes[0].http, r.anchorTok, r.room, 10, 1, 30*time.Second)
	fundAnchor(t, c.nodes[0].http, 1, 10, "seed2")
	var refused struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/redpackets/"+second+"/prepare", r.anchorTok, "", &refused); st != 429 || refused.Code != proto.CodeRateLimited {
		t.Fatalf("a second prepare within the interval through the other node: HTTP %d code %d, want 429 / 10429", st, refused.Code)
	}
}
