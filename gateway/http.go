package gateway

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudwego/hertz/pkg/app"
	"github.com/cloudwego/hertz/pkg/app/middlewares/server/recovery"
	"github.com/cloudwego/hertz/pkg/app/server"
	"github.com/cloudwego/hertz/pkg/common/adaptor"
	errs "github.com/cloudwego/hertz/pkg/common/errors"
	"github.com/cloudwego/hertz/pkg/common/hlog"
	"github.com/cloudwego/hertz/pkg/network/standard"
	"github.com/cloudwego/hertz/pkg/protocol/suite"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/edge/room"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// devTokenTTL is the lifetime of tokens minted by /api/v1/dev/token.
const devTokenTTL = 24 * time.Hour

// API is the Hertz HTTP side of a node (PROTOCOL.md §4).
type API struct {
	cfg     configs.Config
	log     *slog.Logger
	auth    *Auth
	node    *Node
	rooms   *room.Service
	metrics *metrics
	ready   func() *notReady
	// readyLog is the last not-ready cause logged by /readyz (readyz).
	readyLog struct {
		sync.Mutex
		dep string
		at  time.Time
	}
	// metricsToken is the SHA-256 of http.metrics_token (nil: none), for
	// a comparison in constant time whatever the length presented.
	metricsToken []byte
	// programReads bounds each user's GET /programs/{id} (a view of a big
	// program is a megabyte or more to send, and to gzip between nodes).
	programReads *limit.Keyed

	h  *server.Hertz
	ln net.Listener

	reqID atomic.Uint64
	// stopping: Shutdown began, requests still arriving are turned away;
	// handling counts the requests being handled (Shutdown waits for them
	// before the node closes what they use). Both under stopMu.
	stopMu   sync.Mutex
	stopping bool
	handling sync.WaitGroup
}

// Hertz logs at warn and above; its log of each connection it could not
// serve (a malformed request, with the client's bytes, at error level) is
// muted: a flood of bad requests must not flood the log. Those requests are
// counted (liveedge_http_refused_total) and logged at debug without their
// bytes (API.refused).
func init() {
	hlog.SetLevel(hlog.LevelWarn)
	hlog.SetSilentMode(true)
}

// refused counts a request Hertz could not read (it was answered with the
// envelope and its connection closed).
func (a *API) refused(reason string, remote net.Addr, err error) {
	a.metrics.httpRefused.WithLabelValues(reason).Inc()
	if a.log.Enabled(context.Background(), slog.LevelDebug) {
		a.log.Debug("http: request refused", "reason", reason, "remote", addrString(remote), "err_type", fmt.Sprintf("%T", err))
	}
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// ended logs, at debug, a connection Hertz stopped serving with an error
// other than a refusal (a reset, a write timeout): Hertz's own log of it is
// muted with the refusals'.
func (a *API) ended(remote net.Addr, err error) {
	if a.log.Enabled(context.Background(), slog.LevelDebug) {
		a.log.Debug("http: connection ended", "remote", addrString(remote), "err", err)
	}
}

func newAPI(n *Node, auth *Auth) *API {
	a := &API{cfg: n.Config, log: n.Log, auth: auth, node: n, rooms: n.Rooms, metrics: n.metrics, ready: n.ready,
		programReads: limit.New(ProgramReadsPerSecond, time.Second, ProgramReadBurst, nil)}
	if t := n.Config.HTTP.MetricsToken; t != "" {
		sum := sha256.Sum256([]byte(t))
		a.metricsToken = sum[:]
	}
	return a
}

// Listen binds the HTTP address and serves in the background.
func (a *API) Listen() error {
	ln, err := net.Listen("tcp", a.cfg.HTTP.Addr)
	if err != nil {
		return err
	}
	a.ln = newAPIListener(ln, a.cfg.HTTP.MaxConns, a.log)
	a.h = server.New(
		server.WithListener(a.ln),
		server.WithMaxRequestBodySize(a.cfg.HTTP.MaxBodyBytes),
		// Headers are read and buffered before any handler (the token
		// check included): bounded as the WebSocket upgrade's are.
		server.WithMaxHeaderBytes(a.cfg.HTTP.MaxHeaderBytes),
		// Bodies are streamed and read by limitBody, so that one over the
		// limit gets the JSON envelope (Hertz's own 413 is plain text);
		// multipart bodies are not pre-read (that would bypass the limit).
		server.WithStreamBody(true),
		server.WithDisablePreParseMultipartForm(true),
		server.WithHandleMethodNotAllowed(true),
		// A path that differs from a route by a trailing slash is an
		// unknown path (404 10004 in the envelope), not Hertz's redirect
		// (301/307 without the envelope, before any middleware).
		server.WithRedirectTrailingSlash(false),
		// The standard transport: its read timeout is a deadline for the
		// whole of each keep-alive request from its first bytes, and the
		// first request's is set at the accept (OnAccept; Hertz sets none
		// for it). Netpoll's bounds each read only, so a request trickled
		// in a byte every few seconds held its connection and buffers for as
		// long as the client liked (headers up to 1 MiB, a body up to
		// http.max_body_bytes, read before any handler runs). The API is not
		// on the hot path (WebSocket is).
		server.WithTransport(standard.NewTransporter),
		server.WithReadTimeout(a.cfg.HTTP.ReadTimeout.D()),
		server.WithOnAccept(func(conn net.Conn) context.Context {
			_ = conn.SetReadDeadline(time.Now().Add(a.cfg.HTTP.ReadTimeout.D()))
			return context.Background()
		}),
		server.WithWriteTimeout(httpWriteTimeout),
		server.WithIdleTimeout(60*time.Second),
		server.WithDisablePrintRoute(true),
		server.WithExitWaitTime(time.Second),
	)
	// Hertz's own answers to requests it cannot read, in the envelope
	// (httpproto.go).
	a.h.AddProtocol(suite.HTTP1, envelopeHTTP1{engine: a.h.Engine, maxBody: a.cfg.HTTP.MaxBodyBytes, maxHeader: a.cfg.HTTP.MaxHeaderBytes, refused: a.refused, ended: a.ended})
	a.routes()
	go func() {
		if err := a.h.Run(); err != nil {
			a.log.Error("http server", "err", err)
		}
	}()
	return nil
}

// Addr is the bound HTTP address.
func (a *API) Addr() string { return a.ln.Addr().String() }

// Shutdown stops the HTTP server. A request that still arrives on a
// kept-alive connection (the standard transport does not close idle ones)
// is answered "going away" with the connection closed: the node's backends
// are closing behind it.
func (a *API) Shutdown(ctx context.Context) {
	a.stopMu.Lock()
	a.stopping = true
	a.stopMu.Unlock()
	if a.h != nil {
		_ = a.h.Shutdown(ctx)
	}
}

// WaitHandlers waits, until ctx ends, for the requests still being handled
// (a webhook's credit, a forwarded order op, a ticket saga): the node closes
// the services, NATS, Redis and Pebble they use only after. Hertz's own
// shutdown waits a second for the connections to go idle, not for handlers.
func (a *API) WaitHandlers(ctx context.Context) bool {
	done := make(chan struct{})
	go func() {
		a.handling.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	}
}

// httpWriteTimeout bounds a request's handling and answer (limitBody).
const httpWriteTimeout = 10 * time.Second

func (a *API) routes() {
	h := a.h
	// A handler's panic is a bug: it is answered 50000 in the envelope and
	// logged with its stack, never a dropped connection (or, off netpoll's
	// recovering goroutine pool, a dead process).
	h.Use(recovery.Recovery(recovery.WithRecoveryHandler(func(_ context.Context, c *app.RequestContext, err any, stack []byte) {
		a.fail(c, fmt.Errorf("panic: %v\n%s", err, stack))
	})))
	h.Use(a.limitBody)
	h.NoRoute(func(_ context.Context, c *app.RequestContext) {
		a.fail(c, proto.Errorf(proto.CodeNotFound, "no such endpoint"))
	})
	h.NoMethod(func(_ context.Context, c *app.RequestContext) {
		envelope(c, http.StatusMethodNotAllowed, proto.BadRequest("method %s not allowed here", truncate(string(c.Method()), 16)))
	})
	h.GET("/healthz", func(_ context.Context, c *app.RequestContext) { c.String(200, "ok") })
	h.GET("/readyz", a.readyz)
	h.GET("/metrics", a.metricsAuth, adaptor.HertzHandler(promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{})))
	if a.cfg.HTTP.Demo {
		a.demoRoutes()
	}

	v1 := h.Group("/api/v1")
	if a.cfg.Auth.DevTokens {
		v1.POST("/dev/token", a.devToken)
		v1.POST("/dev/credit", a.devCredit)
	}
	v1.GET("/gifts", a.listGifts)
	v1.GET("/pay/products", a.listProducts)
	v1.POST("/pay/notify/:channel", a.payNotify)
	authed := v1.Group("", a.authenticate)
	authed.GET("/wallet", a.wallet)
	authed.GET("/wallet/trades", a.trades)
	authed.POST("/admin/gifts", a.createGift)
	authed.PUT("/admin/gifts/:id", a.updateGift)
	authed.POST("/pay/orders", a.createOrder)
	authed.GET("/pay/orders/:id", a.getOrder)
	authed.POST("/admin/pay/orders/:id/refund", a.refundOrder)
	a.ticketRoutes(authed)
	authed.POST("/pk", a.startPK)
	authed.GET("/pk/:id", a.getPK)
	authed.POST("/pk/:id/accept", a.acceptPK)
	authed.POST("/pk/:id/decline", a.declinePK)
	authed.GET("/admin/users/:id/status", a.userStatus)
	authed.PUT("/admin/users/:id/status", a.setUserStatus)
	authed.GET("/rooms", a.listRooms)
	authed.GET("/rooms/:id", a.getRoom)
	authed.POST("/rooms", a.openRoom)
	authed.DELETE("/rooms/:id", a.closeRoom)
	a.redPacketRoutes(authed)
}

// readyz answers 200 "ready", or 503 with the envelope: 50000, "not ready:
// <reason>" and data {"ready":false,"dependency":<dep>} — fixed words
// naming what is missing (load balancers and anyone else may call it). The
// details behind it (a Redis or NATS error with its address, the store's
// failure) are logged, once per cause and at most every readyLogEvery, not
// answered.
func (a *API) readyz(_ context.Context, c *app.RequestContext) {
	nr := a.ready()
	a.logReadiness(nr)
	if nr == nil {
		c.String(200, "ready")
		return
	}
	type notReadyData struct {
		Ready      bool   `json:"ready"`
		Dependency string `json:"dependency"`
	}
	b, _ := proto.Marshal(struct {
		Code int          `json:"code"`
		Msg  string       `json:"msg"`
		Data notReadyData `json:"data"`
	}{Code: proto.CodeInternal, Msg: "not ready: " + nr.Reason, Data: notReadyData{Dependency: nr.Dep}})
	c.Data(503, "application/json", b)
}

// readyLogEvery bounds how often /readyz logs the same not-ready cause (a
// load balancer polls it every few seconds).
const readyLogEvery = 30 * time.Second

func (a *API) logReadiness(nr *notReady) {
	l := &a.readyLog
	l.Lock()
	defer l.Unlock()
	if nr == nil {
		l.dep = ""
		return
	}
	if nr.Dep == l.dep && time.Since(l.at) < readyLogEvery {
		return
	}
	l.dep, l.at = nr.Dep, time.Now()
	a.log.Warn("not ready", "dependency", nr.Dep, "reason", nr.Reason, "err", nr.Err)
}

// okRaw writes the success envelope around d, JSON already encoded (ours:
// a reply built here or by another node), without encoding it again.
func okRaw(c *app.RequestContext, d []byte) {
	if len(d) == 0 {
		d = []byte("null")
	}
	const head, tail = `{"code":0,"msg":"ok","data":`, `}`
	b := make([]byte, 0, len(head)+len(d)+len(tail))
	b = append(append(append(b, head...), d...), tail...)
	c.Data(200, "application/json", b)
}

// ok writes the success envelope.
func ok(c *app.RequestContext, data any) {
	if data == nil {
		data = struct{}{}
	}
	b, err := proto.Marshal(data)
	if err != nil {
		c.Data(500, "application/json", []byte(`{"code":50000,"msg":"internal error","data":{}}`))
		return
	}
	okRaw(c, b)
}

// fail writes the error envelope; non-*proto.Error errors are logged with a
// request id and answered 50000 without details.
func (a *API) fail(c *app.RequestContext, err error) {
	e := wireError(err)
	switch {
	case e == proto.ErrInternal: // not one of ours with a message of its own (retry hints stay)
		id := a.reqID.Add(1)
		a.log.Error("http request failed", "req_id", id, "path", string(c.Path()), "err", err)
		e = &proto.Error{Code: proto.CodeInternal, Msg: "internal error (request " + strconv.FormatUint(id, 10) + ")"}
	}
	envelope(c, proto.HTTPStatus(e.Code), e)
}

// wireError is the code an error is answered with: the wallet's errors
// mapped to theirs (also before an error crosses to another node, where only
// its code and message survive), anything else as proto.AsError.
func wireError(err error) *proto.Error {
	switch {
	case errors.Is(err, persist.ErrInsufficient):
		return &proto.Error{Code: proto.CodeInsufficientBalance, Msg: "insufficient balance"}
	case errors.Is(err, persist.ErrBalanceLimit):
		return &proto.Error{Code: proto.CodeBadRequest, Msg: balanceLimitMsg}
	case errors.Is(err, persist.ErrWalletUnavailable):
		return &proto.Error{Code: proto.CodeInternal, Msg: walletUnavailableMsg}
	case errors.Is(err, persist.ErrInProgress):
		return &proto.Error{Code: proto.CodeConflict, Msg: "a request with this req_id is still being processed; retry with the same req_id"}
	}
	return proto.AsError(err)
}

// balanceLimitMsg answers an op refused by persist.ErrBalanceLimit (nothing
// moved): an amount out of range for the balance it goes to.
const balanceLimitMsg = "amount out of range: a balance would exceed its maximum"

const walletUnavailableMsg = "wallet temporarily unavailable, nothing moved; retry with the same req_id"

// envelope writes the error envelope {"code":C,"msg":"...","data":{}} with
// status.
func envelope(c *app.RequestContext, status int, e *proto.Error) {
	c.Data(status, "application/json", envelopeBytes(e))
}

// envelopeBytes is the error envelope of e.
func envelopeBytes(e *proto.Error) []byte {
	b, _ := proto.Marshal(struct {
		Code int      `json:"code"`
		Msg  string   `json:"msg"`
		Data struct{} `json:"data"`
	}{Code: e.Code, Msg: e.Msg})
	return b
}

// limitBody reads the request body (streamed by the server) into memory, at
// most http.max_body_bytes; a larger one is answered 413 in the envelope and
// the connection is closed (the rest of the body is never read).
func (a *API) limitBody(ctx context.Context, c *app.RequestContext) {
	a.stopMu.Lock()
	if a.stopping {
		a.stopMu.Unlock()
		c.SetConnectionClose()
		envelope(c, http.StatusServiceUnavailable, proto.Errorf(proto.CodeInternal, "node shutting down; retry on another node"))
		c.Abort()
		return
	}
	a.handling.Add(1)
	a.stopMu.Unlock()
	defer a.handling.Done()
	// The answer within WriteTimeout of the request's start (the standard
	// transport sets no write deadline): a client that stops reading a
	// large answer does not hold its handler for ever.
	_ = c.GetConn().SetWriteDeadline(time.Now().Add(httpWriteTimeout))
	limit := a.cfg.HTTP.MaxBodyBytes
	tooLarge := func() {
		c.SetConnectionClose()
		envelope(c, http.StatusRequestEntityTooLarge, proto.BadRequest("body larger than %d bytes", limit))
		c.Abort()
	}
	if c.Request.Header.ContentLength() > limit {
		tooLarge()
		return
	}
	if c.Request.IsBodyStream() {
		body, err := io.ReadAll(io.LimitReader(c.Request.BodyStream(), int64(limit)+1))
		if err != nil {
			c.SetConnectionClose()
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, errs.ErrTimeout) {
				// (a chunked body's read loses the net.Error in Hertz)
				// Not read whole within http.read_timeout: 408, as documented.
				envelope(c, http.StatusRequestTimeout, proto.BadRequest("the request was not read within %s", a.cfg.HTTP.ReadTimeout.D()))
			} else {
				envelope(c, http.StatusBadRequest, proto.BadRequest("could not read the body"))
			}
			c.Abort()
			return
		}
		if len(body) > limit {
			tooLarge()
			return
		}
		c.Request.SetBody(body)
	}
	c.Next(ctx)
	// A request Hertz read but cannot route — HTTP/1.1 without a Host
	// header, a target that is no path — it answers 400 itself after the
	// middlewares (route.serveError), in plain text unless they wrote a
	// body.
	if c.Response.StatusCode() == http.StatusBadRequest && len(c.Response.Body()) == 0 && !c.Response.IsBodyStream() {
		envelope(c, http.StatusBadRequest, proto.BadRequest("malformed request: no Host header, or a target that is not a path"))
	}
}

// bind decodes the JSON body into v.
func bind(c *app.RequestContext, v any) error {
	body := c.Request.Body()
	if len(body) == 0 {
		return proto.BadRequest("empty body")
	}
	if err := proto.Unmarshal(body, v); err != nil {
		return proto.BadRequest("bad JSON body")
	}
	return nil
}

const identKey = "liveedge.ident"

func (a *API) authenticate(ctx context.Context, c *app.RequestContext) {
	tok := BearerToken(string(c.GetHeader("Authorization")))
	ident, err := a.auth.Verify(tok)
	if err != nil {
		a.fail(c, proto.Errorf(proto.CodeUnauthenticated, "missing or bad token"))
		c.Abort()
		return
	}
	c.Set(identKey, ident)
	c.Next(ctx)
}

// metricsAuth guards /metrics outside development (auth.dev_tokens off):
// its counts (rooms, connections, error rates) are the node's internals,
// for its operators only. It takes http.metrics_token (what a Prometheus
// scraper sends as its bearer token) or an admin's JWT; anything else is
// 401 10002 (no or a bad token) or 403 10003 (a token of another role).
// With dev tokens on (make run, the tests, the load tools) it is open: such
// a node mints admin tokens for anyone anyway.
func (a *API) metricsAuth(ctx context.Context, c *app.RequestContext) {
	if a.cfg.Auth.DevTokens {
		c.Next(ctx)
		return
	}
	tok := BearerToken(string(c.GetHeader("Authorization")))
	if a.metricsToken != nil && tok != "" {
		sum := sha256.Sum256([]byte(tok))
		if subtle.ConstantTimeCompare(sum[:], a.metricsToken) == 1 {
			c.Next(ctx)
			return
		}
	}
	ident, err := a.auth.Verify(tok)
	switch {
	case err != nil:
		a.fail(c, proto.Errorf(proto.CodeUnauthenticated, "missing or bad token (an admin token or http.metrics_token)"))
		c.Abort()
	case ident.Role != RoleAdmin:
		a.fail(c, proto.Errorf(proto.CodeForbidden, "metrics are for admins"))
		c.Abort()
	default:
		c.Next(ctx)
	}
}

func identOf(c *app.RequestContext) Identity {
	v, _ := c.Get(identKey)
	id, _ := v.(Identity)
	return id
}

type devTokenReq struct {
	UserID int64  `json:"user_id"`
	Role   string `json:"role"`
}

func (a *API) devToken(_ context.Context, c *app.RequestContext) {
	var r devTokenReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	if r.Role == "" {
		r.Role = RoleViewer
	}
	if r.UserID <= 0 || !ValidRole(r.Role) {
		a.fail(c, proto.BadRequest("user_id must be > 0 and role one of viewer, anchor, admin"))
		return
	}
	ttl := devTokenTTL
	if m := a.cfg.Auth.MaxTokenTTL.D(); m > 0 {
		ttl = min(ttl, m) // a token this node would refuse is no token (auth.max_token_ttl)
	}
	tok, err := a.auth.Issue(r.UserID, r.Role, ttl)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]string{"token": tok})
}

func pathID(c *app.RequestContext) (int64, error) {
	id, err := strconv.ParseInt(c.Param("id"), 10, 64)
	if err != nil || id <= 0 {
		return 0, proto.BadRequest("bad id")
	}
	return id, nil
}

func queryInt(c *app.RequestContext, name string, def int) (int, error) {
	s := string(c.Query(name))
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, proto.BadRequest("bad %s", name)
	}
	return n, nil
}

func (a *API) listRooms(_ context.Context, c *app.RequestContext) {
	typ, err := queryInt(c, "type", -1)
	if err != nil {
		a.fail(c, err)
		return
	}
	page, err := queryInt(c, "page", 1)
	if err != nil {
		a.fail(c, err)
		return
	}
	size, err := queryInt(c, "page_size", 20)
	if err != nil {
		a.fail(c, err)
		return
	}
	rooms, total, err := a.rooms.List(typ, page, size, identOf(c).UserID)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]any{"rooms": rooms, "total": total, "page": page, "page_size": size,
		"has_more": page*size < total})
}

func (a *API) getRoom(_ context.Context, c *app.RequestContext) {
	id, err := pathID(c)
	if err != nil {
		a.fail(c, err)
		return
	}
	info, err := a.rooms.Get(id, identOf(c).UserID)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, info)
}

type openRoomReq struct {
	Type int `json:"type"`
}

func (a *API) openRoom(_ context.Context, c *app.RequestContext) {
	ident := identOf(c)
	if ident.Role != RoleAnchor {
		a.fail(c, proto.Errorf(proto.CodeForbidden, "only anchors open rooms"))
		return
	}
	var r openRoomReq
	if len(c.Request.Body()) > 0 {
		if err := bind(c, &r); err != nil {
			a.fail(c, err)
			return
		}
	}
	rm, err := a.rooms.Open(ident.UserID, r.Type)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]any{"room_id": rm.ID, "type": rm.Type, "anchor_id": rm.AnchorID})
}

func (a *API) closeRoom(_ context.Context, c *app.RequestContext) {
	id, err := pathID(c)
	if err != nil {
		a.fail(c, err)
		return
	}
	ident := identOf(c)
	closeRoom := func() error { return a.rooms.Close(ident.UserID, id) }
	if ident.Role == RoleAdmin {
		closeRoom = func() error { return a.rooms.CloseByAdmin(id) }
	}
	if err := closeRoom(); err != nil {
		a.fail(c, err)
		return
	}
	if a.node.PK != nil {
		a.node.PK.EndRoom(id) // its contest ends with it
	}
	ok(c, map[string]any{"room_id": id, "status": room.StatusClosed})
}
