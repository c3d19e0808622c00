package ticket

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
)

// The hot-program benchmark: 10,000 orders of one seat each, 64, 512 or
// 2,048 buyers at once, all in ONE category of ONE program (the flash-sale case, and the
// worst case of a per-category lock), against a faithful re-creation of the
// seed's V2/V3 design: a local lock per program+category, then a Redis
// distributed lock per program+category (SET NX PX with a random token,
// released by a compare-and-delete Lua script), then a Lua script that
// checks the seats are free and locks them (HGET/HSET in a hash, DECRBY
// the remaining count), then the lock released; the order write comes after
// the lock, as in the seed.
//
// Two levels, each reported as orders/s, p99 and the ratio ours/seed:
//
//   - reserve: only the seat reservation (ours: memInventory.Reserve, the
//     category mutex held for microseconds; seed: the locks + the Lua
//     script, three Redis round trips under the category's lock);
//
//   - place: the whole order made durable (ours: Service.Place with a
//     provider payment, one group-committed Pebble batch for the ticket
//     order, its req_id and the pay order; seed: the reservation above,
//     then the same records written to the same Pebble).
//
//     go test -run '^$' -bench HotProgram -benchtime 1x ./edge/ticket/
const benchOrders = 10_000

func BenchmarkHotProgramVsSeed_10kSeats(b *testing.B) {
	// The node runs with node.gogc (as the gift benchmarks do); both designs
	// run under it.
	if g := configs.Default().Node.GOGC; g > 0 {
		defer debug.SetGCPercent(debug.SetGCPercent(g))
	}
	srv := redistest.Start(b)
	for i := 0; i < b.N; i++ {
		oursR := runOrders(b, 64, func(b *testing.B) func(int) error { return oursReserve(b) })
		seedR := runOrders(b, 64, func(b *testing.B) func(int) error { return seedPlace(b, srv.Addr, false) })
		oursP := runOrders(b, 64, func(b *testing.B) func(int) error { return oursPlace(b) })
		seedP := runOrders(b, 64, func(b *testing.B) func(int) error { return seedPlace(b, srv.Addr, true) })
		oursP512 := runOrders(b, 512, func(b *testing.B) func(int) error { return oursPlace(b) })
		seedP512 := runOrders(b, 512, func(b *testing.B) func(int) error { return seedPlace(b, srv.Addr, true) })
		oursP2k := runOrders(b, 2048, func(b *testing.B) func(int) error { return oursPlace(b) })
		seedP2k := runOrders(b, 2048, func(b *testing.B) func(int) error { return seedPlace(b, srv.Addr, true) })
		report := func(level string, ours, seed benchResult) {
			b.ReportMetric(ours.perSec, level+"_ours_orders/s")
			b.ReportMetric(seed.perSec, level+"_seed_orders/s")
			b.ReportMetric(ours.perSec/seed.perSec, level+"_ratio_orders/s")
			b.ReportMetric(float64(ours.p99.Microseconds()), level+"_ours_p99_µs")
			b.ReportMetric(float64(seed.p99.Microseconds()), level+"_seed_p99_µs")
			b.ReportMetric(float64(seed.p99)/float64(max(ours.p99, time.Microsecond)), level+"_ratio_p99")
			b.Logf("%-10s ours %9.0f orders/s p99 %8v | seed %9.0f orders/s p99 %8v | ×%.1f orders/s, p99 ÷%.1f",
				level, ours.perSec, ours.p99, seed.perSec, seed.p99, ours.perSec/seed.perSec, float64(seed.p99)/float64(max(ours.p99, time.Microsecond)))
		}
		report("reserve_64", oursR, seedR)
		report("place_64", oursP, seedP)
		report("place_512", oursP512, seedP512)
		report("place_2048", oursP2k, seedP2k)
	}
}

type benchResult struct {
	perSec float64
	p99    time.Duration
	cpu    time.Duration // process CPU time (user + system, every goroutine, Pebble's too) per order
}

// cpuTime is the process's CPU time so far: unlike orders/s on a machine
// shared with other work, it does not move with the neighbours' load.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// runOrders runs benchOrders orders (order i takes seat i) on workers
// goroutines and measures them; setup is not timed.
func runOrders(b *testing.B, workers int, setup func(b *testing.B) func(int) error) benchResult {
	b.StopTimer()
	order := setup(b)
	lat := make([]time.Duration, benchOrders)
	var next atomic.Int64
	var failed atomic.Int64
	var wg sync.WaitGroup
	b.StartTimer()
	start, cpu0 := time.Now(), cpuTime()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= benchOrders {
					return
				}
				t0 := time.Now()
				if err := order(i); err != nil {
					failed.Add(1)
					b.Error(err)
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	took, cpu := time.Since(start), cpuTime()-cpu0
	b.StopTimer()
	slices.Sort(lat)
	return benchResult{perSec: benchOrders / took.Seconds(), p99: lat[benchOrders*99/100], cpu: cpu / benchOrders}
}

func benchSeat(i int) Seat { return Seat{Cat: 1, Row: i/100 + 1, Col: i%100 + 1} }

var hotCategory = []CategoryDef{{ID: 1, Name: "hot", Price: 100, Rows: 100, Cols: 100}}

func oursReserve(b *testing.B) func(int) error {
	e := newEnv(b, Config{})
	prog := e.program(hotCategory, 1, 1)
	return func(i int) error {
		_, err := e.svc.inv.Reserve(prog, int64(i+1), Want{Seats: []Seat{benchSeat(i)}})
		return err
	}
}

func oursPlace(b *testing.B) func(int) error {
	e := newEnv(b, Config{})
	prog := e.program(hotCategory, 1, 1)
	return func(i int) error {
		_, err := e.svc.Place(int64(i+1), PlaceReq{ProgramID: prog, SeatIDs: []string{benchSeat(i).String()}, ReqID: "b"})
		return err
	}
}

// The seed's scripts.
var (
	seedCheckAndLock = rueidis.NewLuaScript(`
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) ~= '1' then return 0 end
end
for i = 2, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], '2') end
redis.call('DECRBY', KEYS[2], #ARGV - 1)
return 1`)
	seedUnlock = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)
)

// seedPlace re-creates the seed's V2/V3 reservation on a fresh program in
// Redis; durable adds the order write to Pebble after the locks.
func seedPlace(b *testing.B, addr string, durable bool) func(int) error {
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(rdb.Close)
	ctx := context.Background()
	if err := rdb.Do(ctx, rdb.B().Flushall().Build()).Error(); err != nil {
		b.Fatal(err)
	}
	const prog, cat = 1, 1
	tag := fmt.Sprintf("{p%d:c%d}", prog, cat) // one Redis Cluster slot per program+category
	seatsKey, remainKey, lockKey := "seats:"+tag, "remain:"+tag, "lock:"+tag
	cmds := make(rueidis.Commands, 0, 100)
	for r := 0; r < 100; r++ {
		hs := rdb.B().Hset().Key(seatsKey).FieldValue()
		for c := 0; c < 100; c++ {
			hs = hs.FieldValue(Seat{1, r + 1, c + 1}.String(), "1")
		}
		cmds = append(cmds, hs.Build())
	}
	cmds = append(cmds, rdb.B().Set().Key(remainKey).Value("10000").Build())
	for _, r := range rdb.DoMulti(ctx, cmds...) {
		if err := r.Error(); err != nil {
			b.Fatal(err)
		}
	}
	var store *persist.Store
	if durable {
		if store, err = persist.Open(b.TempDir()); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = store.Close() })
	}
	var local sync.Mutex // the local lock of program+category (the only one here)
	return func(i int) error {
		seat := benchSeat(i).String()
		var tok [16]byte
		_, _ = rand.Read(tok[:])
		token := hex.EncodeToString(tok[:])
		local.Lock()
		for { // the distributed lock (no contention within one node: the local lock comes first)
			err := rdb.Do(ctx, rdb.B().Set().Key(lockKey).Value(token).Nx().Px(5*time.Second).Build()).Error()
			if err == nil {
				break
			}
			if !rueidis.IsRedisNil(err) {
				local.Unlock()
				return err
			}
		}
		got, err := seedCheckAndLock.Exec(ctx, rdb, []string{seatsKey, remainKey}, []string{strconv.Itoa(i + 1), seat}).AsInt64()
		if uerr := seedUnlock.Exec(ctx, rdb, []string{lockKey}, []string{token}).Error(); uerr != nil && err == nil {
			err = uerr
		}
		local.Unlock()
		if err != nil {
			return err
		}
		if got != 1 {
			return proto.Errorf(proto.CodeSoldOut, "seat %s taken", seat)
		}
		if !durable {
			return nil
		}
		id := int64(i + 1)
		o := &Order{OrderID: strconv.FormatInt(id, 10), UserID: id, ProgramID: prog, SeatIDs: []string{seat},
			Total: 100, Amount: 100, Pay: PayMock, Status: StatusPendingPay, ReqID: "b", id: id}
		recs := []persist.Record{o.record(), {Key: orderReqKey(id, "b"), Value: persist.EncodeUint64(uint64(id))}}
		return store.Apply(func(bt *persist.Batch) error { return setAll(bt, recs) })
	}
}

// BenchmarkTicketPlaceDurable_512Buyers is ours alone at the "place" level
// (Service.Place, provider payment, one fsynced group-committed batch per
// order), 512 buyers, 10,000 orders per iteration: the order path to
// profile (-cpuprofile) without the seed's run in the profile.
//
//	go test -run '^$' -bench TicketPlaceDurable -benchtime 3x -cpuprofile cpu.out ./edge/ticket/
func BenchmarkTicketPlaceDurable_512Buyers(b *testing.B) {
	if g := configs.Default().Node.GOGC; g > 0 {
		defer debug.SetGCPercent(debug.SetGCPercent(g))
	}
	b.ReportAllocs()
	var sum float64
	var p99, cpu time.Duration
	for i := 0; i < b.N; i++ {
		r := runOrders(b, 512, func(b *testing.B) func(int) error { return oursPlace(b) })
		sum += r.perSec
		p99 = max(p99, r.p99)
		cpu += r.cpu
	}
	b.ReportMetric(sum/float64(b.N), "orders/s")
	b.ReportMetric(float64(p99.Microseconds()), "p99_µs")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N)/1e3, "cpu_µs/order")
}

// The timeout sweep after a flash sale: 2,000 unpaid orders (one seat each,
// placed within a second) fall due together; CloseExpired closes them all
// (each: the ticket order and its pay order, two fsynced writes) and the
// seats are free again. Reported: closes/s.
//
//	go test -run '^$' -bench CloseExpired -benchtime 1x ./edge/ticket/
func BenchmarkCloseExpired_2000(b *testing.B) {
	const orders = 2000
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		e := newEnv(b, Config{})
		prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 40, Cols: orders / 40}}, 1, 1)
		var wg sync.WaitGroup
		for g := range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for u := g; u < orders; u += 32 {
					if _, err := e.svc.Place(int64(1000+u), PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "r"}); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		e.clock.advance(time.Hour)
		b.StartTimer()
		start := time.Now()
		closed := e.svc.CloseExpired()
		took := time.Since(start)
		b.StopTimer()
		if free, locked, sold := e.counts(prog); closed != orders || free != orders || locked != 0 || sold != 0 {
			b.Fatalf("closed %d; free %d locked %d sold %d", closed, free, locked, sold)
		}
		b.ReportMetric(float64(orders)/took.Seconds(), "closes/s")
		e.close()
	}
}
