package gateway

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

const connShards = 16

// Server is the WebSocket side of a node: upgrades, per-connection reader and
// writer, heartbeat sweeping and frame dispatch. It implements gws.Event.
type Server struct {
	cfg      configs.Config
	log      *slog.Logger
	auth     *Auth
	router   router.Router
	metrics  *metrics
	chat     *limit.Keyed
	gifts    *gift.Service
	inflight sync.WaitGroup // async requests (gifts) still running

	up      *gws.Upgrader
	httpSrv *http.Server
	ln      net.Listener

	nextID   atomic.Uint64
	count    atomic.Int64
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
	Gifts     *gift.Service
}

func newServer(d ServerDeps) *Server {
	s := &Server{cfg: d.Config, log: d.Log, auth: d.Auth, router: d.Router, metrics: d.Metrics,
		chat: d.ChatLimit, gifts: d.Gifts, stop: make(chan struct{}), writerq: make(chan *Conn)}
	for i := range s.shards {
		s.shards[i].conns = map[uint64]*Conn{}
	}
	s.up = gws.NewUpgrader(s, &gws.ServerOption{
		ReadMaxPayloadSize: d.Config.WS.MaxFrameHardBytes,
		CheckUtf8Enabled:   false, // bad text is answered with 10001, not a close
		HandshakeTimeout:   5 * time.Second,
	})
	return s
}

// Listen binds the WebSocket address and serves in the background.
func (s *Server) Listen() error {
	ln, err := net.Listen("tcp", s.cfg.WS.Addr)
	if err != nil {
		return err
	}
	s.ln = ln
	s.httpSrv = &http.Server{Handler: s, ReadHeaderTimeout: 5 * time.Second, MaxHeaderBytes: 16 << 10,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
	go func() { _ = s.httpSrv.Serve(ln) }()
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
	tok := BearerToken(r.Header.Get("Authorization"))
	if tok == "" {
		tok = r.URL.Query().Get("token")
	}
	ident, err := s.auth.Verify(tok)
	if err != nil {
		s.metrics.upgradesDenied.WithLabelValues("auth").Inc()
		writeJSONError(w, http.StatusUnauthorized, proto.Errorf(proto.CodeUnauthenticated, "missing or bad token"))
		return
	}
	if s.count.Load() >= int64(s.cfg.WS.MaxConns) {
		s.metrics.upgradesDenied.WithLabelValues("full").Inc()
		writeJSONError(w, http.StatusServiceUnavailable, proto.Errorf(proto.CodeInternal, "node is full"))
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
	cc := &corkConn{Conn: netConn, timeout: s.cfg.WS.WriteTimeout.D()}
	// Read the socket directly, not through net/http's hijacked reader (a
	// lock and a condition broadcast per read); bytes it already buffered
	// (a client that did not wait for the 101) come first.
	var src io.Reader = netConn
	if n := rw.Reader.Buffered(); n > 0 {
		early, _ := rw.Reader.Peek(n)
		src = io.MultiReader(bytes.NewReader(bytes.Clone(early)), netConn)
	}
	socket, err := s.up.UpgradeFromConn(cc, bufio.NewReaderSize(src, 4096), r)
	if err != nil {
		return // gws answered the handshake error and closed the connection
	}
	c := &Conn{
		id: s.nextID.Add(1), ident: ident, ws: socket, srv: s, cork: cc,
		batch:   r.URL.Query().Get("batch") == "1",
		pending: map[string]*pendingPush{},
		done:    make(chan struct{}),
		sem:     make(chan struct{}, s.cfg.Gifts.MaxInflight),
	}
	c.lastRead.Store(time.Now().UnixNano())
	socket.Session().Store("c", c)
	go socket.ReadLoop()
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
	s.count.Add(1)
	s.metrics.connections.Inc()
	s.router.Register(c)
	hb := s.cfg.WS.Heartbeat.D()
	c.reply(proto.EncodeHello(proto.Hello{
		UserID: c.ident.UserID, Node: s.cfg.Node.ID,
		HeartbeatS: max(1, int(hb/time.Second)), HeartbeatMS: hb.Milliseconds(),
		Batch: c.batch, SessionID: strconv.FormatUint(c.id, 10),
	}))
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
	c.queue, c.queued = nil, 0
	c.mu.Unlock()
	c.stopAcks()
	s.router.Unregister(c)
	sh := s.shardOf(c.id)
	sh.mu.Lock()
	delete(sh.conns, c.id)
	sh.mu.Unlock()
	s.count.Add(-1)
	s.metrics.connections.Dec()
	close(c.done)
	var ce *gws.CloseError
	if errors.As(err, &ce) && ce.Code == proto.CloseTooBig {
		s.metrics.closes.WithLabelValues("too_big").Inc()
	}
	c.cork.finish() // drain (bounded) and close the socket
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

// OnMessage implements gws.Event: every client frame is handled here, on the
// connection's reader goroutine, in order.
func (s *Server) OnMessage(socket *gws.Conn, msg *gws.Message) {
	defer msg.Close()
	c := connOf(socket)
	c.lastRead.Store(time.Now().UnixNano())
	s.metrics.framesIn.Inc()
	if c.cork.closing.Load() {
		return // read while lingering after the close frame: not served
	}
	if msg.Opcode != gws.OpcodeText {
		c.badFrame(0, proto.ErrBinaryFrame)
		return
	}
	s.dispatch(c, msg.Bytes())
}

// sweep closes connections silent for 2 × heartbeat with 4402.
func (s *Server) sweep() {
	defer s.sweeper.Done()
	hb := s.cfg.WS.Heartbeat.D()
	t := time.NewTicker(max(hb/4, 20*time.Millisecond))
	defer t.Stop()
	var silent []*Conn
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			limit := now.Add(-2 * hb).UnixNano()
			silent = silent[:0]
			for i := range s.shards {
				sh := &s.shards[i]
				sh.mu.Lock()
				for _, c := range sh.conns {
					if c.lastRead.Load() < limit {
						silent = append(silent, c)
					}
				}
				sh.mu.Unlock()
			}
			for _, c := range silent {
				c.Close(proto.CloseHeartbeatTimeout, false)
			}
		}
	}
}

// Conns returns the number of open connections.
func (s *Server) Conns() int { return int(s.count.Load()) }

// Shutdown stops accepting, closes every connection with 1001 after draining
// its queue, and waits for them (until ctx ends, then cuts the rest).
func (s *Server) Shutdown(ctx context.Context) {
	s.draining.Store(true)
	if s.httpSrv != nil {
		_ = s.httpSrv.Close() // listener only: upgraded connections are hijacked
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
		_ = c.cork.Conn.Close() // the socket itself, no lingering
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
