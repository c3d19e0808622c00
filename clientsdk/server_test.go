package clientsdk

import (
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

// tServer is a minimal test-only gateway speaking PROTOCOL.md §3: hello,
// replies to ping/join/leave/chat (plus test types echo, slow, stall, noreply,
// fail), records acks, and lets the test push frames and close connections.
type tServer struct {
	t          *testing.T
	hs         *httptest.Server
	up         *gws.Upgrader
	token      atomic.Value // string: the valid token
	heartbeatS int
	delay      atomic.Int64 // nanoseconds to hold each upgrade (simulates a slow node)
	kick       atomic.Int32 // a close code sent right after hello (0: none)
	joinDelay  atomic.Int64 // nanoseconds to hold the reply to a join with since (a slow re-join)
	pingDelay  atomic.Int64 // nanoseconds to hold the reply to a ping (0: at once)
	firstDelay atomic.Int64 // nanoseconds to hold the reply to a join without since (a slow first join)

	mu         sync.Mutex
	conns      []*tConn
	ackFrames  [][]string
	joins      []tJoin
	refuse     map[int64]bool           // join of these rooms replies 10004
	flaky      map[int64]int            // the next joins of these rooms (this many) reply 50000
	pos        map[int64]proto.Position // the room position a join reply gives (off/ep; none when absent)
	lost       map[int64]bool           // a join with since of these rooms replies recovered:false
	replay     map[int64][][]byte       // frames sent before the reply to a recovered join with since
	before     map[int64][][]byte       // frames sent before the reply to a join without since (pushes racing it)
	afterLeave map[int64][][]byte       // frames sent right after the reply to a leave (a fan-out under way)
	typeCount  map[string]int
	stalls     chan struct{} // a "stall" request holds its read loop until resume closes this
	largeBytes []int         // the sizes of the frames received over proto.MaxFrameBytes (answered 10001)
	echoes     sync.WaitGroup
}

type tJoin struct {
	conn  int
	room  int64
	since *proto.Position
}

type tConn struct {
	n      int
	batch  bool
	ws     *gws.Conn
	closed chan struct{}
	// mute makes the connection a wedged node's: TCP up, every frame read
	// (and counted) but none answered, no ack recorded.
	mute atomic.Bool
}

func newTServer(t *testing.T) *tServer {
	ts := &tServer{t: t, heartbeatS: 30, refuse: map[int64]bool{}, flaky: map[int64]int{}, pos: map[int64]proto.Position{},
		lost: map[int64]bool{}, replay: map[int64][][]byte{}, before: map[int64][][]byte{}, afterLeave: map[int64][][]byte{}, typeCount: map[string]int{},
		stalls: make(chan struct{})}
	ts.token.Store("good")
	ts.up = gws.NewUpgrader(ts, &gws.ServerOption{})
	ts.hs = httptest.NewServer(ts)
	t.Cleanup(func() {
		ts.resume()
		ts.mu.Lock()
		conns := ts.conns
		ts.mu.Unlock()
		for _, c := range conns {
			_ = c.ws.NetConn().Close()
		}
		ts.hs.Close()
		ts.echoes.Wait()
	})
	return ts
}

func (ts *tServer) url() string { return "ws" + strings.TrimPrefix(ts.hs.URL, "http") + "/ws" }

func (ts *tServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/ws" {
		http.NotFound(w, r)
		return
	}
	if d := time.Duration(ts.delay.Load()); d > 0 {
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		}
	}
	// The token comes in the Authorization header, never in the URL.
	if r.Header.Get("Authorization") != "Bearer "+ts.token.Load().(string) || r.URL.Query().Has("token") {
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	ws, err := ts.up.Upgrade(w, r)
	if err != nil {
		return
	}
	ts.mu.Lock()
	tc := &tConn{n: len(ts.conns), batch: r.URL.Query().Get("batch") == "1", ws: ws, closed: make(chan struct{})}
	ts.conns = append(ts.conns, tc)
	ts.mu.Unlock()
	ws.Session().Store("c", tc)
	go ws.ReadLoop()
}

func (ts *tServer) OnOpen(ws *gws.Conn) {
	_ = ws.WriteMessage(gws.OpcodeText, proto.EncodeHello(proto.Hello{UserID: 42, Node: "gw-test", HeartbeatS: ts.heartbeatS, Batch: true}))
	if code := ts.kick.Load(); code != 0 {
		go func() { // after the client is connected (hello read): a short-lived connection
			time.Sleep(20 * time.Millisecond)
			_ = ws.WriteClose(uint16(code), []byte(proto.CloseReason(int(code))))
		}()
	}
}

func (ts *tServer) OnClose(ws *gws.Conn, _ error) {
	if v, ok := ws.Session().Load("c"); ok {
		close(v.(*tConn).closed)
	}
}

func (ts *tServer) OnPing(ws *gws.Conn, p []byte) { _ = ws.WritePong(p) }
func (ts *tServer) OnPong(*gws.Conn, []byte)      {}

func (ts *tServer) OnMessage(ws *gws.Conn, m *gws.Message) {
	defer m.Close()
	v, _ := ws.Session().Load("c")
	tc := v.(*tConn)
	f, perr := proto.DecodeClientFrame(m.Bytes())
	if n := m.Data.Len(); n > proto.MaxFrameBytes {
		ts.mu.Lock()
		ts.largeBytes = append(ts.largeBytes, n)
		ts.mu.Unlock()
	}
	if perr != nil {
		_ = ws.WriteMessage(gws.OpcodeText, proto.EncodeErrorReply(f.ID, perr))
		return
	}
	ts.mu.Lock()
	ts.typeCount[f.T]++
	ts.mu.Unlock()
	if tc.mute.Load() {
		return
	}
	reply := func(b []byte) { _ = ws.WriteMessage(gws.OpcodeText, b) }
	switch f.T {
	case proto.TypePing:
		if d := time.Duration(ts.pingDelay.Load()); d > 0 { // its reply behind a slow link's queued pushes
			id := f.ID
			ts.echoes.Add(1)
			go func() {
				defer ts.echoes.Done()
				time.Sleep(d)
				reply(proto.EncodeReply(id, 0, "", map[string]int64{"ts": time.Now().UnixMilli()}))
			}()
			return
		}
		reply(proto.EncodeReply(f.ID, 0, "", map[string]int64{"ts": time.Now().UnixMilli()}))
	case proto.TypeJoin, proto.TypeLeave:
		var rr proto.RoomReq
		if e := f.DecodeData(&rr); e != nil {
			reply(proto.EncodeErrorReply(f.ID, e))
			return
		}
		if f.T == proto.TypeLeave {
			reply(proto.EncodeReply(f.ID, 0, "", nil))
			ts.mu.Lock()
			late := ts.afterLeave[rr.RoomID]
			ts.mu.Unlock()
			for _, b := range late {
				reply(b)
			}
			return
		}
		ts.mu.Lock()
		ts.joins = append(ts.joins, tJoin{tc.n, rr.RoomID, rr.Since})
		refused, flaky := ts.refuse[rr.RoomID], ts.flaky[rr.RoomID] > 0
		if flaky {
			ts.flaky[rr.RoomID]--
		}
		pos, numbered := ts.pos[rr.RoomID]
		lost, replay, before := ts.lost[rr.RoomID], ts.replay[rr.RoomID], ts.before[rr.RoomID]
		ts.mu.Unlock()
		if d := time.Duration(ts.firstDelay.Load()); d > 0 && rr.Since == nil {
			time.Sleep(d) // recorded, answered late, holding the read loop: a leave sent meanwhile runs after
		}
		if d := time.Duration(ts.joinDelay.Load()); d > 0 && rr.Since != nil {
			time.Sleep(d) // recorded (joinList), answered late: holds this connection's read loop, as a slow node would
		}
		if refused {
			reply(proto.EncodeErrorReply(f.ID, proto.ErrNotFound))
			return
		}
		if flaky {
			reply(proto.EncodeErrorReply(f.ID, proto.ErrInternal))
			return
		}
		rep := map[string]any{"room_id": rr.RoomID, "online": 7}
		if numbered { // else like a server that does not number room pushes
			rep["off"], rep["ep"] = pos.Off, pos.Ep
		}
		if rr.Since == nil || lost { // live pushes the node queued before the reply
			for _, b := range before {
				reply(b)
			}
		}
		if rr.Since != nil { // like the gateway: the replay goes out before the reply
			rep["recovered"] = !lost
			if !lost {
				for _, b := range replay {
					reply(b)
				}
			}
		}
		reply(proto.EncodeReply(f.ID, 0, "", rep))
	case proto.TypeChat:
		reply(proto.EncodeReply(f.ID, 0, "", map[string]string{"mid": "c-" + strconv.FormatInt(f.ID, 10)}))
	case proto.TypeAck:
		var ar proto.AckReq
		if f.DecodeData(&ar) == nil {
			ts.mu.Lock()
			ts.ackFrames = append(ts.ackFrames, ar.Mids)
			ts.mu.Unlock()
		}
	case "echo": // reply later, out of order, some wrapped in batch frames
		d := append([]byte(nil), f.D...)
		id, batch := f.ID, tc.batch && f.ID%3 == 0
		ts.echoes.Add(1)
		go func() {
			defer ts.echoes.Done()
			time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond)
			b := proto.EncodeReply(id, 0, "", d)
			if batch {
				b = proto.AppendBatch(nil, [][]byte{b})
			}
			reply(b)
		}()
	case "slow": // reply after d.ms milliseconds, whatever the read loop does meanwhile (a gift in flight)
		var sd struct {
			MS int `json:"ms"`
		}
		_ = proto.Unmarshal(f.D, &sd)
		id := f.ID
		ts.echoes.Add(1)
		go func() {
			defer ts.echoes.Done()
			time.Sleep(time.Duration(sd.MS) * time.Millisecond)
			reply(proto.EncodeReply(id, 0, "", nil))
		}()
	case "fail":
		reply(proto.EncodeErrorReply(f.ID, proto.ErrForbidden))
	case "stall": // read nothing more (no reply) until resume: the client's writes fill the socket buffers
		ts.mu.Lock()
		ch := ts.stalls
		ts.mu.Unlock()
		<-ch
	case "noreply":
	default:
		reply(proto.EncodeErrorReply(f.ID, proto.BadRequest("unknown type %q", f.T)))
	}
}

// resume lets the read loops held by "stall" requests read again; the next
// "stall" holds its loop anew.
func (ts *tServer) resume() {
	ts.mu.Lock()
	close(ts.stalls)
	ts.stalls = make(chan struct{})
	ts.mu.Unlock()
}

// conn returns connection n, waiting for it to exist.
func (ts *tServer) conn(n int) *tConn {
	ts.t.Helper()
	var tc *tConn
	waitFor(ts.t, 5*time.Second, "server connection "+strconv.Itoa(n), func() bool {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		if len(ts.conns) > n {
			tc = ts.conns[n]
			return true
		}
		return false
	})
	return tc
}

// large returns the sizes of the frames received over proto.MaxFrameBytes.
func (ts *tServer) large() []int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return slices.Clone(ts.largeBytes)
}

func (ts *tServer) connCount() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return len(ts.conns)
}

func (ts *tServer) count(typ string) int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.typeCount[typ]
}

func (ts *tServer) acks() [][]string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([][]string(nil), ts.ackFrames...)
}

func (ts *tServer) ackCount(mid string) int {
	n := 0
	for _, f := range ts.acks() {
		for _, m := range f {
			if m == mid {
				n++
			}
		}
	}
	return n
}

func (ts *tServer) joinsOn(conn int) []int64 {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	var rs []int64
	for _, j := range ts.joins {
		if j.conn == conn {
			rs = append(rs, j.room)
		}
	}
	return rs
}

func (tc *tConn) send(t *testing.T, b []byte) {
	t.Helper()
	if err := tc.ws.WriteMessage(gws.OpcodeText, b); err != nil {
		t.Fatalf("server send: %v", err)
	}
}

func (tc *tConn) close(code int) { _ = tc.ws.WriteClose(uint16(code), []byte(proto.CloseReason(code))) }

// pushFrame encodes a chat push.
func pushFrame(mid string, ack bool, room int64, text string) []byte {
	d, _ := proto.Marshal(proto.ChatPush{From: 7, Text: text})
	return proto.AppendPush(nil, &proto.Push{Mid: mid, Biz: proto.BizChat, Room: room, Data: d, Ack: ack})
}

// joinList returns the joins received, in order.
func (ts *tServer) joinList() []tJoin {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]tJoin(nil), ts.joins...)
}

// offPush encodes a chat push at room position (off, ep).
func offPush(mid string, ack bool, room, off int64, ep, text string) []byte {
	d, _ := proto.Marshal(proto.ChatPush{From: 7, Text: text})
	return proto.AppendPush(nil, &proto.Push{Mid: mid, Biz: proto.BizChat, Room: room, Data: d, Ack: ack, Off: off, Ep: ep})
}

// kill closes the server's listener and breaks every connection without a
// close frame (a node that died).
func (ts *tServer) kill() {
	ts.hs.Listener.Close()
	ts.mu.Lock()
	conns := ts.conns
	ts.mu.Unlock()
	for _, c := range conns {
		_ = c.ws.NetConn().Close()
	}
}

// waitFor polls cond until it holds or timeout expires.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
