package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// testCluster is a real local cluster: node processes sharing one real
// nats-server and one real redis-server (PROTOCOL §8, on free ports).
type testCluster struct {
	redis *redistest.Server
	nats  *natstest.Server
	nodes []*sharedNode
}

// stopAll stops every node (SIGTERM, then waits for it) and returns their
// data directories, for the audits that read their ledgers.
func (c *testCluster) stopAll() []string {
	var dirs []string
	for _, nd := range c.nodes {
		_ = nd.p.cmd.Process.Signal(syscall.SIGTERM)
		<-nd.p.done
		dirs = append(dirs, nd.data)
	}
	return dirs
}

func startCluster(t *testing.T, n int, extra ...string) *testCluster {
	t.Helper()
	return startClusterOn(t, redistest.Start(t), natstest.Start(t), n, extra...)
}

// startClusterOn is startCluster on the given servers.
func startClusterOn(t *testing.T, rs *redistest.Server, ns *natstest.Server, n int, extra ...string) *testCluster {
	t.Helper()
	c := &testCluster{redis: rs, nats: ns}
	bin := binary(t)
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("gw-%d", i+1)
	}
	for i := 0; i < n; i++ {
		nd := &sharedNode{http: freeAddr(t), ws: freeAddr(t), data: t.TempDir()}
		nd.env = nodeEnv(nd.http, nd.ws, nd.data, append([]string{
			"LIVEEDGE_NODE_ID=" + names[i],
			"LIVEEDGE_CLUSTER_ENABLED=true", "LIVEEDGE_NATS_EMBEDDED=false", "LIVEEDGE_NATS_URL=" + c.nats.URL,
			"LIVEEDGE_WALLET_MODE=shared", "LIVEEDGE_WALLET_NODES=" + strings.Join(names, ","),
			"LIVEEDGE_REDIS_ADDR=" + c.redis.Addr,
			"LIVEEDGE_LIMITS_CHAT_PER_SECOND=0", "LIVEEDGE_LIMITS_GIFT_PER_SECOND=0",
		}, extra...)...)
		nd.p = start(t, "", nd.env, bin)
		c.nodes = append(c.nodes, nd)
	}
	for _, nd := range c.nodes {
		waitReady(t, nd.p, nd.http)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for i, nd := range c.nodes {
			out := nd.p.stdout.String()
			t.Logf("gw-%d log (tail):\n%s", i+1, out[max(0, len(out)-4000):])
		}
	})
	return c
}

// metric reads one counter or gauge of a node's /metrics (0 if absent).
func metric(t *testing.T, httpAddr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, name+"{") || strings.HasPrefix(line, name+" ") {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			return v
		}
	}
	return 0
}

// roomLog is what one client saw of a room: chat pushes in arrival order.
type roomLog struct {
	mu   sync.Mutex
	offs []int64
	mids []string
	eps  map[string]bool
}

func (l *roomLog) add(p clientsdk.Push) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.offs = append(l.offs, p.Off)
	l.mids = append(l.mids, p.Mid)
	if l.eps == nil {
		l.eps = map[string]bool{}
	}
	l.eps[p.Ep] = true
}

func (l *roomLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.mids)
}

func pollUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Three node processes, 300 SDK clients spread over them in one room opened
// through node 1; 1,000 chats sent by clients on all three nodes: every client
// gets all 1,000 exactly once, in the same order, with consecutive offsets of
// one epoch. The room's online count through node 2 counts all 300 (and drops
// within a second of leaves); each node receives one NATS message per room
// batch it did not publish itself.
func TestClusterRoomOneOrderAcrossNodes(t *testing.T) {
	c := startCluster(t, 3)
	anchorTok := devToken(t, c.nodes[0].http, 1, "anchor")
	room := openRoom(t, c.nodes[0].http, anchorTok)

	const clients, talkers, chats = 300, 30, 1000
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	logs := make([]*roomLog, clients)
	sdk := make([]*clientsdk.Client, clients)
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		logs[i] = &roomLog{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			nd := c.nodes[i%3]
			tok := devTokenCached(t, nd.http, int64(1000+i))
			lg := logs[i]
			cl, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + nd.ws + "/ws", Token: tok,
				OnPush: func(p clientsdk.Push) {
					if p.Biz == proto.BizChat && p.Room == room {
						lg.add(p)
					}
				}})
			if err != nil {
				errs <- err
				return
			}
			sdk[i] = cl
			if _, err := cl.Join(ctx, room); err != nil {
				errs <- fmt.Errorf("join on %s: %w", nd.ws, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	defer func() {
		for _, cl := range sdk {
			if cl != nil {
				cl.Close()
			}
		}
	}()
	pollUntil(t, 3*time.Second, "online = 300 through node 2", func() bool {
		return roomOnline(t, c.nodes[1].http, anchorTok, room) == clients
	})

	// 30 talkers, ten on each node, send 1,000 chats between them.
	var sent sync.WaitGroup
	sendErrs := make(chan error, chats)
	for k := 0; k < talkers; k++ {
		sent.Add(1)
		go func(k int) {
			defer sent.Done()
			for j := k; j < chats; j += talkers {
				if _, err := sdk[k].Chat(ctx, room, fmt.Sprintf("m-%d", j)); err != nil {
					sendErrs <- err
					return
				}
			}
		}(k)
	}
	sent.Wait()
	close(sendErrs)
	for err := range sendErrs {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		short := 0
		for _, lg := range logs {
			if lg.len() < chats {
				short++
			}
		}
		if short == 0 {
			break
		}
		if time.Now().After(deadline) {
			counts := map[int]int{}
			for i, lg := range logs {
				counts[i%3] += lg.len()
			}
			for _, nd := range c.nodes {
				t.Logf("%s: gap fills %v, lost %v, seq errors %v, in %v, out %v", nd.http,
					metric(t, nd.http, "liveedge_cluster_gap_fills_total"), metric(t, nd.http, "liveedge_cluster_gaps_lost_total"),
					metric(t, nd.http, "liveedge_cluster_sequencer_errors_total"),
					metric(t, nd.http, "liveedge_cluster_nats_room_msgs_in_total"), metric(t, nd.http, "liveedge_cluster_nats_room_msgs_out_total"))
			}
			t.Fatalf("%d clients short of %d chats; received per node (of %d each): %v", short, chats, chats*clients/3, counts)
		}
		time.Sleep(20 * time.Millisecond)
	}
	ref := logs[0]
	ref.mu.Lock()
	first := ref.offs[0]
	refMids := append([]string(nil), ref.mids...)
	ref.mu.Unlock()
	for i, lg := range logs {
		lg.mu.Lock()
		if len(lg.mids) != chats {
			t.Errorf("client %d: %d chats, want %d", i, len(lg.mids), chats)
		}
		if len(lg.eps) != 1 {
			t.Errorf("client %d: epochs %v", i, lg.eps)
		}
		seen := map[string]bool{}
		for j, mid := range lg.mids {
			if seen[mid] {
				t.Errorf("client %d: mid %s twice", i, mid)
			}
			seen[mid] = true
			if lg.offs[j] != first+int64(j) {
				t.Fatalf("client %d: chat #%d has offset %d, want %d", i, j, lg.offs[j], first+int64(j))
			}
			if mid != refMids[j] {
				t.Fatalf("client %d: chat #%d is %s, client 0 had %s", i, j, mid, refMids[j])
			}
		}
		lg.mu.Unlock()
	}

	// NATS: one message per batch per node with members. Every batch a node
	// published reached the two others, and nothing else arrived.
	var out, in, seq float64
	for _, nd := range c.nodes {
		out += metric(t, nd.http, "liveedge_cluster_nats_room_msgs_out_total")
		in += metric(t, nd.http, "liveedge_cluster_nats_room_msgs_in_total")
		seq += metric(t, nd.http, "liveedge_cluster_room_pushes_sequenced_total")
	}
	if seq < chats || out == 0 || in != 2*out {
		t.Errorf("NATS room messages: %v out, %v in (want 2 × out: 3 nodes with members), %v pushes sequenced", out, in, seq)
	}
	t.Logf("%v pushes in %v NATS batches: %.2f NATS deliveries per push", seq, out, (out+in)/seq)

	// Leaves are seen through every node within a second.
	for i := 0; i < 30; i++ {
		if err := sdk[i].Leave(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	pollUntil(t, time.Second, "online = 270 through node 3 after 30 leaves", func() bool {
		return roomOnline(t, c.nodes[2].http, anchorTok, room) == clients-30
	})
}

// pushLog records every push a client gets, by biz.
type pushLog struct {
	mu    sync.Mutex
	byBiz map[int][]clientsdk.Push
	rooms []clientsdk.Push // every room push (off > 0), in arrival order
}

func (l *pushLog) add(p clientsdk.Push) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byBiz == nil {
		l.byBiz = map[int][]clientsdk.Push{}
	}
	l.byBiz[p.Biz] = append(l.byBiz[p.Biz], p)
	if p.Off > 0 {
		l.rooms = append(l.rooms, p)
	}
}

func (l *pushLog) roomPushes() []clientsdk.Push {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]clientsdk.Push(nil), l.rooms...)
}

func (l *pushLog) get(biz int) []clientsdk.Push {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]clientsdk.Push(nil), l.byBiz[biz]...)
}

// allDelivered reports whether every client logged every mid in acked.
func allDelivered(logs []*pushLog, acked map[string]bool) bool {
	for _, lg := range logs {
		got := map[string]bool{}
		for _, p := range lg.get(proto.BizChat) {
			got[p.Mid] = true
		}
		for mid := range acked {
			if !got[mid] {
				return false
			}
		}
	}
	return true
}

// checkRoomSequences fails unless every client got each room push once, with
// consecutive offsets within an epoch and every later epoch starting at 1.
func checkRoomSequences(t *testing.T, logs []*pushLog) {
	t.Helper()
	for i, lg := range logs {
		seen := map[string]bool{}
		var prevEp string
		var prevOff int64
		for _, p := range lg.roomPushes() {
			if seen[p.Mid] {
				t.Fatalf("client %d: %s twice", i, p.Mid)
			}
			seen[p.Mid] = true
			switch {
			case p.Ep == prevEp && p.Off != prevOff+1:
				t.Fatalf("client %d: offset %d after %d in epoch %s (biz %d)", i, p.Off, prevOff, p.Ep, p.Biz)
			case p.Ep != prevEp && prevEp != "" && p.Off != 1:
				t.Fatalf("client %d: new epoch %s starts at %d", i, p.Ep, p.Off)
			}
			prevEp, prevOff = p.Ep, p.Off
		}
	}
}

func dialLogged(t *testing.T, wsAddr, tok string, lg *pushLog) *clientsdk.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + wsAddr + "/ws", Token: tok, OnPush: lg.add})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// A gift from a viewer on node 1 to the anchor on node 2: the anchor gets the
// reliable 5556 once (acked on node 2), a viewer on node 3 sees the room
// effect, the balances agree through every node, and money is conserved
// across every ledger and Redis.
func TestClusterGiftAcrossNodes(t *testing.T) {
	c := startCluster(t, 3)
	const anchor, sender, watcher = 1, 2, 3
	anchorTok := devToken(t, c.nodes[1].http, anchor, "anchor")
	room := openRoom(t, c.nodes[1].http, anchorTok)
	var aLog, sLog, wLog pushLog
	ctx := context.Background()
	a := dialLogged(t, c.nodes[1].ws, anchorTok, &aLog)
	s := dialLogged(t, c.nodes[0].ws, devToken(t, c.nodes[0].http, sender, "viewer"), &sLog)
	w := dialLogged(t, c.nodes[2].ws, devToken(t, c.nodes[2].http, watcher, "viewer"), &wLog)
	for _, cl := range []*clientsdk.Client{a, s, w} {
		if _, err := cl.Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":100,"req_id":"seed"}`, sender), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	gift := map[string]any{"room_id": room, "gift_id": 24, "receiver_id": anchor, "count": 5, "req_id": "g-1"}
	for i := 0; i < 2; i++ { // the retry of the same req_id moves nothing
		if _, err := s.Request(ctx, proto.TypeGift, gift); err != nil {
			t.Fatalf("gift (try %d): %v", i+1, err)
		}
	}
	pollUntil(t, 5*time.Second, "the anchor on node 2 gets the reliable 5556", func() bool {
		return len(aLog.get(proto.BizGift)) > 0
	})
	pollUntil(t, 5*time.Second, "the viewer on node 3 sees the room effect", func() bool {
		return len(wLog.get(proto.BizGift)) > 0
	})
	reliable := 0
	for _, p := range aLog.get(proto.BizGift) {
		if p.Ack {
			reliable++
		}
	}
	if reliable != 1 {
		t.Fatalf("anchor got %d reliable 5556 pushes, want 1 (the retry replays, it sends nothing)", reliable)
	}
	for _, p := range wLog.get(proto.BizGift) {
		if p.Ack || p.Room != room || p.Off == 0 {
			t.Fatalf("room effect on node 3: %+v", p)
		}
	}
	balance := func(nd *sharedNode, user int64) int64 {
		var out struct {
			Data struct {
				Balance int64 `json:"balance"`
			} `json:"data"`
		}
		nodetest.DoJSON(t, "GET", "http://"+nd.http+"/api/v1/wallet", devToken(t, nd.http, user, "viewer"), "", &out)
		return out.Data.Balance
	}
	for _, nd := range c.nodes {
		if b := balance(nd, sender); b != 95 {
			t.Fatalf("sender's balance through %s: %d, want 95", nd.http, b)
		}
	}
	// The anchor's node counted no resend: the ack crossed back to node 2.
	if r := metric(t, c.nodes[1].http, "liveedge_resends_total"); r != 0 {
		t.Errorf("resends on the anchor's node: %v", r)
	}
	// The anchor closes the room through node 2: the viewers on nodes 1 and
	// 3 get the room-closed push (it travels as the room's last offset).
	if st := nodetest.DoJSON(t, "DELETE", fmt.Sprintf("http://%s/api/v1/rooms/%d", c.nodes[1].http, room), anchorTok, "", nil); st != 200 {
		t.Fatalf("close room: %d", st)
	}
	pollUntil(t, 5*time.Second, "5559 on nodes 1 and 3", func() bool {
		return len(sLog.get(proto.BizRoomClosed)) == 1 && len(wLog.get(proto.BizRoomClosed)) == 1
	})
	dirs := c.stopAll()
	cr, db, bal := persisttest.CheckSharedConservation(t, c.redis.Addr, dirs...)
	// A gift debits the sender (the anchor's side is a tally, "received").
	if cr != 100 || db != 5 || bal != 95 {
		t.Fatalf("credits %d debits %d balances %d", cr, db, bal)
	}
}

// Chat through three nodes while NATS restarts, then while Redis restarts
// (empty: it keeps nothing on disk in tests). Every chat whose reply said ok
// reaches every client exactly once, in order, with consecutive offsets in
// its epoch; a chat refused during an outage was answered with an error (the
// client knows). Redis losing its data starts a new epoch (so a client that
// reconnects is told recovered:false) but closes no room. /readyz is 503
// while the dependency is down, 200 again after.
func TestClusterSurvivesNATSAndRedisRestart(t *testing.T) {
	c := startCluster(t, 3, "LIVEEDGE_LOG_LEVEL=debug")
	anchorTok := devToken(t, c.nodes[0].http, 1, "anchor")
	room := openRoom(t, c.nodes[0].http, anchorTok)
	const n = 30
	logs := make([]*pushLog, n)
	cls := make([]*clientsdk.Client, n)
	ctx := context.Background()
	for i := range cls {
		logs[i] = &pushLog{}
		nd := c.nodes[i%3]
		cls[i] = dialLogged(t, nd.ws, devTokenCached(t, nd.http, int64(2000+i)), logs[i])
		if _, err := cls[i].Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	var okMu sync.Mutex
	okMids := map[string]bool{}
	var failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for k := 0; k < 6; k++ { // two talkers per node
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				mid, err := cls[k].Chat(rctx, room, fmt.Sprintf("k%d-%d", k, j))
				cancel()
				if err != nil {
					failed.Add(1)
					time.Sleep(20 * time.Millisecond)
					continue
				}
				okMu.Lock()
				okMids[mid] = true
				okMu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
		}(k)
	}
	okCount := func() int {
		okMu.Lock()
		defer okMu.Unlock()
		return len(okMids)
	}
	notReady := func(what string) {
		pollUntil(t, 10*time.Second, what+": a node reports not ready", func() bool {
			resp, err := http.Get("http://" + c.nodes[1].http + "/readyz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 503
		})
	}
	pollUntil(t, 10*time.Second, "chat flowing", func() bool { return okCount() > 50 })

	goroutines := func() []float64 {
		var g []float64
		for _, nd := range c.nodes {
			g = append(g, metric(t, nd.http, "go_goroutines"))
		}
		return g
	}
	baseline := goroutines()

	c.nats.Stop()
	notReady("NATS down")
	c.nats.Restart()
	c.waitReady(t, "NATS back")
	before := okCount()
	pollUntil(t, 10*time.Second, "chat flowing after NATS", func() bool { return okCount() > before+50 })

	c.redis.Restart()
	c.waitReady(t, "Redis back")
	before = okCount()
	pollUntil(t, 15*time.Second, "chat flowing after Redis", func() bool { return okCount() > before+50 })
	close(stop)
	wg.Wait()

	want := okCount()
	defer func() {
		if !t.Failed() {
			return
		}
		for i, lg := range logs {
			got := map[string]bool{}
			for _, p := range lg.get(proto.BizChat) {
				got[p.Mid] = true
			}
			var missing []string
			okMu.Lock()
			for mid := range okMids {
				if !got[mid] {
					missing = append(missing, mid)
				}
			}
			okMu.Unlock()
			if len(missing) > 0 {
				ps := lg.get(proto.BizChat)
				t.Logf("client %d (node %d) misses %d: %v; last pushes: %+v", i, i%3, len(missing), missing, ps[max(0, len(ps)-3):])
			}
		}
		for _, nd := range c.nodes {
			t.Logf("%s: gap fills %v, lost %v, seq errors %v", nd.http,
				metric(t, nd.http, "liveedge_cluster_gap_fills_total"), metric(t, nd.http, "liveedge_cluster_gaps_lost_total"),
				metric(t, nd.http, "liveedge_cluster_sequencer_errors_total"))
			out := nd.p.stdout.String()
			t.Logf("%s log tail:\n%s", nd.http, out[max(0, len(out)-20000):])
		}
	}()
	pollUntil(t, 20*time.Second, "every client has every acknowledged chat", func() bool {
		okMu.Lock()
		defer okMu.Unlock()
		return allDelivered(logs, okMids)
	})
	checkRoomSequences(t, logs)
	// No goroutine leak from the reconnects: every node settles back to its
	// count under the same traffic before the outages (a little slack for
	// timers and in-flight work).
	pollUntil(t, 20*time.Second, fmt.Sprintf("goroutines back to the baseline %v", baseline), func() bool {
		for i, g := range goroutines() {
			if g > baseline[i]+25 {
				return false
			}
		}
		return true
	})
	eps := map[string]bool{}
	for _, p := range logs[0].get(proto.BizChat) {
		eps[p.Ep] = true
	}
	if len(eps) != 2 {
		t.Errorf("epochs seen: %v; want two (Redis lost the room's numbering once)", eps)
	}
	if roomOnline(t, c.nodes[2].http, anchorTok, room) == 0 {
		t.Fatal("the room is gone or empty after Redis lost its data")
	}
	// A room opened after the loss never gets a live room's id again.
	if r2 := openRoom(t, c.nodes[1].http, devToken(t, c.nodes[1].http, 2, "anchor")); r2 <= room {
		t.Fatalf("a room opened after Redis lost the counter got id %d (live room %d)", r2, room)
	}
	t.Logf("%d chats acknowledged and delivered to all %d clients; %d refused during the outages", want, n, failed.Load())
}

// An order made through node 1; its provider notify is delivered to node 3
// and, at the same moment, the same event to node 2: both answer success, the
// user is credited once and the 5570 reaches them on node 1. GET works through
// any node. A second order, made through node 2, whose notify is lost, is
// settled by reconciliation — run by its own node only — once.
func TestClusterPayOrdersAnyNode(t *testing.T) {
	const secret = "cluster-test-pay-secret-0123"
	prov := mockpay.New(mockpay.Config{Secret: secret})
	ps := httptest.NewServer(prov.Handler())
	t.Cleanup(func() { prov.Close(); ps.Close() })
	c := startCluster(t, 3, "LIVEEDGE_PAY_SECRETS="+secret, "LIVEEDGE_PAY_PROVIDER_URL="+ps.URL,
		"LIVEEDGE_PAY_RECONCILE_AFTER=1s", "LIVEEDGE_PAY_RECONCILE_EVERY=200ms")
	const user = 500
	tok := devToken(t, c.nodes[0].http, user, "viewer")
	var lg pushLog
	dialLogged(t, c.nodes[0].ws, tok, &lg)

	create := func(nd *sharedNode, req string) pay.Order {
		var out struct {
			Data pay.Order `json:"data"`
		}
		if st := nodetest.DoJSON(t, "POST", "http://"+nd.http+"/api/v1/pay/orders", tok,
			fmt.Sprintf(`{"product_id":1,"channel":"mock","req_id":%q}`, req), &out); st != 200 {
			t.Fatalf("order through %s: %d", nd.http, st)
		}
		return out.Data
	}
	balance := func(nd *sharedNode) int64 {
		var w struct {
			Data struct {
				Balance int64 `json:"balance"`
			} `json:"data"`
		}
		nodetest.DoJSON(t, "GET", "http://"+nd.http+"/api/v1/wallet", tok, "", &w)
		return w.Data.Balance
	}
	a := create(c.nodes[0], "a")
	// Every request forwarded between the nodes, seen by a spy on the
	// forwarding subjects (a plain subscriber gets each one too).
	spy, err := nats.Connect(c.nats.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(spy.Close)
	forwarded, err := spy.SubscribeSync("le.pay.>")
	if err != nil {
		t.Fatal(err)
	}
	if err := spy.Flush(); err != nil {
		t.Fatal(err)
	}
	// A forged notify (a wrong signature) through every node: refused 401
	// where it arrives, never forwarded to the order's node.
	forged, _ := proto.Marshal(pay.Event{EventID: "evt-forged", OrderID: a.OrderID, Amount: a.Amount, Status: "SUCCESS",
		PaidAt: time.Now().UnixMilli()})
	for _, nd := range c.nodes {
		req, _ := http.NewRequest("POST", "http://"+nd.http+"/api/v1/pay/notify/mock", bytes.NewReader(forged))
		req.Header.Set(pay.SignatureHeader, mockpay.New(mockpay.Config{Secret: "not-the-secret-0123456789"}).Sign(forged))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("forged notify through %s: %d, want 401", nd.http, resp.StatusCode)
		}
	}
	body, _ := proto.Marshal(pay.Event{EventID: "evt-a", OrderID: a.OrderID, Amount: a.Amount, Status: "SUCCESS",
		PaidAt: time.Now().UnixMilli()})
	var wg sync.WaitGroup
	for _, nd := range []*sharedNode{c.nodes[2], c.nodes[1]} {
		wg.Add(1)
		go func(nd *sharedNode) {
			defer wg.Done()
			req, _ := http.NewRequest("POST", "http://"+nd.http+"/api/v1/pay/notify/mock", bytes.NewReader(body))
			req.Header.Set(pay.SignatureHeader, prov.Sign(body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(b) != "success" {
				t.Errorf("notify through %s: %d %s", nd.http, resp.StatusCode, b)
			}
		}(nd)
	}
	wg.Wait()
	for _, nd := range c.nodes {
		if b := balance(nd); b != a.Coins {
			t.Fatalf("balance through %s: %d, want %d (one credit)", nd.http, b, a.Coins)
		}
		var out struct {
			Data pay.Order `json:"data"`
		}
		if st := nodetest.DoJSON(t, "GET", "http://"+nd.http+"/api/v1/pay/orders/"+a.OrderID, tok, "", &out); st != 200 ||
			out.Data.Status != pay.StatusPayed {
			t.Fatalf("GET order through %s: %d %+v", nd.http, st, out.Data)
		}
	}
	pollUntil(t, 5*time.Second, "5570 on node 1", func() bool { return len(lg.get(proto.BizWalletCredit)) > 0 })
	sawSigned := false
	for {
		m, err := forwarded.NextMsg(100 * time.Millisecond)
		if err != nil {
			break
		}
		var req struct {
			Op   string `json:"op"`
			Body []byte `json:"body"`
		}
		if err := json.Unmarshal(m.Data, &req); err != nil {
			t.Fatalf("forwarded request %q: %v", m.Data, err)
		}
		if req.Op == "notify" && bytes.Contains(req.Body, []byte("evt-forged")) {
			t.Fatalf("the forged notify was forwarded to %s", m.Subject)
		}
		sawSigned = sawSigned || (req.Op == "notify" && bytes.Contains(req.Body, []byte("evt-a")))
	}
	if !sawSigned {
		t.Fatal("the signed notify through another node was not seen forwarded (the spy sees nothing?)")
	}

	// A lost notify: the provider has the payment, nobody was told.
	b := create(c.nodes[1], "b")
	prov.Pay(b.OrderID, b.Amount, "", "SUCCESS")
	pollUntil(t, 15*time.Second, "reconciliation credits order b", func() bool { return balance(c.nodes[2]) == a.Coins+b.Coins })
	time.Sleep(time.Second) // three more reconciler periods: nothing more may happen
	if got := balance(c.nodes[0]); got != a.Coins+b.Coins {
		t.Fatalf("balance after reconciliation: %d, want %d", got, a.Coins+b.Coins)
	}
	mids := map[string]bool{}
	for _, p := range lg.get(proto.BizWalletCredit) {
		mids[p.Mid] = true
	}
	if len(mids) != 2 {
		t.Fatalf("5570 pushes: %d distinct, want 2 (one per paid order)", len(mids))
	}
	dirs := c.stopAll()
	cr, db, bal := persisttest.CheckSharedConservation(t, c.redis.Addr, dirs...)
	if cr != a.Coins+b.Coins || db != 0 || bal != cr {
		t.Fatalf("credits %d debits %d balances %d", cr, db, bal)
	}
}

// kill -9 of one node under chat and gift traffic: the clients it held
// reconnect to the other nodes (SDK URL list, backoff with jitter) and recover
// by offset: every acknowledged chat reaches every client exactly once, in
// order, with consecutive offsets. The dead node's presence stops counting
// within the presence TTL, and no acknowledged gift is lost (conservation over
// every ledger, the killed node's included, and Redis).
func TestClusterNodeKilledUnderTraffic(t *testing.T) {
	c := startCluster(t, 3, "LIVEEDGE_CLUSTER_PRESENCE_TTL=3s")
	anchorTok := devToken(t, c.nodes[0].http, 1, "anchor")
	room := openRoom(t, c.nodes[0].http, anchorTok)
	urls := []string{"ws://" + c.nodes[0].ws + "/ws", "ws://" + c.nodes[1].ws + "/ws", "ws://" + c.nodes[2].ws + "/ws"}
	const n = 30
	ctx := context.Background()
	logs := make([]*pushLog, n)
	cls := make([]*clientsdk.Client, n)
	for i := range cls {
		logs[i] = &pushLog{}
		// Every client lists every node (the SDK starts at a random one).
		cl, err := clientsdk.Dial(ctx, clientsdk.Config{URLs: urls, Token: devTokenCached(t, c.nodes[0].http, int64(3000+i)),
			OnPush: logs[i].add})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cl.Close() })
		cls[i] = cl
		if _, err := cl.Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	onKilled := 0
	for _, cl := range cls {
		if cl.URL() == urls[2] {
			onKilled++
		}
	}
	const sender = 99
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":100000,"req_id":"seed"}`, sender), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	senderCl := dialLogged(t, c.nodes[0].ws, devToken(t, c.nodes[0].http, sender, "viewer"), &pushLog{})
	if _, err := senderCl.Join(ctx, room); err != nil {
		t.Fatal(err)
	}

	var okMu sync.Mutex
	okMids := map[string]bool{}
	var giftsOK atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for k := 0; k < 6; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
				mid, err := cls[k].Chat(rctx, room, fmt.Sprintf("k%d-%d", k, j))
				cancel()
				if err == nil {
					okMu.Lock()
					okMids[mid] = true
					okMu.Unlock()
				}
				time.Sleep(15 * time.Millisecond)
			}
		}(k)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for j := 0; ; j++ {
			select {
			case <-stop:
				return
			default:
			}
			rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			_, err := senderCl.Request(rctx, proto.TypeGift, map[string]any{"room_id": room, "gift_id": 24,
				"receiver_id": 1, "count": 1, "req_id": fmt.Sprintf("g-%d", j)})
			cancel()
			if err == nil {
				giftsOK.Add(1)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	okCount := func() int {
		okMu.Lock()
		defer okMu.Unlock()
		return len(okMids)
	}
	pollUntil(t, 10*time.Second, "traffic flowing", func() bool { return okCount() > 100 })
	if err := syscall.Kill(c.nodes[2].p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-c.nodes[2].p.done
	killedAt := time.Now()
	pollUntil(t, 30*time.Second, "every client reconnected to a live node", func() bool {
		for _, cl := range cls {
			if cl.URL() == urls[2] {
				return false
			}
		}
		return true
	})
	reconnectedIn := time.Since(killedAt)
	// The dead node's presence stops counting within the TTL: the room's
	// online count is the 31 sessions now on the two live nodes.
	pollUntil(t, 3*time.Second+2*time.Second, "online = 31 through node 2 after the kill", func() bool {
		return roomOnline(t, c.nodes[1].http, anchorTok, room) == n+1
	})
	before := okCount()
	pollUntil(t, 10*time.Second, "chat flowing after the kill", func() bool { return okCount() > before+100 })
	close(stop)
	wg.Wait()

	pollUntil(t, 20*time.Second, "every client has every acknowledged chat", func() bool {
		okMu.Lock()
		defer okMu.Unlock()
		return allDelivered(logs, okMids)
	})
	checkRoomSequences(t, logs) // chats and gift effects share the room's offsets
	var dirs []string
	for _, nd := range c.nodes[:2] {
		_ = nd.p.cmd.Process.Signal(syscall.SIGTERM)
		<-nd.p.done
	}
	for _, nd := range c.nodes {
		dirs = append(dirs, nd.data)
	}
	cr, db, bal := persisttest.CheckSharedConservation(t, c.redis.Addr, dirs...)
	if cr != 100000 || db != giftsOK.Load() || bal != cr-db {
		t.Fatalf("credits %d debits %d balances %d; %d gifts acknowledged", cr, db, bal, giftsOK.Load())
	}
	t.Logf("%d clients on the killed node reconnected within %v; %d chats and %d gifts acknowledged, all delivered / debited once",
		onKilled, reconnectedIn.Round(time.Millisecond), okCount(), giftsOK.Load())
}

// A reliable push to a user connected nowhere is kept (in Redis) and
// delivered when they connect, to whichever node: the anchor, offline, gets
// the 5556 of a gift sent through node 1 when they connect to node 3.
func TestClusterOfflineReliablePushDeliveredOnConnect(t *testing.T) {
	c := startCluster(t, 3)
	const anchor, sender = 1, 2
	anchorTok := devToken(t, c.nodes[0].http, anchor, "anchor")
	room := openRoom(t, c.nodes[0].http, anchorTok)
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":10,"req_id":"seed"}`, sender), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	s := dialLogged(t, c.nodes[0].ws, devToken(t, c.nodes[0].http, sender, "viewer"), &pushLog{})
	ctx := context.Background()
	if _, err := s.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Request(ctx, proto.TypeGift, map[string]any{"room_id": room, "gift_id": 24,
		"receiver_id": anchor, "count": 2, "req_id": "away"}); err != nil {
		t.Fatal(err)
	}
	var aLog pushLog
	dialLogged(t, c.nodes[2].ws, anchorTok, &aLog)
	pollUntil(t, 5*time.Second, "the anchor gets the gift sent while away", func() bool {
		for _, p := range aLog.get(proto.BizGift) {
			if p.Ack {
				return true
			}
		}
		return false
	})
}

// A red-packet rain made through node 1 works through every node: prepared
// through node 2, started through node 3 (forwarded to node 1, its owner),
// 300 grabbers spread over the three nodes for 100 packets: exactly 100
// grants, Σ = T, every grant credited once, 5560 and 5561 seen on every
// node, a user in no room refused (10003) through another node, and
// conservation over every ledger and Redis (anchor debit = grants + refund).
func TestClusterRedPacketRainAnyNode(t *testing.T) {
	c := startCluster(t, 3, "LIVEEDGE_REDPACKET_ONE_PER_USER=true")
	const anchor, total, count = 1, 1000, 100
	anchorTok := devToken(t, c.nodes[0].http, anchor, "anchor")
	room := openRoom(t, c.nodes[0].http, anchorTok)
	fundAnchor(t, c.nodes[0].http, anchor, total, "seed")
	code := createRainVia(t, c.nodes[0].http, anchorTok, room, total, count, 30*time.Second)
	const n = 300
	ctx := context.Background()
	cls := make([]*clientsdk.Client, n)
	logs := make([]*pushLog, n)
	var wg sync.WaitGroup
	for i := range cls {
		logs[i] = &pushLog{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			nd := c.nodes[i%3]
			cl, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + nd.ws + "/ws",
				Token: devTokenCached(t, nd.http, int64(5000+i)), OnPush: logs[i].add})
			if err != nil {
				t.Error(err)
				return
			}
			cls[i] = cl
			if _, err := cl.Join(ctx, room); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	defer func() {
		for _, cl := range cls {
			cl.Close()
		}
	}()
	pollUntil(t, 3*time.Second, "online 300", func() bool { return roomOnline(t, c.nodes[2].http, anchorTok, room) == n })
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[1].http+"/api/v1/redpackets/"+code+"/prepare", anchorTok, "", nil); st != 200 {
		t.Fatalf("prepare through node 2: %d", st)
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[2].http+"/api/v1/redpackets/"+code+"/start", anchorTok, "", nil); st != 200 {
		t.Fatalf("start through node 3: %d", st)
	}
	// The per-anchor prepare limit (1 per 10 s) is cluster-wide: a second
	// rain, owned by node 2, cannot be prepared right after the first.
	second := createRainVia(t, c.nodes[1].http, anchorTok, room, 10, 1, 30*time.Second)
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[2].http+"/api/v1/redpackets/"+second+"/prepare", anchorTok, "", nil); st != 429 {
		t.Fatalf("second prepare within 10 s through another node: HTTP %d, want 429", st)
	}
	// A user in no room, through node 2: refused, nothing granted.
	outsider := dialLogged(t, c.nodes[1].ws, devToken(t, c.nodes[1].http, 4999, "viewer"), &pushLog{})
	var pe *proto.Error
	if _, err := outsider.Grab(ctx, code); !errors.As(err, &pe) || pe.Code != proto.CodeForbidden {
		t.Fatalf("grab by a user in no room: %v, want 10003", err)
	}
	var granted, sum atomic.Int64
	// One user with a session on node 2 and one on node 3 grabs through both
	// at once: one packet (one per user), whichever node answers.
	var twiceLogs [2]pushLog
	twice := [2]*clientsdk.Client{
		dialLogged(t, c.nodes[1].ws, devToken(t, c.nodes[1].http, 4998, "viewer"), &twiceLogs[0]),
		dialLogged(t, c.nodes[2].ws, devToken(t, c.nodes[2].http, 4998, "viewer"), &twiceLogs[1]),
	}
	for _, cl := range twice {
		if _, err := cl.Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	// The rain's node learns who is in the room from presence, written every
	// 200 ms: a grab in the same instant as the join would be 10003.
	pollUntil(t, 3*time.Second, "the two sessions in the room's presence", func() bool {
		return roomOnline(t, c.nodes[0].http, anchorTok, room) == n+2
	})
	for _, cl := range twice {
		wg.Add(1)
		go func(cl *clientsdk.Client) {
			defer wg.Done()
			var pe *proto.Error
			r, err := cl.Grab(ctx, code)
			switch {
			case err == nil:
				granted.Add(1)
				sum.Add(r.Amount)
			case errors.As(err, &pe) && (pe.Code == proto.CodeRedPacketTaken || pe.Code == proto.CodeRateLimited):
			default:
				t.Errorf("grab by one user through two nodes: %v", err)
			}
		}(cl)
	}
	wg.Wait()
	if granted.Load() != 1 {
		t.Fatalf("one user through two nodes got %d packets, want 1", granted.Load())
	}
	for i, cl := range cls {
		wg.Add(1)
		go func(i int, cl *clientsdk.Client) {
			defer wg.Done()
			var pe *proto.Error
			r, err := cl.Grab(ctx, code)
			switch {
			case err == nil:
				granted.Add(1)
				sum.Add(r.Amount)
			case errors.As(err, &pe) && pe.Code == proto.CodeRedPacketEmpty:
			default:
				t.Errorf("grab %d: %v", i, err)
			}
		}(i, cl)
	}
	wg.Wait()
	if granted.Load() != count || sum.Load() != total {
		t.Fatalf("%d grants summing to %d; want %d summing to %d", granted.Load(), sum.Load(), count, total)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var started, finished [3]int
		for i, lg := range logs {
			started[i%3] += len(lg.get(proto.BizRainStarted))
			finished[i%3] += len(lg.get(proto.BizRainFinished))
		}
		if started == [3]int{n / 3, n / 3, n / 3} && finished == started {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("5560 per node %v, 5561 per node %v; want %d each", started, finished, n/3)
		}
		time.Sleep(20 * time.Millisecond)
	}
	credited := 0
	for _, lg := range logs {
		for _, p := range lg.get(proto.BizWalletCredit) {
			if strings.Contains(string(p.Data), `"redpacket"`) {
				credited++
			}
		}
	}
	// The one user with two sessions: one credit, pushed to both sessions.
	twiceMids := map[string]bool{}
	for i := range twiceLogs {
		for _, p := range twiceLogs[i].get(proto.BizWalletCredit) {
			if strings.Contains(string(p.Data), `"redpacket"`) {
				twiceMids[p.Mid] = true
			}
		}
	}
	if credited+len(twiceMids) != count || len(twiceMids) != 1 {
		t.Fatalf("%d + %d redpacket credits pushed, want %d in all and 1 for the two-session user", credited, len(twiceMids), count)
	}
	dirs := c.stopAll()
	cr, db, bal := persisttest.CheckSharedConservation(t, c.redis.Addr, dirs...)
	if bal != total || cr-db != total {
		t.Fatalf("credits %d debits %d balances %d, want balances %d", cr, db, bal, total)
	}
}

// A PK across nodes: room A's anchor (on node 1) invites room B through
// node 1; B's anchor (on node 2) hears of it there (5562) and accepts
// through node 2; viewers on nodes 1, 2 and 3 send PK gifts through their
// own nodes. Every viewer sees 5558 pushes whose seq, read as a client does
// (drop one at or below the last), ends with exactly one final result — the
// same scores and winner everywhere, the sums of the PK gifts — and money
// is conserved across every ledger and Redis.
func TestClusterPKAcrossNodes(t *testing.T) {
	c := startCluster(t, 3)
	const anchorA, anchorB = 1, 2
	tokA := devToken(t, c.nodes[0].http, anchorA, "anchor")
	tokB := devToken(t, c.nodes[1].http, anchorB, "anchor")
	roomA := openRoom(t, c.nodes[0].http, tokA)
	roomB := openRoom(t, c.nodes[1].http, tokB)
	ctx := context.Background()
	var bLog pushLog
	dialLogged(t, c.nodes[1].ws, tokB, &bLog)
	type viewer struct {
		user, room, anchor int64
		node               int
		log                pushLog
		cl                 *clientsdk.Client
		sent               int64
	}
	viewers := []*viewer{
		{user: 11, room: roomA, anchor: anchorA, node: 0},
		{user: 12, room: roomB, anchor: anchorB, node: 1},
		{user: 13, room: roomA, anchor: anchorA, node: 2},
		{user: 14, room: roomB, anchor: anchorB, node: 2},
	}
	for _, v := range viewers {
		nd := c.nodes[v.node]
		v.cl = dialLogged(t, nd.ws, devToken(t, nd.http, v.user, "viewer"), &v.log)
		if _, err := v.cl.Join(ctx, v.room); err != nil {
			t.Fatal(err)
		}
		if st := nodetest.DoJSON(t, "POST", "http://"+nd.http+"/api/v1/dev/credit", "",
			fmt.Sprintf(`{"user_id":%d,"amount":1000,"req_id":"seed-%d"}`, v.user, v.user), nil); st != 200 {
			t.Fatalf("credit: %d", st)
		}
	}
	type pkView struct {
		Data struct {
			PKID   string           `json:"pk_id"`
			Status string           `json:"status"`
			Scores map[string]int64 `json:"scores"`
			Seq    int64            `json:"seq"`
			Over   bool             `json:"over"`
		} `json:"data"`
	}
	var inv, ct pkView
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/pk", tokA,
		fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":4}`, roomA, roomB), &inv); st != 200 || inv.Data.Status != "invited" {
		t.Fatalf("invite through node 1: %d %+v", st, inv)
	}
	pollUntil(t, 5*time.Second, "B's anchor on node 2 hears of the invitation (5562)", func() bool {
		return len(bLog.get(proto.BizPKInvite)) == 1
	})
	if st := nodetest.DoJSON(t, "GET", "http://"+c.nodes[2].http+"/api/v1/pk/"+inv.Data.PKID, tokB, "", &ct); st != 200 || ct.Data.Status != "invited" {
		t.Fatalf("invitation through node 3: %d %+v", st, ct)
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[1].http+"/api/v1/pk/"+inv.Data.PKID+"/accept", tokB, "", &ct); st != 200 || ct.Data.Status != "running" {
		t.Fatalf("accept through node 2: %d %+v", st, ct)
	}
	var want = map[int64]int64{}
	var wg sync.WaitGroup
	for i, v := range viewers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; k < 10; k++ {
				count := 1 + (i+k)%3
				if v.room == roomB {
					count++ // B wins
				}
				gift := map[string]any{"room_id": v.room, "gift_id": 24, "receiver_id": v.anchor, "count": count,
					"req_id": fmt.Sprintf("pk-%d-%d", v.user, k), "pk": true}
				if _, err := v.cl.Request(ctx, proto.TypeGift, gift); err != nil {
					t.Errorf("gift: %v", err)
					return
				}
				v.sent += int64(count)
			}
		}()
	}
	wg.Wait()
	for _, v := range viewers {
		want[v.room] += v.sent
	}
	type progress struct {
		PKID   string           `json:"pk_id"`
		Scores map[string]int64 `json:"scores"`
		Seq    int64            `json:"seq"`
		Over   bool             `json:"over"`
		Winner int64            `json:"winner"`
	}
	decode := func(v *viewer) []progress {
		var out []progress
		for _, p := range v.log.get(proto.BizPKProgress) {
			var pr progress
			if err := json.Unmarshal(p.Data, &pr); err != nil || pr.PKID != inv.Data.PKID || p.Room != v.room {
				t.Fatalf("5558 to viewer %d: %s (%v)", v.user, p.Data, err)
			}
			out = append(out, pr)
		}
		return out
	}
	for _, v := range viewers {
		pollUntil(t, 10*time.Second, "the final result reaches every viewer", func() bool {
			for _, p := range decode(v) {
				if p.Over {
					return true
				}
			}
			return false
		})
	}
	a, b := fmt.Sprint(roomA), fmt.Sprint(roomB)
	var final *progress
	for _, v := range viewers {
		ps := decode(v)
		var kept []progress // as a client keeps them: stale seqs dropped
		stale := 0
		for _, p := range ps {
			if len(kept) > 0 && p.Seq <= kept[len(kept)-1].Seq {
				stale++
				continue
			}
			kept = append(kept, p)
		}
		overs := 0
		for _, p := range ps {
			if p.Over {
				overs++
			}
		}
		last := kept[len(kept)-1]
		if overs != 1 || !last.Over || len(kept) < 3 {
			t.Fatalf("viewer %d: %d final pushes, last kept %+v, %d kept (%d stale)", v.user, overs, last, len(kept), stale)
		}
		for k := 1; k < len(kept); k++ {
			if kept[k].Scores[a] < kept[k-1].Scores[a] || kept[k].Scores[b] < kept[k-1].Scores[b] {
				t.Fatalf("viewer %d: a score went back at seq %d", v.user, kept[k].Seq)
			}
		}
		if final == nil {
			final = &last
		} else if last.Seq != final.Seq || last.Winner != final.Winner || !reflect.DeepEqual(last.Scores, final.Scores) {
			t.Fatalf("viewer %d's result %+v differs from %+v", v.user, last, *final)
		}
		t.Logf("viewer %d on node %d: %d pushes, %d stale", v.user, v.node+1, len(ps), stale)
	}
	if final.Scores[a] != want[roomA] || final.Scores[b] != want[roomB] || final.Winner != roomB {
		t.Fatalf("result %+v, want scores %d:%d, winner %d", *final, want[roomA], want[roomB], roomB)
	}
	for _, nd := range c.nodes {
		var got pkView
		if st := nodetest.DoJSON(t, "GET", "http://"+nd.http+"/api/v1/pk/"+inv.Data.PKID, tokA, "", &got); st != 200 ||
			!got.Data.Over || got.Data.Seq != final.Seq || !reflect.DeepEqual(got.Data.Scores, final.Scores) {
			t.Fatalf("GET through %s: %d %+v", nd.http, st, got)
		}
	}
	dirs := c.stopAll()
	total := want[roomA] + want[roomB]
	if cr, db, bal := persisttest.CheckSharedConservation(t, c.redis.Addr, dirs...); cr != 4000 || db != total || bal != 4000-total {
		t.Fatalf("credits %d debits %d balances %d, want 4000 %d %d", cr, db, bal, total, 4000-total)
	}
}

// A ticket program made through node 1 works through every node: read
// through node 2, an order paid with coins placed through node 3, read
// through node 2; an order placed through node 2 and cancelled through node
// 3; the seats add up (sold + locked + free = seats) through any node; the
// program ids of two nodes never collide.
func TestClusterTicketsAnyNode(t *testing.T) {
	c := startCluster(t, 3)
	admin := devToken(t, c.nodes[0].http, 9000, "admin")
	var created struct {
		Data struct {
			ProgramID int64 `json:"program_id"`
		} `json:"data"`
	}
	prog := `{"name":"show","categories":[{"category_id":1,"name":"A","price":10,"rows":2,"cols":5}],"per_order_max":4,"per_user_max":6}`
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/admin/programs", admin, prog, &created); st != 200 {
		t.Fatalf("program through node 1: %d", st)
	}
	pid := created.Data.ProgramID
	var other struct {
		Data struct {
			ProgramID int64 `json:"program_id"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[1].http+"/api/v1/admin/programs", devToken(t, c.nodes[1].http, 9000, "admin"), prog, &other); st != 200 || other.Data.ProgramID == pid {
		t.Fatalf("program through node 2: %d, id %d (node 1's: %d)", st, other.Data.ProgramID, pid)
	}
	type order struct {
		Data struct {
			OrderID string   `json:"order_id"`
			Status  string   `json:"status"`
			SeatIDs []string `json:"seat_ids"`
		} `json:"data"`
	}
	const buyer, buyer2 = 700, 701
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":100,"req_id":"seed"}`, buyer), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	tok := devToken(t, c.nodes[2].http, buyer, "viewer")
	var paid order
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[2].http+"/api/v1/tickets/orders", tok,
		fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":2,"pay":"coins","req_id":"t1"}`, pid), &paid); st != 200 ||
		paid.Data.Status != "PAID" || len(paid.Data.SeatIDs) != 2 {
		t.Fatalf("coins order through node 3: %d %+v", st, paid.Data)
	}
	var got order
	if st := nodetest.DoJSON(t, "GET", "http://"+c.nodes[1].http+"/api/v1/tickets/orders/"+paid.Data.OrderID, tok, "", &got); st != 200 || got.Data.Status != "PAID" {
		t.Fatalf("GET order through node 2: %d %+v", st, got.Data)
	}
	tok2 := devToken(t, c.nodes[1].http, buyer2, "viewer")
	var pending order
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[1].http+"/api/v1/tickets/orders", tok2,
		fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":3,"req_id":"t2"}`, pid), &pending); st != 200 || pending.Data.Status != "PENDING_PAY" {
		t.Fatalf("order through node 2: %d %+v", st, pending.Data)
	}
	var view struct {
		Data struct {
			Seats []struct {
				Status int `json:"status"`
			} `json:"seats"`
		} `json:"data"`
	}
	count := func(nd *sharedNode) (free, locked, sold int) {
		view.Data.Seats = nil
		if st := nodetest.DoJSON(t, "GET", fmt.Sprintf("http://%s/api/v1/programs/%d", nd.http, pid), tok, "", &view); st != 200 {
			t.Fatalf("program through %s: %d", nd.http, st)
		}
		for _, s := range view.Data.Seats {
			switch s.Status {
			case 1:
				free++
			case 2:
				locked++
			case 3:
				sold++
			}
		}
		return
	}
	if f, l, s := count(c.nodes[2]); f != 5 || l != 3 || s != 2 {
		t.Fatalf("through node 3: free %d locked %d sold %d, want 5 3 2", f, l, s)
	}
	var cancelled order
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[2].http+"/api/v1/tickets/orders/"+pending.Data.OrderID+"/cancel", tok2, "", &cancelled); st != 200 || cancelled.Data.Status != "CANCELLED" {
		t.Fatalf("cancel through node 3: %d %+v", st, cancelled.Data)
	}
	if f, l, s := count(c.nodes[1]); f != 8 || l != 0 || s != 2 {
		t.Fatalf("through node 2 after the cancel: free %d locked %d sold %d, want 8 0 2", f, l, s)
	}

	// The same request through two nodes at once is one order, one debit.
	var dup [2]order
	var wg sync.WaitGroup
	for i, nd := range []*sharedNode{c.nodes[1], c.nodes[2]} {
		wg.Add(1)
		go func(i int, nd *sharedNode) {
			defer wg.Done()
			for { // 10409 while the first is being placed: retry the same req_id
				st := nodetest.DoJSON(t, "POST", "http://"+nd.http+"/api/v1/tickets/orders", tok,
					fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":1,"pay":"coins","req_id":"t3"}`, pid), &dup[i])
				if st != 409 {
					if st != 200 {
						t.Errorf("duplicate through %s: %d", nd.http, st)
					}
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
		}(i, nd)
	}
	wg.Wait()
	if dup[0].Data.OrderID == "" || dup[0].Data.OrderID != dup[1].Data.OrderID {
		t.Fatalf("one req_id through two nodes gave orders %q and %q", dup[0].Data.OrderID, dup[1].Data.OrderID)
	}
	// 30 buyers over the three nodes for the 7 seats left: exactly 7 sold,
	// none twice.
	var sold atomic.Int64
	seats := sync.Map{}
	for i := 0; i < 30; i++ {
		u := int64(800 + i)
		if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/dev/credit", "",
			fmt.Sprintf(`{"user_id":%d,"amount":10,"req_id":"seed"}`, u), nil); st != 200 {
			t.Fatalf("credit: %d", st)
		}
		wg.Add(1)
		go func(u int64, nd *sharedNode) {
			defer wg.Done()
			var o order
			st := nodetest.DoJSON(t, "POST", "http://"+nd.http+"/api/v1/tickets/orders", devTokenCached(t, nd.http, u),
				fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":1,"pay":"coins","req_id":"rush"}`, pid), &o)
			if st == 200 && o.Data.Status == "PAID" {
				sold.Add(1)
				if _, twice := seats.LoadOrStore(o.Data.SeatIDs[0], u); twice {
					t.Errorf("seat %s sold twice", o.Data.SeatIDs[0])
				}
			}
		}(u, c.nodes[i%3])
	}
	wg.Wait()
	if f, l, s := count(c.nodes[0]); sold.Load() != 7 || f != 0 || l != 0 || s != 10 {
		t.Fatalf("rush: %d sold; free %d locked %d sold %d, want 7 sold and 0 0 10", sold.Load(), f, l, s)
	}
	dirs := c.stopAll()
	// Coins: 100 + 30 × 10 credited; 2 + 1 + 7 seats at 10 debited.
	if cr, db, bal := persisttest.CheckSharedConservation(t, c.redis.Addr, dirs...); cr != 400 || db != 100 || bal != 300 {
		t.Fatalf("credits %d debits %d balances %d, want 400 100 300", cr, db, bal)
	}
}

// A chat retried with its req_id through another node (as after a reconnect
// to another gateway) is posted once: two node processes, the retry answers
// the first mid, and members on both nodes get the message once.
func TestClusterChatReqIDOnceAcrossNodes(t *testing.T) {
	c := startCluster(t, 2)
	anchorTok := devToken(t, c.nodes[0].http, 1, "anchor")
	room := openRoom(t, c.nodes[0].http, anchorTok)
	ctx := context.Background()
	var logs [2]pushLog
	var sends [2]*clientsdk.Client
	for i, nd := range c.nodes {
		sends[i] = dialLogged(t, nd.ws, devTokenCached(t, nd.http, 50), &pushLog{})
		watch := dialLogged(t, nd.ws, devTokenCached(t, nd.http, int64(60+i)), &logs[i])
		for _, cl := range []*clientsdk.Client{sends[i], watch} {
			if _, err := cl.Join(ctx, room); err != nil {
				t.Fatal(err)
			}
		}
	}
	mid, err := sends[0].ChatOnce(ctx, room, "once", "retry-me")
	if err != nil {
		t.Fatal(err)
	}
	if m, err := sends[1].ChatOnce(ctx, room, "once", "retry-me"); err != nil || m != mid {
		t.Fatalf("the retry through node 2: %q %v, want %q", m, err, mid)
	}
	if _, err := sends[1].ChatOnce(ctx, room, "after", "another"); err != nil {
		t.Fatal(err)
	}
	for i := range logs {
		pollUntil(t, 10*time.Second, "both chats on node "+strconv.Itoa(i+1), func() bool { return len(logs[i].get(proto.BizChat)) >= 2 })
	}
	time.Sleep(200 * time.Millisecond) // a duplicate would arrive meanwhile
	for i := range logs {
		got := logs[i].get(proto.BizChat)
		if len(got) != 2 || got[0].Mid != mid {
			t.Fatalf("node %d's member got %d chats (first %+v), want 2, the first %s", i+1, len(got), got[0], mid)
		}
	}
}

// A user's chats are rate limited across the nodes (before: each node
// counted its own, so connections on two nodes chatted at twice the rate):
// twelve chats sent at once through two nodes at 5 a second (bursts of 5)
// pass five, and one more per 200 ms they took.
func TestClusterChatRateCountedAcrossNodes(t *testing.T) {
	c := startCluster(t, 2, "LIVEEDGE_LIMITS_CHAT_PER_SECOND=5")
	anchorTok := devToken(t, c.nodes[0].http, 1, "anchor")
	room := openRoom(t, c.nodes[0].http, anchorTok)
	ctx := context.Background()
	var cls [2]*clientsdk.Client
	for i, nd := range c.nodes {
		cls[i] = dialLogged(t, nd.ws, devTokenCached(t, nd.http, 70), &pushLog{})
		if _, err := cls[i].Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	atFiveASecond(t, "chats", func(i int) error {
		_, err := cls[i%2].Chat(ctx, room, "hi "+strconv.Itoa(i))
		return err
	})
}

// atFiveASecond makes twelve requests at once (send(i), i = 0..11), as a
// limit of 5 a second in bursts of 5 counted across the nodes allows: five
// pass, and one more per 200 ms they took; the others are 10429. It returns
// how many passed.
func atFiveASecond(t *testing.T, what string, send func(i int) error) int64 {
	t.Helper()
	var sent, limited atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for i := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			switch err := send(i); {
			case err == nil:
				sent.Add(1)
			case nodetest.CodeOf(err) == proto.CodeRateLimited:
				limited.Add(1)
			default:
				t.Errorf("%s %d: %v", what, i, err)
			}
		}()
	}
	wg.Wait()
	most := 5 + int64(time.Since(start)/(200*time.Millisecond))
	if sent.Load() < 5 || sent.Load() > most || sent.Load()+limited.Load() != 12 {
		t.Fatalf("%d %s passed, %d limited, through two nodes at 5/s; want 5..%d", sent.Load(), what, limited.Load(), most)
	}
	return sent.Load()
}

// waitReady waits until every node of c answers /readyz 200 (NATS and Redis
// reachable, the shared wallet ready).
func (c *testCluster) waitReady(t *testing.T, what string) {
	t.Helper()
	pollUntil(t, 20*time.Second, what+": every node ready", func() bool {
		for _, nd := range c.nodes {
			resp, err := http.Get("http://" + nd.http + "/readyz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				return false
			}
		}
		return true
	})
}

// A user's gift rate (limits.gift_per_second) is counted across the nodes:
// twelve gifts at once through two nodes at 5/s debit five (ten when each
// node counted its own), the rest 10429 with nothing debited; money is
// conserved.
func TestClusterGiftRateCountedAcrossNodes(t *testing.T) {
	c := startCluster(t, 2, "LIVEEDGE_LIMITS_GIFT_PER_SECOND=5")
	const anchor, sender = 1, 71
	anchorTok := devToken(t, c.nodes[0].http, anchor, "anchor")
	room := openRoom(t, c.nodes[0].http, anchorTok)
	ctx := context.Background()
	a := dialLogged(t, c.nodes[0].ws, anchorTok, &pushLog{})
	if _, err := a.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+c.nodes[0].http+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":100,"req_id":"seed"}`, sender), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	var cls [2]*clientsdk.Client
	for i, nd := range c.nodes {
		cls[i] = dialLogged(t, nd.ws, devTokenCached(t, nd.http, sender), &pushLog{})
		if _, err := cls[i].Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	sent := atFiveASecond(t, "gifts", func(i int) error {
		gift := map[string]any{"room_id": room, "gift_id": 24, "receiver_id": anchor, "count": 1, "req_id": "r-" + strconv.Itoa(i)}
		_, err := cls[i%2].Request(ctx, proto.TypeGift, gift)
		return err
	})
	dirs := c.stopAll()
	cr, db, bal := persisttest.CheckSharedConservation(t, c.redis.Addr, dirs...)
	if cr != 100 || db != sent || bal != 100-sent {
		t.Fatalf("credits %d debits %d balances %d; %d gifts sent", cr, db, bal, sent)
	}
}

// ws.max_conns_per_user bounds a user's connections on every node together
// (presence, within ~200 ms): at 3, two on node 1 leave one for node 2 (each
// node allowed 3 before), and a connection closed on node 1 gives its slot
// back to node 2.
func TestClusterConnsPerUserAcrossNodes(t *testing.T) {
	c := startCluster(t, 2, "LIVEEDGE_WS_MAX_CONNS_PER_USER=3")
	const user = 80
	tok := devTokenCached(t, c.nodes[0].http, user)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{c.redis.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	// held waits until presence shows the user's connections per node.
	held := func(want map[string]string) {
		t.Helper()
		pollUntil(t, 5*time.Second, fmt.Sprintf("presence %v", want), func() bool {
			got, err := rdb.Do(context.Background(), rdb.B().Hgetall().Key("le:uc:{80}").Build()).AsStrMap()
			if err != nil || len(got) != len(want) {
				return false
			}
			for node, n := range want {
				if _, cnt, _ := strings.Cut(got[node], ":"); cnt != n {
					return false
				}
			}
			return true
		})
	}
	a := dialLogged(t, c.nodes[0].ws, tok, &pushLog{})
	dialLogged(t, c.nodes[0].ws, tok, &pushLog{})
	held(map[string]string{"gw-1": "2"})
	dialLogged(t, c.nodes[1].ws, tok, &pushLog{})
	held(map[string]string{"gw-1": "2", "gw-2": "1"})
	if st := upgradeStatus(t, c.nodes[1].ws, tok); st != http.StatusTooManyRequests {
		t.Fatalf("a fourth connection (on node 2) answered %d, want 429", st)
	}
	_ = a.Close()
	held(map[string]string{"gw-1": "1", "gw-2": "1"})
	// The slot given back (node 2 reads presence through its client-side
	// cache: the invalidation may reach it a moment after Redis changed).
	pollUntil(t, 5*time.Second, "a connection through node 2 again", func() bool {
		return upgradeStatus(t, c.nodes[1].ws, tok) == http.StatusSwitchingProtocols
	})
}

// upgradeStatus makes a WebSocket upgrade request to wsAddr with tok and
// returns its HTTP status (a connection made is closed at once).
func upgradeStatus(t *testing.T, wsAddr, tok string) int {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+wsAddr+"/ws?token="+tok, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// A cluster on a Redis that requires a password and a NATS that requires a
// user: the nodes authenticate (redis.password, nats.user/password) and
// serve — a credit through one node is the balance through the other. A node
// with a wrong NATS password never becomes ready. Before, neither server
// could be protected: the node had no way to send credentials.
func TestClusterOnAuthenticatedRedisAndNATS(t *testing.T) {
	const redisPW, natsPW = "redis-secret-for-tests", "nats-secret-for-tests"
	rs := redistest.StartWith(t, "--requirepass", redisPW)
	ns := natstest.StartWith(t, "--user", "liveedge", "--pass", natsPW)
	c := startClusterOn(t, rs, ns, 2, "LIVEEDGE_REDIS_PASSWORD="+redisPW, "LIVEEDGE_NATS_USER=liveedge", "LIVEEDGE_NATS_PASSWORD="+natsPW)
	n1, n2 := c.nodes[0], c.nodes[1]
	tixCredit(t, n1, 741, 500, "auth-seed")
	var out struct {
		Data struct {
			Balance int64 `json:"balance"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "GET", "http://"+n2.http+"/api/v1/wallet", devTokenCached(t, n2.http, 741), "", &out); st != 200 || out.Data.Balance != 500 {
		t.Fatalf("balance through the other node: %d %+v, want 500", st, out)
	}

	bad := &sharedNode{http: freeAddr(t), ws: freeAddr(t), data: t.TempDir()}
	bad.env = nodeEnv(bad.http, bad.ws, bad.data, []string{
		"LIVEEDGE_NODE_ID=gw-9", "LIVEEDGE_CLUSTER_ENABLED=true", "LIVEEDGE_NATS_EMBEDDED=false", "LIVEEDGE_NATS_URL=" + ns.URL,
		"LIVEEDGE_WALLET_MODE=shared", "LIVEEDGE_WALLET_NODES=gw-1,gw-2,gw-9", "LIVEEDGE_REDIS_ADDR=" + rs.Addr,
		"LIVEEDGE_REDIS_PASSWORD=" + redisPW, "LIVEEDGE_NATS_USER=liveedge", "LIVEEDGE_NATS_PASSWORD=wrong",
	}...)
	bad.p = start(t, "", bad.env, binary(t))
	readyz := func() int {
		resp, err := http.Get("http://" + bad.http + "/readyz")
		if err != nil {
			return 0 // not listening yet
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	pollUntil(t, 30*time.Second, "the node with a wrong NATS password answering /readyz", func() bool { return readyz() != 0 })
	for range 10 {
		if st := readyz(); st == 200 {
			t.Fatal("a node with a wrong NATS password is ready")
		}
		time.Sleep(200 * time.Millisecond)
	}
}
