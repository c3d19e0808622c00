package clientsdk

import (
	"context"
	crand "crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Client is a self-reconnecting LiveEdge WebSocket client. Create it with
// Dial; it is safe for concurrent use.
type Client struct {
	cfg Config
	log *slog.Logger

	ctx    context.Context // canceled when the client stops (Close or terminal)
	cancel context.CancelFunc

	nextID atomic.Int64
	dedup  *dedup

	mu      sync.Mutex
	sess    *session           // the ready session; nil while (re)connecting
	readyCh chan struct{}      // closed iff sess != nil
	rooms   map[int64]*roomPos // the joined rooms and the last position seen in each
	// joining are rooms whose join is in flight: a push of the room may
	// come before the join's reply, and its position is kept here (else the
	// reply's older position made the next push look like a gap).
	joining map[int64]*roomPos
	// joinsPending counts the Joins of each room waiting for their reply
	// (joining is dropped when the last ends); undoing holds a room's new
	// Joins until the leave of one that timed out is written (undoJoin).
	joinsPending map[int64]int
	undoing      map[int64]chan struct{}
	// left are the rooms Leave left on this connection (not joined since):
	// a push of one, fanned out before the leave took effect, is dropped.
	// Rooms joined with a raw Request are neither here nor in rooms: their
	// pushes pass. At most maxLeft; cleared at each (re)connect.
	left    map[int64]struct{}
	urlIdx  int       // index in cfg.urls of the current (or last) connection
	upSince time.Time // when the current (or last) connection became active
	// shortLived counts the connections in a row that ended within
	// stableAfter of becoming active: their reconnects start further up the
	// backoff (reconnect), so a connection closed again at once (4408, 4402,
	// a draining node) does not reconnect ten times a second.
	shortLived int
	hello      proto.Hello
	lastCode   int
	lastReason string
	stopErr    error // why the client stopped (nil: Close)
	stopped    bool

	// events: reader/run loop → dispatcher; closed by the run loop. Of
	// pointers: a queue of EventBuffer events by value (some 110 KiB) was
	// most of an idle client's memory.
	events chan *event
	// undelivered are the reliable pushes queued for OnPush and not yet
	// handed to it (at most the queue's size): acked only once delivered,
	// and a resend of one meanwhile is neither queued again nor acked.
	undelivered map[string]struct{} // under mu

	// acks are the reliable pushes OnPush has returned from, not acked yet
	// (gathered while more events wait), the oldest delivered at ackSince.
	ackMu    sync.Mutex
	acks     []heldAck
	ackSince time.Time
	// flushing holds a token while held acks are sent: a close waits for
	// a flush under way, but no longer than its own context.
	flushing chan struct{}

	cbMu         sync.Mutex
	cbRunning    bool
	cbStopped    bool
	cbDrain      bool // Close waits: the queued state events are still delivered
	dispatchDone chan struct{}

	wg sync.WaitGroup // every goroutine but the dispatcher

	stats struct {
		reconnects, pushes, delivered, dups, offDups, notJoined, acks, requests atomic.Int64
	}
}

// roomPos is the last position seen in a joined room: the off/ep of the last
// room push that passed the offset guard, or of the join reply when newer.
// Guarded by Client.mu.
type roomPos struct {
	off   int64
	ep    string
	known bool // the server gave a position (a join reply with "ep", even "", or a numbered push)
}

// merge moves the position to (off, ep) when that is newer: a later offset
// in the same epoch, or any position in another epoch (numbering restarted).
func (p *roomPos) merge(off int64, ep string) {
	if !p.known || ep != p.ep || off > p.off {
		p.off, p.ep, p.known = off, ep, true
	}
}

// since is the position to send in a re-join; nil when the server never
// gave one (a server that does not number room pushes). A room joined before
// its first push has the position {0, ""}: it is sent too, so that pushes
// missed meanwhile are replayed or reported (StateRoomResync), never lost
// silently.
func (p *roomPos) since() *proto.Position {
	if !p.known {
		return nil
	}
	return &proto.Position{Off: p.off, Ep: p.ep}
}

// joinReply is the d of a join reply (PROTOCOL.md §3).
type joinReply struct {
	RoomID    int64   `json:"room_id"`
	Online    int     `json:"online"`
	Off       int64   `json:"off"`
	Ep        *string `json:"ep"`        // nil: a server that does not number room pushes
	Recovered *bool   `json:"recovered"` // only in the reply to a join with since
}

func (r *joinReply) ep() string {
	if r.Ep == nil {
		return ""
	}
	return *r.Ep
}

// startIndex picks the URL Dial tries first (random; tests replace it).
var startIndex = func(n int) int { return rand.IntN(n) }

// reconnectOffset picks how far after the URL of the connection that ended a
// reconnect starts, among the n URLs (n > 1: random in [1, n-1], another
// URL: the clients of a node that died or is draining spread over the others,
// rather than all move to the next one; tests replace it).
var reconnectOffset = func(n int) int { return 1 + rand.IntN(n-1) }

type event struct {
	push  Push
	ack   bool     // push is reliable: ack it once OnPush returned
	from  *session // the connection push came on (its ack goes there)
	state *StateEvent
}

// heldAck is a delivered reliable push to ack and the connection it came on.
type heldAck struct {
	mid  string
	from *session
}

// Dial connects to one of cfg's URLs and waits for the server's hello,
// bounded by ctx and, per attempt, cfg.RequestTimeout. It tries each URL once,
// in list order starting at a random one (URL with PreferURL), until one connects; the error
// joins those of every attempt. An HTTP 401 yields an error wrapping
// ErrUnauthorized — at once with a static Token (the same for every node);
// with a TokenFunc once every URL refused the tokens it gave. Once Dial
// has returned, the client keeps itself connected until Close or a terminal
// close code.
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	c := &Client{
		cfg:          cfg,
		log:          cfg.Logger,
		dedup:        newDedup(cfg.DedupWindow),
		readyCh:      make(chan struct{}),
		rooms:        make(map[int64]*roomPos),
		events:       make(chan *event, cfg.EventBuffer),
		undelivered:  map[string]struct{}{},
		dispatchDone: make(chan struct{}),
		flushing:     make(chan struct{}, 1),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	go c.dispatch()

	s, err := c.dialAny(ctx)
	if err != nil {
		c.cancel()
		c.wg.Wait()
		close(c.events)
		<-c.dispatchDone
		return nil, err
	}
	c.wg.Add(1)
	go c.run(s)
	return c, nil
}

// dialAny makes Dial's attempts: each URL once, from a random one (the
// first with PreferURL). An HTTP 401 ends them at once with a static Token;
// with a TokenFunc the next URL is tried with a new token (TokenExpired).
func (c *Client) dialAny(ctx context.Context) (*session, error) {
	n := len(c.cfg.urls)
	start := 0
	if !c.cfg.PreferURL {
		start = startIndex(n)
	}
	var errs []error
	reason := TokenConnect
	for k := range n {
		i := (start + k) % n
		s, err := c.connect(ctx, i, reason)
		if err == nil {
			if err = c.activate(s, 0, i); err == nil {
				return s, nil
			}
			s.closeWith(proto.CloseNormal, nil)
			<-s.done
			s.endWrites()
		}
		errs = append(errs, err)
		c.log.Info("clientsdk: connect failed", "url", c.cfg.redactedURL(i), "err", err)
		var ce *CloseError
		if (errors.Is(err, ErrUnauthorized) && c.cfg.TokenFunc == nil) || ctx.Err() != nil ||
			(errors.As(err, &ce) && !c.reconnectable(ce.Code)) {
			break
		}
		// A token refused (401) or ended (4501): the next URL is tried with
		// a new one (TokenExpired); after another failure, as a connect
		// (as the TypeScript SDK does) — but TokenFunc's own failure leaves
		// the reason as it was (TS: "connect" then).
		switch {
		case errors.Is(err, ErrUnauthorized) || (errors.As(err, &ce) && ce.Code == proto.CloseTokenExpired):
			reason = TokenExpired
		case !errors.Is(err, errTokenFunc):
			reason = TokenConnect
		}
	}
	if len(errs) == 1 {
		return nil, errs[0]
	}
	return nil, errors.Join(errs...)
}

// Close closes the connection with 1000, stops reconnecting, fails pending
// requests with ErrClosed and waits for the client's goroutines (see the
// package documentation for callbacks). It is idempotent and always returns nil.
func (c *Client) Close() error {
	c.stop(nil)
	c.wg.Wait()
	c.cbMu.Lock()
	running := c.cbRunning
	switch {
	case running:
		// A callback runs — this Close may be its own, so it is not waited
		// for — and nothing queued behind it is delivered (no callback
		// starts after any Close has returned), also if a Close before
		// this one is draining.
		c.cbDrain = false
	case !c.cbStopped:
		// No callback runs: the state events queued by the end of the
		// connection (StateDisconnected, StateClosed) are delivered before
		// Close returns — before, StateClosed was dropped whenever the
		// dispatcher had not reached it yet.
		c.cbDrain = true
	}
	c.cbStopped = true
	c.cbMu.Unlock()
	if !running {
		<-c.dispatchDone
	}
	return nil
}

// Closed is closed when the client has stopped: after Close, or after a
// terminal close code (then see LastClose and Err).
func (c *Client) Closed() <-chan struct{} { return c.ctx.Done() }

// Err is nil while the client runs or after Close; after a terminal stop it
// is the cause: a *CloseError (code >= 4500) or ErrUnauthorized.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopErr
}

// Hello returns the d of the last hello received.
func (c *Client) Hello() proto.Hello {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hello
}

// LastClose returns the close code and reason of the last connection that
// ended (0, "" if none has). 1006 means the connection broke without a close
// frame.
func (c *Client) LastClose() (code int, reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastCode, c.lastReason
}

// Rooms returns the joined rooms (the set re-joined after a reconnect), sorted.
func (c *Client) Rooms() []int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.roomsLocked()
}

func (c *Client) roomsLocked() []int64 {
	rs := make([]int64, 0, len(c.rooms))
	for r := range c.rooms {
		rs = append(rs, r)
	}
	slices.Sort(rs)
	return rs
}

// RoomPosition returns the last position seen in a joined room: the off and
// ep of the last room push delivered (or de-duplicated by mid), or those of
// the join reply when newer. It is what a re-join after a reconnect sends as
// since. ok is false when the room is not joined.
func (c *Client) RoomPosition(roomID int64) (pos proto.Position, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.rooms[roomID]
	if p == nil {
		return proto.Position{}, false
	}
	return proto.Position{Off: p.off, Ep: p.ep}, true
}

// URL returns the node URL (without its query) of the current connection, or
// of the last one while reconnecting.
func (c *Client) URL() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cfg.redactedURL(c.urlIdx)
}

// Stats returns a snapshot of the counters.
func (c *Client) Stats() Stats {
	return Stats{
		Reconnects:       c.stats.reconnects.Load(),
		PushesReceived:   c.stats.pushes.Load(),
		PushesDelivered:  c.stats.delivered.Load(),
		Duplicates:       c.stats.dups.Load(),
		OffsetDuplicates: c.stats.offDups.Load(),
		NotJoined:        c.stats.notJoined.Load(),
		AcksSent:         c.stats.acks.Load(),
		Requests:         c.stats.requests.Load(),
	}
}

// Request sends {"t":typ,"id":N,"d":d} and returns the raw JSON d of the reply
// (a copy). d may be nil ({}), raw JSON ([]byte) or any value to encode.
// A reply with a non-zero code returns a *proto.Error. ctx bounds the whole
// request: waiting for a connection while the client reconnects, writing its
// frame and waiting for the reply; if ctx has no deadline,
// Config.RequestTimeout applies. When ctx ends while the frame is being
// written (a server that reads nothing), Request returns ctx's error at once
// but the frame is not cut: it is written whole in the background, so the
// request may still reach the server and run, as one whose reply came too
// late (a write that never ends closes the connection at RequestTimeout,
// see Config.RequestTimeout). A request that times out makes the client
// ping the node at once (see Config.HeartbeatInterval). A request in flight when the connection drops
// fails with ErrDisconnected and is not resent.
func (c *Client) Request(ctx context.Context, typ string, d any) ([]byte, error) {
	if typ == proto.TypeJoin {
		// A room joined raw after Leave: its pushes are the app's again.
		if room, ok := roomOf(d); ok {
			c.mu.Lock()
			delete(c.left, room)
			c.mu.Unlock()
		}
	}
	return c.request(ctx, typ, d, nil)
}

// roomOf is the room_id of a request's d, whatever form the app gave it in
// (encoded as the request would be).
func roomOf(d any) (int64, bool) {
	var b []byte
	switch v := d.(type) {
	case proto.RoomReq:
		return v.RoomID, true
	case []byte:
		b = v
	case json.RawMessage:
		b = v
	default:
		var err error
		if b, err = proto.Marshal(d); err != nil {
			return 0, false
		}
	}
	var r proto.RoomReq
	if proto.Unmarshal(b, &r) != nil {
		return 0, false
	}
	return r.RoomID, true
}

// maxLeft bounds Client.left (rooms left on one connection); beyond it the
// set starts again empty (a push of a room left earlier then passes).
const maxLeft = 4096

func (c *Client) request(ctx context.Context, typ string, d any, onOK func(d []byte)) ([]byte, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.cfg.RequestTimeout)
		defer cancel()
	}
	for {
		s, err := c.waitReady(ctx)
		if err != nil {
			return nil, err
		}
		id, cl, err := s.send(ctx, typ, d, onOK)
		if errors.Is(err, errNotSent) {
			continue // the connection went away before we wrote: wait for the next one
		}
		if err == nil {
			var raw []byte
			raw, err = s.await(ctx, typ, id, cl)
			if err == nil {
				return raw, nil
			}
		}
		if errors.Is(err, context.DeadlineExceeded) {
			s.suspect()
		}
		return nil, err
	}
}

func (c *Client) waitReady(ctx context.Context) (*session, error) {
	for {
		if c.ctx.Err() != nil {
			return nil, c.closedErr()
		}
		c.mu.Lock()
		s, ready := c.sess, c.readyCh
		c.mu.Unlock()
		if s != nil {
			return s, nil
		}
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, fmt.Errorf("clientsdk: waiting for a connection: %w", ctx.Err())
		case <-c.ctx.Done():
			return nil, c.closedErr()
		}
	}
}

func (c *Client) closedErr() error {
	if err := c.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return ErrClosed
}

// Join joins a room and returns its online count. The room is remembered and
// re-joined after every reconnect (with since, see JoinInfo).
func (c *Client) Join(ctx context.Context, roomID int64) (online int, err error) {
	r, err := c.JoinInfo(ctx, roomID)
	return r.Online, err
}

// JoinInfo is Join returning the whole reply: the online count and the
// room's position (its newest offset and epoch; the room's pushes after it
// follow). The client tracks the position of every joined room from there on
// (RoomPosition) and re-joins with since after a reconnect.
func (c *Client) JoinInfo(ctx context.Context, roomID int64) (JoinResult, error) {
	var jr joinReply
	var perr error
	c.mu.Lock()
	for c.undoing[roomID] != nil { // a timed-out Join's leave goes first
		ch := c.undoing[roomID]
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return JoinResult{}, fmt.Errorf("clientsdk: join: %w", ctx.Err())
		}
		c.mu.Lock()
	}
	delete(c.left, roomID)
	if c.joinsPending == nil {
		c.joinsPending = map[int64]int{}
	}
	c.joinsPending[roomID]++
	if c.joining[roomID] == nil && c.rooms[roomID] == nil {
		if c.joining == nil {
			c.joining = map[int64]*roomPos{}
		}
		c.joining[roomID] = &roomPos{}
	}
	c.mu.Unlock()
	counted := true // this Join is in joinsPending (undoJoin takes it out itself)
	defer func() {
		if counted {
			c.mu.Lock()
			c.joinEndLocked(roomID)
			c.mu.Unlock()
		}
	}()
	_, err := c.request(ctx, proto.TypeJoin, proto.RoomReq{RoomID: roomID}, func(d []byte) {
		// Run by the reader on success, before this connection can be seen
		// as closed and before the pushes that follow the reply: a later
		// re-join always includes the room.
		jr = joinReply{}
		perr = proto.Unmarshal(d, &jr)
		c.mu.Lock()
		defer c.mu.Unlock()
		p := c.rooms[roomID]
		if p == nil {
			e := c.joining[roomID]
			if e == nil {
				// A Leave came after this Join was sent (it dropped the
				// room from joining): the node runs the leave after the
				// join, so the room is not re-joined.
				return
			}
			p = &roomPos{}
			*p = *e // pushes that came before the reply
			c.rooms[roomID] = p
		}
		if jr.Ep != nil {
			p.merge(jr.Off, *jr.Ep)
		}
	})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			counted = false
			c.undoJoin(roomID)
		}
		return JoinResult{}, err
	}
	if perr != nil {
		return JoinResult{}, fmt.Errorf("clientsdk: join reply: %w", perr)
	}
	return JoinResult{RoomID: roomID, Online: jr.Online, Off: jr.Off, Ep: jr.ep()}, nil
}

// undoJoin leaves a room whose join went unanswered (its context ended):
// the node may have joined it while the client does not track it — its
// pushes would come until the next reconnect, and then stop without a word.
// A Join of the room started meanwhile waits until the leave is written
// (undoing), so a Join after it comes after the leave; a room joined, or whose other Join still waits for its reply (that
// reply decides), is kept.
func (c *Client) undoJoin(roomID int64) {
	c.mu.Lock()
	// This Join ends here, under the same lock as the decision: of two
	// Joins timing out together, the last one out leaves.
	last := c.joinEndLocked(roomID)
	if c.rooms[roomID] != nil || !last {
		c.mu.Unlock()
		return
	}
	if c.left == nil || len(c.left) >= maxLeft {
		c.left = map[int64]struct{}{}
	}
	c.left[roomID] = struct{}{}
	s := c.sess
	if s == nil || c.stopped {
		c.mu.Unlock()
		return // no connection (the one the join went on is gone, and its rooms with it), or closing
	}
	done := make(chan struct{})
	if c.undoing == nil {
		c.undoing = map[int64]chan struct{}{}
	}
	c.undoing[roomID] = done
	// Counted with the client's goroutines (Close waits for it): added
	// under c.mu while not stopped, so before any Close's Wait.
	c.wg.Add(1)
	c.mu.Unlock()
	// Sent on a goroutine, bounded by RequestTimeout: the Join returns when
	// its context says (a connection whose writes are stuck would hold it
	// RequestTimeout more), and a Join of the room started meanwhile waits
	// for done — the leave goes out first all the same.
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.RequestTimeout)
		defer cancel()
		id, cl, err := s.send(ctx, proto.TypeLeave, proto.RoomReq{RoomID: roomID}, nil)
		c.mu.Lock()
		delete(c.undoing, roomID)
		c.mu.Unlock()
		close(done)
		if err == nil {
			_, _ = s.await(ctx, proto.TypeLeave, id, cl)
		}
	}()
}

// joinEndLocked takes a Join of roomID out of joinsPending (c.mu held) and
// reports whether it was the last: then joining is dropped too.
func (c *Client) joinEndLocked(roomID int64) (last bool) {
	if c.joinsPending[roomID]--; c.joinsPending[roomID] > 0 {
		return false
	}
	delete(c.joinsPending, roomID)
	delete(c.joining, roomID)
	return true
}

// Leave leaves a room. The room leaves the re-join set at once, whatever the
// outcome of the request (a Join of it still waiting for its reply does not
// put it back).
func (c *Client) Leave(ctx context.Context, roomID int64) error {
	c.mu.Lock()
	delete(c.rooms, roomID)
	delete(c.joining, roomID)
	if c.left == nil || len(c.left) >= maxLeft {
		c.left = map[int64]struct{}{}
	}
	c.left[roomID] = struct{}{}
	c.mu.Unlock()
	_, err := c.request(ctx, proto.TypeLeave, proto.RoomReq{RoomID: roomID}, nil)
	return err
}

// Chat sends a chat message to a room and returns the mid of its push.
func (c *Client) Chat(ctx context.Context, roomID int64, text string) (mid string, err error) {
	return c.ChatOnce(ctx, roomID, text, "")
}

// ChatOnce is Chat with a req_id (≤ 64 bytes; "" = none): sent again with the
// same reqID — after ErrDisconnected or a timeout, through any node — within
// a couple of minutes, the message is posted once and the first mid
// answered; 10409 while the first is still being sent (retry).
func (c *Client) ChatOnce(ctx context.Context, roomID int64, text, reqID string) (mid string, err error) {
	raw, err := c.request(ctx, proto.TypeChat, proto.ChatReq{RoomID: roomID, Text: text, ReqID: reqID}, nil)
	if err != nil {
		return "", err
	}
	var r struct {
		Mid string `json:"mid"`
	}
	if err := proto.Unmarshal(raw, &r); err != nil {
		return "", fmt.Errorf("clientsdk: chat reply: %w", err)
	}
	return r.Mid, nil
}

// GiftReq is a gift to send (PROTOCOL.md §3 gift).
type GiftReq struct {
	RoomID     int64
	GiftID     int64
	ReceiverID int64
	Count      int    // 0 means 1
	ReqID      string // ≤ 64 bytes; "" makes one (see Client.Gift)
	PK         bool   // extension: count the gift towards the room's PK score
}

// GiftResult is the reply of a successful gift: its order and the sender's
// balance after it.
type GiftResult struct {
	OrderID string `json:"order_id"`
	Balance int64  `json:"balance"`
}

// Gift sends a gift. Its req_id makes it idempotent (PROTOCOL.md §5): sent
// again with the same one — through any node, within 24 h — it moves nothing
// again and answers the first result. Without g.ReqID one is made, and every
// error is a *GiftError that carries the req_id sent: after a failure that
// is not a refusal (ErrDisconnected, a timeout: the gift may have been
// debited; or 10409 still being processed, 50000, 10429, whose message says
// so) retry with that req_id, never with a new one, which would debit again.
// A reply error is a *proto.Error wrapped in it (errors.As finds it).
func (c *Client) Gift(ctx context.Context, g GiftReq) (GiftResult, error) {
	var r GiftResult
	if g.ReqID == "" {
		g.ReqID = crand.Text()
	}
	if g.Count == 0 {
		g.Count = 1
	}
	raw, err := c.request(ctx, proto.TypeGift, giftFrame{g.RoomID, g.GiftID, g.ReceiverID, g.Count, g.ReqID, g.PK}, nil)
	if err == nil {
		if err = proto.Unmarshal(raw, &r); err != nil {
			err = fmt.Errorf("clientsdk: gift reply: %w", err)
		}
	}
	if err != nil {
		return r, &GiftError{ReqID: g.ReqID, Err: err}
	}
	return r, nil
}

// giftFrame is the d of a gift request.
type giftFrame struct {
	RoomID     int64  `json:"room_id"`
	GiftID     int64  `json:"gift_id"`
	ReceiverID int64  `json:"receiver_id"`
	Count      int    `json:"count"`
	ReqID      string `json:"req_id"`
	PK         bool   `json:"pk,omitempty"`
}

// GrabResult is the reply of a successful grab: the amount credited (the
// credit itself also arrives as a biz 5570 push) and a message to show.
type GrabResult struct {
	Amount int64  `json:"amount"`
	Msg    string `json:"msg"`
}

// Grab grabs one packet of the red-packet rain code (the client must have
// joined the rain's room). A refusal is a *proto.Error: 30001 not found or
// not started, 30002 already grabbed, 30003 none left, 10003 not in the
// room, 10429 too fast. Like every request it is not resent after a
// disconnect (ErrDisconnected): grab again, a packet is granted at most once
// per user when the server is configured so.
func (c *Client) Grab(ctx context.Context, code string) (GrabResult, error) {
	var r GrabResult
	raw, err := c.request(ctx, proto.TypeGrab, proto.GrabReq{Code: code}, nil)
	if err != nil {
		return r, err
	}
	if err := proto.Unmarshal(raw, &r); err != nil {
		return r, fmt.Errorf("clientsdk: grab reply: %w", err)
	}
	return r, nil
}

// Ping sends a ping request and waits for its reply.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.request(ctx, proto.TypePing, nil, nil)
	return err
}

// --- connection management ---

// connect opens one connection and waits for its hello, bounded by ctx and
// RequestTimeout. On error nothing of the attempt is left running.
func (c *Client) connect(ctx context.Context, i int, reason string) (*session, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
	defer cancel()
	token, err := c.token(ctx, reason)
	if err != nil {
		return nil, err
	}
	addr, err := c.cfg.dialURL(i)
	if err != nil {
		return nil, fmt.Errorf("clientsdk: URL: %w", err)
	}
	where := c.cfg.redactedURL(i)
	handshake := c.cfg.RequestTimeout
	if dl, ok := ctx.Deadline(); ok {
		handshake = max(time.Until(dl), time.Millisecond)
	}
	s := newSession(c)
	dialer := &ctxDialer{ctx: ctx, local: c.cfg.LocalAddr}
	conn, resp, err := gws.NewClient(s, &gws.ClientOption{
		Addr:             addr,
		RequestHeader:    http.Header{"Authorization": {"Bearer " + token}},
		HandshakeTimeout: handshake,
		NewDialer:        func() (gws.Dialer, error) { return dialer, nil },
	})
	stopped := dialer.stop()
	if err != nil {
		if resp != nil && resp.StatusCode == http.StatusUnauthorized {
			return nil, fmt.Errorf("%w: %s", ErrUnauthorized, where)
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("clientsdk: connect %s: %w", where, ctx.Err())
		}
		if resp != nil {
			return nil, fmt.Errorf("clientsdk: connect %s: HTTP %d: %w", where, resp.StatusCode, err)
		}
		return nil, fmt.Errorf("clientsdk: connect %s: %w", where, err)
	}
	if !stopped { // ctx closed the connection right after the handshake
		_ = conn.NetConn().Close()
		return nil, fmt.Errorf("clientsdk: connect %s: %w", where, ctx.Err())
	}
	s.conn = conn
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		conn.ReadLoop()
	}()
	select {
	case h := <-s.helloCh:
		c.mu.Lock()
		c.hello = h
		c.mu.Unlock()
		return s, nil
	case <-s.done:
		return nil, fmt.Errorf("clientsdk: connect %s: before hello: %w", where, s.closeError())
	case <-ctx.Done():
		s.closeWith(proto.CloseNormal, ctx.Err())
		<-s.done
		return nil, fmt.Errorf("clientsdk: connect %s: waiting for hello: %w", where, ctx.Err())
	}
}

// activate re-joins the remembered rooms on s (with since where their
// position is known), then makes s (connected to URL i) the ready session,
// reports StateConnected and starts its heartbeat. An error means s is
// unusable (the caller closes it).
func (c *Client) activate(s *session, attempt, i int) error {
	c.mu.Lock()
	c.left = nil // a new connection is in no room it was not re-joined to
	rooms := c.roomsLocked()
	sinces := make([]*proto.Position, len(rooms))
	for k, r := range rooms {
		sinces[k] = c.rooms[r].since()
	}
	c.mu.Unlock()
	if len(rooms) > 0 {
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.RequestTimeout)
		defer cancel()
		type sent struct {
			room int64
			id   int64
			cl   *call
		}
		calls := make([]sent, 0, len(rooms))
		for k, r := range rooms { // pipelined: all joins out, then all replies
			req := proto.RoomReq{RoomID: r, Since: sinces[k]}
			id, cl, err := s.send(ctx, proto.TypeJoin, req, c.rejoined(r, req.Since))
			if errors.Is(err, errNotSent) {
				<-s.done
				return s.closeError()
			}
			if err != nil {
				return err
			}
			calls = append(calls, sent{r, id, cl})
		}
		for _, sc := range calls {
			_, err := s.await(ctx, proto.TypeJoin, sc.id, sc.cl)
			var pe *proto.Error
			switch {
			case errors.As(err, &pe) && (pe.Code == proto.CodeInternal || pe.Code == proto.CodeRateLimited):
				// Not a refusal of the room (a Redis or NATS blip in the
				// node's join, or its rate): this session is given up and
				// the client reconnects with its back-off, the room kept.
				return fmt.Errorf("clientsdk: re-join room %d: %w", sc.room, pe)
			case errors.As(err, &pe):
				c.mu.Lock()
				_, still := c.rooms[sc.room] // not left by the app meanwhile
				delete(c.rooms, sc.room)
				c.mu.Unlock()
				if still {
					c.log.Info("clientsdk: room dropped: re-join refused", "room", sc.room, "code", pe.Code)
					c.emitState(StateEvent{State: StateRoomDropped, Room: sc.room, Err: pe})
				}
			case errors.Is(err, ErrDisconnected):
				<-s.done
				return s.closeError()
			case err != nil:
				return err
			}
		}
	}
	c.mu.Lock()
	if s.dead {
		c.mu.Unlock()
		return s.closeError() // done is closed once dead is set
	}
	if c.ctx.Err() != nil {
		c.mu.Unlock()
		return c.closedErr()
	}
	c.sess = s
	c.urlIdx = i
	c.upSince = time.Now()
	close(c.readyCh)
	hello := c.hello
	c.mu.Unlock()
	if attempt > 0 {
		c.stats.reconnects.Add(1) // counted before StateConnected is seen
	}
	where := c.cfg.redactedURL(i)
	c.log.Info("clientsdk: connected", "url", where, "node", hello.Node, "user_id", hello.UserID, "attempt", attempt)
	c.emitState(StateEvent{State: StateConnected, Hello: hello, Attempt: attempt, URL: where})

	every := c.cfg.HeartbeatInterval
	switch {
	case every != 0:
	case hello.HeartbeatMS > 0: // exact (heartbeat_s is rounded down: 300 ms says 1 s)
		every = time.Duration(hello.HeartbeatMS) * time.Millisecond / 2
	case hello.HeartbeatS > 0:
		every = time.Duration(hello.HeartbeatS) * time.Second / 2
	}
	c.wg.Add(1)
	go c.heartbeat(s, every)
	if c.cfg.TokenFunc != nil && hello.ExpiresInMS > 0 {
		if left := leftOf(hello.ExpiresInMS); left <= maxRefreshLeft {
			c.wg.Add(1)
			go c.refreshes(s, left, s.helloAt)
		}
	}
	return nil
}

// rejoined returns the reply hook of the re-join of room sent with since: run
// by the reader, in order with the room's pushes (the replayed ones come
// before the reply), it moves the room's position on to the reply's and
// reports StateRoomResync when the server could not replay what was missed.
func (c *Client) rejoined(room int64, since *proto.Position) func(d []byte) {
	return func(d []byte) {
		var jr joinReply
		if err := proto.Unmarshal(d, &jr); err != nil {
			c.log.Warn("clientsdk: undecodable join reply", "room", room, "err", err)
		}
		c.mu.Lock()
		p := c.rooms[room]
		if p == nil {
			c.mu.Unlock()
			return // left while it was re-joined: nothing to re-sync
		}
		// A live push that came before the reply moved the position on:
		// advance reported its gap, if it had one.
		moved := since != nil && (p.off != since.Off || p.ep != since.Ep)
		notRecovered := since != nil && (jr.Recovered == nil || !*jr.Recovered)
		// Below the position sent, in its epoch: the room's numbering went
		// back (a cluster's Redis) — pushes read before the reply may have
		// been dropped as duplicates and a later one moved the position on
		// without a gap: reported even then.
		wentBack := notRecovered && jr.Ep != nil && *jr.Ep == since.Ep && jr.Off < since.Off
		switch {
		case jr.Ep != nil && notRecovered && !moved:
			// Re-synced from here: the reply's position, even below the
			// one the client had (a cluster whose Redis went back numbers
			// the next pushes from there: kept, they would be dropped).
			p.off, p.ep, p.known = jr.Off, *jr.Ep, true
		case jr.Ep != nil:
			p.merge(jr.Off, *jr.Ep)
		}
		c.mu.Unlock()
		if notRecovered && (!moved || wentBack) {
			c.log.Info("clientsdk: room history not recovered, re-sync needed", "room", room,
				"since_off", since.Off, "since_ep", since.Ep, "off", jr.Off, "ep", jr.ep())
			c.emitState(StateEvent{State: StateRoomResync, Room: room, Off: jr.Off, Ep: jr.ep(), Since: since})
		}
	}
}

// heartbeat checks that s's node is alive. Every interval (none when every
// <= 0) it pings when nothing was written for half an interval, so the
// gateway never sees the client silent for 2 × heartbeat, or when nothing
// was read for as long — whatever was written: a node that keeps the TCP
// connection but answers nothing (wedged, half-open) is left even while the
// app keeps sending requests. It also pings at once when a request timed
// out (session.suspect). A ping without a reply within RequestTimeout
// closes the connection (the run loop reconnects) — unless a reply was read
// since the ping went out: a wedged node answers nothing, while one
// applying backpressure (the gateway stops reading a connection with
// gifts.max_inflight gifts in flight) answers the ping late but keeps
// sending the replies of what it took meanwhile. Leaving it would fail
// every request in flight with ErrDisconnected (ambiguous for a gift); it is
// kept, and pinged again if it falls silent (the tick, or the next request
// timed out). Pushes alone buy time, not the verdict: a viewer on a slow
// link gets its replies behind the room's pushes the node queued first, so
// while pushes come the client waits for a reply up to probeGrace ×
// RequestTimeout from the ping — but a node whose reading of this
// connection died keeps fanning room pushes out to it and never answers.
func (c *Client) heartbeat(s *session, every time.Duration) {
	defer c.wg.Done()
	var tick <-chan time.Time
	if every > 0 {
		t := time.NewTicker(every)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-tick:
			if time.Since(time.Unix(0, s.lastWrite.Load())) < every/2 &&
				time.Since(time.Unix(0, s.lastRead.Load())) < every/2 {
				continue
			}
		case <-s.probe:
		case <-s.done:
			return
		case <-c.ctx.Done():
			return
		}
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.RequestTimeout)
		// Taken before the write: a write held by a node that does not
		// read (TCP buffers full) is part of the wait.
		pinged := time.Now().UnixNano()
		id, cl, err := s.send(ctx, proto.TypePing, nil, nil)
		if err == nil {
			_, err = s.await(ctx, proto.TypePing, id, cl)
		}
		cancel()
		if err == nil {
			c.log.Debug("clientsdk: ping answered", "rtt", time.Since(time.Unix(0, pinged)))
			continue
		}
		var pe *proto.Error
		if !errors.As(err, &pe) && errors.Is(err, context.DeadlineExceeded) {
			if s.repliedAt.Load() > pinged || (s.lastRead.Load() > pinged && s.replyWithin(pinged, probeGrace*c.cfg.RequestTimeout)) {
				c.log.Info("clientsdk: heartbeat ping answered late but the node still replies, keeping connection")
				continue
			}
			if s.appHeld.Load() {
				// The reply may be read: the reader waits for OnPush.
				c.log.Info("clientsdk: heartbeat ping not read yet, the reader waits for a slow OnPush: keeping connection")
				continue
			}
			c.log.Warn("clientsdk: heartbeat ping unanswered, closing connection")
			s.abandon(fmt.Errorf("clientsdk: heartbeat ping unanswered: %w", err))
			return
		}
	}
}

// probeGrace × RequestTimeout is how long after a ping a client still
// reading pushes waits for a reply before it leaves the node (heartbeat).
const probeGrace = 3

// replyWithin reports whether a reply is read before pinged (unix ns) +
// wait, or the session ends first (nothing to leave then).
func (s *session) replyWithin(pinged int64, wait time.Duration) bool {
	t := time.NewTicker(min(wait/20, 50*time.Millisecond) + time.Millisecond)
	defer t.Stop()
	for s.repliedAt.Load() <= pinged {
		if time.Since(time.Unix(0, pinged)) >= wait {
			return false
		}
		select {
		case <-t.C:
		case <-s.done:
			return true
		case <-s.c.ctx.Done():
			return true
		}
	}
	return true
}

// run owns the connection after Dial: it waits for the session to end,
// reports it, and reconnects until the client stops. It closes c.events on
// return, when no reader is left.
func (c *Client) run(s *session) {
	defer c.wg.Done()
	defer close(c.events)
	for {
		select {
		case <-s.done:
		case <-c.ctx.Done():
			// The acks of pushes OnPush has had go out before the close
			// frame (the client's context is done: a context of their own).
			actx, cancel := context.WithTimeout(context.Background(), time.Second)
			c.flushAcks(actx)
			cancel()
			s.closeWith(proto.CloseNormal, nil)
			<-s.done
		}
		s.endWrites()
		code, reason, err := s.closeCode, s.closeReason, s.closeErr
		c.mu.Lock()
		c.lastCode, c.lastReason = code, reason
		c.mu.Unlock()
		c.log.Info("clientsdk: disconnected", "code", code, "reason", reason, "err", err)
		c.emitState(StateEvent{State: StateDisconnected, Code: code, Reason: reason, Err: err})
		if c.ctx.Err() != nil {
			c.emitState(StateEvent{State: StateClosed, Code: code, Reason: reason, Err: c.Err()})
			return
		}
		if !c.reconnectable(code) {
			c.terminate(code, reason, s.closeError())
			return
		}
		if s = c.reconnect(); s == nil {
			return
		}
	}
}

// stableAfter is how long a connection must last for its reconnect to start
// the backoff afresh.
const stableAfter = 30 * time.Second

// reconnectable reports whether the client reconnects after close code: the
// codes below 4500, and 4501 (token expired) when a TokenFunc can supply a
// new token (the next connect calls it). Other 45xx codes are terminal.
func (c *Client) reconnectable(code int) bool {
	return proto.Reconnectable(code) || (code == proto.CloseTokenExpired && c.cfg.TokenFunc != nil)
}

// reconnect retries until a session is active (returned) or the client stops
// (nil, after reporting StateClosed). Attempts go round the URL list starting
// at another URL than the connection that ended, chosen at random
// (reconnectOffset); each round starts with the
// exponential backoff with full jitter (round n: random [0, min(max,
// min·2^(n-1))]), and within a round the next URL is tried after a short
// random pause in [min/2, min] (see Config.ReconnectMin).
func (c *Client) reconnect() *session {
	n := len(c.cfg.urls)
	c.mu.Lock()
	from := c.urlIdx
	if !c.upSince.IsZero() && time.Since(c.upSince) < stableAfter {
		c.shortLived = min(c.shortLived+1, 32)
	} else {
		c.shortLived = 0
	}
	floor := c.shortLived // backoff rounds already spent on short-lived connections
	reason := TokenReconnect
	if c.lastCode == proto.CloseTokenExpired {
		reason = TokenExpired
	}
	c.mu.Unlock()
	off := 1
	if n > 1 {
		off = reconnectOffset(n)
	}
	var lastErr error
	for attempt := 1; ; attempt++ {
		i := (from + off + attempt - 1) % n
		var delay time.Duration
		if k := attempt - 1; k%n == 0 {
			delay = c.backoff(k/n + 1 + floor)
		} else {
			delay = c.pace()
		}
		c.emitState(StateEvent{State: StateReconnecting, Attempt: attempt, Delay: delay, Err: lastErr, URL: c.cfg.redactedURL(i)})
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-c.ctx.Done():
			t.Stop()
		}
		if c.ctx.Err() != nil {
			c.emitState(StateEvent{State: StateClosed, Err: c.Err()})
			return nil
		}
		s, err := c.connect(c.ctx, i, reason)
		if err == nil {
			if err = c.activate(s, attempt, i); err == nil {
				return s
			}
			s.closeWith(proto.CloseNormal, nil)
			<-s.done
			s.endWrites()
		}
		if c.ctx.Err() != nil {
			c.emitState(StateEvent{State: StateClosed, Err: c.Err()})
			return nil
		}
		c.log.Info("clientsdk: reconnect failed", "attempt", attempt, "url", c.cfg.redactedURL(i), "err", err)
		var ce *CloseError
		if errors.As(err, &ce) && !c.reconnectable(ce.Code) {
			c.terminate(ce.Code, ce.Reason, ce)
			return nil
		}
		if errors.Is(err, ErrUnauthorized) && c.cfg.TokenFunc == nil {
			c.terminate(0, "", err)
			return nil
		}
		// The next attempt's token: a refused or ended one asks for a new
		// one; a 503 or a dropped attempt is no reason to; TokenFunc's own
		// failure leaves the reason as it was.
		switch {
		case errors.Is(err, ErrUnauthorized) || (errors.As(err, &ce) && ce.Code == proto.CloseTokenExpired):
			reason = TokenExpired
		case !errors.Is(err, errTokenFunc):
			reason = TokenReconnect
		}
		lastErr = err
	}
}

// terminate stops the client for cause (a terminal close or a refused token).
func (c *Client) terminate(code int, reason string, cause error) {
	if code != 0 {
		c.mu.Lock()
		c.lastCode, c.lastReason = code, reason
		c.mu.Unlock()
	}
	c.log.Warn("clientsdk: stopped: not reconnecting", "code", code, "err", cause)
	c.mu.Lock()
	if !c.stopped {
		c.stopped, c.stopErr = true, cause
	}
	c.mu.Unlock()
	// Queue the event before Closed fires, so that a caller woken by Closed
	// finds StateClosed queued.
	c.emitState(StateEvent{State: StateClosed, Code: code, Reason: reason, Err: c.Err()})
	c.cancel()
}

// stop marks the client stopped (first cause wins) and cancels c.ctx.
func (c *Client) stop(cause error) {
	c.mu.Lock()
	if !c.stopped {
		c.stopped, c.stopErr = true, cause
	}
	c.mu.Unlock()
	c.cancel()
}

// pace is the wait before trying the next URL within a reconnect round:
// random in [ReconnectMin/2, ReconnectMin].
func (c *Client) pace() time.Duration {
	half := c.cfg.ReconnectMin / 2
	return half + time.Duration(rand.Int64N(int64(c.cfg.ReconnectMin-half)+1))
}

// backoff is the wait before reconnect round n (the n-th attempt with one
// URL): random in [0, min(ReconnectMax, ReconnectMin·2^(n-1))].
func (c *Client) backoff(attempt int) time.Duration {
	ceil := c.cfg.ReconnectMax
	if attempt < 32 {
		if d := c.cfg.ReconnectMin << (attempt - 1); d > 0 && d < ceil {
			ceil = d
		}
	}
	return time.Duration(rand.Int64N(int64(ceil) + 1))
}

// --- callbacks ---

func (c *Client) emitState(ev StateEvent) {
	if c.cfg.OnState == nil {
		return
	}
	c.emit(event{state: &ev})
}

// emit queues ev for the dispatcher, blocking while the queue is full
// (backpressure); it gives up (false) once the client has stopped and the
// queue is still full.
func (c *Client) emit(ev event) bool {
	select {
	case c.events <- &ev:
		return true
	default:
	}
	select {
	case c.events <- &ev:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// dispatch is the one goroutine that calls OnPush and OnState. A reliable
// push is acked once OnPush has returned (acks gathered while more events
// wait, at most ackHold, sent on the current connection; those gathered
// when the client closes go out before its close frame). One queued and
// not delivered when the client closes is not delivered, nor acked: the
// node hands it on to the user's next connection instead of taking it as
// delivered.
func (c *Client) dispatch() {
	defer close(c.dispatchDone)
	// Its flushes are not cut short by the client's context (a write waits
	// no longer than the session, and RequestTimeout): a close waits for
	// one under way (flushAcks) — for a second at most — and then sends
	// the rest before its frame.
	flush := context.Background()
	defer c.flushAcks(flush)
	for ev := range c.events {
		c.cbMu.Lock()
		if c.cbStopped && (!c.cbDrain || ev.state == nil) {
			drain := c.cbDrain
			c.cbMu.Unlock()
			if drain {
				continue // closed: pushes not delivered (nor acked); state events are, until run's end closed the queue
			}
			return
		}
		c.cbRunning = true
		c.cbMu.Unlock()

		switch {
		case ev.state != nil:
			c.cfg.OnState(*ev.state)
		case ev.ack && c.ctx.Err() != nil:
			// Closing: not delivered (nor acked), handed on by the node.
		default:
			c.cfg.OnPush(ev.push)
			if ev.ack {
				c.mu.Lock()
				delete(c.undelivered, ev.push.Mid)
				c.mu.Unlock()
				c.holdAck(ev.push.Mid, ev.from)
			}
		}
		if c.acksDue(len(c.events) == 0) {
			c.flushAcks(flush)
		}

		c.cbMu.Lock()
		c.cbRunning = false
		stop := c.cbStopped && !c.cbDrain
		c.cbMu.Unlock()
		if stop {
			return
		}
	}
}

// ackHold is the longest a delivered reliable push waits for its ack while
// more events keep the queue busy.
const ackHold = 100 * time.Millisecond

// holdAck adds delivered reliable push mid, which came on from, to the
// acks to send.
func (c *Client) holdAck(mid string, from *session) {
	c.ackMu.Lock()
	if len(c.acks) == 0 {
		c.ackSince = time.Now()
	}
	c.acks = append(c.acks, heldAck{mid, from})
	c.ackMu.Unlock()
}

// acksDue reports whether the held acks go out now: the queue is empty, a
// frame's worth is held, or the oldest has waited ackHold.
func (c *Client) acksDue(idle bool) bool {
	c.ackMu.Lock()
	defer c.ackMu.Unlock()
	n := len(c.acks)
	return n > 0 && (idle || n >= proto.MaxAckMids || time.Since(c.ackSince) >= ackHold)
}

// flushAcks sends each held ack on the connection its push came on while
// that one lives — also while it is not ready yet: a push the node sends
// right after the hello (the user's offline box) is delivered while the
// rooms are being re-joined, and an ack kept from that connection made the
// node resend it. An ack whose connection ended goes on the current one (on
// none while reconnecting: the node resends those pushes to the next one,
// where they are acked as duplicates, not delivered again).
func (c *Client) flushAcks(ctx context.Context) {
	select {
	case c.flushing <- struct{}{}:
	case <-ctx.Done():
		// A flush under way is stuck (its write waits behind a frame the
		// node does not read): these acks stay held; the pushes are sent
		// again on the next connection, and dropped there as duplicates.
		return
	}
	defer func() { <-c.flushing }()
	c.ackMu.Lock()
	held := c.acks
	c.acks = nil
	c.ackMu.Unlock()
	if len(held) == 0 {
		return
	}
	// Grouped by connection, in order (almost always one group).
	var to []*session
	mids := map[*session][]string{}
	c.mu.Lock()
	for _, h := range held {
		s := h.from
		if s == nil || s.dead {
			s = c.sess
		}
		if s == nil {
			continue
		}
		if _, ok := mids[s]; !ok {
			to = append(to, s)
		}
		mids[s] = append(mids[s], h.mid)
	}
	c.mu.Unlock()
	for _, s := range to {
		s.sendAcks(ctx, mids[s])
	}
}

// dupAck appends the ack of a duplicate push (delivered before, or
// dropped) when it is reliable — unless its first copy still waits in the
// queue: that one is acked once OnPush has it (dispatch), not before.
func (c *Client) dupAck(acks []string, mid string, reliable bool) []string {
	if reliable && !c.queuedUndelivered(mid) {
		return append(acks, mid)
	}
	return acks
}

// queuedUndelivered reports whether reliable push mid waits in the queue.
func (c *Client) queuedUndelivered(mid string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.undelivered[mid]
	return ok
}
