package gateway_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// A credit made while the user is connected nowhere (a reliable 5570) is
// kept and delivered when they connect — after the hello, which goes out as
// a frame of its own even for a client that accepts batch frames (the SDK
// refuses a first frame that is not a hello).
func TestOfflineCreditDeliveredAfterHello(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	for i, amount := range []string{"5", "7"} {
		if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/dev/credit", "",
			`{"user_id":77,"amount":`+amount+`,"req_id":"c`+string(rune('0'+i))+`"}`, nil); st != 200 {
			t.Fatalf("credit: %d", st)
		}
	}
	credits := dialCollecting(t, n, 77)
	nodetest.Eventually(t, 5*time.Second, func() bool { return len(credits()) == 2 }, "the two credits made while away")
}

// dialCollecting connects user with the Go SDK (acking) and returns what
// it has received of biz 5570 (wallet credited) so far.
func dialCollecting(t *testing.T, n *gateway.Node, user int64) func() []clientsdk.Push {
	t.Helper()
	var mu sync.Mutex
	var credits []clientsdk.Push
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := clientsdk.Dial(ctx, clientsdk.Config{URL: nodetest.WSURL(n), Token: nodetest.Token(t, n, user, gateway.RoleViewer),
		OnPush: func(p clientsdk.Push) {
			if p.Biz == proto.BizWalletCredit {
				mu.Lock()
				credits = append(credits, p)
				mu.Unlock()
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return func() []clientsdk.Push {
		mu.Lock()
		defer mu.Unlock()
		return append([]clientsdk.Push(nil), credits...)
	}
}

// A reliable push written to a connection that closed before acking it is
// kept, and delivered again at the user's next connect (it was dropped with
// the connection: a credit's 5570 never arrived).
func TestUnackedPushKeptWhenTheConnectionCloses(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	const user = 78
	raw := nodetest.MustDialRaw(t, nodetest.WSURL(n), nodetest.Token(t, n, user, gateway.RoleViewer), nodetest.RawOptions{})
	raw.NextOfType(proto.TypeHello, 5*time.Second)
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/dev/credit", "",
		`{"user_id":78,"amount":9,"req_id":"k1"}`, nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	push := raw.NextOfType(proto.TypePush, 5*time.Second) // written, never acked
	if push.Biz != proto.BizWalletCredit || push.Mid == "" {
		t.Fatalf("push %+v", push)
	}
	raw.Close()
	again := dialCollecting(t, n, user)
	nodetest.Eventually(t, 5*time.Second, func() bool {
		got := again()
		return len(got) == 1 && got[0].Mid == push.Mid
	}, "the unacked credit push delivered again")
}

// A client owed more offline pushes than its send queue holds
// (ws.send_queue_bytes) gets them all, in order, as fast as it reads: they
// were all queued at its connect, and the connection closed 4408 as a slow
// consumer (at every reconnect — the box drained each time again).
func TestOfflineBacklogLargerThanTheSendQueue(t *testing.T) {
	n := backlogNode(t)
	const user = 79
	pad := strings.Repeat("x", 1000)
	var mids []string
	for i := range 40 { // ~40 KiB: five queues' worth
		mid, reached := n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus,
			Data: []byte(fmt.Sprintf(`{"i":%d,"pad":%q}`, i, pad)), Ack: true})
		if reached != 0 {
			t.Fatalf("reached %d sessions of an offline user", reached)
		}
		mids = append(mids, mid)
	}
	r := dial(t, n, user, nodetest.RawOptions{Batch: true})
	readInOrder(t, r, mids)
	if d := metricValue(t, n, "liveedge_queue_drops_total"); d > 0 {
		t.Fatalf("%v send queue drops", d)
	}
}

// Offline pushes still waiting for room in the queue (the backlog) when the
// connection closes are kept with its unacked ones: the user's next session
// gets every one of them, in order.
func TestOfflineBacklogKeptWhenTheConnectionCloses(t *testing.T) {
	n := backlogNode(t)
	const user = 80
	pad := strings.Repeat("x", 256<<10)
	var mids []string
	for i := range 40 { // 10 MiB: more than the socket buffers hold
		mid, _ := n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus,
			Data: []byte(fmt.Sprintf(`{"i":%d,"pad":%q}`, i, pad)), Ack: true})
		mids = append(mids, mid)
	}
	r := nodetest.MustDialRaw(t, nodetest.WSURL(n), nodetest.Token(t, n, user, gateway.RoleViewer), nodetest.RawOptions{Batch: true, RcvBuf: 4096})
	r.NextOfType(proto.TypeHello, 5*time.Second)
	r.Pause() // nothing acked; the writer stalls on the full socket
	nodetest.Eventually(t, 5*time.Second, func() bool { return n.WS.Backlogged(user) > 0 && n.WS.WriterTook(user) },
		"the writer stalled with pushes waiting in the backlog")
	r.Drop()
	<-r.Closed()
	next := dial(t, n, user, nodetest.RawOptions{Batch: true})
	var got []string
	for len(got) < len(mids) {
		if f := next.Next(5 * time.Second); f.T == proto.TypePush && !slices.Contains(got, f.Mid) {
			got = append(got, f.Mid)
		}
	}
	if !slices.Equal(got, mids) {
		t.Fatalf("the next session got\n %v\nwant\n %v", got, mids)
	}
}

// Cluster: a box kept in Redis, larger than the send queue, drained by
// another node at the user's connect, reaches the client whole and in
// order (the drain hands each push to the connection's backlog).
func TestClusterOfflineBacklogLargerThanTheSendQueue(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	peers := []string{"gw-1", "gw-2"}
	var nodes []*gateway.Node
	for _, id := range peers {
		cfg := clusterNodeConfig(t, id, peers, rds, nats)
		cfg.WS.SendQueueBytes = 8 << 10
		cfg.WS.OfflineMax = 40
		cfg.WS.ResendAfter = configsDuration(time.Minute)
		nodes = append(nodes, nodetest.Start(t, cfg))
	}
	const user = 86
	pad := strings.Repeat("x", 1000)
	var mids []string
	for i := range 40 {
		mid, _ := nodes[0].Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus,
			Data: []byte(fmt.Sprintf(`{"i":%d,"pad":%q}`, i, pad)), Ack: true})
		mids = append(mids, mid)
	}
	r := dial(t, nodes[1], user, nodetest.RawOptions{Batch: true})
	readInOrder(t, r, mids)
}

// A reliable push made for a user whose connection has just become
// reachable, before what they were owed is given to it, comes after the owed
// pushes (an order's newer status never overtakes an older one kept for
// them): on one node (the offline box) and in a cluster (the shared list in
// Redis, drained after the subscription).
func TestLivePushDuringTheOfflineDrainComesAfterIt(t *testing.T) {
	t.Run("node", func(t *testing.T) {
		n := backlogNode(t)
		livePushDuringTheDrain(t, n, n)
	})
	t.Run("cluster", func(t *testing.T) {
		rds, nats := redistest.Start(t), natstest.Start(t)
		peers := []string{"gw-1", "gw-2"}
		var nodes []*gateway.Node
		for _, id := range peers {
			cfg := clusterNodeConfig(t, id, peers, rds, nats)
			cfg.WS.OfflineMax = 40
			cfg.WS.ResendAfter = configsDuration(time.Minute)
			nodes = append(nodes, nodetest.Start(t, cfg))
		}
		livePushDuringTheDrain(t, nodes[0], nodes[1])
	})
}

// livePushDuringTheDrain keeps 10 pushes for a user through from, then
// connects them to at, which makes one more push for them the moment their
// connection is reachable; all 11 must arrive in the order they were made.
func livePushDuringTheDrain(t *testing.T, from, at *gateway.Node) {
	const user = 88
	var mids []string
	for i := range 10 {
		mid, _ := from.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus,
			Data: []byte(fmt.Sprintf(`{"i":%d}`, i)), Ack: true})
		mids = append(mids, mid)
	}
	live := make(chan string, 1)
	var once sync.Once
	at.WS.OnAttached(func(u int64) {
		if u == user {
			once.Do(func() {
				mid, _ := at.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus, Data: []byte(`{"live":true}`), Ack: true})
				live <- mid
			})
		}
	})
	r := dial(t, at, user, nodetest.RawOptions{Batch: true})
	select {
	case mid := <-live:
		mids = append(mids, mid)
	case <-time.After(5 * time.Second):
		t.Fatal("no live push made at the attach")
	}
	readInOrder(t, r, mids)
}

// backlogNode is a node with an 8 KiB send queue, room for 40 offline
// pushes per user, and resends far off (the raw clients do not ack).
func backlogNode(t *testing.T) *gateway.Node {
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 8 << 10
	cfg.WS.OfflineMax = 40
	cfg.WS.ResendAfter = configsDuration(time.Minute)
	return nodetest.Start(t, cfg)
}

// While a client takes what it is owed, a push made for it meanwhile comes
// after the owed ones (not ahead of an older status of the same order), and
// its live traffic keeps the queue's room: a reply is answered, not closed
// 4408 behind a queue filled with the backlog.
func TestLivePushWaitsBehindTheBacklog(t *testing.T) {
	n := backlogNode(t)
	const user = 81
	pad := strings.Repeat("x", 256<<10) // 10 MiB in all: more than the socket buffers hold
	var mids []string
	for i := range 40 {
		mid, _ := n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus,
			Data: []byte(fmt.Sprintf(`{"i":%d,"pad":%q}`, i, pad)), Ack: true})
		mids = append(mids, mid)
	}
	r := nodetest.MustDialRaw(t, nodetest.WSURL(n), nodetest.Token(t, n, user, gateway.RoleViewer), nodetest.RawOptions{Batch: true, RcvBuf: 4096})
	r.NextOfType(proto.TypeHello, 5*time.Second)
	r.Pause()
	nodetest.Eventually(t, 5*time.Second, func() bool { return n.WS.Backlogged(user) > 0 }, "pushes waiting in the backlog")
	live, _ := n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus, Data: []byte(`{"live":true}`), Ack: true})
	mids = append(mids, live)
	if err := r.Send(`{"t":"ping","id":7,"d":{}}`); err != nil {
		t.Fatal(err)
	}
	r.Resume()
	var got []string
	replied := false
	for len(got) < len(mids) || !replied {
		select {
		case f := <-r.Frames():
			switch {
			case f.T == proto.TypePush && !slices.Contains(got, f.Mid):
				got = append(got, f.Mid)
			case f.ID == 7:
				replied = true
			}
		case <-r.Closed():
			t.Fatalf("closed %d after %d of %d pushes", r.CloseCode(), len(got), len(mids))
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d pushes, replied %v", len(got), len(mids), replied)
		}
	}
	if !slices.Equal(got, mids) {
		t.Fatalf("pushes out of order:\n got %v\nwant %v", got, mids)
	}
}

// A box larger than the pushes a connection may hold unacked (4,096; here
// ws.offline_max 5,000) is delivered whole to a client that acks: the
// backlog waits for acks rather than closing the connection 4408.
func TestOfflineBoxOverTheAckBoundDelivered(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.OfflineMax = 5000
	n := nodetest.Start(t, cfg)
	const user = 82
	for i := range 5000 {
		n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus, Data: []byte(fmt.Sprintf(`{"i":%d}`, i)), Ack: true})
	}
	seen := dialSeeing(t, n, user)
	nodetest.Eventually(t, 20*time.Second, func() bool { return len(seen()) == 5000 }, "every push of the box")
	if d := metricValue(t, n, "liveedge_queue_drops_total"); d > 0 {
		t.Fatalf("%v send queue drops", d)
	}
}

// Reliable pushes made while the user's connections come and go — each
// dropped after reading a few frames, never acking, with an 8 KiB queue
// and pushes of 2 KB, so that what is owed waits in backlogs, is handed on
// from one connection to the next and to the box — all reach the user's
// last connection: nothing is lost on the way.
func TestOwedPushesSurviveConnectionChurn(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 8 << 10
	cfg.WS.OfflineMax = 1000
	cfg.WS.ResendAfter = configsDuration(time.Minute)
	n := nodetest.Start(t, cfg)
	const user, pushes = 83, 300
	pad := strings.Repeat("y", 2000)
	sent := make(chan []string, 1)
	go func() {
		var mids []string
		for i := range pushes {
			mid, _ := n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus,
				Data: []byte(fmt.Sprintf(`{"i":%d,"pad":%q}`, i, pad)), Ack: true})
			mids = append(mids, mid)
			time.Sleep(time.Duration(i%7) * time.Millisecond)
		}
		sent <- mids
	}()
	for cycle := range 12 {
		r := nodetest.MustDialRaw(t, nodetest.WSURL(n), nodetest.Token(t, n, user, gateway.RoleViewer), nodetest.RawOptions{Batch: true, RcvBuf: 4096})
		r.NextOfType(proto.TypeHello, 5*time.Second)
		for range cycle * 3 {
			select {
			case <-r.Frames():
			case <-time.After(50 * time.Millisecond):
			}
		}
		r.Pause()
		time.Sleep(time.Duration(cycle%4) * 10 * time.Millisecond)
		r.Drop()
		<-r.Closed()
	}
	mids := <-sent
	seen := dialSeeing(t, n, user)
	missing := func() []string {
		got := seen()
		var out []string
		for _, m := range mids {
			if !got[m] {
				out = append(out, m)
			}
		}
		return out
	}
	deadline := time.Now().Add(15 * time.Second)
	for len(missing()) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if m := missing(); len(m) > 0 {
		t.Fatalf("%d of %d pushes never reached the last connection: %v", len(m), len(mids), m[:min(len(m), 5)])
	}
}

// Owed pushes take at most half of the pushes a connection may hold unacked
// (4,096): a live reliable push — here a room's — still has room beside a
// box that the client has not acked yet. The backlog took them all, and the
// next reliable push closed the connection 4408.
func TestLiveReliablePushBesideAnUnackedBacklog(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.OfflineMax = 5000
	cfg.WS.ResendAfter = configsDuration(time.Minute)
	n := nodetest.Start(t, cfg)
	const user = 84
	for i := range 5000 {
		n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus, Data: []byte(fmt.Sprintf(`{"i":%d}`, i)), Ack: true})
	}
	room := nodetest.OpenRoom(t, n, 1, 0)
	r := nodetest.MustDialRaw(t, nodetest.WSURL(n), nodetest.Token(t, n, user, gateway.RoleViewer), nodetest.RawOptions{Batch: true, Buf: 100000})
	if f := request(t, r, 1, fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room)); f.Code != 0 {
		t.Fatalf("join: %+v", f)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool { return n.WS.PendingAcks(user) == 2048 && n.WS.Backlogged(user) > 0 },
		"half the ack bound pending, the rest of the box waiting")
	mid, err := n.Router.PublishRoom(room, proto.Push{Biz: proto.BizRainStarted, Room: room, Data: []byte(`{}`), Ack: true})
	if err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case f := <-r.Frames():
			if f.Mid == mid {
				return
			}
		case <-r.Closed():
			t.Fatalf("closed %d by a live reliable room push beside the backlog", r.CloseCode())
		case <-time.After(5 * time.Second):
			t.Fatal("the room push never came")
		}
	}
}

// A client that reads but does not ack is resent what it was sent within
// the queue's room (a round takes half of it; the rest waits for the next):
// a resend round of 80 KB to an 8 KiB queue closed it 4408 (resend frames
// of up to 64 KiB, queued at once).
func TestResendsWithinTheQueueRoom(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 8 << 10
	cfg.WS.OfflineMax = 40
	cfg.WS.ResendAfter = configsDuration(100 * time.Millisecond)
	cfg.WS.ResendMaxTries = 3
	n := nodetest.Start(t, cfg)
	const user = 85
	pad := strings.Repeat("z", 2000)
	var mids []string
	for i := range 40 {
		mid, _ := n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus, Data: []byte(fmt.Sprintf(`{"i":%d,"pad":%q}`, i, pad)), Ack: true})
		mids = append(mids, mid)
	}
	r := dial(t, n, user, nodetest.RawOptions{Batch: true})
	seen := map[string]int{}
	for end := time.After(1500 * time.Millisecond); ; {
		select {
		case f := <-r.Frames():
			if f.T == proto.TypePush {
				seen[f.Mid]++
			}
			continue
		case <-r.Closed():
			t.Fatalf("closed %d while resending (%d of %d pushes seen)", r.CloseCode(), len(seen), len(mids))
		case <-end:
		}
		break
	}
	resent := 0
	for _, m := range mids {
		if seen[m] == 0 {
			t.Fatalf("push %s never came (%v)", m, seen)
		}
		if seen[m] > 1 {
			resent++
		}
	}
	if resent == 0 {
		t.Fatal("nothing resent")
	}
}

// dialSeeing connects user with the Go SDK (it acks every push) and returns
// the mids of the pushes it has received so far.
func dialSeeing(t *testing.T, n *gateway.Node, user int64) func() map[string]bool {
	t.Helper()
	var mu sync.Mutex
	seen := map[string]bool{}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := clientsdk.Dial(ctx, clientsdk.Config{URL: nodetest.WSURL(n), Token: nodetest.Token(t, n, user, gateway.RoleViewer),
		OnPush: func(p clientsdk.Push) {
			mu.Lock()
			seen[p.Mid] = true
			mu.Unlock()
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return func() map[string]bool {
		mu.Lock()
		defer mu.Unlock()
		return maps.Clone(seen)
	}
}

// A push owed from before that is larger than the send queue reaches the
// client (the backlog moves a frame whole into an empty queue) but is never
// resent: a resend could only overflow the queue. It is given up on after
// ws.resend_max_tries, as one not acked, and the connection stays.
func TestOwedPushLargerThanTheQueueGivenUpNotResent(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 8 << 10
	cfg.WS.ResendAfter = configsDuration(20 * time.Millisecond)
	cfg.WS.ResendMaxTries = 3
	n := nodetest.Start(t, cfg)
	const user = 87
	mid, _ := n.Router.SendUser(user, proto.Push{Biz: proto.BizOrderStatus,
		Data: []byte(fmt.Sprintf(`{"pad":%q}`, strings.Repeat("x", 20000))), Ack: true})
	r := dial(t, n, user, nodetest.RawOptions{Batch: true})
	if f := r.NextOfType(proto.TypePush, 5*time.Second); f.Mid != mid {
		t.Fatalf("push %+v, want %s", f, mid)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool { return metricValue(t, n, "liveedge_resend_giveups_total") == 1 },
		"the push not given up on")
	if k := countPushes(r, mid, 100*time.Millisecond); k != 0 || r.CloseCode() != 0 {
		t.Fatalf("resent %d times, close code %d", k, r.CloseCode())
	}
}

// readInOrder reads r's pushes until it has had every one of mids (each
// read again is skipped), failing on a close, a quiet of 10 s, or another
// order.
func readInOrder(t *testing.T, r *nodetest.Raw, mids []string) {
	t.Helper()
	var got []string
	for len(got) < len(mids) {
		select {
		case f := <-r.Frames():
			if f.T == proto.TypePush && !slices.Contains(got, f.Mid) {
				got = append(got, f.Mid)
			}
		case <-r.Closed():
			t.Fatalf("closed %d after %d of %d pushes", r.CloseCode(), len(got), len(mids))
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d pushes", len(got), len(mids))
		}
	}
	if !slices.Equal(got, mids) {
		t.Fatalf("pushes out of order:\n got %v\nwant %v", got, mids)
	}
}
