package gateway_test

import (
	"context"
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
