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
	var mu sync.Mutex
	var credits []clientsdk.Push
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := clientsdk.Dial(ctx, clientsdk.Config{URL: nodetest.WSURL(n), Token: nodetest.Token(t, n, 77, gateway.RoleViewer),
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
	defer c.Close()
	nodetest.Eventually(t, 5*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(credits) == 2
	}, "the two credits made while away")
}
