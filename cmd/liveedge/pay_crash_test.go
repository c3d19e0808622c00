package main

import (
	"fmt"
	"net/http/httptest"
	"syscall"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/persist/persisttest"
)

// kill -9 the node while the provider is delivering notifies (with
// duplicates): after the restart the provider's retries finish the job and
// every order is credited exactly once. (Recording the event and crediting
// the coins are one fsynced batch, so no crash can fall between them; the
// shared-wallet crash points between intent, Redis and Pebble are tested in
// persist.)
func TestKill9DuringNotifyStorm(t *testing.T) {
	const secret = "crash-test-pay-secret-0123"
	prov := mockpay.New(mockpay.Config{Secret: secret, Factor: 0.0005, Duplicates: 2})
	ps := httptest.NewServer(prov.Handler())
	t.Cleanup(func() { prov.Close(); ps.Close() })

	bin := binary(t)
	httpAddr, wsAddr, data := freeAddr(t), freeAddr(t), t.TempDir()
	env := nodeEnv(httpAddr, wsAddr, data, "LIVEEDGE_PAY_SECRETS="+secret, "LIVEEDGE_PAY_PROVIDER_URL="+ps.URL,
		"LIVEEDGE_PAY_MAX_OPEN_ORDERS_PER_USER=10") // perUser open orders each
	p := start(t, "", env, bin)
	waitReady(t, p, httpAddr)

	const users, perUser = 20, 10
	type ord struct {
		user int64
		o    pay.Order
	}
	var orders []ord
	toks := map[int64]string{}
	for u := int64(1); u <= users; u++ {
		toks[u] = devToken(t, httpAddr, 1000+u, "viewer")
		for k := 0; k < perUser; k++ {
			var out struct {
				Data pay.Order `json:"data"`
			}
			if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/pay/orders", toks[u],
				fmt.Sprintf(`{"product_id":%d,"channel":"mock","req_id":"o%d"}`, 1+k%3, k), &out); st != 200 {
				t.Fatalf("order: %d", st)
			}
			orders = append(orders, ord{1000 + u, out.Data})
		}
	}
	notify := "http://" + httpAddr + "/api/v1/pay/notify/mock"
	for _, o := range orders {
		prov.Pay(o.o.OrderID, o.o.Amount, notify, "SUCCESS")
	}
	nodetest.Eventually(t, 30*time.Second, func() bool { return prov.Delivered.Load() >= int64(len(orders))/3 }, "deliveries too slow")
	if err := syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	t.Logf("killed after %d of %d payments acknowledged (%d attempts)", prov.Delivered.Load(), len(orders), prov.Attempts.Load())

	p2 := start(t, "", env, bin)
	waitReady(t, p2, httpAddr)
	nodetest.Eventually(t, 60*time.Second, func() bool { return prov.Delivered.Load() == int64(len(orders)) },
		"provider retries did not finish: %d/%d", prov.Delivered.Load(), len(orders))

	want := map[int64]int64{}
	for _, o := range orders {
		want[o.user] += o.o.Coins
		var out struct {
			Data pay.Order `json:"data"`
		}
		nodetest.DoJSON(t, "GET", "http://"+httpAddr+"/api/v1/pay/orders/"+o.o.OrderID, toks[o.user-1000], "", &out)
		if out.Data.Status != pay.StatusPayed {
			t.Fatalf("order %s is %s", o.o.OrderID, out.Data.Status)
		}
	}
	var total int64
	for u, coins := range want {
		var w struct {
			Data struct {
				Balance int64 `json:"balance"`
			} `json:"data"`
		}
		nodetest.DoJSON(t, "GET", "http://"+httpAddr+"/api/v1/wallet", toks[u-1000], "", &w)
		if w.Data.Balance != coins {
			t.Fatalf("user %d balance %d, want %d", u, w.Data.Balance, coins)
		}
		total += coins
	}
	_ = p2.cmd.Process.Signal(syscall.SIGTERM)
	<-p2.done
	c, d, b := persisttest.CheckConservationDir(t, data)
	if c != total || d != 0 || b != total {
		t.Fatalf("credits %d debits %d balances %d, want %d", c, d, b, total)
	}
}
