package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

// The raw idle client (Config.Client = ClientRaw, loadgen -client raw): an
// idle viewer and nothing more, as cheap as this process can make it, so that
// 100,000 of them fit beside the nodes on two shared cores. Per connection:
// one gws connection with a 512-byte read buffer and no session map, its
// ReadLoop goroutine (which gws needs) and a 64-byte rawConn. Nothing else
// runs per connection: one sweeper goroutine per process sends every joined
// connection's heartbeat pings (one shared, pre-encoded frame) and times out
// unanswered ones; 256 shared dial workers open the connections (ramp and
// reconnects); a reconnect waits out its backoff in a runtime timer.
//
// A connection is held only while it is joined: it dials with its token
// (minted once through /api/v1/dev/token), waits for the hello, sends the
// join and counts as held when the join is answered with code 0. Pings are
// {"t":"ping"} requests every half of the hello's heartbeat from the hello on
// (as the SDK does; -heartbeat overrides), WebSocket pings are answered with
// pongs, and
// a push with "ack":true is acknowledged. A held connection that is lost is
// a disconnect (by close code, or "1006" without a close frame, or
// "ping-timeout" when a ping went unanswered for 10 s); it reconnects with
// full-jitter exponential backoff (100 ms .. 5 s) to the same node, then the
// next ones, and re-joins (a reconnect). A connection that never joined is
// given up after 5 attempts (a connect error).

// Client kinds (Config.Client).
const (
	ClientSDK = "sdk"
	ClientRaw = "raw"
)

// Raw connection states.
const (
	rawDown    int32 = iota // not connected: queued for a dial or waiting out a backoff
	rawDialing              // a dial worker is connecting it
	rawHello                // upgraded, waiting for the hello
	rawJoining              // join sent
	rawJoined               // held
	rawGone                 // given up, or the run is closing
)

const (
	rawPingTimeout = 10 * time.Second // clientsdk.DefaultRequestTimeout
	rawMaxAttempts = 5                // attempts of a connection that never joined
	rawDialers     = 256              // dials in flight at most (as the SDK path)
	rawReadBuffer  = 512              // gws read buffer per connection (frames larger than it are read through it)
	rawJoinID      = 1
	rawPingID      = 2
	rawBackoffMin  = 100 * time.Millisecond
	rawBackoffMax  = 5 * time.Second
)

var rawPingFrame = []byte(`{"t":"ping","id":2,"d":{}}`)

// Local close reasons (rawConn.local).
var (
	reasonPingTimeout = "ping-timeout"
	reasonJoinRefused = "join-refused"
	reasonBadHello    = "bad-hello"
)

type rawClient struct {
	r     *run
	conns []rawConn
	join  []byte   // the join frame, the same for every connection
	bases []string // per node: the WebSocket URL ready for "token=..."

	dialq   chan int32 // connections to dial; each is queued at most once
	dialers []*net.Dialer
	workers sync.WaitGroup
	live    sync.WaitGroup // read loops
	stop    chan struct{}
	closing atomic.Bool

	hb      atomic.Int64 // ping interval (ns); 0 until known, < 0 none
	held    atomic.Int64 // joined now
	settled atomic.Int64 // joined once, or given up
	holding atomic.Bool
	heldMin atomic.Int64

	joinLat Hist // hello → join reply

	pings, pingTimeouts, acks atomic.Int64
	reasonsMu                 sync.Mutex
	reasons                   map[string]int64 // disconnects by reason
}

type rawConn struct {
	rc       *rawClient
	idx      int32
	state    atomic.Int32
	tries    atomic.Int32 // failed attempts in a row
	joined   atomic.Bool  // joined at least once
	ws       atomic.Pointer[gws.Conn]
	local    atomic.Pointer[string] // why we closed it
	pingAt   atomic.Int64           // unix ns of the oldest unanswered ping; 0 none
	nextPing atomic.Int64           // unix ns
	joinAt   atomic.Int64           // unix ns the join was sent
	token    string                 // dial workers only (handed over through dialq)
}

// runRaw is Run for Client = ClientRaw (the idle scenario only).
func (r *run) runRaw(ctx context.Context, res *Result) {
	cfg := &r.cfg
	rc := &rawClient{r: r, conns: make([]rawConn, cfg.Conns), dialq: make(chan int32, cfg.Conns),
		stop: make(chan struct{}), reasons: map[string]int64{}}
	rc.join = []byte(`{"t":"join","id":` + strconv.Itoa(rawJoinID) + `,"d":{"room_id":` + strconv.FormatInt(r.room, 10) + `}}`)
	rc.bases = cfg.WS // the token goes in an Authorization header, never in the URL
	for i := range max(cfg.SrcIPs, 1) {
		d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: -1} // the heartbeat is the keep-alive
		if cfg.SrcIPs > 1 {
			d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i))}
		}
		rc.dialers = append(rc.dialers, d)
	}
	if cfg.Heartbeat != 0 {
		rc.hb.Store(int64(cfg.Heartbeat))
	}
	for i := range rc.conns {
		rc.conns[i].rc, rc.conns[i].idx = rc, int32(i)
	}
	for range min(rawDialers, cfg.Conns) {
		rc.workers.Add(1)
		go rc.worker(ctx)
	}
	sweepDone := make(chan struct{})
	go func() {
		defer close(sweepDone)
		rc.sweep()
	}()

	// Ramp: connection i is queued at i/Ramp s; done when every connection
	// has joined or been given up.
	t0 := time.Now()
	for i := range cfg.Conns {
		if d := time.Until(t0.Add(time.Duration(i) * time.Second / time.Duration(cfg.Ramp))); d > 0 {
			select {
			case <-time.After(d):
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			break
		}
		rc.dialq <- int32(i)
	}
	for rc.settled.Load() < int64(cfg.Conns) && ctx.Err() == nil {
		time.Sleep(20 * time.Millisecond)
	}
	res.RampSeconds = time.Since(t0).Seconds()
	r.conns.Store(rc.held.Load())
	r.http.CloseIdleConnections() // tokens are kept: no more HTTP unless a token failed
	r.logf("ramp done in %.1f s: %d held (joined), %d given up, %d disconnects", res.RampSeconds, rc.held.Load(), r.connErrs.Load(), r.disconnects.Load())

	// The ramp's garbage (token requests, handshakes) back to the OS before
	// memory is measured: what stays is what the hold costs.
	debug.FreeOSMemory()
	time.Sleep(time.Second)
	r.measureMemory(res)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r.logf("memory: RSS %.1f MiB; Go heap in use %.1f MiB, goroutine stacks %.1f MiB, %d goroutines",
		mib(res.LoadgenRSSAfter), mib(int64(ms.HeapInuse)), mib(int64(ms.StackInuse)), runtime.NumGoroutine())
	if d := time.Until(cfg.StartAt); !cfg.StartAt.IsZero() && d > 0 {
		select {
		case <-time.After(d):
		case <-ctx.Done():
		}
	}
	res.Viewers = r.conns.Load()

	// The hold.
	var cpu0, self0 time.Duration
	if cfg.NodePID > 0 {
		cpu0, _ = CPUTime(cfg.NodePID)
	}
	self0, _ = CPUTime(0)
	disc0, recon0 := r.disconnects.Load(), r.reconnects.Load()
	rc.heldMin.Store(rc.held.Load())
	rc.holding.Store(true)
	t1 := time.Now()
	progress := time.NewTicker(10 * time.Second)
	hold := time.NewTimer(cfg.Duration)
wait:
	for {
		select {
		case <-hold.C:
			break wait
		case <-ctx.Done():
			break wait
		case <-progress.C:
			r.logf("holding: %d joined, %d disconnects, %d reconnects", rc.held.Load(), r.disconnects.Load(), r.reconnects.Load())
		}
	}
	progress.Stop()
	hold.Stop()
	if cfg.NodePID > 0 {
		if v, err := RSS(cfg.NodePID); err == nil {
			res.setNodeEnd(v, rc.held.Load())
		}
	}
	rc.holding.Store(false)
	res.RunSeconds = time.Since(t1).Seconds()
	if cfg.NodePID > 0 {
		if cpu1, err := CPUTime(cfg.NodePID); err == nil && cpu0 > 0 && res.RunSeconds > 0 {
			res.NodeCPUCores = (cpu1 - cpu0).Seconds() / res.RunSeconds
		}
	}
	if self1, err := CPUTime(0); err == nil && res.RunSeconds > 0 {
		res.LoadgenCPUCores = (self1 - self0).Seconds() / res.RunSeconds
	}
	res.Client = ClientRaw
	res.HeldEnd = rc.held.Load()
	res.HeldMin = min(rc.heldMin.Load(), res.HeldEnd)
	res.HoldDisconnects = r.disconnects.Load() - disc0
	res.HoldReconnects = r.reconnects.Load() - recon0
	res.Pings, res.PingTimeouts, res.Acks = rc.pings.Load(), rc.pingTimeouts.Load(), rc.acks.Load()
	res.JoinBuckets, res.JoinMaxUS = rc.joinLat.Buckets(), rc.joinLat.MaxUS()
	res.JoinP50Ms, res.JoinP99Ms, res.JoinMaxMs = rc.joinLat.Quantile(0.5), rc.joinLat.Quantile(0.99), rc.joinLat.Quantile(1)

	rc.shutdown()
	<-sweepDone
	rc.reasonsMu.Lock()
	if len(rc.reasons) > 0 {
		res.DisconnectReasons = rc.reasons
	}
	rc.reasonsMu.Unlock()
}

// shutdown stops the dials, closes every connection (1000) and waits for
// their read loops (10 s at most).
func (rc *rawClient) shutdown() {
	rc.closing.Store(true)
	close(rc.stop)
	rc.workers.Wait()
	for i := range rc.conns {
		c := &rc.conns[i]
		if ws := c.ws.Load(); ws != nil {
			_ = ws.SetWriteDeadline(time.Now().Add(time.Second))
			_ = ws.WriteClose(proto.CloseNormal, nil)
		}
	}
	done := make(chan struct{})
	go func() {
		rc.live.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		rc.r.fail(errors.New("raw client: read loops still running 10 s after the close"))
	}
}

func (rc *rawClient) worker(ctx context.Context) {
	defer rc.workers.Done()
	for {
		select {
		case <-rc.stop:
			return
		case i := <-rc.dialq:
			rc.dial(ctx, &rc.conns[i])
		}
	}
}

// dial mints the connection's token (once) and opens it to its node (after
// failures, the next nodes in turn); the read loop takes it from there.
func (rc *rawClient) dial(ctx context.Context, c *rawConn) {
	if rc.closing.Load() {
		return
	}
	r := rc.r
	cfg := &r.cfg
	c.state.Store(rawDialing)
	if c.token == "" {
		tok, err := r.viewerToken(ctx, cfg.HTTP[int(c.idx)%len(cfg.HTTP)], cfg.UserBase+int64(c.idx))
		if err != nil {
			rc.retry(c, fmt.Errorf("token: %w", err))
			return
		}
		c.token = tok
	}
	node := (int(c.idx) + int(c.tries.Load())) % len(rc.bases)
	dialer := rc.dialers[int(c.idx)%len(rc.dialers)]
	ws, resp, err := gws.NewClient(c, &gws.ClientOption{
		Addr:             rc.bases[node],
		RequestHeader:    http.Header{"Authorization": {"Bearer " + c.token}},
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   rawReadBuffer,
		ParallelGolimit:  1,
		NewDialer:        func() (gws.Dialer, error) { return dialer, nil },
		NewSession:       func() gws.SessionStorage { return noSession{} },
	})
	if err != nil {
		if resp != nil {
			err = fmt.Errorf("HTTP %d: %w", resp.StatusCode, err)
		}
		rc.retry(c, fmt.Errorf("connect %s: %w", cfg.WS[node], err))
		return
	}
	c.local.Store(nil)
	c.ws.Store(ws)
	c.state.Store(rawHello)
	rc.live.Add(1)
	go func() {
		defer rc.live.Done()
		ws.ReadLoop()
	}()
	if rc.closing.Load() { // shutdown may have looked at c before ws was stored
		_ = ws.WriteClose(proto.CloseNormal, nil)
	}
}

// retry schedules the next attempt after a full-jitter backoff, or gives the
// connection up (it never joined and has failed rawMaxAttempts times).
func (rc *rawClient) retry(c *rawConn, err error) {
	n := c.tries.Add(1)
	if err != nil {
		rc.r.fail(fmt.Errorf("conn %d: %w", c.idx, err))
	}
	if rc.closing.Load() {
		c.state.Store(rawGone)
		return
	}
	if !c.joined.Load() && n >= rawMaxAttempts {
		c.state.Store(rawGone)
		rc.r.connErrs.Add(1)
		rc.settled.Add(1)
		return
	}
	c.state.Store(rawDown)
	ceil := min(rawBackoffMin<<min(n-1, 10), rawBackoffMax)
	time.AfterFunc(rand.N(ceil)+time.Millisecond, func() {
		if !rc.closing.Load() {
			rc.dialq <- c.idx // never blocks: capacity Conns, each connection queued at most once
		}
	})
}

func (rc *rawClient) disconnected(reason string) {
	rc.r.disconnects.Add(1)
	rc.reasonsMu.Lock()
	rc.reasons[reason]++
	rc.reasonsMu.Unlock()
}

// sweep is the one timer of the process: it pings every joined connection
// whose turn has come and closes those whose ping went unanswered.
func (rc *rawClient) sweep() {
	t := time.NewTimer(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-rc.stop:
			return
		case <-t.C:
		}
		iv := rc.hb.Load()
		now := time.Now().UnixNano()
		for i := range rc.conns {
			c := &rc.conns[i]
			if st := c.state.Load(); st != rawJoined && st != rawJoining {
				continue // heartbeats from the hello on, as the SDK (a join may take a while)
			}
			if pa := c.pingAt.Load(); pa != 0 && now-pa > int64(rawPingTimeout) {
				rc.pingTimeouts.Add(1)
				c.closeLocal(&reasonPingTimeout)
				continue
			}
			if next := c.nextPing.Load(); iv > 0 && now >= next {
				c.nextPing.Store(nextPing(next, now, iv))
				c.pingAt.CompareAndSwap(0, now) // before the write: the reply may come first
				if c.write(rawPingFrame) == nil {
					rc.pings.Add(1)
				}
			}
		}
		h := rc.held.Load()
		if rc.holding.Load() && h < rc.heldMin.Load() {
			rc.heldMin.Store(h)
		}
		tick := 200 * time.Millisecond
		if iv > 0 {
			tick = min(max(time.Duration(iv)/4, 20*time.Millisecond), tick)
		}
		t.Reset(tick)
	}
}

// nextPing is when a connection pings next after its ping due at next was
// sent at now (interval iv). It keeps the connection's phase: a sweep that
// came late (a starved process) must not line every due connection up on
// one instant, or the pings of a whole interval come in bursts from then on.
// One that fell a whole interval behind starts again at a random point of
// the next interval.
func nextPing(next, now, iv int64) int64 {
	if next += iv; next <= now {
		next = now + rand.Int64N(iv) + 1
	}
	return next
}

// write sends one text frame (5 s at most: a write deadline before each
// write, as several goroutines write and each sets its own).
func (c *rawConn) write(b []byte) error {
	ws := c.ws.Load()
	if ws == nil {
		return net.ErrClosed
	}
	_ = ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
	return ws.WriteMessage(gws.OpcodeText, b)
}

// closeLocal closes the connection from this side (1000); OnClose reports reason.
func (c *rawConn) closeLocal(reason *string) {
	c.local.CompareAndSwap(nil, reason)
	if ws := c.ws.Load(); ws != nil {
		_ = ws.SetWriteDeadline(time.Now().Add(time.Second))
		_ = ws.WriteClose(proto.CloseNormal, nil)
	}
}

// rawFrame is what the idle client reads of a server frame.
type rawFrame struct {
	T    string `json:"t"`
	ID   int64  `json:"id"`
	Code int    `json:"code"`
	Mid  string `json:"mid"`
	Ack  bool   `json:"ack"`
	D    struct {
		HeartbeatS  int   `json:"heartbeat_s"`
		HeartbeatMS int64 `json:"heartbeat_ms"`
	} `json:"d"`
}

// scanFrame reads a frame laid out as the gateway writes them (proto:
// EncodeHello, EncodeReply, AppendPush) without reflection, which keeps the
// read loops' stacks small; ok is false for anything else (then decoded as
// JSON).
func scanFrame(b []byte) (f rawFrame, ok bool) {
	switch {
	case bytes.HasPrefix(b, []byte(`{"t":"reply","id":`)):
		f.T = proto.TypeReply
		rest := b[len(`{"t":"reply","id":`):]
		if f.ID, rest, ok = scanInt(rest); !ok || !bytes.HasPrefix(rest, []byte(`,"code":`)) {
			return f, false
		}
		var code int64
		code, _, ok = scanInt(rest[len(`,"code":`):])
		f.Code = int(code)
		return f, ok
	case bytes.HasPrefix(b, []byte(`{"t":"push","mid":"`)):
		f.T = proto.TypePush
		rest := b[len(`{"t":"push","mid":"`):]
		i := bytes.IndexByte(rest, '"')
		if i < 0 || bytes.IndexByte(rest[:i], '\\') >= 0 {
			return f, false
		}
		f.Mid = string(rest[:i])
		switch {
		case bytes.HasSuffix(b, []byte(`,"ack":true}`)):
			f.Ack = true
		case !bytes.HasSuffix(b, []byte(`,"ack":false}`)):
			return f, false
		}
		return f, true
	case bytes.HasPrefix(b, []byte(`{"t":"hello","d":{`)):
		f.T = proto.TypeHello
		if i := bytes.Index(b, []byte(`"heartbeat_ms":`)); i >= 0 {
			f.D.HeartbeatMS, _, _ = scanInt(b[i+len(`"heartbeat_ms":`):])
		}
		if i := bytes.Index(b, []byte(`"heartbeat_s":`)); i >= 0 {
			hs, _, _ := scanInt(b[i+len(`"heartbeat_s":`):])
			f.D.HeartbeatS = int(hs)
		}
		return f, f.D.HeartbeatMS > 0 || f.D.HeartbeatS > 0
	}
	return f, false
}

// scanInt reads a decimal integer (optionally negative) at the start of b.
func scanInt(b []byte) (v int64, rest []byte, ok bool) {
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	i := 0
	for ; i < len(b) && i < 18 && b[i] >= '0' && b[i] <= '9'; i++ {
		v = v*10 + int64(b[i]-'0')
	}
	if i == 0 {
		return 0, b, false
	}
	if neg {
		v = -v
	}
	return v, b[i:], true
}

// --- gws.Event (on the connection's read loop) ---

func (c *rawConn) OnOpen(*gws.Conn) {}

func (c *rawConn) OnPing(ws *gws.Conn, payload []byte) {
	_ = ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_ = ws.WritePong(payload)
}

func (c *rawConn) OnPong(*gws.Conn, []byte) {}

func (c *rawConn) OnMessage(ws *gws.Conn, m *gws.Message) {
	defer m.Close()
	rc := c.rc
	f, ok := scanFrame(m.Bytes())
	if !ok {
		if err := json.Unmarshal(m.Bytes(), &f); err != nil {
			var te *json.UnmarshalTypeError // a d of another shape: the rest was read
			if !errors.As(err, &te) {
				rc.r.fail(fmt.Errorf("conn %d: undecodable frame: %w", c.idx, err))
				return
			}
		}
	}
	switch f.T {
	case proto.TypeHello:
		if c.state.Load() != rawHello {
			return
		}
		hb := time.Duration(f.D.HeartbeatMS) * time.Millisecond
		if hb <= 0 {
			hb = time.Duration(f.D.HeartbeatS) * time.Second
		}
		if hb <= 0 && rc.hb.Load() == 0 {
			c.closeLocal(&reasonBadHello)
			return
		}
		rc.hb.CompareAndSwap(0, int64(hb/2)) // as the SDK: half the server's heartbeat
		if iv := rc.hb.Load(); iv > 0 {
			// the first ping at a random point of the first interval: the
			// ramp's order says nothing about when the pings fall
			c.nextPing.Store(time.Now().UnixNano() + rand.Int64N(iv) + 1)
		}
		c.pingAt.Store(0)
		c.joinAt.Store(time.Now().UnixNano())
		c.state.Store(rawJoining)
		if err := c.write(rc.join); err != nil {
			return // the read loop sees the connection go
		}
	case proto.TypeReply:
		switch f.ID {
		case rawJoinID:
			if c.state.Load() != rawJoining {
				return
			}
			if f.Code != proto.CodeOK {
				rc.r.fail(fmt.Errorf("conn %d: join refused: code %d", c.idx, f.Code))
				c.closeLocal(&reasonJoinRefused)
				return
			}
			rc.joinLat.Record(time.Duration(time.Now().UnixNano() - c.joinAt.Load()))
			c.tries.Store(0)
			c.state.Store(rawJoined)
			rc.held.Add(1)
			if c.joined.Swap(true) {
				rc.r.reconnects.Add(1)
			} else {
				rc.settled.Add(1)
			}
		case rawPingID:
			c.pingAt.Store(0)
		}
	case proto.TypePush:
		if f.Ack && f.Mid != "" {
			mid, _ := json.Marshal(f.Mid)
			if c.write([]byte(`{"t":"ack","d":{"mids":[`+string(mid)+`]}}`)) == nil {
				rc.acks.Add(1)
			}
		}
	}
}

func (c *rawConn) OnClose(_ *gws.Conn, err error) {
	rc := c.rc
	prev := c.state.Swap(rawDown)
	c.ws.Store(nil)
	c.pingAt.Store(0)
	if prev == rawJoined {
		rc.held.Add(-1)
	}
	if rc.closing.Load() {
		c.state.Store(rawGone)
		return
	}
	reason, code := "1006", 1006 // lost without a close frame
	var ce *gws.CloseError
	if p := c.local.Load(); p != nil {
		reason, code = *p, proto.CloseNormal
	} else if errors.As(err, &ce) {
		code = int(ce.Code)
		reason = strconv.Itoa(code)
	}
	if prev != rawJoined {
		// lost before it joined: a failed attempt (a local close has said why)
		var why error
		if c.local.Load() == nil {
			why = fmt.Errorf("closed before joined (%s): %v", reason, err)
		}
		rc.retry(c, why)
		return
	}
	rc.disconnected(reason)
	if !proto.Reconnectable(code) {
		c.state.Store(rawGone)
		rc.r.fail(fmt.Errorf("conn %d: closed with %s: not reconnecting", c.idx, reason))
		return
	}
	rc.retry(c, nil)
}

// noSession is gws's per-connection session storage, without the map.
type noSession struct{}

func (noSession) Len() int                     { return 0 }
func (noSession) Load(string) (any, bool)      { return nil, false }
func (noSession) Delete(string)                {}
func (noSession) Store(string, any)            {}
func (noSession) Range(func(string, any) bool) {}
