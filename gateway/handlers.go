package gateway

import (
	"errors"
	"time"

	"github.com/liveedge/liveedge/edge/gift"
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
	var (
		d   any
		err *proto.Error
	)
	switch f.T {
	case proto.TypePing:
		d = map[string]int64{"ts": time.Now().UnixMilli()}
	case proto.TypeJoin:
		d, err = s.join(c, &f)
	case proto.TypeLeave:
		d, err = s.leave(c, &f)
	case proto.TypeChat:
		d, err = s.chatMsg(c, &f)
	case proto.TypeGift:
		var r gift.Req
		if err = decodeValid(&f, &r); err == nil {
			inRoom := s.router.IsMember(r.RoomID, c)
			id, user, start := f.ID, c.ident.UserID, time.Now()
			c.begin()
			s.gifts.SendAsync(user, inRoom, r, func(rep gift.Reply, err *proto.Error) {
				defer c.end()
				if err != nil {
					c.reply(proto.EncodeErrorReply(id, err))
				} else {
					c.reply(proto.EncodeReply(id, proto.CodeOK, "ok", rep))
				}
				s.metrics.giftSeconds.Observe(time.Since(start).Seconds())
			})
			return
		}
	case proto.TypeGrab:
		var r proto.GrabReq
		if err = decodeValid(&f, &r); err == nil {
			id := f.ID
			c.begin()
			s.rp.GrabAsync(c.ident.UserID, r.Code, func(rep redpacket.GrabReply, err *proto.Error) {
				defer c.end()
				if err != nil {
					c.reply(proto.EncodeErrorReply(id, err))
				} else {
					c.reply(proto.EncodeReply(id, proto.CodeOK, "ok", rep))
				}
			})
			return
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
	RoomID int64 `json:"room_id"`
	Online int   `json:"online"`
}

func (s *Server) join(c *Conn, f *proto.ClientFrame) (any, *proto.Error) {
	var r proto.RoomReq
	if err := decodeValid(f, &r); err != nil {
		return nil, err
	}
	n, err := s.router.Join(r.RoomID, c)
	switch {
	case errors.Is(err, router.ErrNoRoom):
		return nil, proto.Errorf(proto.CodeNotFound, "room not found or closed")
	case errors.Is(err, router.ErrTooManyRooms):
		return nil, proto.Errorf(proto.CodeConflict, "joined too many rooms")
	case err != nil:
		s.log.Error("join", "room", r.RoomID, "err", err)
		return nil, proto.ErrInternal
	}
	return joinReply{RoomID: r.RoomID, Online: n}, nil
}

func (s *Server) leave(c *Conn, f *proto.ClientFrame) (any, *proto.Error) {
	var r proto.RoomReq
	if err := decodeValid(f, &r); err != nil {
		return nil, err
	}
	s.router.Leave(r.RoomID, c)
	return nil, nil
}

type chatReply struct {
	Mid string `json:"mid"`
}

func (s *Server) chatMsg(c *Conn, f *proto.ClientFrame) (any, *proto.Error) {
	var r proto.ChatReq
	if err := decodeValid(f, &r); err != nil {
		return nil, err
	}
	if !s.router.IsMember(r.RoomID, c) {
		return nil, proto.Errorf(proto.CodeForbidden, "not in room")
	}
	if !s.chat.Allow(uint64(c.ident.UserID)) {
		return nil, proto.ErrRateLimited
	}
	d, merr := proto.Marshal(proto.ChatPush{From: c.ident.UserID, Text: r.Text})
	if merr != nil {
		return nil, proto.ErrInternal
	}
	mid, err := s.router.PublishRoom(r.RoomID, proto.Push{Biz: proto.BizChat, Data: d})
	switch {
	case errors.Is(err, router.ErrNoRoom):
		return nil, proto.Errorf(proto.CodeNotFound, "room not found or closed")
	case errors.Is(err, router.ErrRoomBusy):
		return nil, proto.Errorf(proto.CodeRateLimited, "room is busy, retry")
	case err != nil:
		return nil, proto.ErrInternal
	}
	return chatReply{Mid: mid}, nil
}
