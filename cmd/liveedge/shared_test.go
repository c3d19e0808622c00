package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
)

type sharedNode struct {
	p              *proc
	http, ws, data string
	env            []string
}

// startSharedNodes starts two node processes in shared wallet mode on one
// real Redis (each with its own embedded NATS and Pebble).
func startSharedNodes(t *testing.T, redisAddr string) [2]*sharedNode {
	bin := binary(t)
	var ns [2]*sharedNode
	for i := range ns {
		n := &sharedNode{http: freeAddr(t), ws: freeAddr(t), data: t.TempDir()}
		n.env = nodeEnv(n.http, n.ws, n.data,
			fmt.Sprintf("LIVEEDGE_NODE_ID=gw-%d", i+1),
			"LIVEEDGE_WALLET_MODE=shared", "LIVEEDGE_WALLET_NODES=gw-1,gw-2",
			"LIVEEDGE_REDIS_ADDR="+redisAddr, "LIVEEDGE_LIMITS_GIFT_PER_SECOND=0")
		n.p = start(t, "", n.env, bin)
		ns[i] = n
	}
	for _, n := range ns {
		waitReady(t, n.p, n.http)
	}
	return ns
}

// Shared mode through two node processes on one Redis: balance 500, 1,000
// concurrent 1-coin gifts split over both nodes: exactly 500 succeed, the
// balance ends at 0, 500 failures; then Redis restarted empty: balances come
// back equal to the two ledgers.
func TestSharedWalletTwoNodeProcesses(t *testing.T) {
	rs := redistest.Start(t)
	ns := startSharedNodes(t, rs.Addr)
	const sender, anchor = 900, 1
	if st := nodetest.DoJSON(t, "POST", "http://"+ns[0].http+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":500,"req_id":"seed"}`, sender), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	var ok, poor atomic.Int64
	var wg sync.WaitGroup
	for i, n := range ns {
		room := openRoom(t, n.http, devToken(t, n.http, anchor, "anchor"))
		tok := devToken(t, n.http, sender, "viewer")
		for c := 0; c < 4; c++ {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			cl, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + n.ws + "/ws", Token: tok})
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cl.Close() })
			if _, err := cl.Join(context.Background(), room); err != nil {
				t.Fatal(err)
			}
			for k := 0; k < 125; k++ {
				wg.Add(1)
				go func(req string) {
					defer wg.Done()
					_, err := cl.Request(context.Background(), proto.TypeGift, map[string]any{
						"room_id": room, "gift_id": 24, "receiver_id": anchor, "count": 1, "req_id": req})
					var pe *proto.Error
					switch {
					case err == nil:
						ok.Add(1)
					case errors.As(err, &pe) && pe.Code == proto.CodeInsufficientBalance:
						poor.Add(1)
					default:
						t.Errorf("gift %s: %v", req, err)
					}
				}(fmt.Sprintf("n%d-c%d-%d", i, c, k))
			}
		}
	}
	wg.Wait()
	if ok.Load() != 500 || poor.Load() != 500 {
		t.Fatalf("ok %d insufficient %d", ok.Load(), poor.Load())
	}
	balance := func(n *sharedNode, user int64) (int64, int64) {
		var w struct {
			Code int `json:"code"`
			Data struct {
				Balance  int64 `json:"balance"`
				Received int64 `json:"received"`
			} `json:"data"`
		}
		nodetest.DoJSON(t, "GET", "http://"+n.http+"/api/v1/wallet", devToken(t, n.http, user, "viewer"), "", &w)
		return w.Data.Balance, w.Data.Received
	}
	for _, n := range ns {
		if b, _ := balance(n, sender); b != 0 {
			t.Fatalf("sender balance on %s: %d", n.http, b)
		}
		if _, r := balance(n, anchor); r != 500 {
			t.Fatalf("anchor received on %s: %d", n.http, r)
		}
	}

	// Redis restarted empty: both nodes contribute their ledgers; the
	// balances come back as the ledgers say.
	rs.Restart()
	nodetest.Eventually(t, 20*time.Second, func() bool {
		for _, n := range ns {
			if _, r := balance(n, anchor); r != 500 {
				return false
			}
			if nodetest.DoJSON(t, "GET", "http://"+n.http+"/readyz", "", "", nil) != 200 {
				return false
			}
		}
		return true
	}, "balances not rebuilt from the ledgers after the Redis restart")
	for _, n := range ns {
		if b, _ := balance(n, sender); b != 0 {
			t.Fatalf("sender after rebuild: balance %d", b)
		}
	}
	// A new credit and a replayed old gift behave: no double debit.
	if st := nodetest.DoJSON(t, "POST", "http://"+ns[1].http+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":10,"req_id":"after"}`, sender), nil); st != 200 {
		t.Fatalf("credit after rebuild: %d", st)
	}
	// Read through the other node: its client-side cached balance is
	// invalidated by Redis asynchronously (milliseconds after the write).
	nodetest.Eventually(t, 2*time.Second, func() bool {
		b, _ := balance(ns[0], sender)
		return b == 10
	}, "balance after rebuild and credit, read through the other node, is not 10")
	for _, n := range ns {
		_ = n.p.cmd.Process.Signal(syscall.SIGTERM)
		<-n.p.done
	}
	c, d, b := persisttest.CheckSharedConservation(t, rs.Addr, ns[0].data, ns[1].data)
	if c != 510 || d != 500 || b != 10 {
		t.Fatalf("credits %d debits %d balances %d", c, d, b)
	}
}

// A catalogue change made through node 1 is served by node 2 within 1 s.
func TestSharedCatalogueChangeVisibleOnOtherNode(t *testing.T) {
	rs := redistest.Start(t)
	ns := startSharedNodes(t, rs.Addr)
	admin := devToken(t, ns[0].http, 7, "admin")
	get := func(n *sharedNode) (price int64, status int) {
		var out struct {
			Data struct {
				Gifts []struct {
					ID     int64 `json:"gift_id"`
					Price  int64 `json:"price"`
					Status int   `json:"status"`
				} `json:"gifts"`
			} `json:"data"`
		}
		nodetest.DoJSON(t, "GET", "http://"+n.http+"/api/v1/gifts?all=1", "", "", &out)
		for _, g := range out.Data.Gifts {
			if g.ID == 25 {
				return g.Price, g.Status
			}
		}
		return 0, -1
	}
	if p, _ := get(ns[1]); p != 500 {
		t.Fatalf("seed price on node 2: %d", p)
	}
	if st := nodetest.DoJSON(t, "PUT", "http://"+ns[0].http+"/api/v1/admin/gifts/25", admin, `{"price":520,"status":0}`, nil); st != 200 {
		t.Fatalf("update: %d", st)
	}
	changed := time.Now()
	nodetest.Eventually(t, time.Second, func() bool { p, s := get(ns[1]); return p == 520 && s == 0 },
		"node 2 still serves the old gift after 1 s")
	t.Logf("node 2 served the change after %v", time.Since(changed).Round(time.Millisecond))
}
