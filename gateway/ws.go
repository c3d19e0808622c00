package gateway

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

const connShards = 16

// Server is the WebSocket side of a node: upgrades, per-connection reader and
// writer, heartbeat sweeping and frame dispatch. It implements gws.Event.
type Server struct {
	// afterEnqueue, in tests only, runs in Conn.Send right after the frame
	// is queued (where its writer may already have written it).
	afterEnqueue func(c *Conn, f *router.Frame)
	// handshakes bounds the upgrade requests being read (accept).
	handshakes *handshakeGate
	// afterAttached, in tests only, runs in Conn.Attached: the connection
	// is reachable, what its user is owed not yet given to it.
	afterAttached func(c *Conn)
	// chatStep, in tests only, runs in a chat with a req_id right after
	// its claim was taken (published false) and right after its publish
	// returned, before its claim is settled (true).
	chatStep atomic.Pointer[func(req string, published bool)]
	// onFrame, in tests only, runs in dispatch with each decoded frame's
	// type (a handler failing there).
	onFrame func(t string)

	cfg     configs.Config
	log     *slog.Logger
	auth    *Auth
	router  router.Router
	metrics *metrics
	chat    *limit.Keyed
	// chatPeeks bounds the chats with a req_id looked up before the chat
	// limit (a Redis read in a cluster): chatPeekFactor × the chat rate.
	chatPeeks  *limit.Keyed
	chatShared *limit.Shared                // the chat limit across a cluster's nodes (nil: off)
	elsewhere  func(user int64) (int, bool) // ServerDeps.SessionsElsewhere
	joins      *limit.Keyed                 // JoinsPerSecond per connection
	reqID      atomic.Uint64                // ids of internal errors (internal)
	chatOnce   chatOnce
	gifts      *gift.Service
	roomOpen   func(room int64) (bool, error)
	// roomKnownClosed: Deps.RoomKnownClosed.
	roomKnownClosed func(room int64) bool
	rp              *redpacket.Service
	grab            func(user int64, code string, done func(any, *proto.Error))
	// roomOpsWait, grabWaits: ServerDeps.RoomOpsWait, GrabWaits.
	roomOpsWait bool
	grabWaits   func(code string) bool
	inflight    sync.WaitGroup // async requests (gifts, grabs) still running

	up *gws.Upgrader
	// upSub is up answering WSSubprotocol, for a request that offers it (gws
	// refuses a request that offers none of an upgrader's subprotocols, so
	// up, which names none, serves the others as before).
	upSub *gws.Upgrader
	ln    net.Listener // accept and handshake serve it (handshake.go)

	nextID atomic.Uint64
	// count is the number of connection slots taken: reserved by ServeHTTP
	// before the upgrade (never above ws.max_conns: reserveConn), given back
	// by OnClose or by a failed upgrade.
	count    atomic.Int64
	users    userCounts // slots per user, bounded by ws.max_conns_per_user
	draining atomic.Bool
	stop     chan struct{}
	sweeper  sync.WaitGroup

	// Writer goroutines are recycled: a connection that needs a writer hands
	// itself to an idle one (whose stack has already grown to the depth of a
	// socket write) and starts a new goroutine only when none is idle.
	writerq     chan *Conn   // unbuffered: a send succeeds only into an idle writer
	idleWriters atomic.Int32 // writers parked on writerq, at most maxIdleWriters

	shards [connShards]struct {
		mu    sync.Mutex
		conns map[uint64]*Conn
	}
}

// ServerDeps are what a Server needs from the node.
type ServerDeps struct {
	Config  configs.Config
	Log     *slog.Logger
	Auth    *Auth
	Router  router.Router
	Metrics *metrics
	// ChatLimit limits chat per user (nil = off).
	ChatLimit *limit.Keyed
	// ChatShared, in a cluster, counts the same limit on every node (a
	// user's chats through N nodes were N times the rate); nil = off.
	ChatShared *limit.Shared
	// ChatOnce remembers chats sent with a req_id (nil: this node's memory).
	ChatOnce chatOnce
	Gifts    *gift.Service
	// RoomOpen, if set, is asked about a room the router does not know
	// (in a cluster, an open through another node not yet replicated here);
	// an error (it could not say) answers the join "retry", not 10004.
	RoomOpen func(room int64) (bool, error)
	// RoomKnownClosed, if set, says whether a room is known here not to be
	// open, without asking anyone (a chat from a non-member: 10004).
	RoomKnownClosed func(room int64) bool
	// RedPackets serves grab frames.
	RedPackets *redpacket.Service
	// Grab, if set, serves grab frames instead (a cluster forwards a grab
	// to the rain's node); done gets the reply's d.
	Grab func(user int64, code string, done func(any, *proto.Error))
	// RoomOpsWait: a join or a chat may wait on Redis (a cluster): they
	// are served on the connection's lane, off its reader (lane.go).
	RoomOpsWait bool
	// GrabWaits, if set, tells whether a grab of a rain may wait on Redis
	// where it is served: then it is served on the connection's lane.
	GrabWaits func(code string) bool
	// SessionsElsewhere, in a cluster, reports a user's sessions on the
	// other nodes (known false: could not tell), so ws.max_conns_per_user
	// bounds them all; nil = this node's only.
	SessionsElsewhere func(user int64) (n int, known bool)
}

func newServer(d ServerDeps) *Server {
	s := &Server{cfg: d.Config, log: d.Log, auth: d.Auth, router: d.Router, metrics: d.Metrics,
		chat: d.ChatLimit, chatShared: d.ChatShared, joins: limit.New(JoinsPerSecond, time.Second, max(JoinBurst, 2*d.Config.WS.MaxRoomsPerConn), nil), gifts: d.Gifts, roomOpen: d.RoomOpen, roomKnownClosed: d.RoomKnownClosed, rp: d.RedPackets, grab: d.Grab, roomOpsWait: d.RoomOpsWait, grabWaits: d.GrabWaits, elsewhere: d.SessionsElsewhere, stop: make(chan struct{}), writerq: make(chan *Conn), handshakes: newHandshakeGate()}
	if s.chatOnce = d.ChatOnce; s.chatOnce == nil {
		s.chatOnce = newMemChatOnce()
	}
	if n := d.Config.Limits.ChatPerSecond; n > 0 {
		s.chatPeeks = limit.New(chatPeekFactor*n, time.Second, chatPeekFactor*n, nil)
	}
	for i := range s.shards {
		s.shards[i].conns = map[uint64]*Conn{}
	}
	opt := gws.ServerOption{
		ReadMaxPayloadSize: d.Config.WS.MaxFrameHardBytes,
		CheckUtf8Enabled:   false, // bad text is answered with 10001, not a close
		HandshakeTimeout:   5 * time.Second,
		// One pointer per connection instead of gws's map and mutex.
		NewSession: func() gws.SessionStorage { return new(connSession) },
	}
	sub := opt
	s.up = gws.NewUpgrader(s, &opt)
	sub.SubProtocols = []string{WSSubprotocol} // the token's is never answered
	s.upSub = gws.NewUpgrader(s, &sub)
	return s
}

// notAnUpgrade says what r lacks of a WebSocket upgrade (RFC 6455 4.2.1,
// what gws checks), "" when nothing.
func notAnUpgrade(r *http.Request) string {
	switch {
	case r.Method != http.MethodGet:
		return "the method must be GET"
	case !headerHasToken(r.Header.Values("Connection"), "upgrade"):
		return `"Connection: Upgrade" missing`
	case !strings.EqualFold(r.Header.Get("Upgrade"), "websocket"):
		return `"Upgrade: websocket" missing`
	case r.Header.Get("Sec-WebSocket-Version") != "13":
		return "Sec-WebSocket-Version must be 13"
	case r.Header.Get("Sec-WebSocket-Key") == "":
		return "Sec-WebSocket-Key missing"
	}
	return ""
}

// headerHasToken reports whether the comma-separated header values hold
// token (case-insensitive).
func headerHasToken(values []string, token string) bool {
	for _, v := range values {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// Listen binds the WebSocket address and serves in the background.
func (s *Server) Listen() error {
	ln, err := net.Listen("tcp", s.cfg.WS.Addr)
	if err != nil {
		return err
	}
	s.ln = ln
	go s.accept(ln)
	s.sweeper.Add(1)
	go s.sweep()
	return nil
}

// Addr is the bound WebSocket address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// ServeHTTP authenticates and upgrades GET /ws.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/ws" {
		writeJSONError(w, http.StatusNotFound, proto.ErrNotFound)
		return
	}
	if s.draining.Load() {
		s.metrics.upgradesDenied.WithLabelValues("draining").Inc()
		writeJSONError(w, http.StatusServiceUnavailable, proto.Errorf(proto.CodeInternal, "node is shutting down"))
		return
	}
	q := r.URL.Query() // parsed once (a map and its strings per parse)
	// The token: an Authorization header (non-browser clients), else the
	// subprotocol that carries it (browsers: WSSubprotocol), else ?token=
	// (the first form; it ends up in access logs).
	offers := r.Header.Values("Sec-WebSocket-Protocol")
	offered, subTok := subprotocols(offers)
	tok := BearerToken(r.Header.Get("Authorization"))
	if tok == "" {
		tok = subTok
	}
	if tok == "" {
		tok = q.Get("token")
	}
	ident, err := s.auth.Verify(tok)
	if err != nil {
		s.metrics.upgradesDenied.WithLabelValues("auth").Inc()
		writeJSONError(w, http.StatusUnauthorized, proto.Errorf(proto.CodeUnauthenticated, "missing or bad token"))
		return
	}
	if !s.reserveConn() {
		s.metrics.upgradesDenied.WithLabelValues("full").Inc()
		writeJSONError(w, http.StatusServiceUnavailable, proto.Errorf(proto.CodeInternal, "node is full"))
		return
	}
	// The user's slots here: the bound less their sessions on the other
	// nodes (presence, ~200 ms behind; Redis not answering: this node's
	// bound alone).
	slots := s.cfg.WS.MaxConnsPerUser
	if s.elsewhere != nil {
		if n, known := s.elsewhere(ident.UserID); known {
			slots -= n
		}
	}
	if slots <= 0 || !s.users.reserve(ident.UserID, slots) {
		s.releaseConn()
		s.metrics.upgradesDenied.WithLabelValues("user_full").Inc()
		writeJSONError(w, http.StatusTooManyRequests, proto.Errorf(proto.CodeRateLimited,
			"too many connections for this user (at most %d)", s.cfg.WS.MaxConnsPerUser))
		return
	}
	// From here the slots are this connection's: OnClose gives them back,
	// or the failed upgrade below.
	upgraded := false
	defer func() {
		if !upgraded {
			s.users.release(ident.UserID)
			s.releaseConn()
		}
	}()
	if msg := notAnUpgrade(r); msg != "" {
		// Checked here, not left to gws: it answers in plain text, with
		// its own words, after the connection is hijacked. (After the
		// caps: a node or user at its bound answers that first.)
		s.metrics.upgradesDenied.WithLabelValues("bad_upgrade").Inc()
		writeJSONError(w, http.StatusBadRequest, proto.BadRequest("not a WebSocket upgrade: %s", msg))
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		writeJSONError(w, http.StatusInternalServerError, proto.ErrInternal)
		return
	}
	netConn, rw, err := hj.Hijack()
	if err != nil {
		return
	}
	if n := s.cfg.WS.SocketSendBuffer; n > 0 {
		if tc, ok := netConn.(*net.TCPConn); ok {
			_ = tc.SetWriteBuffer(n)
		}
	}
	cc := newCorkConn(netConn, s.cfg.WS.WriteTimeout.D())
	// The socket is read directly, not through net/http's hijacked reader,
	// by a wsReader whose goroutine exists only while the client sends
	// (then the socket waits in the node's epoll with no goroutine and no
	// buffer). Bytes net/http already buffered (a client that did not wait
	// for the 101) come first. gws is given no reader: its ReadLoop is not
	// used, only its handshake and writes.
	var early []byte
	if n := rw.Reader.Buffered(); n > 0 {
		early, _ = rw.Reader.Peek(n)
	}
	up := s.up
	if offered {
		up = s.upSub
		// gws reads the first header line only: lines merged, as HTTP
		// allows, so an offer on a later line is answered too.
		r.Header.Set("Sec-WebSocket-Protocol", strings.Join(offers, ", "))
	}
	// Likewise Connection (notAnUpgrade found "upgrade" on any line).
	r.Header.Set("Connection", strings.Join(r.Header.Values("Connection"), ", "))
	socket, err := up.UpgradeFromConn(cc, nil, r)
	if err != nil {
		// gws answered the handshake error and called cc.Close, which only
		// half-closes (the linger of a WebSocket close); no reader will
		// finish it, so close the socket here or it leaks.
		_ = netConn.Close()
		return
	}
	c := &Conn{
		id: s.nextID.Add(1), ident: ident, ws: socket, srv: s, cork: cc,
		batch: q.Get("batch") == "1",
		done:  make(chan struct{}),
		// The writer role is held until the connection is registered
		// (OnOpen, Attached): nothing is written before the hello, and the
		// hello not before the client is reachable.
		writing: true,
	}
	c.held.Store(true)
	c.rd = newWSReader(c, netConn, early)
	cc.kick, cc.framed = c.rd.kick, true
	c.lastRead.Store(time.Now().UnixNano())
	c.expires.Store(ident.Expires.UnixNano())
	socket.Session().Store("c", c)
	upgraded = true // the reader calls OnOpen, then OnClose, which releases
	go c.rd.run(true)
}

// reserveConn takes one of the node's ws.max_conns slots, or reports false
// when none is free. Exact under concurrency: a slot is taken by CAS, never
// by a check and a later increment.
func (s *Server) reserveConn() bool {
	limit := int64(s.cfg.WS.MaxConns)
	for {
		n := s.count.Load()
		if n >= limit {
			return false
		}
		if s.count.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (s *Server) releaseConn() { s.count.Add(-1) }

const userShards = 64

// userCounts counts connection slots per user, in shards keyed by user id.
// An entry exists only while its user holds a slot (deleted at zero), so the
// map is bounded by the connections, never by the users ever seen.
type userCounts struct {
	shards [userShards]struct {
		mu sync.Mutex
		n  map[int64]int
	}
}

// reserve takes one of user's limit slots, or reports false when all are
// taken (limit <= 0: no per-user limit).
func (u *userCounts) reserve(user int64, limit int) bool {
	sh := &u.shards[uint64(user)%userShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if limit > 0 && sh.n[user] >= limit {
		return false
	}
	if sh.n == nil {
		sh.n = map[int64]int{}
	}
	sh.n[user]++
	return true
}

// release gives back one slot of user.
func (u *userCounts) release(user int64) {
	sh := &u.shards[uint64(user)%userShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sh.n[user] <= 1 {
		delete(sh.n, user)
		return
	}
	sh.n[user]--
}

// size is the number of users holding a slot.
func (u *userCounts) size() int {
	n := 0
	for i := range u.shards {
		sh := &u.shards[i]
		sh.mu.Lock()
		n += len(sh.n)
		sh.mu.Unlock()
	}
	return n
}

func writeJSONError(w http.ResponseWriter, status int, e *proto.Error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	b, _ := proto.Marshal(map[string]any{"code": e.Code, "msg": e.Msg, "data": map[string]any{}})
	_, _ = w.Write(b)
}

func connOf(socket *gws.Conn) *Conn {
	v, _ := socket.Session().Load("c")
	c, _ := v.(*Conn)
	return c
}

func (s *Server) shardOf(id uint64) *struct {
	mu    sync.Mutex
	conns map[uint64]*Conn
} {
	return &s.shards[id%connShards]
}

// OnOpen implements gws.Event.
func (s *Server) OnOpen(socket *gws.Conn) {
	c := connOf(socket)
	sh := s.shardOf(c.id)
	sh.mu.Lock()
	sh.conns[c.id] = c
	sh.mu.Unlock()
	s.metrics.connections.Inc()
	// The hello is queued before the connection is registered with the
	// router: a push to this user (a credit, a gift received) that arrived
	// in between went out before the hello, and clients refuse a first frame
	// that is not one (seen as a TestSharedWalletTwoNodeProcesses flake).
	// And it is written only once the connection is registered: a client
	// that has its hello is reachable (a push sent to it meanwhile reached
	// nobody). The writer role is held since the upgrade: the hello and
	// whatever is queued behind it wait for the writer the router starts
	// (Attached) as soon as SendUser finds the connection, before it sends
	// the user's offline pushes — the writer drains the queue while they
	// are queued, as before.
	hb := s.cfg.WS.Heartbeat.D()
	c.reply(proto.EncodeHello(proto.Hello{
		UserID: c.ident.UserID, Node: s.cfg.Node.ID,
		HeartbeatS: max(1, int(hb/time.Second)), HeartbeatMS: hb.Milliseconds(),
		Batch: c.batch, SessionID: strconv.FormatUint(c.id, 10),
		ExpiresInMS: max(1, time.Until(time.Unix(0, c.expires.Load())).Milliseconds()),
	}))
	if s.draining.Load() {
		// Stopping: not made reachable. Registered, it would gather its
		// user's kept pushes into a connection Shutdown may not wait for
		// (upgraded after its snapshot), and hand them on while the
		// backends close — into memory lost at exit. They stay kept.
		c.Attached()
		c.Close(proto.CloseGoingAway, true)
		return
	}
	c.registered.Store(true)
	s.router.Register(c)
	c.Attached() // a router that did not tell it
	if s.draining.Load() {
		c.Close(proto.CloseGoingAway, true)
	}
}

// OnClose implements gws.Event.
func (s *Server) OnClose(socket *gws.Conn, err error) {
	c := connOf(socket)
	if c == nil {
		return
	}
	c.mu.Lock()
	if c.closeCode == 0 {
		c.closeCode = proto.CloseNormal // closed by the client or the network
	}
	c.closing.Store(true)
	c.dropQueue()
	c.mu.Unlock()
	unacked := c.stopAcks()
	if c.registered.Load() {
		s.router.Unregister(c)
	}
	if k, ok := s.router.(router.Keeper); ok && len(unacked) > 0 {
		// Sent again to the user's other sessions, or kept for the next
		// connect — before done: a graceful shutdown waits for done, then
		// closes NATS and Redis, which a cluster's Keep uses (bounded: at
		// most the offline box's size, one presence read, one pipeline).
		k.Keep(c.UserID(), unacked)
	}
	sh := s.shardOf(c.id)
	sh.mu.Lock()
	delete(sh.conns, c.id)
	sh.mu.Unlock()
	close(c.done)
	if ce := refusal(err); ce != nil && ce.Code == proto.CloseTooBig {
		s.metrics.closes.WithLabelValues("too_big").Inc()
	}
	c.cork.finish() // drain (bounded) and close the socket
	// The connection's slots are free only once its socket is closed, so
	// lingering sockets stay within ws.max_conns and ws.max_conns_per_user.
	s.users.release(c.ident.UserID)
	s.releaseConn()
	s.metrics.connections.Dec()
}

// OnPing implements gws.Event (WebSocket-level ping; pong through gws's lock,
// with a fresh write deadline from corkConn however long the socket was quiet).
func (s *Server) OnPing(socket *gws.Conn, payload []byte) {
	if c := connOf(socket); c != nil {
		c.lastRead.Store(time.Now().UnixNano())
	}
	_ = socket.WritePong(payload)
}

// OnPong implements gws.Event.
func (s *Server) OnPong(socket *gws.Conn, _ []byte) {
	if c := connOf(socket); c != nil {
		c.lastRead.Store(time.Now().UnixNano())
	}
}

// OnMessage implements gws.Event (not called: the connection's wsReader
// reads its frames and calls serveFrame).
func (s *Server) OnMessage(socket *gws.Conn, msg *gws.Message) {
	defer msg.Close()
	s.serveFrame(connOf(socket), msg.Opcode, msg.Bytes())
}

// serveFrame handles one client message, on the connection's reader
// goroutine, in order; data is valid during the call only. Behind a
// request served on the connection's lane it is queued there (lane.go).
func (s *Server) serveFrame(c *Conn, op gws.Opcode, data []byte) {
	c.lastRead.Store(time.Now().UnixNano())
	s.metrics.framesIn.Inc()
	if c.laneOn.Load() && op == gws.OpcodeText && isAckOrRefresh(data) {
		// An ack is of pushes already received and has no reply: served
		// at once, never behind a request waiting on Redis (the pushes
		// would be resent meanwhile, and owed ones waiting for acks held).
		// A refresh depends on nothing sent before it, and is judged by
		// the connection's token when served: held behind requests waiting
		// on Redis, one read before the token's end could be refused.
		s.serveMessage(c, op, data)
		return
	}
	if c.queueBehindLane(op, data) {
		return
	}
	s.serveMessage(c, op, data)
}

// The quoted names isAck and isAckOrRefresh look for before they decode.
var quotedAck, quotedRefresh = []byte(`"` + proto.TypeAck + `"`), []byte(`"` + proto.TypeRefresh + `"`)

// isAck reports whether data is an ack frame (decoded only if it holds
// "ack").
func isAck(data []byte) bool {
	return bytes.Contains(data, quotedAck) && frameTypeIn(data, proto.TypeAck)
}

// isAckOrRefresh reports whether data is an ack or a refresh frame (decoded
// only if it holds either name).
func isAckOrRefresh(data []byte) bool {
	return (bytes.Contains(data, quotedAck) || bytes.Contains(data, quotedRefresh)) &&
		frameTypeIn(data, proto.TypeAck, proto.TypeRefresh)
}

// frameTypeIn decodes data and reports whether it is a client frame of one
// of types.
func frameTypeIn(data []byte, types ...string) bool {
	f, perr := proto.DecodeClientFrame(data)
	return perr == nil && slices.Contains(types, f.T)
}

// serveMessage serves one client message, on the reader or the lane.
func (s *Server) serveMessage(c *Conn, op gws.Opcode, data []byte) {
	defer s.recoverFrame(c)
	if c.readAfterClose() {
		// Read after the node decided to close the connection (4501 at the
		// token's expiry, 4408, shutdown…), or while lingering after its
		// close frame: no request is served (its reply could not be queued)
		// — but an ack still is (it has no reply): the pushes a drain wrote
		// just before the close frame, acked by the client after it, are
		// not handed on as unacked.
		if op == gws.OpcodeText && isAck(data) {
			s.dispatch(c, data)
		}
		return
	}
	if op != gws.OpcodeText {
		c.badFrame(0, proto.ErrBinaryFrame)
		return
	}
	s.dispatch(c, data)
}

// refuseMessage answers a message refused whatever it held (queued behind
// a lane without its payload) as serveMessage would have.
func (s *Server) refuseMessage(c *Conn, e *proto.Error) {
	if !c.readAfterClose() {
		c.badFrame(0, e)
	}
}

// readAfterClose reports whether a message is served after the node decided
// to close c, or while it lingers after its close frame: no request is
// served then (its reply could not be queued), only acks.
func (c *Conn) readAfterClose() bool { return c.closing.Load() || c.cork.closing.Load() }

// recoverFrame turns a panic while serving one of c's frames (a bug) into
// c's close with 1011, logged with its stack: the node and its other
// connections go on (HTTP's handlers have the same recovery). What the
// handler left half done is c's alone; the close ends it.
func (s *Server) recoverFrame(c *Conn) {
	if r := recover(); r != nil {
		s.metrics.framePanics.Inc()
		s.log.Error("serving a frame panicked: connection closed 1011", "user", c.ident.UserID, "panic", r, "stack", string(debug.Stack()))
		c.Close(proto.CloseInternal, false)
	}
}

// sweepEvery is how often sweep looks at every connection: a quarter of the
// heartbeat, at most maxSweepEvery (so that a token expiry is noticed within
// it however long the heartbeat), at least 20 ms.
func sweepEvery(hb time.Duration) time.Duration {
	return min(max(hb/4, 20*time.Millisecond), maxSweepEvery)
}

const maxSweepEvery = time.Second

// sweep closes connections silent for 2 × heartbeat with 4402 and those whose
// token expired with 4501. One node-wide ticker looks at every connection
// (two loads and two compares each): no timer or goroutine per connection, at
// a cost of about 100k compares a second at 100k connections.
func (s *Server) sweep() {
	defer s.sweeper.Done()
	hb := s.cfg.WS.Heartbeat.D()
	t := time.NewTicker(sweepEvery(hb))
	defer t.Stop()
	var silent, expired []*Conn
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			limit := now.Add(-2 * hb).UnixNano()
			nowNS := now.UnixNano()
			silent, expired = silent[:0], expired[:0]
			for i := range s.shards {
				sh := &s.shards[i]
				sh.mu.Lock()
				for _, c := range sh.conns {
					switch {
					case c.expires.Load() <= nowNS:
						expired = append(expired, c)
					case !c.readHeld.Load() && c.lastRead.Load() < limit: // (held first: holdReads moves lastRead before it lets go)
						silent = append(silent, c)
					}
				}
				sh.mu.Unlock()
			}
			for _, c := range expired {
				if expireConn(c, nowNS) {
					c.Close(proto.CloseTokenExpired, true)
				}
			}
			for _, c := range silent {
				c.Close(proto.CloseHeartbeatTimeout, false)
			}
		}
	}
}

// expireConn marks c's token ended (expires 0, which no refresh moves on)
// unless a refresh gave it one that ends after now (unix ns) meanwhile.
func expireConn(c *Conn, now int64) bool {
	for {
		v := c.expires.Load()
		if v > now {
			return false
		}
		if v == 0 || c.expires.CompareAndSwap(v, 0) {
			return true
		}
	}
}

// Conns returns the number of open connections.
func (s *Server) Conns() int { return int(s.count.Load()) }

// Shutdown stops accepting, closes every connection with 1001 after draining
// its queue, and waits for them (until ctx ends, then cuts the rest).
func (s *Server) Shutdown(ctx context.Context) {
	s.draining.Store(true)
	if s.ln != nil {
		_ = s.ln.Close() // upgraded connections stay until closed below
	}
	all := s.snapshot()
	for _, c := range all {
		c.Close(proto.CloseGoingAway, true)
	}
	for _, c := range all {
		select {
		case <-c.done:
		case <-ctx.Done():
		}
	}
	for _, c := range s.snapshot() { // whatever did not drain in time
		c.cork.closeNow() // the socket itself, no lingering
	}
	for _, c := range all {
		select {
		case <-c.done:
		case <-time.After(time.Second):
		}
	}
	// Requests already accepted (gift debits) finish: their results are
	// durable before storage closes.
	waited := make(chan struct{})
	go func() { s.inflight.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-ctx.Done():
		<-waited // a debit in flight is never cut off half-way
	}
	close(s.stop)
	s.sweeper.Wait()
}

// maxIdleWriters bounds the parked writer goroutines (a few KiB of stack
// each); beyond it a writer whose connection is drained exits.
const maxIdleWriters = 128

// startWriter runs c.writeLoop on an idle writer goroutine, or on a new one.
func (s *Server) startWriter(c *Conn) {
	select {
	case s.writerq <- c:
	default:
		go s.writer(c)
	}
}

// writer drains one connection at a time: it serves c until c's queue is
// empty (exactly what a goroutine per writing connection would do, so a
// slow client still holds only its own writer), then parks for the next
// connection unless enough writers are parked already.
func (s *Server) writer(c *Conn) {
	for {
		c.writeLoop()
		if s.idleWriters.Add(1) > maxIdleWriters {
			s.idleWriters.Add(-1)
			return
		}
		select {
		case c = <-s.writerq:
			s.idleWriters.Add(-1)
		case <-s.stop:
			s.idleWriters.Add(-1)
			return
		}
	}
}

func (s *Server) snapshot() []*Conn {
	var out []*Conn
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, c := range sh.conns {
			out = append(out, c)
		}
		sh.mu.Unlock()
	}
	return out
}
