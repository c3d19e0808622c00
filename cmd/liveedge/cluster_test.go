package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway/proto"
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

func startCluster(t *testing.T, n int, extra ...string) *testCluster {
	t.Helper()
	c := &testCluster{redis: redistest.Start(t), nats: natstest.Start(t)}
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
