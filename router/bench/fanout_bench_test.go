package bench

import (
	"errors"
	"flag"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

// One op = one ~110-byte chat push delivered to every viewer of the room.
// Run with a fixed push count (the benchmark function runs once; b.Loop
// publishes exactly N pushes, then the timer keeps running until every viewer
// has received all of them):
//
//	go test -run '^$' -bench 'Fanout|Bare' -benchtime 2000x -timeout 30m ./router/bench/
//
// Each size's LiveEdge and bare-loop runs are adjacent (Go runs benchmarks in
// source order). The gws.Broadcaster baseline is opt-in (-bench Broadcaster):
// at 10k viewers it adds minutes to a run.

func BenchmarkRoomFanout_1k(b *testing.B)   { benchFanout(b, kindLiveEdge, 1_000) }
func BenchmarkBareGwsLoop_1k(b *testing.B)  { benchFanout(b, kindBareLoop, 1_000) }
func BenchmarkRoomFanout_10k(b *testing.B)  { benchFanout(b, kindLiveEdge, 10_000) }
func BenchmarkBareGwsLoop_10k(b *testing.B) { benchFanout(b, kindBareLoop, 10_000) }

func BenchmarkGwsBroadcaster_1k(b *testing.B)  { benchFanout(b, kindBareBroadcaster, 1_000) }
func BenchmarkGwsBroadcaster_10k(b *testing.B) { benchFanout(b, kindBareBroadcaster, 10_000) }

type kind int

const (
	kindLiveEdge        kind = iota // nodetest node, Router.PublishRoom, clients with ?batch=1
	kindBareLoop                    // for each push, for each conn: conn.WriteMessage
	kindBareBroadcaster             // for each push: gws.NewBroadcaster, Broadcast to each conn
)

const (
	warmupPushes = 100                        // untimed round before the measured one
	textPad      = "benchmark chat message !" // makes the push frame ~110 bytes
	senderID     = 42
)

// publisher publishes one push stamped with ts (unix ns) to every viewer.
// warmUp publishes warmupPushes and waits for their deliveries (connections,
// pools, goroutine stacks, TCP windows); the fleet's stats start afresh. It
// returns the deliveries expected per viewer so far.
func warmUp(b *testing.B, pub publisher, fl *fleetProc, viewers int) int64 {
	fl.expect(warmupPushes)
	for range warmupPushes {
		if err := pub.publish(time.Now().UnixNano()); err != nil {
			b.Fatal(err)
		}
	}
	fl.waitDone(doneBudget(warmupPushes, viewers))
	_ = fl.stats()
	return warmupPushes
}

type publisher interface {
	publish(ts int64) error
}

func benchFanout(b *testing.B, k kind, viewers int) {
	if !fixedBenchtime() {
		b.Skip("fan-out benchmarks need a fixed push count: -benchtime Nx (e.g. 2000x)")
	}
	if err := raiseNofile(); err != nil {
		b.Logf("raise RLIMIT_NOFILE: %v", err)
	}
	var (
		pub   publisher
		fl    *fleetProc
		check func()
	)
	switch k {
	case kindLiveEdge:
		pub, fl, check = startLiveEdge(b, viewers)
	default:
		pub, fl, check = startBare(b, viewers, k == kindBareBroadcaster)
	}

	total := warmUp(b, pub, fl, viewers)

	n := 0
	b.ReportAllocs()
	fl.expect(total + int64(fixedN()))
	srvCPU, fleetCPU := selfCPU(), fl.cpuTime()
	for b.Loop() {
		if err := pub.publish(time.Now().UnixNano()); err != nil {
			b.Fatal(err)
		}
		n++
	}
	// b.Loop stopped the timer after publishing; delivery is part of the op.
	b.StartTimer()
	fl.waitDone(doneBudget(n, viewers))
	b.StopTimer()
	elapsed := b.Elapsed()
	srvCPU, fleetCPU = selfCPU()-srvCPU, fl.cpuTime()-fleetCPU
	total += int64(n)

	st := fl.stats()
	check()
	if want := total * int64(viewers); st.pushes != want {
		b.Fatalf("fleet received %d pushes, want %d", st.pushes, want)
	}
	b.ReportMetric(float64(n)/elapsed.Seconds(), "pushes/s")
	b.ReportMetric(float64(st.frames)/float64(int64(n)*int64(viewers)), "frames/push")
	b.ReportMetric(ms(st.p50), "p50-ms")
	b.ReportMetric(ms(st.p99), "p99-ms")
	b.ReportMetric(ms(st.max), "max-ms")
	b.ReportMetric(float64(srvCPU.Microseconds())/float64(n), "srv-cpu-us/op")
	b.ReportMetric(float64(fleetCPU.Microseconds())/float64(n), "fleet-cpu-us/op")

	// Paced phase (untimed): the same offered load for every server, each push
	// stamped with its scheduled time, so a publisher that falls behind is
	// charged for it (no coordinated omission).
	rate, secs := pacedLoad(viewers)
	if rate <= 0 || secs <= 0 {
		return
	}
	count := max(1, int(rate*secs))
	interval := time.Duration(float64(time.Second) / rate)
	fl.expect(total + int64(count))
	t0 := time.Now()
	for i := range count {
		at := t0.Add(time.Duration(i) * interval)
		if d := time.Until(at); d > 0 {
			time.Sleep(d)
		}
		if err := pub.publish(at.UnixNano()); err != nil {
			b.Fatal(err)
		}
	}
	fl.waitDone(doneBudget(count, viewers))
	ps := fl.stats()
	check()
	if want := (total + int64(count)) * int64(viewers); ps.pushes != want {
		b.Fatalf("fleet received %d pushes, want %d", ps.pushes, want)
	}
	b.ReportMetric(rate, "paced-pushes/s")
	b.ReportMetric(ms(ps.p50), "paced-p50-ms")
	b.ReportMetric(ms(ps.p99), "paced-p99-ms")
}

// pacedLoad is the paced phase's rate (pushes/s) and duration: by default
// 40,000 deliveries/s (40 pushes/s to 1k viewers, 4 to 10k; about 40% of what
// the bare loop sustains on a 2-core machine) for 10 s.
// LIVEEDGE_BENCH_PACED_DELIVERIES and LIVEEDGE_BENCH_PACED_SECONDS override
// them (0 turns the phase off).
func pacedLoad(viewers int) (rate, secs float64) {
	deliveries, secs := 40_000.0, 10.0
	if v, err := strconv.ParseFloat(os.Getenv("LIVEEDGE_BENCH_PACED_DELIVERIES"), 64); err == nil {
		deliveries = v
	}
	if v, err := strconv.ParseFloat(os.Getenv("LIVEEDGE_BENCH_PACED_SECONDS"), 64); err == nil {
		secs = v
	}
	return deliveries / float64(viewers), secs
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// doneBudget is how long delivering n pushes to viewers may take before the
// benchmark gives up (generous: 20 µs per delivery on top of a minute).
func doneBudget(n, viewers int) time.Duration {
	return time.Minute + time.Duration(n)*time.Duration(viewers)*20*time.Microsecond
}

// fixedBenchtime reports whether -test.benchtime is a count ("2000x").
func fixedBenchtime() bool { return fixedN() > 0 }

func fixedN() int {
	f := flag.Lookup("test.benchtime")
	if f == nil {
		return 0
	}
	s := f.Value.String()
	if !strings.HasSuffix(s, "x") {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSuffix(s, "x"))
	if err != nil {
		return 0
	}
	return n
}

// chatData is the push's d: {"from":42,"text":"…","ts":<unix ns>}.
func chatData(dst []byte, ts int64) []byte {
	dst = append(dst, `{"from":`...)
	dst = strconv.AppendInt(dst, senderID, 10)
	dst = append(dst, `,"text":"`+textPad+`","ts":`...)
	dst = strconv.AppendInt(dst, ts, 10)
	return append(dst, '}')
}

// ---- LiveEdge ----

type liveEdgePub struct {
	r    *router.Local
	room int64
	data []byte
	busy int // PublishRoom refusals (room queue full) retried
}

func (p *liveEdgePub) publish(ts int64) error {
	p.data = chatData(p.data[:0], ts)
	for {
		_, err := p.r.PublishRoom(p.room, proto.Push{Biz: proto.BizChat, Data: p.data})
		if !errors.Is(err, router.ErrRoomBusy) {
			return err
		}
		// The room's pending queue is full: back off like a real publisher would.
		p.busy++
		time.Sleep(50 * time.Microsecond)
	}
}

func startLiveEdge(b *testing.B, viewers int) (publisher, *fleetProc, func()) {
	cfg := nodetest.Config(b)
	cfg.Log.Level = "error"
	// The fleet's clients never ping; keep them from being swept as silent.
	cfg.WS.Heartbeat = configs.Duration(time.Hour)
	node := nodetest.Start(b, cfg)
	room := nodetest.OpenRoom(b, node, 1, 0)
	fl := startFleet(b, nodetest.WSURL(node), viewers, room, cfg.Auth.JWTSecret)
	if got := node.Router.Online(room); got != viewers {
		b.Fatalf("room has %d members, want %d", got, viewers)
	}
	pub := &liveEdgePub{r: node.Local, room: room}
	before := node.Router.Stats()
	check := func() {
		st := node.Router.Stats()
		if gone := st.SessionsGone - before.SessionsGone; gone != 0 {
			b.Fatalf("%d sends refused by closing sessions (slow-consumer closes?)", gone)
		}
		if pub.busy > 0 {
			b.Logf("PublishRoom returned ErrRoomBusy %d times (retried)", pub.busy)
		}
		if got := node.WS.Conns(); got != viewers {
			b.Fatalf("node has %d connections, want %d", got, viewers)
		}
	}
	return pub, fl, check
}

// ---- bare gws ----

// bareServer is the baseline: a gws upgrader behind net/http that keeps every
// connection in a slice and does nothing else.
type bareServer struct {
	gws.BuiltinEventHandler
	up     *gws.Upgrader
	srv    *http.Server
	ln     net.Listener
	mu     sync.Mutex
	conns  []*gws.Conn
	closed atomic.Int64
}

func (s *bareServer) OnOpen(c *gws.Conn) {
	s.mu.Lock()
	s.conns = append(s.conns, c)
	s.mu.Unlock()
}

func (s *bareServer) OnClose(*gws.Conn, error) { s.closed.Add(1) }

func (s *bareServer) OnPing(c *gws.Conn, p []byte) { _ = c.WritePong(p) }

func (s *bareServer) OnMessage(_ *gws.Conn, m *gws.Message) { m.Close() }

func (s *bareServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c, err := s.up.Upgrade(w, r)
	if err != nil {
		return
	}
	go c.ReadLoop()
}

func (s *bareServer) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

type bareLoopPub struct {
	conns []*gws.Conn
	room  int64
	mids  *router.MidSource
	data  []byte
	frame []byte
	bcast bool
}

// publish encodes the push once (the same bytes LiveEdge sends), then writes
// it to every connection: one WebSocket frame per push per connection.
func (p *bareLoopPub) publish(ts int64) error {
	p.data = chatData(p.data[:0], ts)
	push := proto.Push{Mid: p.mids.Next(), Biz: proto.BizChat, Room: p.room, Data: p.data}
	if p.bcast {
		// The broadcaster frames the payload once and writes it from each
		// connection's own async write queue; the payload must stay untouched.
		bc := gws.NewBroadcaster(gws.OpcodeText, proto.AppendPush(nil, &push))
		for _, c := range p.conns {
			if err := bc.Broadcast(c); err != nil {
				return err
			}
		}
		return bc.Close()
	}
	p.frame = proto.AppendPush(p.frame[:0], &push)
	for _, c := range p.conns {
		if err := c.WriteMessage(gws.OpcodeText, p.frame); err != nil {
			return err
		}
	}
	return nil
}

func startBare(b *testing.B, viewers int, bcast bool) (publisher, *fleetProc, func()) {
	s := &bareServer{}
	s.up = gws.NewUpgrader(s, &gws.ServerOption{
		CheckUtf8Enabled: false, // as LiveEdge's upgrader
		HandshakeTimeout: 5 * time.Second,
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	s.ln = ln
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = s.srv.Serve(ln) }()
	b.Cleanup(func() {
		_ = s.srv.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			_ = c.NetConn().Close()
		}
		s.mu.Unlock()
	})
	fl := startFleet(b, "ws://"+ln.Addr().String()+"/ws", viewers, 0, "")
	// OnOpen runs in the upgrading goroutine before ReadLoop; the client may
	// see the handshake answer a moment before that.
	deadline := time.Now().Add(10 * time.Second)
	for s.count() < viewers && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := s.count(); got != viewers {
		b.Fatalf("bare server has %d connections, want %d", got, viewers)
	}
	s.mu.Lock()
	conns := append([]*gws.Conn(nil), s.conns...)
	s.mu.Unlock()
	pub := &bareLoopPub{conns: conns, room: 1, mids: router.NewMidSource("gw-1"), bcast: bcast}
	check := func() {
		if n := s.closed.Load(); n != 0 {
			b.Fatalf("%d bare connections closed during the run", n)
		}
	}
	return pub, fl, check
}
