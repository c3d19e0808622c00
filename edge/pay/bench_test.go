package pay_test

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// BenchmarkNotifyVerified measures the webhook path on 2 cores: signature
// verification over the raw body, event de-duplication, the guarded order
// transition and the exactly-once, fsynced coin credit — one distinct paid
// order per notify, 256 concurrent deliveries (group commit shares fsyncs).
// Run: go test -run '^$' -bench NotifyVerified -benchtime 20000x ./edge/pay/
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
		Secrets: []string{fuzzSecret}, ReconcileEvery: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer svc.Close()
	// Orders and their signed notifies, prepared outside the timer.
	bodies := make([][]byte, b.N)
	var wg sync.WaitGroup
	var next atomic.Int64
	for w := 0; w < 64; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= b.N {
					return
				}
				user := int64(i%5000 + 1)
				o, err := svc.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: fmt.Sprint("r", i)})
				if err != nil {
					b.Error(err)
					return
				}
				bodies[i], _ = proto.Marshal(pay.Event{EventID: "e" + o.OrderID, OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS"})
			}
		}()
	}
	wg.Wait()
	b.ReportAllocs()
	b.SetParallelism(128)
	var idx atomic.Int64
	var bad atomic.Int64
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			body := bodies[idx.Add(1)-1]
			if st, _ := svc.Notify("mock", pay.Sign(fuzzSecret, time.Now(), body), body); st != pay.NotifyOK {
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
	if c, _, _, err := l.Audit(); err != nil || c != int64(b.N)*300 {
		b.Fatalf("audit: credits %d err %v", c, err)
	}
}
