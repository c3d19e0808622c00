package bench

import (
	"errors"
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/natstest"
)

// BenchmarkClusterFanout_10k: 10,000 viewers in ONE room, in one run:
//
//	1node   one cluster node (cluster mode: Redis sequencer, NATS publish)
//	3nodes  three cluster nodes, the viewers spread evenly (round-robin)
//	local   one single-node node (router.Local), for reference
//
// Every node is in this process (nodetest), with a real nats-server and a
// real redis-server per sub-benchmark; the 10k clients are a fleet process
// (fleet_test.go). The pushes are published through node 1's
// Router.PublishRoom, so in cluster mode each batch is numbered by one Lua
// script in Redis and published once on NATS. One op = one ~110-byte push
// delivered to every viewer.
//
//	go test -run '^$' -bench ClusterFanout -benchtime 2000x -timeout 30m ./router/bench/
//
// Two paced phases follow the burst, each for LIVEEDGE_BENCH_PACED_SECONDS
// (default 10 s) and the same for all three: "paced-" offers half the rate the
// 1node burst measured (LIVEEDGE_BENCH_CLUSTER_PACED_PUSHES fixes it instead;
// 0 = off), "light-" the single-node benchmark's light load (40,000
// deliveries/s = 4 pushes/s; LIVEEDGE_BENCH_PACED_DELIVERIES).
func BenchmarkClusterFanout_10k(b *testing.B) {
	if !fixedBenchtime() {
		b.Skip("fan-out benchmarks need a fixed push count: -benchtime Nx (e.g. 2000x)")
	}
	const viewers = 10_000
	var res clusterResults
	b.Run("1node", func(b *testing.B) { benchCluster(b, &res, 1, viewers) })
	b.Run("3nodes", func(b *testing.B) { benchCluster(b, &res, 3, viewers) })
	b.Run("local", func(b *testing.B) { benchCluster(b, &res, 0, viewers) })
	if res.one > 0 && res.three > 0 {
		b.Logf("deliveries/s: 3 nodes %.0f, 1 node %.0f, local %.0f; 3-node/1-node = %.2f×",
			res.three, res.one, res.local, res.three/res.one)
	}
}

// clusterResults carries figures from one sub-benchmark to the next (they
// run in source order).
type clusterResults struct {
	one, three, local float64 // deliveries/s of the burst
	pacedRate         float64 // pushes/s offered in every paced phase
}

// clusterPub publishes through a node's Router (Cluster or Local). Each push
// gets its own data: the cluster router keeps p.Data until its sequencer
// has numbered the push.
type clusterPub struct {
	r    router.Router
	room int64
	busy int
}

func (p *clusterPub) publish(ts int64) error {
	data := chatData(make([]byte, 0, 96), ts)
	for {
		_, err := p.r.PublishRoom(p.room, proto.Push{Biz: proto.BizChat, Data: data})
		if !errors.Is(err, router.ErrRoomBusy) {
			return err
		}
		p.busy++
		time.Sleep(50 * time.Microsecond)
	}
}

// clusterSetup is one configuration under test.
type clusterSetup struct {
	nodes   []*gateway.Node
	pub     *clusterPub
	fl      *fleetProc
	servers []int // pids of nats-server and redis-server (children of this process)
}

// natsStats sums the nodes' cluster counters.
func (s *clusterSetup) natsStats() router.ClusterStats {
	var t router.ClusterStats
	for _, n := range s.nodes {
		if n.Cluster == nil {
			continue
		}
		c := n.Cluster.ClusterStats()
		t.BatchesOut += c.BatchesOut
		t.BatchesIn += c.BatchesIn
		t.PushesSequenced += c.PushesSequenced
		t.GapFills += c.GapFills
		t.GapsLost += c.GapsLost
		t.SequencerErrors += c.SequencerErrors
		t.BadWire += c.BadWire
		t.SubscribedRooms += c.SubscribedRooms
	}
	return t
}

// serverCPU is the CPU time used so far by nats-server and redis-server.
func (s *clusterSetup) serverCPU() time.Duration {
	var d time.Duration
	for _, pid := range s.servers {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil {
			d += procStatCPU(b)
		}
	}
	return d
}

// startClusterSetup starts nodes cluster nodes (0: one single-node node),
// opens a room through the first, and a fleet of viewers spread over all.
func startClusterSetup(b *testing.B, nodes, viewers int) *clusterSetup {
	s := &clusterSetup{}
	var cfgs []configs.Config
	if nodes == 0 {
		cfg := nodetest.Config(b)
		cfgs = append(cfgs, cfg)
	} else {
		rds, nats := redistest.Start(b), natstest.Start(b)
		s.servers = childPids("redis-server", "nats-server")
		if len(s.servers) != 2 {
			b.Logf("found %d of the nats-server and redis-server processes: their CPU is not complete", len(s.servers))
		}
		names := make([]string, nodes)
		for i := range names {
			names[i] = fmt.Sprintf("gw-%d", i+1)
		}
		for i := range names {
			cfg := nodetest.Config(b)
			cfg.Node.ID = names[i]
			cfg.Cluster.Enabled = true
			cfg.NATS.Embedded = false
			cfg.NATS.URL = nats.URL
			cfg.Wallet.Mode = "shared"
			cfg.Wallet.Nodes = names
			cfg.Redis.Addr = rds.Addr
			cfgs = append(cfgs, cfg)
		}
	}
	urls := make([]string, 0, len(cfgs))
	for _, cfg := range cfgs {
		cfg.Log.Level = "error"
		// The fleet's clients never ping; keep them from being swept as silent.
		cfg.WS.Heartbeat = configs.Duration(time.Hour)
		// A room's history must outlast a lost batch: with the default 256
		// (= one full batch of the sequencer) a batch whose NATS publish is
		// missing — a sequencer call that outlived its timeout although the
		// script ran — is trimmed by the next batches before the other nodes
		// read it, and they skip it (GapsLost): their viewers never get those
		// pushes and the round stalls. 4096 holds the whole burst
		// (router/bench/README.md, "Sequencer errors and stalls").
		cfg.Rooms.HistorySize = 4096
		n := nodetest.Start(b, cfg)
		s.nodes = append(s.nodes, n)
		urls = append(urls, nodetest.WSURL(n))
	}
	first := s.nodes[0]
	room := nodetest.OpenRoom(b, first, 1, 0)
	s.fl = startFleet(b, strings.Join(urls, ","), viewers, room, cfgs[0].Auth.JWTSecret)
	for i, n := range s.nodes {
		want := viewers / len(s.nodes)
		if i < viewers%len(s.nodes) {
			want++
		}
		if got := n.WS.Conns(); got != want {
			b.Fatalf("node %d has %d connections, want %d", i+1, got, want)
		}
	}
	// In cluster mode Online counts presence in Redis (written every 200 ms).
	deadline := time.Now().Add(10 * time.Second)
	for first.Router.Online(room) != viewers && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := first.Router.Online(room); got != viewers {
		b.Fatalf("room has %d members, want %d", got, viewers)
	}
	s.pub = &clusterPub{r: first.Router, room: room}
	return s
}

// childPids lists this process's children whose command is one of names.
func childPids(names ...string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid …
		i, j := strings.IndexByte(string(st), '('), strings.LastIndexByte(string(st), ')')
		if i < 0 || j < i {
			continue
		}
		comm := string(st[i+1 : j])
		f := strings.Fields(string(st[j+1:]))
		if len(f) < 2 {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid != self {
			continue
		}
		for _, n := range names {
			if strings.HasPrefix(n, comm) { // comm is cut at 15 bytes
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

func benchCluster(b *testing.B, res *clusterResults, nodes, viewers int) {
	if err := raiseNofile(); err != nil {
		b.Logf("raise RLIMIT_NOFILE: %v", err)
	}
	s := startClusterSetup(b, nodes, viewers)
	pub, fl := s.pub, s.fl
	gone0 := s.sessionsGone()
	var seqErrs int64
	check := func() {
		if gone := s.sessionsGone() - gone0; gone != 0 {
			b.Fatalf("%d sends refused by closing sessions (slow-consumer closes?)", gone)
		}
		conns := 0
		for _, n := range s.nodes {
			conns += n.WS.Conns()
		}
		if conns != viewers {
			b.Fatalf("nodes have %d connections, want %d", conns, viewers)
		}
		// A sequencer error is a Redis call that failed or outlived the
		// router's 2 s call timeout: if the script ran anyway, the pushes are
		// in the history and every node fills them in as a gap (the fleet's
		// exact count above still holds); if it did not, they are lost and
		// the round stalls (the watchdog and the bounded wait report it).
		if st := s.natsStats(); st.GapsLost != 0 || st.BadWire != 0 {
			b.Fatalf("cluster counters: %+v", st)
		} else if st.SequencerErrors > seqErrs {
			b.Logf("sequencer errors: %d (gap fills %d)", st.SequencerErrors, st.GapFills)
			seqErrs = st.SequencerErrors
		}
	}

	total := warmUp(b, pub, fl, viewers)

	n := 0
	b.ReportAllocs()
	fl.expect(total + int64(fixedN()))
	ns0, srvCPU, fleetCPU, extCPU := s.natsStats(), selfCPU(), fl.cpuTime(), s.serverCPU()
	for b.Loop() {
		if err := pub.publish(time.Now().UnixNano()); err != nil {
			b.Fatal(err)
		}
		n++
	}
	b.StartTimer()
	stop := s.watchdog(b, time.Minute)
	fl.waitDone(roundBudget)
	stop()
	b.StopTimer()
	elapsed := b.Elapsed()
	srvCPU, fleetCPU, extCPU = selfCPU()-srvCPU, fl.cpuTime()-fleetCPU, s.serverCPU()-extCPU
	total += int64(n)
	// Every push is counted as sequenced before it is delivered locally, so
	// by now the burst's batches are all counted on the publishing node; the
	// receivers' in-counters are as well (they delivered).
	ns1 := s.natsStats()

	st := fl.stats()
	check()
	if want := total * int64(viewers); st.pushes != want {
		b.Fatalf("fleet received %d pushes, want %d", st.pushes, want)
	}
	rate := float64(n) / elapsed.Seconds()
	b.ReportMetric(rate, "pushes/s")
	b.ReportMetric(rate*float64(viewers), "deliveries/s")
	b.ReportMetric(float64(st.frames)/float64(int64(n)*int64(viewers)), "frames/push")
	b.ReportMetric(ms(st.p50), "p50-ms")
	b.ReportMetric(ms(st.p99), "p99-ms")
	b.ReportMetric(float64(srvCPU.Microseconds())/float64(n), "srv-cpu-us/op")
	b.ReportMetric(float64(fleetCPU.Microseconds())/float64(n), "fleet-cpu-us/op")
	if nodes > 0 {
		reportNATS(b, ns0, ns1, "")
		b.ReportMetric(float64(extCPU.Microseconds())/float64(n), "nats+redis-cpu-us/op")
	}
	switch nodes {
	case 1:
		res.one = rate * float64(viewers)
	case 3:
		res.three = rate * float64(viewers)
		if res.one > 0 {
			b.ReportMetric(res.three/res.one, "x-vs-1node")
		}
	case 0:
		res.local = rate * float64(viewers)
		if res.one > 0 {
			b.ReportMetric(res.local/res.one, "x-vs-1node")
		}
	}

	// Paced phases: the same offered load for every configuration, each
	// push stamped with its scheduled time (no coordinated omission). First
	// half the 1-node burst rate, then the light load of the single-node
	// benchmark (40,000 deliveries/s: 4 pushes/s to 10k viewers).
	if res.pacedRate == 0 {
		res.pacedRate = rate / 2
		if v, err := strconv.ParseFloat(os.Getenv("LIVEEDGE_BENCH_CLUSTER_PACED_PUSHES"), 64); err == nil {
			res.pacedRate = v
		}
	}
	lightRate, secs := pacedLoad(viewers)
	total = pacedPhase(b, s, nodes, viewers, total, res.pacedRate, secs, "paced-", check)
	pacedPhase(b, s, nodes, viewers, total, lightRate, secs, "light-", check)
	if pub.busy > 0 {
		b.Logf("PublishRoom returned ErrRoomBusy %d times (retried)", pub.busy)
	}
	if nodes > 0 {
		st := s.natsStats()
		b.ReportMetric(float64(st.SequencerErrors), "seq-errors")
		b.ReportMetric(float64(st.GapFills), "gap-fills")
		b.Logf("cluster counters: %+v", st)
	}
}

// roundBudget bounds every round of the cluster benchmark (a normal burst
// round takes 5–15 s here): a stalled round fails in bounded time.
const roundBudget = 3 * time.Minute

// pacedPhase publishes rate pushes/s for secs and reports the latency from
// each push's scheduled time; it returns the new cumulative push count.
func pacedPhase(b *testing.B, s *clusterSetup, nodes, viewers int, total int64, rate, secs float64,
	prefix string, check func()) int64 {
	if rate <= 0 || secs <= 0 {
		return total
	}
	count := max(1, int(rate*secs))
	interval := time.Duration(float64(time.Second) / rate)
	s.fl.expect(total + int64(count))
	ns0 := s.natsStats()
	t0 := time.Now()
	for i := range count {
		at := t0.Add(time.Duration(i) * interval)
		if d := time.Until(at); d > 0 {
			time.Sleep(d)
		}
		if err := s.pub.publish(at.UnixNano()); err != nil {
			b.Fatal(err)
		}
	}
	stop := s.watchdog(b, time.Minute)
	s.fl.waitDone(roundBudget)
	stop()
	ns1 := s.natsStats()
	ps := s.fl.stats()
	check()
	total += int64(count)
	if want := total * int64(viewers); ps.pushes != want {
		b.Fatalf("fleet received %d pushes, want %d", ps.pushes, want)
	}
	b.ReportMetric(rate, prefix+"pushes/s")
	b.ReportMetric(ms(ps.p50), prefix+"p50-ms")
	b.ReportMetric(ms(ps.p99), prefix+"p99-ms")
	if nodes > 0 {
		reportNATS(b, ns0, ns1, prefix)
	}
	return total
}

// reportNATS reports NATS messages per push (Σ in+out over the nodes ÷
// pushes sequenced), NATS deliveries per batch published (in ÷ out: the
// nodes with members other than the publisher) and pushes per batch (= per
// Redis script call).
func reportNATS(b *testing.B, s0, s1 router.ClusterStats, prefix string) {
	out, in, pushes := s1.BatchesOut-s0.BatchesOut, s1.BatchesIn-s0.BatchesIn, s1.PushesSequenced-s0.PushesSequenced
	if pushes <= 0 || out <= 0 {
		b.Fatalf("no batches counted: out %d in %d pushes %d", out, in, pushes)
	}
	b.ReportMetric(float64(in+out)/float64(pushes), prefix+"nats-msgs/push")
	b.ReportMetric(float64(in)/float64(out), prefix+"nats-in/out")
	b.ReportMetric(float64(pushes)/float64(out), prefix+"pushes/batch")
}

// watchdog: if the round is not over after d, ask the fleet which
// connections are behind and write the nodes' counters and this process's
// goroutines to a file in the temp dir (a stalled round is a bug to report).
func (s *clusterSetup) watchdog(b *testing.B, d time.Duration) (stop func()) {
	t := time.AfterFunc(d, func() {
		_, _ = fmt.Fprintln(s.fl.stdin, "progress") // not send: no Fatal off the test goroutine
		f, err := os.CreateTemp("", "clusterfanout-stall-*.txt")
		if err != nil {
			return
		}
		defer f.Close()
		for i, n := range s.nodes {
			fmt.Fprintf(f, "node %d: conns %d stats %+v\n", i+1, n.WS.Conns(), n.Router.Stats())
			if n.Cluster != nil {
				fmt.Fprintf(f, "node %d: cluster %+v\n", i+1, n.Cluster.ClusterStats())
			}
		}
		_ = pprof.Lookup("goroutine").WriteTo(f, 1)
		b.Logf("round not over after %v: cluster counters %+v; node state and goroutines in %s",
			d, s.natsStats(), f.Name())
	})
	return func() { t.Stop() }
}

func (s *clusterSetup) sessionsGone() int64 {
	var g int64
	for _, n := range s.nodes {
		g += n.Router.Stats().SessionsGone
	}
	return g
}
