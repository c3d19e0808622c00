package clientsdk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

// errNotSent: the session died before the request frame was written; the
// request can safely wait for the next connection.
var errNotSent = errors.New("clientsdk: not sent")

// errWriteUnderWay: the caller's context ended while its frame was being
// written; the write goes on in the background (see session.write).
var errWriteUnderWay = errors.New("frame still being written")

// session is one WebSocket connection: its gws event handler, writer lock and
// pending requests. It never reconnects; the Client replaces it.
type session struct {
	c    *Client
	conn *gws.Conn

	wsem      chan struct{} // one-slot write lock that a context can abandon
	lastWrite atomic.Int64  // unix nanos of the last successful write
	lastRead  atomic.Int64  // unix nanos of the last frame read
	repliedAt atomic.Int64  // unix nanos of the last reply read (the node reads our frames)
	// appHeld: the reader may wait for room in the event queue (the app's
	// callbacks are slow: a push, or a state event it emits) — what it does
	// not read meanwhile is the app's delay, not the node's: the heartbeat
	// does not leave the node for it.
	appHeld atomic.Bool
	// probe asks the heartbeat for a ping at once (buffered 1): a request
	// on this connection went unanswered for its whole context.
	probe chan struct{}

	helloCh  chan proto.Hello // buffered 1; the hello, once
	gotHello bool             // reader goroutine only
	helloAt  time.Time        // when the hello was read (before it is sent on helloCh)

	// Guarded by c.mu (so that "dead" and c.sess change together).
	dead    bool
	pending map[int64]*call

	closeMu   sync.Mutex
	local     bool // we closed it
	localCode int
	localErr  error
	localLost bool // we gave it up (its node stopped answering): reported as lost, 1006

	// Set by OnClose before done is closed.
	closeCode   int
	closeReason string
	closeErr    error
	done        chan struct{}
}

type call struct {
	ch   chan reply     // buffered 1
	onOK func(d []byte) // run by the reader on a code-0 reply (d: the reply's d, valid during the call), before the reply is delivered
}

type reply struct {
	code int
	msg  string
	d    []byte
}

func newSession(c *Client) *session {
	return &session{
		c:       c,
		wsem:    make(chan struct{}, 1),
		helloCh: make(chan proto.Hello, 1),
		probe:   make(chan struct{}, 1),
		pending: make(map[int64]*call),
		done:    make(chan struct{}),
	}
}

// closeWith closes the connection from our side with code; cause is what
// OnClose reports as the error (nil for an orderly close).
// abandon closes s because its node stopped answering (an unanswered
// heartbeat ping): reported as a connection lost, 1006 "ping timeout" (as
// the TypeScript SDK does), not as the app's own close — its close frame
// still says 1000.
func (s *session) abandon(cause error) {
	s.closeMu.Lock()
	if !s.local {
		s.local, s.localCode, s.localErr, s.localLost = true, proto.CloseNormal, cause, true
	}
	s.closeMu.Unlock()
	s.closeWith(proto.CloseNormal, cause)
}

func (s *session) closeWith(code int, cause error) {
	s.closeMu.Lock()
	if !s.local {
		s.local, s.localCode, s.localErr = true, code, cause
	}
	s.closeMu.Unlock()
	if s.conn == nil {
		return
	}
	wait := min(s.c.cfg.RequestTimeout, closeWait)
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case s.wsem <- struct{}{}:
		// No frame under way: the close frame goes out under a deadline of
		// its own (the last write's may have passed long ago: an idle
		// client closed without its close frame), and gws closes the socket.
		_ = s.conn.SetWriteDeadline(time.Now().Add(wait))
		_ = s.conn.WriteClose(uint16(code), nil)
		<-s.wsem
	case <-s.done:
		// Ended meanwhile: nothing to close (and endWrites may hold the
		// write lock for good).
	case <-t.C:
		// A frame has been under way for that long (a node that does not
		// read): the close frame could only follow it, up to its
		// RequestTimeout deadline. The socket is closed instead — the
		// stuck write fails at once and the read loop ends (the node sees
		// the connection drop, not a close frame).
		_ = s.conn.NetConn().Close()
	}
}

// closeWait bounds how long closing waits for a frame under way before it
// closes the socket without a close frame (at most RequestTimeout).
const closeWait = time.Second

// closeError is why the session ended (valid after done is closed).
func (s *session) closeError() error {
	if s.closeErr != nil {
		return s.closeErr
	}
	return &CloseError{Code: s.closeCode, Reason: s.closeReason}
}

// write sends one text frame (b is the write's until it ends). It returns
// errNotSent when the session ended, or ctx.Err() when ctx ended, before
// the frame was started (nothing written); an error wrapping
// errWriteUnderWay and ctx.Err() when ctx ended while the frame was being
// written; the write error otherwise.
//
// ctx bounds the call, the frame's own write included, but it cannot cut
// that write short: a WebSocket frame stopped half-way leaves the stream
// unreadable for the server, and the connection with it — one request's
// context must not cost every other request its connection. So the frame is
// written by a goroutine of its own, under the write deadline
// (RequestTimeout); when ctx ends first, write returns and the frame goes on
// in the background, holding the write lock (frames after it wait: each is
// written whole, in order). A frame still not through at RequestTimeout
// fails, and gws closes the connection on a failed write (nothing follows
// the cut frame): the session ends and the client reconnects, as when the
// caller waited for that write itself.
func (s *session) write(ctx context.Context, b []byte) error {
	select {
	case s.wsem <- struct{}{}:
	case <-s.done:
		return errNotSent
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-s.done:
		<-s.wsem
		return errNotSent
	default:
	}
	if ctx.Done() == nil { // a context that never ends: no goroutine needed
		defer func() { <-s.wsem }()
		return s.writeFrame(b)
	}
	res := make(chan error, 1)
	go func() {
		defer func() { <-s.wsem }()
		res <- s.writeFrame(b)
	}()
	select {
	case err := <-res:
		return err
	case <-ctx.Done():
		select {
		case err := <-res: // done meanwhile: its outcome, not the context's
			return err
		default:
		}
		return fmt.Errorf("%w: %w", errWriteUnderWay, ctx.Err())
	}
}

// endWrites, once the session is done, waits for a frame write whose caller
// gave up on it (write): closing the socket fails it at once (the
// connection is over), and then holding the write lock for good keeps any
// other from starting. So no writer goroutine outlives its session in the
// run loop, nor Close.
func (s *session) endWrites() {
	_ = s.conn.NetConn().Close()
	s.wsem <- struct{}{}
}

// writeFrame writes b under the write lock, its deadline RequestTimeout
// from now — set here, on the goroutine that writes, not before it ran: a
// starved process (a collection, a loaded machine) could start the write
// past a deadline set earlier, fail it at once and close a healthy
// connection.
func (s *session) writeFrame(b []byte) error {
	_ = s.conn.SetWriteDeadline(time.Now().Add(s.c.cfg.RequestTimeout))
	if err := s.conn.WriteMessage(gws.OpcodeText, b); err != nil {
		return err
	}
	s.lastWrite.Store(time.Now().UnixNano())
	return nil
}

type requestFrame struct {
	T  string `json:"t"`
	ID int64  `json:"id"`
	D  any    `json:"d"`
}

func encodeRequest(typ string, id int64, d any) ([]byte, error) {
	switch v := d.(type) {
	case nil:
		d = struct{}{}
	case []byte:
		d = json.RawMessage(v)
	}
	b, err := proto.Marshal(requestFrame{T: typ, ID: id, D: d})
	if err != nil {
		return nil, fmt.Errorf("clientsdk: encode %s: %w", typ, err)
	}
	return b, nil
}

// send registers and writes one request. errNotSent means nothing was written
// and the session is gone.
func (s *session) send(ctx context.Context, typ string, d any, onOK func(d []byte)) (int64, *call, error) {
	c := s.c
	id := c.nextID.Add(1)
	b, err := encodeRequest(typ, id, d)
	if err != nil {
		return 0, nil, err
	}
	cl := &call{ch: make(chan reply, 1), onOK: onOK}
	c.mu.Lock()
	if s.dead {
		c.mu.Unlock()
		return 0, nil, errNotSent
	}
	s.pending[id] = cl
	c.mu.Unlock()

	if err := s.write(ctx, b); err != nil {
		s.forget(id)
		switch {
		case errors.Is(err, errNotSent):
			return 0, nil, errNotSent
		case errors.Is(err, errWriteUnderWay):
			// Given up while its frame was going out: the request may
			// still reach the server and run, as after a timeout waiting
			// for its reply (which, if one comes, finds no pending call).
			return 0, nil, fmt.Errorf("clientsdk: %s id %d: %w", typ, id, err)
		case ctx.Err() != nil && errors.Is(err, ctx.Err()):
			return 0, nil, fmt.Errorf("clientsdk: %s: %w", typ, err)
		}
		// A write that failed part-way may have reached the server.
		return 0, nil, fmt.Errorf("%w: %s id %d: write: %v", ErrDisconnected, typ, id, err)
	}
	c.stats.requests.Add(1)
	return id, cl, nil
}

// await waits for the reply of a sent request.
func (s *session) await(ctx context.Context, typ string, id int64, cl *call) ([]byte, error) {
	select {
	case r := <-cl.ch:
		return r.result()
	case <-s.done:
		return s.lastReply(typ, id, cl)
	case <-ctx.Done():
		if !s.forget(id) {
			// The reader took the reply meanwhile: its hook runs (a join
			// is then tracked) and it is sent at once — the answer, not
			// the timeout. (Or the connection ended and dropped every
			// pending call: the reader sends no reply after that.)
			select {
			case r := <-cl.ch:
				return r.result()
			case <-s.done:
				return s.lastReply(typ, id, cl)
			}
		}
		return nil, fmt.Errorf("clientsdk: %s id %d: %w", typ, id, ctx.Err())
	case <-s.c.ctx.Done():
		s.forget(id)
		return nil, s.c.closedErr()
	}
}

// lastReply is cl's reply once the session is done: the reader delivers a
// reply before it closes done, so one sent is preferred; none is
// ErrDisconnected.
func (s *session) lastReply(typ string, id int64, cl *call) ([]byte, error) {
	select {
	case r := <-cl.ch:
		return r.result()
	default:
	}
	return nil, fmt.Errorf("%w: %s id %d in flight", ErrDisconnected, typ, id)
}

func (r reply) result() ([]byte, error) {
	if r.code != proto.CodeOK {
		return nil, &proto.Error{Code: r.code, Msg: r.msg}
	}
	if len(r.d) == 0 {
		return []byte("{}"), nil
	}
	return r.d, nil
}

// suspect has the heartbeat ping at once (one ping at a time): a request
// timed out, and a node that answers nothing at all must be left within the
// ping's timeout, not after every request the app makes timed out.
func (s *session) suspect() {
	select {
	case s.probe <- struct{}{}:
	default:
	}
}

// forget drops pending request id; false if the reader took it first (its
// reply is being handled: it is sent on the call's channel next).
func (s *session) forget(id int64) bool {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	_, ok := s.pending[id]
	delete(s.pending, id)
	return ok
}

// --- gws.Event ---

func (s *session) OnOpen(*gws.Conn) {}

// OnPing answers with a pong under a deadline of its own (after a quiet
// spell the last write's has passed: the pong timed out and gws closed the
// connection).
func (s *session) OnPing(conn *gws.Conn, payload []byte) {
	_ = conn.SetWriteDeadline(time.Now().Add(s.c.cfg.RequestTimeout))
	_ = conn.WritePong(payload)
}

func (s *session) OnPong(*gws.Conn, []byte) {}

func (s *session) OnClose(_ *gws.Conn, err error) {
	s.closeMu.Lock()
	local, lcode, lerr, lost := s.local, s.localCode, s.localErr, s.localLost
	s.closeMu.Unlock()
	var ce *gws.CloseError
	switch {
	case errors.As(err, &ce):
		s.closeCode, s.closeReason = int(ce.Code), string(ce.Reason)
		if s.closeCode == 0 {
			s.closeCode = 1005 // close frame without a status code
		}
		s.closeErr = &CloseError{Code: s.closeCode, Reason: s.closeReason}
	case local && lost:
		s.closeCode, s.closeReason, s.closeErr = 1006, "ping timeout", lerr
	case local:
		s.closeCode, s.closeReason, s.closeErr = lcode, "closed by client", lerr
	default:
		s.closeCode, s.closeReason = 1006, "connection lost"
		if err == nil || err.Error() == "" {
			err = net.ErrClosed
		}
		s.closeErr = fmt.Errorf("clientsdk: connection lost: %w", err)
	}
	c := s.c
	c.mu.Lock()
	if c.sess == s {
		c.sess = nil
		c.readyCh = make(chan struct{})
	}
	s.dead = true
	clear(s.pending) // their waiters see done
	c.mu.Unlock()
	close(s.done)
}

func (s *session) OnMessage(_ *gws.Conn, m *gws.Message) {
	defer m.Close()
	s.lastRead.Store(time.Now().UnixNano())
	log := s.c.log
	if m.Opcode != gws.OpcodeText {
		log.Warn("clientsdk: ignoring non-text frame", "opcode", m.Opcode)
		return
	}
	f, err := proto.DecodeServerFrame(m.Bytes())
	if err != nil {
		log.Warn("clientsdk: undecodable server frame", "err", err, "len", m.Data.Len())
		return
	}
	if !s.gotHello {
		var h proto.Hello
		if f.T != proto.TypeHello || proto.Unmarshal(f.D, &h) != nil {
			log.Warn("clientsdk: first frame is not a hello", "t", f.T)
			s.closeWith(1002, errors.New("clientsdk: protocol error: first frame is not a hello"))
			return
		}
		s.gotHello = true
		s.helloAt = time.Now()
		s.helloCh <- h
		return
	}
	var acks []string
	if f.T == proto.TypeBatch {
		for i := range f.Frames {
			acks = s.handle(&f.Frames[i], acks)
		}
	} else {
		acks = s.handle(&f, acks)
	}
	if len(acks) > 0 {
		s.sendAcks(s.c.ctx, acks)
	}
}

// handle processes one reply or push and returns acks with the mid to
// acknowledge appended.
func (s *session) handle(f *proto.ServerFrame, acks []string) []string {
	c := s.c
	switch f.T {
	case proto.TypeReply:
		s.repliedAt.Store(time.Now().UnixNano())
		c.mu.Lock()
		cl := s.pending[f.ID]
		delete(s.pending, f.ID)
		c.mu.Unlock()
		if cl == nil {
			c.log.Debug("clientsdk: reply to no pending request (timed out?)", "id", f.ID)
			return acks
		}
		if f.Code == proto.CodeOK && cl.onOK != nil {
			// A re-join's hook may emit a state event: held like a push.
			s.appHeld.Store(true)
			cl.onOK(f.D)
			s.appHeld.Store(false)
		}
		cl.ch <- reply{code: f.Code, msg: f.Msg, d: append([]byte(nil), f.D...)}
	case proto.TypePush:
		c.stats.pushes.Add(1)
		reliable := f.Ack && f.Mid != ""
		if f.Room != 0 && f.Off > 0 {
			deliver, gap, prev, joined := c.advance(f.Room, f.Off, f.Ep)
			if !joined {
				// The room was left: a push the node
				// fanned out before the leave took effect is not the app's
				// any more — a re-join with a since of its own would see
				// it twice.
				c.stats.notJoined.Add(1)
				return c.dupAck(acks, f.Mid, reliable)
			}
			if !deliver {
				c.stats.offDups.Add(1)
				return c.dupAck(acks, f.Mid, reliable)
			}
			if gap {
				// Pushes between the last seen and this one are lost on
				// this connection (the node could not fill a hole, or the
				// room's numbering restarted): the app re-syncs, as after
				// a re-join that could not recover.
				c.log.Info("clientsdk: room pushes missed, re-sync needed", "room", f.Room, "off", f.Off, "ep", f.Ep)
				s.appHeld.Store(true)
				c.emitState(StateEvent{State: StateRoomResync, Room: f.Room, Off: f.Off - 1, Ep: f.Ep, Since: &prev})
				s.appHeld.Store(false)
			}
		}
		// Numbered room pushes are guarded by their offset above: only the
		// others, and reliable ones (resent, possibly when the room has no
		// position here), go through the mid ring, so a busy room cannot
		// push a user push's mid out of it before its resend arrives.
		if f.Mid != "" && (f.Room == 0 || f.Off == 0 || f.Ack) && c.dedup.seen(f.Mid) {
			c.stats.dups.Add(1)
			return c.dupAck(acks, f.Mid, reliable)
		}
		if c.cfg.OnPush == nil {
			if reliable {
				acks = append(acks, f.Mid) // nobody to deliver to: received is all
			}
			return acks
		}
		p := Push{Mid: f.Mid, Biz: f.Biz, Room: f.Room, Off: f.Off, Ep: f.Ep, Ack: f.Ack, Data: append([]byte(nil), f.D...)}
		if reliable {
			c.mu.Lock()
			c.undelivered[f.Mid] = struct{}{}
			c.mu.Unlock()
		}
		s.appHeld.Store(true)
		queued := c.emit(event{push: p, ack: reliable, from: s})
		s.appHeld.Store(false)
		if queued {
			c.stats.delivered.Add(1)
		} else if reliable {
			c.mu.Lock()
			delete(c.undelivered, f.Mid) // not queued: the client stopped; not acked
			c.mu.Unlock()
		}
	default:
		c.log.Debug("clientsdk: ignoring server frame", "t", f.T)
	}
	return acks
}

// advance is the offset guard of a joined room's push at (off, ep): false
// when the room already saw off or a later offset in the same epoch (a
// replay overlapping what was delivered), else it moves the room's position
// to the push's. A push of a room not (yet) in the joined set passes
// (joined with a raw Request), unless Leave left it: joined false.
// gap: the push is not the next one after the position known (an offset
// skipped in the same epoch, or another epoch) — pushes were missed; prev is
// that position then.
func (c *Client) advance(room, off int64, ep string) (deliver, gap bool, prev proto.Position, joined bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.rooms[room]
	if p == nil {
		if p = c.joining[room]; p == nil {
			_, left := c.left[room]
			return !left, false, prev, !left
		}
	}
	if p.known && ep == p.ep && off <= p.off {
		return false, false, prev, true
	}
	fresh := p.off == 0 && p.ep == "" // numbered, nothing pushed yet: any epoch starts at 1
	gap = p.known && !(fresh && off == 1) && (ep != p.ep || off > p.off+1)
	prev = proto.Position{Off: p.off, Ep: p.ep}
	p.off, p.ep, p.known = off, ep, true
	return true, gap, prev, true
}

type ackFrame struct {
	T string       `json:"t"`
	D proto.AckReq `json:"d"`
}

func (s *session) sendAcks(ctx context.Context, mids []string) {
	for len(mids) > 0 {
		n := min(len(mids), proto.MaxAckMids)
		b, err := proto.Marshal(ackFrame{T: proto.TypeAck, D: proto.AckReq{Mids: mids[:n]}})
		if err != nil {
			s.c.log.Error("clientsdk: encode ack", "err", err)
			return
		}
		if err := s.write(ctx, b); err != nil {
			s.c.log.Debug("clientsdk: ack not sent", "err", err)
			return
		}
		s.c.stats.acks.Add(int64(n))
		mids = mids[n:]
	}
}

// ctxDialer dials with a context and closes the connection if the context
// ends before stop is called (gws's handshake takes no context).
type ctxDialer struct {
	ctx    context.Context
	local  net.Addr // Config.LocalAddr
	stopFn func() bool
}

func (d *ctxDialer) Dial(network, addr string) (net.Conn, error) {
	nd := net.Dialer{LocalAddr: d.local}
	conn, err := nd.DialContext(d.ctx, network, addr)
	if err != nil {
		return nil, err
	}
	d.stopFn = context.AfterFunc(d.ctx, func() { _ = conn.Close() })
	return conn, nil
}

// stop reports false if the context already closed the connection.
func (d *ctxDialer) stop() bool {
	if d.stopFn == nil {
		return true
	}
	return d.stopFn()
}
