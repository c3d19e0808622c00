package bench

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// runHotUsers runs the hot workload with its senders as users: each of the
// hotSenders hot users combo-sends — fires comboLen 1-coin gifts at once (a
// combo button firing its hits without waiting for answers; the user's app
// has those comboLen in flight) and fires the next combo when the last one is
// answered — while conc cold clients send gifts of w.seq (10,000 other
// senders) one at a time. The mix is the workload's: 10 % of the gifts
// started are hot. Cold clients start a gift only against a token; every hot
// gift started adds (100−hotShare)/hotShare tokens to a queue of 2·conc that
// holds conc to begin with, so neither side runs ahead of the other by more
// than conc gifts (a hot user waits when the cold clients lag); the
// rate measured is the rate at which the system serves that mix (as TPC-C
// reports New-Order throughput with its transaction mix held).
//
// A system whose hot users are slow therefore serves the whole workload
// slowly: that is the point of the hot workload. runClosedLoop's worker pool,
// by contrast, lets a hot sender hold as many gifts in flight as clients are
// stuck on them (~100 for the seed), which no user's app does.
func runHotUsers(sys debiter, w *workload, conc int, warmup, measure time.Duration, nonce string) (loadResult, hotStats) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	win := window{from: start.Add(warmup).UnixNano(), to: start.Add(warmup + measure).UnixNano()}
	var (
		next, hotNext, ok, fail, hotOK atomic.Int64
		stop                           atomic.Bool
		lat, hotLat                    latencies
		wg                             sync.WaitGroup
		firstErr                       atomic.Value
	)
	const coldPerHot = (100 - hotShare) / hotShare
	tokens := make(chan struct{}, 2*conc)
	for range conc {
		tokens <- struct{}{}
	}
	done := make(chan struct{})
	// record counts one answered gift (latency from start to answer).
	record := func(err error, t0 int64, mine *[]int64, nOK, nFail *int64) {
		t1 := time.Now().UnixNano()
		if !win.has(t1) {
			return
		}
		if err == nil {
			*nOK++
			*mine = append(*mine, t1-t0)
		} else if ctx.Err() == nil {
			*nFail++
			firstErr.CompareAndSwap(nil, err)
		}
	}
	for h := range hotSenders {
		user := senderBase + int64(h)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var combo sync.WaitGroup
			var mu sync.Mutex
			var mine []int64
			var nOK, nFail int64
		combos:
			for n := 0; !stop.Load(); n++ {
				for i := range comboLen {
					// Tokens for the cold clients before the gift starts.
					for range coldPerHot {
						select {
						case tokens <- struct{}{}:
						case <-done:
							combo.Wait()
							break combos
						}
					}
					hotNext.Add(1)
					combo.Add(1)
					go func() {
						defer combo.Done()
						g := giftOp{sender: user, receiver: roomOf(user), room: roomOf(user), giftID: comboGift,
							price: catalogue[comboIdx].price, reqID: nonce + "h" + strconv.FormatInt(user, 36) + "-" + strconv.Itoa(n*comboLen+i)}
						t0 := time.Now().UnixNano()
						err := sys.debit(ctx, g)
						mu.Lock()
						record(err, t0, &mine, &nOK, &nFail)
						mu.Unlock()
					}()
				}
				combo.Wait()
			}
			ok.Add(nOK)
			hotOK.Add(nOK)
			fail.Add(nFail)
			lat.add(mine)
			hotLat.add(mine)
		}()
	}
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []int64
			var nOK, nFail int64
			for !stop.Load() {
				select {
				case <-tokens:
				case <-done:
					continue
				}
				g := w.op(next.Add(1)-1, nonce)
				t0 := time.Now().UnixNano()
				err := sys.debit(ctx, g)
				record(err, t0, &mine, &nOK, &nFail)
			}
			ok.Add(nOK)
			fail.Add(nFail)
			lat.add(mine)
		}()
	}
	cpu, extCPU := measureWindow(sys, win, func() { stop.Store(true); close(done) }, &wg, cancel)
	res := loadResult{win: win, ok: ok.Load(), fail: fail.Load(), lat: lat.stats(), cpu: cpu, extCPU: extCPU,
		started: next.Load() + hotNext.Load()}
	hs := hotStats{ok: hotOK.Load(), lat: hotLat.stats()}
	if e := firstErr.Load(); e != nil {
		fmt.Fprintf(os.Stderr, "giftbench: %d failed gifts, first: %v\n", res.fail, e)
	}
	return res, hs
}

// hotStats are the hot users' share of a runHotUsers phase.
type hotStats struct {
	ok  int64
	lat latStats
}

func (h hotStats) report(b interface{ ReportMetric(float64, string) }, res loadResult) {
	b.ReportMetric(float64(h.ok)/float64(max(1, res.ok)), "hot-share")
	b.ReportMetric(ms(h.lat.p99), "hot-p99-ms")
}
