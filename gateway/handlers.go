package gateway

import (
	"errors"
	"strconv"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

// dispatch decodes one client frame and runs its handler. Every outcome is a
// reply on c's queue (ack has none); nothing here blocks on other connections.
// Only frames that are not JSON (proto.IsMalformed) count as abuse.
func (s *Server) dispatch(c *Conn, b []byte) {
	f, perr := proto.DecodeClientFrame(b)
	if perr != nil {
		if proto.IsMalformed(perr) {
			c.badFrame(f.ID, perr)
		} else {
			c.reply(proto.EncodeErrorReply(f.ID, perr))
		}
		return
	}
	if s.onFrame != nil {
		s.onFrame(f.T)
	}
	var (
		d   any
		err *proto.Error
	)
	switch f.T {
	case proto.TypePing:
		d = map[string]int64{"ts": time.Now().UnixMilli()}
	case proto.TypeJoin:
		if s.roomOpsWait && c.offload(gws.OpcodeText, b) {
			return // may wait on Redis: served on the lane
		}
		d, err = s.join(c, &f)
	case proto.TypeLeave:
		d, err = s.leave(c, &f)
	case proto.TypeChat:
		if s.roomOpsWait && c.offload(gws.OpcodeText, b) {
			return
		}
		d, err = s.chatMsg(c, &f)
	case proto.TypeGift:
		var r gift.Req
		if err = decodeValid(&f, &r); err == nil {
			inRoom := s.router.IsMember(r.RoomID, c)
			id, user, start := f.ID, c.ident.UserID, time.Now()
			if !c.begin() {
				return
			}
			s.gifts.SendAsync(user, inRoom, r, func(rep gift.Reply, err *proto.Error) {
				defer c.end()
				// Timed before the reply is queued: a client that has its
				// answer finds it counted.
				s.metrics.giftSeconds.Observe(time.Since(start).Seconds())
				if err != nil {
					c.reply(proto.EncodeErrorReply(id, err))
				} else {
					c.reply(proto.EncodeReply(id, proto.CodeOK, "ok", rep))
				}
			})
			return
		}
	case proto.TypeGrab:
		var r proto.GrabReq
		if err = decodeValid(&f, &r); err == nil {
			if s.grabWaits != nil && s.grabWaits(r.Code) && c.offload(gws.OpcodeText, b) {
				return // may wait on Redis: served on the lane
			}
			id := f.ID
			if !c.begin() {
				return
			}
			reply := func(rep any, err *proto.Error) {
				defer c.end()
				if err != nil {
					c.reply(proto.EncodeErrorReply(id, err))
				} else {
					c.reply(proto.EncodeReply(id, proto.CodeOK, "ok", rep))
				}
			}
			if s.grab != nil {
				s.grab(c.ident.UserID, r.Code, reply)
			} else {
				s.rp.GrabAsync(c.ident.UserID, r.Code, func(rep redpacket.GrabReply, err *proto.Error) { reply(rep, err) })
			}
			return
		}
	case proto.TypeRefresh:
		var r proto.RefreshReq
		if err = decodeValid(&f, &r); err == nil {
			d, err = s.refresh(c, r.Token)
			s.metrics.refreshes.WithLabelValues(refreshOutcome(err)).Inc()
		}
	case proto.TypeAck:
		var r proto.AckReq
		if err = decodeValid(&f, &r); err == nil {
			c.acked(r.Mids)
			return
		}
	default:
		err = proto.BadRequest("unknown type %q", truncate(f.T, 32))
	}
	if err != nil {
		// A well-formed frame that fails validation (a missing, mistyped or
		// out-of-range field, an unknown type) is an ordinary mistake: it
		// is answered and does not count towards the abuse limit.
		c.reply(proto.EncodeErrorReply(f.ID, err))
		return
	}
	c.reply(proto.EncodeReply(f.ID, proto.CodeOK, "ok", d))
}

// refresh hands c a new token (extension): the same user's and role's,
// verified as at the upgrade. c then lives until the new token's exp — later
// or earlier than the one it had. A connection whose token already ended
// is not revived: it is closed 4501 at the next sweep.
//
// The swap is atomic with the sweep's (expireConn): a refresh either lands
// before the sweep looks — and the connection lives on — or finds it
// expired and is refused; never answered OK and then closed 4501.
func (s *Server) refresh(c *Conn, tok string) (any, *proto.Error) {
	ident, err := s.auth.Verify(tok)
	if err != nil {
		return nil, proto.Errorf(proto.CodeUnauthenticated, "token refused")
	}
	if ident.UserID != c.ident.UserID || ident.Role != c.ident.Role {
		return nil, proto.Errorf(proto.CodeForbidden, "the token is not for this connection's user and role")
	}
	for {
		old := c.expires.Load()
		if old <= time.Now().UnixNano() {
			return nil, errConnTokenEnded
		}
		if c.expires.CompareAndSwap(old, ident.Expires.UnixNano()) {
			return proto.RefreshReply{ExpiresInMS: max(1, time.Until(ident.Expires).Milliseconds())}, nil
		}
	}
}

var errConnTokenEnded = proto.Errorf(proto.CodeUnauthenticated, "the connection's token has expired")

// refreshOutcome is a refresh's label in liveedge_token_refreshes_total.
func refreshOutcome(err *proto.Error) string {
	switch {
	case err == nil:
		return "ok"
	case err.Code == proto.CodeForbidden:
		return "forbidden"
	}
	return "refused"
}

type validator interface{ Validate() *proto.Error }

func decodeValid(f *proto.ClientFrame, v validator) *proto.Error {
	if err := f.DecodeData(v); err != nil {
		return err
	}
	return v.Validate()
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

type joinReply struct {
	RoomID    int64  `json:"room_id"`
	Online    int    `json:"online"`
	Off       int64  `json:"off"`
	Ep        string `json:"ep"`
	Recovered *bool  `json:"recovered,omitempty"` // only for a join with since
}

// JoinsPerSecond and JoinBurst bound a connection's joins (10429 beyond):
// each may read a room's history (Redis in a cluster) and subscribe the node
// to the room — a join loop was a free amplifier. Per connection, not per
// user: the burst (at least twice ws.max_rooms_per_conn) covers a
// reconnect's re-joins on every one of a user's connections at once.
const (
	JoinsPerSecond = 10
	JoinBurst      = 32
)

func (s *Server) join(c *Conn, f *proto.ClientFrame) (any, *proto.Error) {
	var r proto.RoomReq
	if err := decodeValid(f, &r); err != nil {
		return nil, err
	}
	if !s.joins.Allow(c.id) {
		return nil, proto.Errorf(proto.CodeRateLimited, "too many joins, at most %d a second", JoinsPerSecond)
	}
	j, err := s.router.JoinAt(r.RoomID, c, r.Since)
	if errors.Is(err, router.ErrNoRoom) && s.roomOpen != nil {
		switch open, oerr := s.roomOpen(r.RoomID); {
		case oerr != nil:
			s.log.Warn("join: room not read", "room", r.RoomID, "err", oerr)
			return nil, errUnavailable // Redis could not say: not "no such room"
		case open:
			j, err = s.router.JoinAt(r.RoomID, c, r.Since) // opened through another node just now
		}
	}
	switch {
	case errors.Is(err, router.ErrNoRoom):
		return nil, proto.Errorf(proto.CodeNotFound, "room not found or closed")
	case errors.Is(err, router.ErrTooManyRooms):
		return nil, proto.Errorf(proto.CodeConflict, "joined too many rooms")
	case errors.Is(err, router.ErrUnavailable):
		return nil, errUnavailable
	case err != nil:
		return nil, s.internal("join", err, "room", r.RoomID)
	}
	rep := joinReply{RoomID: r.RoomID, Online: j.Online, Off: j.Off, Ep: j.Ep}
	if r.Since != nil {
		rep.Recovered = &j.Recovered
	}
	return rep, nil
}

func (s *Server) leave(c *Conn, f *proto.ClientFrame) (any, *proto.Error) {
	var r proto.RoomReq
	if err := decodeValid(f, &r); err != nil {
		return nil, err
	}
	s.router.Leave(r.RoomID, c)
	return nil, nil
}

// chatPeekFactor: a user's chats with a req_id are looked up (peek) at most
// this many times the chat rate; beyond it they are refused (10429) without
// a lookup.
const chatPeekFactor = 4

type chatReply struct {
	Mid string `json:"mid"`
}

func (s *Server) chatMsg(c *Conn, f *proto.ClientFrame) (any, *proto.Error) {
	var r proto.ChatReq
	if err := decodeValid(f, &r); err != nil {
		return nil, err
	}
	if !s.router.IsMember(r.RoomID, c) {
		if s.roomKnownClosed != nil && s.roomKnownClosed(r.RoomID) {
			return nil, proto.Errorf(proto.CodeNotFound, "room closed or unknown")
		}
		return nil, proto.Errorf(proto.CodeForbidden, "not in room")
	}
	// A req_id's chat sent already is answered before the rate limit (its
	// retry takes no token) by a read that changes nothing; only a chat the
	// limit lets through claims its req_id (a refused one costs no write).
	if r.ReqID != "" {
		if !s.chatPeeks.Allow(uint64(c.ident.UserID)) {
			// Retries are few; a flood of fresh req_ids would otherwise
			// cost a Redis read each (in a cluster) however many the chat
			// limit then refuses.
			return nil, proto.ErrRateLimited
		}
		if mid, perr := s.chatOnce.peek(c.ident.UserID, r.ReqID); perr != nil || mid != "" {
			if perr != nil {
				return nil, perr
			}
			return chatReply{Mid: mid}, nil // sent already: its retry
		}
	}
	// In a cluster, across the nodes too (a user may hold connections on
	// several): one Redis call, beside the sequencer's that the chat makes
	// anyway; Redis not answering is "retry", as the chat itself would be
	// (and spends none of the user's rate).
	spent, perr := limit.Take(s.chat, s.chatShared, uint64(c.ident.UserID), proto.ErrRateLimited, s.log)
	if perr != nil {
		return nil, perr
	}
	d, merr := proto.Marshal(proto.ChatPush{From: c.ident.UserID, Text: r.Text})
	if merr != nil {
		return nil, s.internal("chat encode", merr)
	}
	var settle func(string)
	var by time.Time // the chat is numbered by then or never (a claim's)
	if r.ReqID != "" {
		by = time.Now().Add(chatSendBy(s.chatOnce.inFlight())) // before the claim: its TTL runs from later
		mid, st, perr := s.chatOnce.claim(c.ident.UserID, r.ReqID)
		if perr != nil {
			spent.GiveBack() // nothing sent (Redis did not answer, or 10409): no rate spent
			return nil, perr
		}
		if mid != "" {
			spent.GiveBack() // sent meanwhile, by the first request: this one sent nothing
			return chatReply{Mid: mid}, nil
		}
		settle = st
		if f := s.chatStep.Load(); f != nil {
			(*f)(r.ReqID, false)
		}
	}
	var mid string
	var err error
	push := proto.Push{Biz: proto.BizChat, Data: d}
	if w, ok := s.router.(interface {
		PublishRoomBy(int64, proto.Push, time.Time, func(string)) (string, error)
	}); ok {
		// A cluster numbers the push in Redis first: "sent" only once it
		// is. One answered in doubt settles its claim once its fate is
		// known (late: on the sequencer, which must not wait for Redis
		// here) — its mid kept, so a retry after the claim's TTL is not
		// posted again; never numbered after by, so the claim cannot lapse
		// before a late push goes out.
		var late func(string)
		if settle != nil {
			late = func(mid string) { go settle(mid) }
		}
		mid, err = w.PublishRoomBy(r.RoomID, push, by, late)
	} else {
		mid, err = s.router.PublishRoom(r.RoomID, push)
	}
	if settle != nil {
		if f := s.chatStep.Load(); f != nil {
			(*f)(r.ReqID, true)
		}
		switch {
		case err == nil:
			settle(mid)
		case errors.Is(err, router.ErrNoRoom) || errors.Is(err, router.ErrRoomBusy),
			errors.Is(err, router.ErrUnavailable) && !errors.Is(err, router.ErrUnconfirmed):
			// Never sent (not queued, or given up before the sequencer
			// took it): its retry is sent, at once.
			settle("")
		}
		// Otherwise in doubt (a cluster's sequencer did not answer in time:
		// the push may still go out): the claim stays until late settles it
		// or it expires, retries meanwhile are 10409, so a late push is not
		// doubled.
	}
	switch {
	case errors.Is(err, router.ErrNoRoom):
		return nil, proto.Errorf(proto.CodeNotFound, "room not found or closed")
	case errors.Is(err, router.ErrRoomBusy):
		return nil, proto.Errorf(proto.CodeRateLimited, "room is busy, retry")
	case errors.Is(err, router.ErrUnavailable): // cluster: Redis unreachable, or no answer in time
		s.log.Warn("chat not confirmed", "room", r.RoomID, "err", err)
		switch {
		case !errors.Is(err, router.ErrUnconfirmed):
			return nil, errUnavailable // never sent
		case settle != nil:
			return nil, errChatInDoubt
		}
		return nil, errChatUnconfirmed
	case err != nil:
		return nil, s.internal("chat", err, "room", r.RoomID)
	}
	return chatReply{Mid: mid}, nil
}

// internal logs err with a request id and answers 50000 with that id (PROTOCOL
// §7), never its details.
func (s *Server) internal(what string, err error, kv ...any) *proto.Error {
	id := s.reqID.Add(1)
	s.log.Error("ws request failed: "+what, append([]any{"req_id", id, "err", err}, kv...)...)
	return &proto.Error{Code: proto.CodeInternal, Msg: "internal error (request ws-" + strconv.FormatUint(id, 10) + ")"}
}

// errChatInDoubt answers a chat with a req_id whose push the cluster did not
// confirm in time: it may still go out; its req_id is held meanwhile.
var errChatInDoubt = proto.Errorf(proto.CodeInternal, "the chat was not confirmed in time and may still be sent; retry with the same req_id")

// errChatUnconfirmed answers a chat without a req_id whose push the
// cluster took but did not confirm in time: it may still go out (a retry
// may post it twice: a req_id makes retries safe).
var errChatUnconfirmed = proto.Errorf(proto.CodeInternal, "the chat was not confirmed in time and may still be sent (a req_id makes a retry safe)")

// errUnavailable: a shared dependency (Redis, NATS) is unreachable; nothing
// was done and the client may retry.
var errUnavailable = proto.Errorf(proto.CodeInternal, "temporarily unavailable, retry")
