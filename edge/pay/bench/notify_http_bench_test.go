// Package bench measures the payment webhook: in process (the handler) and
// over real HTTP (Hertz) on a real node.
package bench

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
)

const secret = "bench-pay-secret-0123456789"

// BenchmarkNotifyHTTP posts signed notifies for distinct orders to a node's
// webhook from 128 keep-alive connections in the same process (client and
// server share the 2 cores).
// Run: go test -run '^$' -bench NotifyHTTP -benchtime 20000x ./edge/pay/bench/
func BenchmarkNotifyHTTP(b *testing.B) {
	cfg := nodetest.Config(b)
	cfg.Pay.Secrets = []string{secret}
	cfg.Pay.ProviderURL = ""
	n := nodetest.Start(b, cfg)
	bodies := prepareNotifies(b, n.Pay)
	var next atomic.Int64
	var wg sync.WaitGroup
	url := nodetest.HTTPURL(n) + "/api/v1/pay/notify/mock"
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256}}
	var bad atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for w := 0; w < 128; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= b.N {
					return
				}
				req, _ := http.NewRequest("POST", url, bytes.NewReader(bodies[i]))
				req.Header.Set(pay.SignatureHeader, pay.Sign(secret, time.Now(), bodies[i]))
				resp, err := client.Do(req)
				if err != nil {
					bad.Add(1)
					continue
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(body) != "success" {
					bad.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	b.StopTimer()
	if bad.Load() > 0 {
		b.Fatalf("%d notifies failed", bad.Load())
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "notifies/s")
	c, _, _ := persisttest.CheckConservation(b, n.Ledger)
	if c != int64(b.N)*300 {
		b.Fatalf("credits %d", c)
	}
}

// prepareNotifies creates b.N orders (distinct users' orders, 64 at a time so
// their fsyncs group-commit) and returns one signed-ready SUCCESS body each.
func prepareNotifies(b *testing.B, svc *pay.Service) [][]byte {
	bodies := make([][]byte, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 64; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= b.N {
					return
				}
				o, err := svc.CreateOrder(int64(i%5000+1), pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: fmt.Sprint("r", i)})
				if err != nil {
					b.Error(err)
					return
				}
				bodies[i], _ = proto.Marshal(pay.Event{EventID: "e" + o.OrderID, OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS"})
			}
		}()
	}
	wg.Wait()
	return bodies
}

// BenchmarkNotifyVerified measures the webhook path in process on 2 cores:
// signature verification over the raw body, event de-duplication, the
// guarded order transition and the exactly-once, fsynced coin credit — one
// distinct paid order per notify, 256 concurrent deliveries (group commit
// shares fsyncs).
// Run: go test -run '^$' -bench NotifyVerified -benchtime 20000x ./edge/pay/bench/
func BenchmarkNotifyVerified(b *testing.B) {
	st, err := persist.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	l, err := persist.NewLedger(st, nil)
	if err != nil {
		b.Fatal(err)
	}
	svc, err := pay.New(st, l, router.NewLocal("bench", router.LocalConfig{}), pay.Config{Node: "bench",
		Secrets: []string{secret}, ReconcileEvery: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer svc.Close()
	bodies := prepareNotifies(b, svc)
	b.ReportAllocs()
	b.SetParallelism(128)
	var idx, bad atomic.Int64
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			body := bodies[idx.Add(1)-1]
			if st, _ := svc.Notify("mock", pay.Sign(secret, time.Now(), body), body); st != pay.NotifyOK {
				bad.Add(1)
			}
		}
	})
	el := time.Since(start)
	b.StopTimer()
	if bad.Load() > 0 {
		b.Fatalf("%d notifies not ok", bad.Load())
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "notifies/s")
	c, _, _ := persisttest.CheckConservation(b, l)
	if c != int64(b.N)*300 {
		b.Fatalf("credits %d", c)
	}
}
