package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
)

// BenchmarkGiftDebit_Hot, _HotPool and _Spread: each round runs every system
// for the same wall time (warm-up + measured window) with the same client
// model on the same gifts, and reports acknowledged gifts/s in the window and
// per-gift latency. The seed runs first; the liveedge line carries x-seed =
// liveedge gifts/s ÷ seed gifts/s of the same run. The ledger line is a
// diagnostic: persist.Ledger.Apply alone with the same Op.
//
// _Hot is the hot workload with its hot senders as users that combo-send and
// the mix held (runHotUsers); _HotPool is the same 10 % hot mix as one gift
// sequence served by a pool of clients (runClosedLoop), where a hot sender
// may have as many gifts in flight as clients happen to be on them; _Spread
// spreads the gifts over 10,000 senders (runClosedLoop).
//
//	go test -run '^$' -bench GiftDebit -benchtime 1x ./edge/gift/bench/
func BenchmarkGiftDebit_Hot(b *testing.B)     { benchDebit(b, hotUsersWorkload(), hotUsersLoop) }
func BenchmarkGiftDebit_HotPool(b *testing.B) { benchDebit(b, hotWorkload(), poolLoop) }
func BenchmarkGiftDebit_Spread(b *testing.B)  { benchDebit(b, spreadWorkload(), poolLoop) }

// loop runs one load phase of a debit benchmark and reports it.
type loop func(b *testing.B, sys debiter, w *workload, k knobs, nonce string, extra extraMetrics) loadResult

func poolLoop(b *testing.B, sys debiter, w *workload, k knobs, nonce string, extra extraMetrics) loadResult {
	res := runClosedLoop(sys, w, k.conc, k.warmup, k.measure, nonce)
	res.report(b, extra(res))
	return res
}

func hotUsersLoop(b *testing.B, sys debiter, w *workload, k knobs, nonce string, extra extraMetrics) loadResult {
	res, hot := runHotUsers(sys, w, k.conc, k.warmup, k.measure, nonce)
	res.report(b, extra(res))
	hot.report(b, res)
	return res
}

// debiter is one system under test: debit returns once the gift is
// acknowledged to the caller (nil) or refused.
type debiter interface {
	debit(ctx context.Context, g giftOp) error
}

func benchDebit(b *testing.B, w *workload, run loop) {
	sameGC()
	k := loadKnobs()
	var seedRate float64
	b.Run("seed", func(b *testing.B) {
		for i := range b.N {
			sys, extra := startSeed(b, w)
			seedRate = run(b, sys, w, k, fmt.Sprintf("s%d-", i), extra).rate()
		}
	})
	b.Run("liveedge", func(b *testing.B) {
		for i := range b.N {
			sys, extra := startLiveEdge(b, w)
			res := run(b, sys, w, k, fmt.Sprintf("l%d-", i), extra)
			if seedRate > 0 {
				b.ReportMetric(res.rate()/seedRate, "x-seed")
			}
		}
	})
	// Diagnostic: the ledger alone (persist.Ledger.Apply with the Op the gift
	// service builds), to tell the service's own cost from the ledger's.
	b.Run("ledger", func(b *testing.B) {
		for i := range b.N {
			sys, extra := startLiveEdge(b, w)
			sys = ledgerDebit{sys.(liveEdgeDebit).ledger}
			res := run(b, sys, w, k, fmt.Sprintf("d%d-", i), extra)
			if seedRate > 0 {
				b.ReportMetric(res.rate()/seedRate, "x-seed")
			}
		}
	})
}

// loadResult is what one closed-loop phase measured.
type loadResult struct {
	win      window
	ok, fail int64
	lat      latStats
	cpu      time.Duration // this process's CPU time in the window
	extCPU   time.Duration // the system's other processes' (redis-server) CPU time in the window
	started  int64
}

func (r loadResult) rate() float64 { return float64(r.ok) / r.win.secs() }

func (r loadResult) report(b *testing.B, extra map[string]float64) {
	for unit, v := range extra {
		b.ReportMetric(v, unit)
	}
	b.ReportMetric(r.rate(), "gifts/s")
	b.ReportMetric(ms(r.lat.p50), "p50-ms")
	b.ReportMetric(ms(r.lat.p99), "p99-ms")
	b.ReportMetric(ms(r.lat.max), "max-ms")
	b.ReportMetric(float64(r.fail), "failed")
	b.ReportMetric(float64(r.cpu)/float64(r.win.to-r.win.from), "cpu-cores")
	if r.extCPU > 0 {
		b.ReportMetric(float64(r.extCPU)/float64(r.win.to-r.win.from), "redis-cpu-cores")
	}
	b.ReportMetric(float64((r.cpu+r.extCPU).Microseconds())/float64(max(1, r.ok)), "cpu-us/gift")
}

// runClosedLoop runs conc clients, each starting the next gift of w as soon
// as its previous one is answered, for warmup+measure, and counts the gifts
// answered inside the measured window (latency = start to answer).
func runClosedLoop(sys debiter, w *workload, conc int, warmup, measure time.Duration, nonce string) loadResult {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	win := window{from: start.Add(warmup).UnixNano(), to: start.Add(warmup + measure).UnixNano()}
	var (
		next, ok, fail atomic.Int64
		stop           atomic.Bool
		lat            latencies
		wg             sync.WaitGroup
		firstErr       atomic.Value
	)
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []int64
			var nOK, nFail int64
			for !stop.Load() {
				g := w.op(next.Add(1)-1, nonce)
				t0 := time.Now().UnixNano()
				err := sys.debit(ctx, g)
				t1 := time.Now().UnixNano()
				if !win.has(t1) {
					continue
				}
				if err == nil {
					nOK++
					mine = append(mine, t1-t0)
				} else if ctx.Err() == nil {
					nFail++
					firstErr.CompareAndSwap(nil, err)
				}
			}
			ok.Add(nOK)
			fail.Add(nFail)
			lat.add(mine)
		}()
	}
	cpu, extCPU := measureWindow(sys, win, func() { stop.Store(true) }, &wg, cancel)
	res := loadResult{win: win, ok: ok.Load(), fail: fail.Load(), lat: lat.stats(), cpu: cpu, extCPU: extCPU, started: next.Load()}
	if e := firstErr.Load(); e != nil {
		fmt.Fprintf(os.Stderr, "giftbench: %d failed gifts, first: %v\n", res.fail, e)
	}
	return res
}

// measureWindow waits for win, measures this process's CPU and the system's
// external CPU (redis-server for the seed) over it, then stops the load and
// lets the gifts in flight finish (a seed gift may be asleep for up to 1 s
// per retry); after a grace period it cancels whatever is still sleeping.
func measureWindow(sys debiter, win window, stop func(), wg *sync.WaitGroup, cancel context.CancelFunc) (cpu, extCPU time.Duration) {
	ext := func() time.Duration { return 0 }
	if e, ok := sys.(interface{ extCPU() time.Duration }); ok {
		ext = e.extCPU
	}
	time.Sleep(time.Until(time.Unix(0, win.from)))
	cpu0, ext0 := selfCPU(), ext()
	time.Sleep(time.Until(time.Unix(0, win.to)))
	cpu, extCPU = selfCPU()-cpu0, ext()-ext0
	stop()
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(3 * time.Second):
		cancel()
		<-finished
	}
	return cpu, extCPU
}

// ---- LiveEdge: gift.Service.Send on a real Pebble ledger ----

type liveEdgeDebit struct {
	svc    *gift.Service
	ledger *persist.Ledger
}

func (l liveEdgeDebit) debit(_ context.Context, g giftOp) error {
	_, perr := l.svc.Send(g.sender, true, gift.Req{RoomID: g.room, GiftID: g.giftID, ReceiverID: g.receiver,
		Count: 1, ReqID: g.reqID})
	if perr != nil {
		return perr
	}
	return nil
}

// startLiveEdge builds what a node builds for gifts (Pebble store, ledger,
// catalogue, local router with the rooms open, gift service without a rate
// limit) and credits every sender.
// extraMetrics are a system's own metrics of a finished phase (unit → value).
type extraMetrics func(loadResult) map[string]float64

func startLiveEdge(b testing.TB, w *workload) (debiter, extraMetrics) {
	b.Helper()
	store, err := persist.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	ledger, err := persist.NewLedger(store, nil)
	if err != nil {
		b.Fatal(err)
	}
	cat, err := gift.NewCatalogue(gift.PebbleCatalogue{Store: store})
	if err != nil {
		b.Fatal(err)
	}
	rt := router.NewLocal("bench", router.LocalConfig{})
	for r := int64(1); r <= debitRooms; r++ {
		rt.OpenRoom(r)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	// The node's default gift settings (effect window, room effect cap), no
	// per-user rate limit (the workload's hot senders exceed any sane one).
	def := configs.Default().Gifts
	svc := gift.New(ledger, rt, cat, gift.Config{PerSecond: 0, EffectWindow: def.EffectWindow.D(),
		RoomEffectsPerSecond: def.RoomEffectsPerSecond}, log)
	if err := parallel(w.senders, 64, func(u int64) error {
		_, err := ledger.Apply(persist.Op{User: u, Postings: []persist.Posting{{User: u, Delta: startBalance, Reason: persist.ReasonDev}}})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = store.Close() })
	return liveEdgeDebit{svc, ledger}, func(res loadResult) map[string]float64 {
		return nil
	}
}

// ---- seed: Redis lock + sleep/retry + DECRBY + async DB ----

func startSeed(b testing.TB, w *workload) (debiter, extraMetrics) {
	b.Helper()
	srv := redistest.Start(b)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}, DisableCache: true})
	if err != nil {
		b.Fatal(err)
	}
	db, err := pebble.Open(b.TempDir(), &pebble.Options{Logger: quietLogger{}})
	if err != nil {
		b.Fatal(err)
	}
	s := newSeedDebit(rdb, db)
	s.redisPID = redisPID(srv.Addr)
	if err := s.credit(context.Background(), w.senders, startBalance); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		s.close()
		rdb.Close()
		_ = db.Close()
	})
	return s, func(res loadResult) map[string]float64 {
		return map[string]float64{
			"retries/gift": float64(s.retries.Load()) / float64(max(1, res.started)),
			"db-rejected":  float64(s.rejected.Load()),
		}
	}
}

// parallel calls fn for every item with n goroutines; the first error wins.
func parallel(items []int64, n int, fn func(int64) error) error {
	var (
		next atomic.Int64
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(len(items)) {
					return
				}
				if err := fn(items[i]); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}
