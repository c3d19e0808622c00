package gateway_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
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
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 8 << 10
	cfg.WS.OfflineMax = 40
	n := nodetest.Start(t, cfg)
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
	var got []string
	for len(got) < len(mids) {
		select {
		case f := <-r.Frames():
			if f.T == proto.TypePush && !slices.Contains(got, f.Mid) {
				got = append(got, f.Mid)
			}
		case <-r.Closed():
			t.Fatalf("closed %d after %d of %d pushes", r.CloseCode(), len(got), len(mids))
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d pushes", len(got), len(mids))
		}
	}
	if !slices.Equal(got, mids) {
		t.Fatalf("pushes out of order:\n got %v\nwant %v", got, mids)
	}
	if d := nodeCounter(t, n, "liveedge_queue_drops_total"); d > 0 {
		t.Fatalf("%v send queue drops", d)
	}
}

// Offline pushes still waiting for room in the queue (the backlog) when the
// connection closes are kept with its unacked ones: the user's next session
// gets every one of them, in order.
func TestOfflineBacklogKeptWhenTheConnectionCloses(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 8 << 10
	cfg.WS.OfflineMax = 40
	n := nodetest.Start(t, cfg)
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
	time.Sleep(200 * time.Millisecond)
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
