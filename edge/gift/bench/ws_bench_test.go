package bench

import (
	"bytes"
	"fmt"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/persist"
)

// BenchmarkGiftWS measures gifts over WebSocket end to end. The load
// generator (the same code for every server) runs in a child process by
// default (LIVEEDGE_GIFTBENCH_CLIENT=inproc: in this process); either way it
// shares the machine's 2 cores with the server. cpu-cores is both processes'
// CPU time over the measured window; server-cores the server's alone.
//
//   - echo: a bare gws server (net/http + gws.NewUpgrader on 127.0.0.1:0)
//     that answers each gift frame, on the reading goroutine, with a reply
//     frame of exactly the size LiveEdge's gift reply has. Closed loop:
//     conns connections, window requests in flight on each.
//
//   - liveedge: a real node (nodetest.Start, gift rate limit off), the same
//     client code and frames; every sender is in one of rooms rooms and gives
//     1-coin gifts to its anchor (anchors are offline). x-echo = gifts/s ÷
//     echo replies/s of this run.
//
//   - liveedge_half: a fresh node and connections, open loop at half the
//     liveedge rate just measured, each gift stamped with its scheduled send
//     time (no coordinated omission): p99 is the target figure.
//     liveedge_quarter and liveedge_tenth: the same at a quarter and a
//     tenth of it; echo_at_liveedge_<part>: the echo offered each load.
//
//   - liveedge_batch, liveedge_batch_half: the same with ?batch=1 (the Go
//     SDK's default): the node may merge replies and pushes into batch
//     frames, so reply frames are no longer the echo's size.
//
// Run:
//
//	go test -run '^$' -bench GiftWS -benchtime 1x ./edge/gift/bench/
func BenchmarkGiftWS(b *testing.B) {
	raiseNofile(b)
	sameGC()
	k := loadKnobs()
	var echoRate float64
	b.Run("echo", func(b *testing.B) {
		for range b.N {
			cl := startEchoClients(b, k)
			res := cl.run(0)
			res.report(b)
			echoRate = res.rate()
			cl.close()
		}
	})
	// The machine's floor for the latency target: the bare echo, open loop,
	// at half its own max rate.
	b.Run("echo_half", func(b *testing.B) { runEchoOpen(b, k, echoRate/2, "echo") })
	for _, batch := range []bool{false, true} {
		name := "liveedge"
		if batch {
			name += "_batch"
		}
		// LIVEEDGE_GIFTBENCH_RATE (gifts/s, for profiling one phase alone)
		// stands in for the closed loop's rate when that is not run.
		leRate := 2 * k.rate
		b.Run(name, func(b *testing.B) {
			for range b.N {
				node, cl := startLiveEdgeWS(b, k, batch)
				res := cl.run(0)
				res.report(b)
				leRate = res.rate()
				if echoRate > 0 {
					b.ReportMetric(leRate/echoRate, "x-echo")
				}
				reportCommits(b, node)
				checkNode(b, node, cl)
				cl.close()
			}
		})
		// Open loop at fractions of that rate, each beside the bare echo
		// offered the same load (what this machine and this load generator
		// give at that rate with no gift work at all): the p99-vs-load
		// curve of both, up to half of LiveEdge's max (plain frames).
		type load struct {
			suffix string
			part   float64
		}
		loads := []load{{"_half", 0.5}}
		if !batch {
			loads = append(loads, load{"_quarter", 0.25}, load{"_tenth", 0.1})
		}
		for _, l := range loads {
			b.Run(name+l.suffix, func(b *testing.B) { runLiveEdgeOpen(b, k, batch, leRate*l.part, nil, name) })
			b.Run("echo_at_"+name+l.suffix, func(b *testing.B) { runEchoOpen(b, k, leRate*l.part, name) })
		}
		if batch {
			continue
		}
		// Diagnostic: the same node and load with a wallet that answers at
		// once (no ledger, no fsync, no accounting): what the gateway and
		// gift path cost without the durable debit.
		b.Run(name+"_nowallet_half", func(b *testing.B) { runLiveEdgeOpen(b, k, batch, leRate/2, &instantWallet{}, name) })
	}
}

// runLiveEdgeOpen runs a fresh node (its gift wallet replaced by w unless
// nil) open loop at rate, which the closed-loop sub-benchmark `of` measured.
func runLiveEdgeOpen(b *testing.B, k knobs, batch bool, rate float64, w persist.Wallet, of string) {
	if rate == 0 {
		b.Skipf("needs the %s sub-benchmark of the same run (its rate)", of)
	}
	for range b.N {
		node, cl := startLiveEdgeWSWallet(b, k, batch, w)
		res := cl.run(rate)
		res.report(b)
		b.ReportMetric(rate, "offered/s")
		reportCommits(b, node)
		checkNode(b, node, cl)
		cl.close()
	}
}

// runEchoOpen runs the bare echo open loop at rate, which the closed-loop
// sub-benchmark `of` measured.
func runEchoOpen(b *testing.B, k knobs, rate float64, of string) {
	if rate == 0 {
		b.Skipf("needs the %s sub-benchmark of the same run (its rate)", of)
	}
	for range b.N {
		cl := startEchoClients(b, k)
		res := cl.run(rate)
		res.report(b)
		b.ReportMetric(rate, "offered/s")
		cl.close()
	}
}

// ---- bare gws echo server ----

// startEchoClients starts an echo server and connects the clients to it,
// each connection in a room as for LiveEdge.
func startEchoClients(b testing.TB, k knobs) clients {
	srv := startEcho(b, int64(k.conns))
	targets := make([]connTarget, k.conns)
	for i := range targets {
		room := int64(i%k.rooms) + 1
		targets[i] = connTarget{url: "ws://" + srv.addr + "/ws", user: senderBase + int64(i), room: room, anchor: room}
	}
	return startClients(b, k, targets)
}

type echoServer struct {
	up      *gws.Upgrader
	addr    string
	orderID atomic.Int64
	// pushes: a grab's reply is followed by a reliable credit push shaped
	// like LiveEdge's 5570, whose ack the client sends back (the frames a
	// LiveEdge grab costs, without the work behind them).
	pushes bool
	mid    atomic.Int64
}

// startEcho starts the echo server. Its order ids count up from firstOrder,
// as LiveEdge's trade ids count up from the credits of its senders, so that
// its replies have the size LiveEdge's have.
func startEcho(b testing.TB, firstOrder int64) *echoServer {
	b.Helper()
	s := &echoServer{}
	s.orderID.Store(firstOrder)
	s.up = gws.NewUpgrader(s, &gws.ServerOption{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	s.addr = ln.Addr().String()
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := s.up.Upgrade(w, r)
		if err != nil {
			return
		}
		go c.ReadLoop()
	})}
	go func() { _ = hs.Serve(ln) }()
	b.Cleanup(func() { _ = hs.Close() })
	return s
}

func (s *echoServer) OnOpen(*gws.Conn)             {}
func (s *echoServer) OnClose(*gws.Conn, error)     {}
func (s *echoServer) OnPing(c *gws.Conn, p []byte) { _ = c.WritePong(p) }
func (s *echoServer) OnPong(*gws.Conn, []byte)     {}
func (s *echoServer) OnMessage(c *gws.Conn, m *gws.Message) {
	id, _ := jsonInt(m.Bytes(), `"id":`)
	grab := bytes.HasPrefix(m.Bytes(), []byte(`{"t":"grab"`))
	ack := bytes.HasPrefix(m.Bytes(), []byte(`{"t":"ack"`))
	m.Close()
	if ack {
		return
	}
	var arr [128]byte
	if grab {
		// LiveEdge's grab reply: {"t":"reply","id":N,"code":0,"msg":"ok","d":{"amount":A,"msg":"恭喜领取到红包：A"}}
		out := append(arr[:0], `{"t":"reply","id":`...)
		out = strconv.AppendInt(out, id, 10)
		out = append(out, `,"code":0,"msg":"ok","d":{"amount":10,"msg":"恭喜领取到红包：10"}}`...)
		_ = c.WriteMessage(gws.OpcodeText, out)
		if s.pushes {
			var parr [160]byte
			p := append(parr[:0], `{"t":"push","mid":"echo-1a2b3c-`...)
			p = strconv.AppendInt(p, s.mid.Add(1)+1_000_000, 36)
			p = append(p, `","biz":5570,"d":{"balance":10000010,"delta":10,"reason":"redpacket"},"ack":true}`...)
			_ = c.WriteMessage(gws.OpcodeText, p)
		}
		return
	}
	// LiveEdge's reply: {"t":"reply","id":N,"code":0,"msg":"ok","d":{"order_id":"123456","balance":999999999}}
	out := append(arr[:0], `{"t":"reply","id":`...)
	out = strconv.AppendInt(out, id, 10)
	out = append(out, `,"code":0,"msg":"ok","d":{"order_id":"`...)
	out = strconv.AppendInt(out, s.orderID.Add(1), 10)
	out = append(out, `","balance":999999999}}`...)
	_ = c.WriteMessage(gws.OpcodeText, out)
}

// ---- LiveEdge node ----

// startLiveEdgeWS starts a node, opens the rooms, credits the senders and
// connects them (batch: with ?batch=1, as the Go SDK does by default, so the
// node may merge replies and pushes into batch frames).
func startLiveEdgeWS(b testing.TB, k knobs, batch bool) (*gateway.Node, clients) {
	return startLiveEdgeWSWallet(b, k, batch, nil)
}

// startLiveEdgeWSWallet is startLiveEdgeWS with the gift service's wallet
// replaced by w (nil: the node's own ledger).
func startLiveEdgeWSWallet(b testing.TB, k knobs, batch bool, w persist.Wallet) (*gateway.Node, clients) {
	b.Helper()
	cfg := nodetest.Config(b)
	cfg.Limits.GiftPerSecond = 0
	cfg.Log.Level = "warn"
	if v := envFloat("LIVEEDGE_GIFTBENCH_EFFECTS", 0); v > 0 {
		cfg.Gifts.RoomEffectsPerSecond = int(v)
	}
	if v, err := strconv.ParseFloat(os.Getenv("LIVEEDGE_GIFTBENCH_WAL_MIN_SYNC_MS"), 64); err == nil && v >= 0 {
		cfg.Node.WALMinSync = configs.Duration(time.Duration(v * float64(time.Millisecond)))
	}
	node := nodetest.Start(b, cfg)
	if w != nil {
		node.Gifts.SetWallet(w)
	}
	rooms := make([]int64, k.rooms)
	anchors := make([]int64, k.rooms)
	for i := range rooms {
		anchors[i] = int64(i + 1)
		rooms[i] = nodetest.OpenRoom(b, node, anchors[i], 0)
	}
	users := make([]int64, k.conns)
	for i := range users {
		users[i] = senderBase + int64(i)
	}
	if err := parallel(users, 64, func(u int64) error {
		_, err := node.Ledger.Apply(persist.Op{User: u, Postings: []persist.Posting{{User: u, Delta: startBalance, Reason: persist.ReasonDev}}})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	base := nodetest.WSURL(node)
	targets := make([]connTarget, len(users))
	for i, u := range users {
		url := base + "?token=" + nodetest.Token(b, node, u, gateway.RoleViewer)
		if batch {
			url += "&batch=1"
		}
		targets[i] = connTarget{url: url, user: u, room: rooms[i%k.rooms], anchor: anchors[i%k.rooms]}
	}
	return node, startClients(b, k, targets)
}

// instantWallet is a persist.Wallet that does no work: every op succeeds at
// once with zero balances. Only for the nowallet diagnostic.
type instantWallet struct{ seq atomic.Int64 }

func (w *instantWallet) Apply(op persist.Op) (persist.Result, error) {
	n := max(1, len(op.Postings))
	r := persist.Result{TradeIDs: make([]int64, n), Balances: make([]int64, n), At: time.Now().UnixMilli()}
	for i := range r.TradeIDs {
		r.TradeIDs[i] = w.seq.Add(1)
	}
	return r, nil
}

func (w *instantWallet) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	done(w.Apply(op))
}

func (w *instantWallet) Balance(int64) (int64, error) { return 0, nil }

func (w *instantWallet) Trades(int64, int64, int) ([]persist.Trade, error) { return nil, nil }

func (w *instantWallet) Tally(string, int64) (int64, error) { return 0, nil }

// checkNode fails the benchmark if the node closed connections.
func checkNode(b testing.TB, node *gateway.Node, cl clients) {
	if n := node.WS.Conns(); n != cl.conns() {
		b.Errorf("node has %d connections, want %d", n, cl.conns())
	}
}

// ---- load generator (same code for both servers) ----

// fleet is the client side: conns connections, each with one sender
// goroutine and gws's reader goroutine.
type fleet struct {
	b      testing.TB
	conns  []*wsConn
	window int
	phase  atomic.Pointer[phase]
}

// phase is one load phase: the measured window and what was measured in it.
type phase struct {
	win      window
	lat      latencies
	reqs     atomic.Int64
	reqBytes atomic.Int64
	frames   atomic.Int64         // WebSocket frames received in the window (replies, pushes, batches)
	cpu      <-chan time.Duration // this process's CPU time over the window, once it is over
}

// ringSize bounds requests in flight on one connection (ids map to slots).
const ringSize = 1024

type wsConn struct {
	fl     *fleet
	ws     *gws.Conn
	user   int64
	room   int64
	anchor int64
	code   string // a red-packet code: the connection grabs instead of gifting

	slots    [ringSize]atomic.Int64 // id % ringSize → send (or scheduled) time, unix ns
	tokens   chan struct{}          // in-flight bound
	inflight atomic.Int64
	joined   chan struct{}
	closed   chan struct{}
	nextID   int64 // sender goroutine only

	mu   sync.Mutex
	lats []int64 // latencies in the current phase's window
	ok   int64
	fail int64
	rep  int64 // bytes of plain (unbatched) replies in the window
	repN int64 // plain replies in the window
}

// connTarget is where connection i goes and what it sends.
type connTarget struct {
	url                string
	user, room, anchor int64
	code               string // grab this rain instead of gifting
}

func dialFleet(b testing.TB, k knobs, target func(i int) connTarget) *fleet {
	b.Helper()
	fl := &fleet{b: b, window: k.window}
	fl.phase.Store(&phase{})
	for i := range k.conns {
		t := target(i)
		c := &wsConn{fl: fl, user: t.user, room: t.room, anchor: t.anchor, code: t.code, tokens: make(chan struct{}, ringSize),
			joined: make(chan struct{}), closed: make(chan struct{}), nextID: 1}
		ws, _, err := gws.NewClient(c, &gws.ClientOption{Addr: t.url})
		if err != nil {
			fl.close()
			b.Fatalf("dial %d: %v", i, err)
		}
		c.ws = ws
		go ws.ReadLoop()
		fl.conns = append(fl.conns, c)
	}
	b.Cleanup(fl.close)
	return fl
}

func (fl *fleet) close() {
	for _, c := range fl.conns {
		_ = c.ws.WriteClose(1000, nil)
	}
	for _, c := range fl.conns {
		select {
		case <-c.closed:
		case <-time.After(2 * time.Second):
			_ = c.ws.NetConn().Close()
		}
	}
	fl.conns = nil
}

// joinAll joins every connection to its room (id 0) and waits for the replies.
func (fl *fleet) joinAll(b testing.TB) {
	for _, c := range fl.conns {
		if err := c.ws.WriteMessage(gws.OpcodeText, fmt.Appendf(nil, `{"t":"join","id":0,"d":{"room_id":%d}}`, c.room)); err != nil {
			b.Fatal(err)
		}
	}
	deadline := time.After(30 * time.Second)
	for i, c := range fl.conns {
		select {
		case <-c.joined:
		case <-deadline:
			b.Fatalf("connection %d did not join its room", i)
		}
	}
}

// giftFrame is the gift request: {"t":"gift","id":N,"d":{...,"req_id":"<user>-<N>"}}.
func (c *wsConn) giftFrame(dst []byte, id int64) []byte {
	dst = append(dst, `{"t":"gift","id":`...)
	dst = strconv.AppendInt(dst, id, 10)
	dst = append(dst, `,"d":{"room_id":`...)
	dst = strconv.AppendInt(dst, c.room, 10)
	dst = append(dst, `,"gift_id":24,"receiver_id":`...)
	dst = strconv.AppendInt(dst, c.anchor, 10)
	dst = append(dst, `,"count":1,"req_id":"`...)
	dst = strconv.AppendInt(dst, c.user, 10)
	dst = append(dst, '-')
	dst = strconv.AppendInt(dst, id, 10)
	return append(dst, `"}}`...)
}

// grabFrame is the grab request: {"t":"grab","id":N,"d":{"code":"<code>"}}.
func (c *wsConn) grabFrame(dst []byte, id int64) []byte {
	dst = append(dst, `{"t":"grab","id":`...)
	dst = strconv.AppendInt(dst, id, 10)
	dst = append(dst, `,"d":{"code":"`...)
	dst = append(dst, c.code...)
	return append(dst, `"}}`...)
}

// send sends gift id stamped with at (unix ns); it blocks while ringSize
// (closed loop: the window) requests are in flight.
func (c *wsConn) send(buf []byte, at int64, stop <-chan struct{}) ([]byte, bool) {
	select {
	case c.tokens <- struct{}{}:
	case <-stop:
		return buf, false
	}
	id := c.nextID
	c.nextID++
	c.slots[id%ringSize].Store(at)
	c.inflight.Add(1)
	if c.code != "" {
		buf = c.grabFrame(buf[:0], id)
	} else {
		buf = c.giftFrame(buf[:0], id)
	}
	if err := c.ws.WriteMessage(gws.OpcodeText, buf); err != nil {
		<-c.tokens
		c.inflight.Add(-1)
		return buf, false
	}
	if ph := c.fl.phase.Load(); ph.win.has(at) {
		ph.reqs.Add(1)
		ph.reqBytes.Add(int64(len(buf)))
	}
	return buf, true
}

func (c *wsConn) OnOpen(*gws.Conn) {}
func (c *wsConn) OnClose(*gws.Conn, error) {
	close(c.closed)
}
func (c *wsConn) OnPing(s *gws.Conn, p []byte) { _ = s.WritePong(p) }
func (c *wsConn) OnPong(*gws.Conn, []byte)     {}

var (
	replyPrefix = []byte(`{"t":"reply","id":`)
	batchPrefix = []byte(`{"t":"batch","d":[`)
	pushPrefix  = []byte(`{"t":"push","mid":"`)
)

// OnMessage matches replies to requests by id, also inside batch frames;
// pushes (room gift effects) and the hello are read and dropped.
func (c *wsConn) OnMessage(_ *gws.Conn, m *gws.Message) {
	defer m.Close()
	now := time.Now().UnixNano()
	p := m.Bytes()
	if ph := c.fl.phase.Load(); ph.win.has(now) {
		ph.frames.Add(1)
	}
	switch {
	case bytes.HasPrefix(p, replyPrefix):
		c.onReply(p, now, len(p))
	case bytes.HasPrefix(p, pushPrefix) && bytes.Contains(p, []byte(`"ack":true`)):
		// A reliable push (a grab's 5570 credit): acknowledged, as the SDKs do.
		mid := p[len(pushPrefix):]
		if i := bytes.IndexByte(mid, '"'); i > 0 {
			ack := append(append([]byte(`{"t":"ack","d":{"mids":["`), mid[:i]...), `"]}}`...)
			_ = c.ws.WriteMessage(gws.OpcodeText, ack)
		}
	case bytes.HasPrefix(p, batchPrefix):
		if c.code != "" {
			c.ackAll(p) // grabs: the 5570 credits in the batch
		}
		for i := bytes.Index(p, replyPrefix); i >= 0; {
			p = p[i:]
			c.onReply(p, now, 0)
			p = p[len(replyPrefix):]
			i = bytes.Index(p, replyPrefix)
		}
	}
}

// ackAll acknowledges every push of a batch frame in one ack frame (the
// node ignores mids it is not waiting for).
func (c *wsConn) ackAll(p []byte) {
	ack := []byte(`{"t":"ack","d":{"mids":[`)
	n := 0
	for i := bytes.Index(p, pushPrefix[1:]); i >= 0; i = bytes.Index(p, pushPrefix[1:]) {
		p = p[i+len(pushPrefix)-1:]
		j := bytes.IndexByte(p, '"')
		if j <= 0 {
			break
		}
		if n > 0 {
			ack = append(ack, ',')
		}
		ack = append(append(append(ack, '"'), p[:j]...), '"')
		n++
	}
	if n > 0 {
		_ = c.ws.WriteMessage(gws.OpcodeText, append(ack, `]}}`...))
	}
}

// onReply handles the reply at the start of p (size: its frame's size, 0
// inside a batch).
func (c *wsConn) onReply(p []byte, now int64, size int) {
	id, _ := jsonInt(p, `"id":`)
	if id == 0 {
		close(c.joined)
		return
	}
	code, _ := jsonInt(p, `"code":`)
	at := c.slots[id%ringSize].Load()
	<-c.tokens
	c.inflight.Add(-1)
	// Counted by send (or scheduled) time: the requests of the window, each
	// waited for even if its reply comes after the window.
	if !c.fl.phase.Load().win.has(at) {
		return
	}
	c.mu.Lock()
	if code == 0 {
		c.ok++
		c.lats = append(c.lats, now-at)
		if size > 0 {
			c.rep += int64(size)
			c.repN++
		}
	} else {
		c.fail++
	}
	c.mu.Unlock()
}

// jsonInt reads the integer after key in p (no JSON parse: the load
// generator must stay cheap).
func jsonInt(p []byte, key string) (int64, bool) {
	i := bytes.Index(p, []byte(key))
	if i < 0 {
		return 0, false
	}
	var n int64
	ok := false
	for _, ch := range p[i+len(key):] {
		if ch < '0' || ch > '9' {
			break
		}
		n, ok = n*10+int64(ch-'0'), true
	}
	return n, ok
}

// wsResult is what one phase measured.
type wsResult struct {
	win                window
	ok, fail           int64
	lat                latStats
	reqBytes, repBytes float64       // average payload sizes of requests and plain reply frames
	frames             int64         // frames the clients received in the window
	cpu                time.Duration // both sides
	serverCPU          time.Duration // the server's process alone (clients in a child process only)
	serverSched        time.Duration // p99 of its goroutines' wait for a P (schedOver; child clients only)
}

func (r wsResult) rate() float64 { return float64(r.ok) / r.win.secs() }

func (r wsResult) report(b *testing.B) { r.reportAs(b, "gifts/s") }

// reportAs reports r with its rate in unit (gifts/s, grabs/s).
func (r wsResult) reportAs(b *testing.B, unit string) {
	b.ReportMetric(r.rate(), unit)
	b.ReportMetric(ms(r.lat.p50), "p50-ms")
	b.ReportMetric(ms(r.lat.p99), "p99-ms")
	b.ReportMetric(ms(r.lat.max), "max-ms")
	b.ReportMetric(float64(r.fail), "failed")
	b.ReportMetric(float64(r.frames)/r.win.secs(), "frames-in/s")
	b.ReportMetric(r.reqBytes, "req-B")
	b.ReportMetric(r.repBytes, "rep-B")
	b.ReportMetric(float64(r.cpu)/float64(time.Duration(r.win.to-r.win.from)), "cpu-cores")
	if r.serverCPU > 0 {
		b.ReportMetric(float64(r.serverCPU)/float64(time.Duration(r.win.to-r.win.from)), "server-cores")
		b.ReportMetric(ms(r.serverSched), "sched-p99-ms")
	}
}

// begin starts a phase measured from from to from+measure (the load starts
// now: the time until from is the warm-up).
func (fl *fleet) begin(from time.Time, measure time.Duration) *phase {
	ph := &phase{win: window{from: from.UnixNano(), to: from.Add(measure).UnixNano()}, cpu: cpuOver(from, from.Add(measure))}
	for _, c := range fl.conns {
		c.mu.Lock()
		c.lats, c.ok, c.fail, c.rep, c.repN = c.lats[:0], 0, 0, 0, 0
		c.mu.Unlock()
	}
	fl.phase.Store(ph)
	return ph
}

// finish stops the senders, waits for the replies in flight and collects.
func (fl *fleet) finish(ph *phase, stop chan struct{}, senders *sync.WaitGroup) wsResult {
	cpu := <-ph.cpu
	close(stop)
	senders.Wait()
	deadline := time.Now().Add(30 * time.Second)
	for _, c := range fl.conns {
		for c.inflight.Load() > 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if n := c.inflight.Load(); n > 0 {
			fl.b.Errorf("connection of user %d: %d requests unanswered after 30 s", c.user, n)
			break
		}
	}
	res := wsResult{win: ph.win, cpu: cpu, frames: ph.frames.Load()}
	var repBytes, repN int64
	for _, c := range fl.conns {
		c.mu.Lock()
		res.ok += c.ok
		res.fail += c.fail
		repBytes += c.rep
		repN += c.repN
		ph.lat.add(c.lats)
		c.mu.Unlock()
	}
	res.lat = ph.lat.stats()
	if repN > 0 {
		res.repBytes = float64(repBytes) / float64(repN)
	}
	if n := ph.reqs.Load(); n > 0 {
		res.reqBytes = float64(ph.reqBytes.Load()) / float64(n)
	}
	return res
}

// closedLoop keeps window gifts in flight on every connection.
func (fl *fleet) closedLoop(from time.Time, measure time.Duration) wsResult {
	ph := fl.begin(from, measure)
	stop := make(chan struct{})
	var senders sync.WaitGroup
	for _, c := range fl.conns {
		// Pre-fill the tokens above the window so that only window are free.
		for range ringSize - fl.window {
			c.tokens <- struct{}{}
		}
		senders.Add(1)
		go func() {
			defer senders.Done()
			var buf []byte
			for ok := true; ok; {
				buf, ok = c.send(buf, time.Now().UnixNano(), stop)
			}
		}()
	}
	time.Sleep(time.Until(time.Unix(0, ph.win.to)))
	res := fl.finish(ph, stop, &senders)
	for _, c := range fl.conns {
		for range ringSize - fl.window {
			<-c.tokens
		}
	}
	return res
}

// openLoop sends rate gifts/s in total, spread evenly over the connections,
// each stamped with its scheduled time.
func (fl *fleet) openLoop(rate float64, from time.Time, measure time.Duration) wsResult {
	ph := fl.begin(from, measure)
	stop := make(chan struct{})
	var senders sync.WaitGroup
	n := len(fl.conns)
	interval := time.Duration(float64(time.Second) * float64(n) / rate)
	start := time.Now()
	end := time.Unix(0, ph.win.to)
	// Each connection's gifts are due at fixed times (staggered across the
	// connections). A few pacers, each serving a slice of the connections,
	// wake every pacerTick and send every gift that is due; its latency
	// counts from its due time, so a pacer's lateness is charged to the
	// system under test, never hidden. One wake-up per tick instead of one
	// timer and one goroutine wake-up per gift keeps the generator's own
	// cost down on these shared cores.
	for p := range openPacers {
		senders.Add(1)
		go func() {
			defer senders.Done()
			var conns []*wsConn
			var due []time.Time
			for i := p; i < n; i += openPacers {
				conns = append(conns, fl.conns[i])
				due = append(due, start.Add(interval*time.Duration(i)/time.Duration(n)))
			}
			bufs := make([][]byte, len(conns))
			tick := time.NewTicker(pacerTick)
			defer tick.Stop()
			for {
				now := time.Now()
				live := false
				for j, c := range conns {
					for !due[j].After(now) && due[j].Before(end) {
						var ok bool
						if bufs[j], ok = c.send(bufs[j], due[j].UnixNano(), stop); !ok {
							return
						}
						due[j] = due[j].Add(interval)
					}
					live = live || due[j].Before(end)
				}
				if !live {
					return
				}
				select {
				case <-tick.C:
				case <-stop:
					return
				}
			}
		}()
	}
	time.Sleep(time.Until(end))
	return fl.finish(ph, stop, &senders)
}

// Open-loop pacing: openPacers goroutines, each waking every pacerTick.
const (
	openPacers = 8
	pacerTick  = time.Millisecond
)

// reportCommits reports the node's ledger group commits over the run
// (warm-up included): p50/p99 of one group's write + fsync, and ops per group.
func reportCommits(b *testing.B, node *gateway.Node) {
	cs := node.Ledger.Collectors()
	b.ReportMetric(histQuantile(cs[0], 0.5)*1000, "commit-p50-ms")
	b.ReportMetric(histQuantile(cs[0], 0.99)*1000, "commit-p99-ms")
	b.ReportMetric(histMean(cs[1]), "ops/commit")
	g := node.WS.GiftLatency()
	b.ReportMetric(histQuantile(g, 0.5)*1000, "node-p50-ms")
	b.ReportMetric(histQuantile(g, 0.99)*1000, "node-p99-ms")
}

func histSnapshot(c prometheus.Collector) *dto.Histogram {
	h, ok := c.(prometheus.Histogram)
	if !ok {
		return nil
	}
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		return nil
	}
	return m.GetHistogram()
}

// histQuantile is the upper bound of the bucket holding quantile q.
func histQuantile(c prometheus.Collector, q float64) float64 {
	h := histSnapshot(c)
	if h == nil || h.GetSampleCount() == 0 {
		return 0
	}
	want := uint64(q * float64(h.GetSampleCount()))
	for _, bk := range h.GetBucket() {
		if bk.GetCumulativeCount() >= want {
			return bk.GetUpperBound()
		}
	}
	return h.GetBucket()[len(h.GetBucket())-1].GetUpperBound()
}

func histMean(c prometheus.Collector) float64 {
	h := histSnapshot(c)
	if h == nil || h.GetSampleCount() == 0 {
		return 0
	}
	return h.GetSampleSum() / float64(h.GetSampleCount())
}
