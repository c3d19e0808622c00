// Package bench measures the payment webhook over real HTTP (Hertz) on a
// real node. The in-process figure is BenchmarkNotifyVerified in edge/pay.
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
	"github.com/liveedge/liveedge/persist/persisttest"
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
				o, err := n.Pay.CreateOrder(int64(i%5000+1), pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: fmt.Sprint("r", i)})
				if err != nil {
					b.Error(err)
					return
				}
				bodies[i], _ = proto.Marshal(pay.Event{EventID: "e" + o.OrderID, OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS"})
			}
		}()
	}
	wg.Wait()
	url := nodetest.HTTPURL(n) + "/api/v1/pay/notify/mock"
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256}}
	var bad atomic.Int64
	next.Store(0)
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
