package bench

import (
	"math"
	"runtime/debug"
	"runtime/metrics"

	"bytes"
	"github.com/liveedge/liveedge/configs"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Knobs (environment variables; the defaults are what README.md reports).
//
//	LIVEEDGE_GIFTBENCH_WARMUP   seconds of load before measuring (default 1)
//	LIVEEDGE_GIFTBENCH_SECONDS  seconds measured per system and phase (default 5)
//	LIVEEDGE_GIFTBENCH_CONC     concurrent senders of the debit benchmarks (default 512)
//	LIVEEDGE_GIFTBENCH_CONNS    WebSocket connections of BenchmarkGiftWS (default 500)
//	LIVEEDGE_GIFTBENCH_WINDOW   requests in flight per connection, closed loop (default 8)
//	LIVEEDGE_GIFTBENCH_ROOMS    rooms the WebSocket senders are spread over (default 20)
//	LIVEEDGE_GIFTBENCH_EFFECTS  the node's gifts.room_effects_per_second (default: the node default)
//	LIVEEDGE_GIFTBENCH_WAL_MIN_SYNC_MS  the node's node.wal_min_sync in ms (default: the node default)
//	LIVEEDGE_GIFTBENCH_RATE     offered gifts/s of the _half phases when the closed loops are not run
//	LIVEEDGE_GIFTBENCH_CLIENT   where BenchmarkGiftWS's clients run: proc (a child process, default) or inproc
type knobs struct {
	warmup, measure time.Duration
	conc            int
	conns, window   int
	rooms           int
	rate            float64 // LIVEEDGE_GIFTBENCH_RATE
	client          string  // LIVEEDGE_GIFTBENCH_CLIENT
}

func loadKnobs() knobs {
	return knobs{
		warmup:  time.Duration(envFloat("LIVEEDGE_GIFTBENCH_WARMUP", 1) * float64(time.Second)),
		measure: time.Duration(envFloat("LIVEEDGE_GIFTBENCH_SECONDS", 5) * float64(time.Second)),
		conc:    int(envFloat("LIVEEDGE_GIFTBENCH_CONC", 512)),
		conns:   int(envFloat("LIVEEDGE_GIFTBENCH_CONNS", 500)),
		window:  int(envFloat("LIVEEDGE_GIFTBENCH_WINDOW", 8)),
		rooms:   int(envFloat("LIVEEDGE_GIFTBENCH_ROOMS", 20)),
		rate:    envFloat("LIVEEDGE_GIFTBENCH_RATE", 0),
		client:  os.Getenv("LIVEEDGE_GIFTBENCH_CLIENT"),
	}
}

func envFloat(name string, def float64) float64 {
	if v, err := strconv.ParseFloat(os.Getenv(name), 64); err == nil && v > 0 {
		return v
	}
	return def
}

// ---- workloads ----

// Ids: anchors (receivers) are 1..rooms, senders start at senderBase, so a
// sender is never its own receiver.
const (
	senderBase   = 100_000
	hotSenders   = 10     // the combo senders of the hot workload
	comboLen     = 10     // gifts in one combo streak of a hot sender
	hotShare     = 10     // percent of gifts from hot senders
	coldSenders  = 10_000 // the many others (and the spread workload's senders)
	debitRooms   = 100
	seqLen       = 1 << 20 // gifts in a workload sequence (cycled)
	startBalance = 1_000_000_000
	comboGift    = 24 // 爱心气泡, price 1: the classic combo gift
)

// catalogue is gift id → price of the seed catalogue (gift.Seed).
var catalogue = []struct{ id, price int64 }{{22, 90}, {23, 20}, {24, 1}, {25, 500}, {27, 45}, {28, 45}, {29, 20}}

// slot is one gift of a workload sequence.
type slot struct {
	sender int64
	gift   uint8 // index into catalogue
}

// workload is a cyclic sequence of gifts: the i-th gift a client starts is
// seq[i % len(seq)], so the mix of gifts started is exactly the sequence's.
type workload struct {
	name    string
	senders []int64 // every sender (to credit)
	seq     []slot
}

// giftOp is one gift to debit.
type giftOp struct {
	sender, receiver, room int64
	giftID, price          int64
	reqID                  string
}

func (w *workload) op(i int64, nonce string) giftOp {
	s := w.seq[i%int64(len(w.seq))]
	room := roomOf(s.sender)
	g := catalogue[s.gift]
	return giftOp{sender: s.sender, receiver: room, room: room, giftID: g.id, price: g.price,
		reqID: nonce + strconv.FormatInt(i, 36)}
}

// roomOf is the room a sender watches (hot senders all watch room 1); its
// anchor, the receiver, has the room's id.
func roomOf(sender int64) int64 {
	if sender < senderBase+hotSenders {
		return 1
	}
	return (sender-senderBase)%debitRooms + 1
}

// hotWorkload: a live-room workload where hotShare % of the gifts come from
// hotSenders senders combo-sending: every block of 100 gifts holds one streak
// of comboLen consecutive 1-coin gifts from one hot sender (clients start
// consecutive gifts at nearly the same moment, so a streak is a burst of
// concurrent gifts from one user, as a combo button produces), at a random
// place; the other 90 come from coldSenders others, uniformly.
func hotWorkload() *workload {
	rng := rand.New(rand.NewPCG(1, 2))
	w := &workload{name: "hot"}
	for i := range hotSenders + coldSenders {
		w.senders = append(w.senders, senderBase+int64(i))
	}
	const block = 100 * comboLen / hotShare
	for len(w.seq) < seqLen {
		hot := senderBase + int64(rng.IntN(hotSenders))
		at := rng.IntN(block - comboLen + 1)
		for j := 0; j < block; j++ {
			if j >= at && j < at+comboLen {
				w.seq = append(w.seq, slot{sender: hot, gift: comboIdx})
				continue
			}
			w.seq = append(w.seq, slot{sender: senderBase + hotSenders + int64(rng.IntN(coldSenders)),
				gift: uint8(rng.IntN(len(catalogue)))})
		}
	}
	return w
}

// hotUsersWorkload is the hot workload for runHotUsers: the hot senders are
// driven by runHotUsers itself; seq holds the others' gifts (the spread
// workload's sequence).
func hotUsersWorkload() *workload {
	w := spreadWorkload()
	w.name = "hot-users"
	for i := range hotSenders {
		w.senders = append(w.senders, senderBase+int64(i))
	}
	return w
}

// spreadWorkload: gifts uniformly from coldSenders senders.
func spreadWorkload() *workload {
	rng := rand.New(rand.NewPCG(3, 4))
	w := &workload{name: "spread"}
	for i := range coldSenders {
		w.senders = append(w.senders, senderBase+hotSenders+int64(i))
	}
	for range seqLen {
		w.seq = append(w.seq, slot{sender: w.senders[rng.IntN(len(w.senders))], gift: uint8(rng.IntN(len(catalogue)))})
	}
	return w
}

var comboIdx = func() uint8 {
	for i, g := range catalogue {
		if g.id == comboGift {
			return uint8(i)
		}
	}
	panic("combo gift not in catalogue")
}()

// ---- latency ----

// latencies collects per-request latencies (ns) from many goroutines.
type latencies struct {
	mu  sync.Mutex
	all []int64
}

func (l *latencies) add(part []int64) {
	l.mu.Lock()
	l.all = append(l.all, part...)
	l.mu.Unlock()
}

type latStats struct {
	n             int
	p50, p99, max time.Duration
}

func (l *latencies) stats() latStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.all) == 0 {
		return latStats{}
	}
	slices.Sort(l.all)
	at := func(q float64) time.Duration {
		i := int(q * float64(len(l.all)-1))
		return time.Duration(l.all[i])
	}
	return latStats{n: len(l.all), p50: at(0.50), p99: at(0.99), max: time.Duration(l.all[len(l.all)-1])}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// window is the measured interval of a load phase.
type window struct{ from, to int64 } // unix ns

func (w window) has(t int64) bool { return t >= w.from && t < w.to }

func (w window) secs() float64 { return float64(w.to-w.from) / 1e9 }

// ---- process ----

// raiseNofile sets the soft RLIMIT_NOFILE to the hard limit.
func raiseNofile(tb testing.TB) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		tb.Logf("getrlimit: %v", err)
		return
	}
	if l.Cur < l.Max {
		l.Cur = l.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
			tb.Logf("setrlimit: %v", err)
		}
	}
}

// redisPID finds the redis-server listening on addr (host:port) in /proc.
func redisPID(addr string) int {
	_, port, _ := strings.Cut(addr, ":")
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		cmd, _ := os.ReadFile("/proc/" + d.Name() + "/cmdline")
		// redis-server rewrites its title to "redis-server 127.0.0.1:PORT".
		args := strings.Fields(strings.ReplaceAll(string(cmd), "\x00", " "))
		if len(args) > 0 && strings.HasSuffix(args[0], "redis-server") &&
			(slices.Contains(args, port) || slices.ContainsFunc(args, func(a string) bool { return strings.HasSuffix(a, ":"+port) })) {
			return pid
		}
	}
	return 0
}

// procCPU is process pid's user+system CPU time (0 if unknown).
func procCPU(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// Fields after the command (which may hold spaces) in parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64) // utime: field 14
	st, err2 := strconv.ParseInt(f[12], 10, 64) // stime: field 15
	if err1 != nil || err2 != nil {
		return 0
	}
	return time.Duration(ut+st) * 10 * time.Millisecond // CLK_TCK = 100
}

// cpuOver yields this process's CPU time between from and to, once to has
// passed.
func cpuOver(from, to time.Time) <-chan time.Duration {
	out := make(chan time.Duration, 1)
	go func() {
		time.Sleep(time.Until(from))
		c0 := selfCPU()
		time.Sleep(time.Until(to))
		out <- selfCPU() - c0
	}()
	return out
}

// schedOver measures this process's scheduling latency over [from, to):
// the 99th percentile of how long a runnable goroutine waited for a P
// (runtime/metrics /sched/latencies:seconds; the bucket's upper bound). On
// a saturated machine this is where a reply's tail goes before any of the
// server's own work.
func schedOver(from, to time.Time) <-chan time.Duration {
	out := make(chan time.Duration, 1)
	go func() {
		time.Sleep(time.Until(from))
		h0 := schedHist()
		time.Sleep(time.Until(to))
		out <- runtimeHistQuantile(h0, schedHist(), 0.99)
	}()
	return out
}

func schedHist() *metrics.Float64Histogram {
	s := []metrics.Sample{{Name: "/sched/latencies:seconds"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindFloat64Histogram {
		return nil
	}
	return s[0].Value.Float64Histogram()
}

// runtimeHistQuantile is the q quantile of the samples h1 has beyond h0 (two
// reads of one cumulative histogram), as its bucket's upper bound.
func runtimeHistQuantile(h0, h1 *metrics.Float64Histogram, q float64) time.Duration {
	if h0 == nil || h1 == nil || len(h0.Counts) != len(h1.Counts) {
		return 0
	}
	var total uint64
	for i := range h1.Counts {
		total += h1.Counts[i] - h0.Counts[i]
	}
	if total == 0 {
		return 0
	}
	want, acc := uint64(math.Ceil(q*float64(total))), uint64(0)
	for i := range h1.Counts {
		if acc += h1.Counts[i] - h0.Counts[i]; acc >= want {
			ub := h1.Buckets[i+1]
			if math.IsInf(ub, 1) {
				ub = h1.Buckets[i]
			}
			return time.Duration(ub * float64(time.Second))
		}
	}
	return 0
}

// selfCPU is this process's user+system CPU time.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// sameGC gives the whole benchmark process — baselines included — the GC
// setting a LiveEdge node applies (node.gogc), before anything runs, so that
// no system is measured under a different collector than the other.
func sameGC() {
	if g := configs.Default().Node.GOGC; g > 0 {
		debug.SetGCPercent(g)
	}
}
