package router

import (
	"context"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/persist/redistest"
)

// BenchmarkSequenceMaxFlushDelay measures the cluster sequencer's Redis call
// (sequence.lua, one push per call: the worst case, no batching) from 64
// concurrent callers over 64 rooms, with rueidis' MaxFlushDelay at 0, 20 µs
// and 100 µs, in one run against one throwaway redis-server. MaxFlushDelay
// holds each pipeline flush back so more commands share a write: fewer
// syscalls for Redis and the node, at the price of that delay per call.
//
//	go test -run '^$' -bench SequenceMaxFlushDelay -benchtime 20000x ./router/
func BenchmarkSequenceMaxFlushDelay(b *testing.B) {
	srv := redistest.Start(b)
	for _, d := range []time.Duration{0, 20 * time.Microsecond, 100 * time.Microsecond} {
		b.Run("delay="+d.String(), func(b *testing.B) {
			rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}, DisableCache: true,
				MaxFlushDelay: d})
			if err != nil {
				b.Fatal(err)
			}
			defer rdb.Close()
			const callers, rooms = 64, 64
			lat := make([][]time.Duration, callers)
			next := make(chan int, b.N)
			for i := 0; i < b.N; i++ {
				next <- i
			}
			close(next)
			b.ResetTimer()
			var wg sync.WaitGroup
			for g := 0; g < callers; g++ {
				wg.Add(1)
				go func(g int) {
					defer wg.Done()
					for i := range next {
						room := int64(i % rooms)
						start := time.Now()
						err := sequenceScript.Exec(context.Background(), rdb,
							[]string{seqKey(room), epKey(room), histKey(room), batchKey(room)},
							[]string{"256", "120000", "ep", strconv.FormatInt(time.Now().UnixMilli(), 10), "1", "", "0",
								"g" + strconv.Itoa(g), strconv.Itoa(i + 1), "0", "m" + strconv.Itoa(i), "5555", "0", `{"from":1,"text":"hello"}`}).Error()
						if err != nil {
							b.Error(err)
							return
						}
						lat[g] = append(lat[g], time.Since(start))
					}
				}(g)
			}
			wg.Wait()
			b.StopTimer()
			var all []time.Duration
			for _, l := range lat {
				all = append(all, l...)
			}
			slices.Sort(all)
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "calls/s")
			b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
		})
	}
}
